//! Runtime-dispatched SIMD: one generic kernel body, three instruction sets.
//!
//! Kernels are written once against the [`Simd`] trait and implement [`Kernel`]. The entry
//! point [`dispatch`] picks the instruction set once, at run time, and calls the kernel
//! inside a function compiled with that set's target features; the kernel body and every
//! `Simd` method are `#[inline(always)]`, so they are compiled with those features too.
//! A token of type [`Avx512`] or [`Avx2`] is only ever made after the CPU was checked,
//! which is what makes calling the intrinsics sound.

use crate::dtype::{DType, Element};
use std::fmt;

/// Instruction set used by the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust on `[f32; 8]` arrays (vectorized by the compiler for the baseline target).
    Scalar,
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes; bf16 outputs are rounded by AVX512-BF16's `vcvtneps2bf16` where
    /// the CPU has it (same results: round to nearest even, NaN kept, denormals handled).
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// Whether this CPU can run `self`.
    pub fn is_supported(self) -> bool {
        self <= SimdLevel::detect()
    }

    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            SimdLevel::Scalar => 8,
            SimdLevel::Avx2 => 8,
            SimdLevel::Avx512 => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SimdLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Ok(SimdLevel::Scalar),
            "avx2" => Ok(SimdLevel::Avx2),
            "avx512" | "avx-512" => Ok(SimdLevel::Avx512),
            _ => Err(format!("unknown SIMD level `{s}` (expected scalar, avx2 or avx512)")),
        }
    }
}

/// The operations the kernels need, on vectors of `LANES` f32.
///
/// Loads and stores take slices of at least `LANES` elements (checked); element types are
/// converted in registers.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    const LANES: usize;
    /// Vector registers of the instruction set (for register-blocked kernels).
    const REGS: usize;
    type V: Copy;

    fn splat(self, v: f32) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a * b + c` on one value, rounded as [`Simd::fma`] rounds each lane: the scalar
    /// ends of a vector loop must give the bits its vectors would (a flat pass and a
    /// tiled one, each chosen by where the buffers lie, must agree).
    #[inline(always)]
    fn fma1(self, a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    /// `max(v, 0)`; NaN stays NaN.
    fn relu(self, v: Self::V) -> Self::V;
    /// `v` where `mask_src > 0`, else 0 (the ReLU backward gate).
    fn where_positive(self, mask_src: Self::V, v: Self::V) -> Self::V;
    /// The first `k` lanes of `a`, the rest of `b` (`k <= LANES`).
    fn select_first(self, k: usize, a: Self::V, b: Self::V) -> Self::V;
    /// The last `k` lanes of `a` followed by the first `LANES - k` lanes of `b`
    /// (`0 < k < LANES`): a vector that straddles the end of one run and the start of the
    /// next, from one whole-vector load of each.
    fn splice(self, k: usize, a: Self::V, b: Self::V) -> Self::V;

    fn load_f32(self, src: &[f32]) -> Self::V;
    fn store_f32(self, dst: &mut [f32], v: Self::V);
    fn load_f16(self, src: &[half::f16]) -> Self::V;
    fn store_f16(self, dst: &mut [half::f16], v: Self::V);
    fn load_bf16(self, src: &[half::bf16]) -> Self::V;
    fn store_bf16(self, dst: &mut [half::bf16], v: Self::V);
    /// Non-temporal stores (written around the caches). `dst` must start on a multiple of
    /// the vector's byte width (`LANES * size_of::<T>()`; checked). Use [`put`](Simd::put).
    fn stream_f32(self, dst: &mut [f32], v: Self::V);
    fn stream_f16(self, dst: &mut [half::f16], v: Self::V);
    fn stream_bf16(self, dst: &mut [half::bf16], v: Self::V);
    /// Order the non-temporal stores of this thread before its later stores (`sfence`):
    /// a kernel that streamed calls it before it returns, so the thread that joins it reads
    /// the data.
    fn fence(self);

    /// Hint that the cache line holding `src[i]` will be read soon (into L1). Only a hint:
    /// nothing is read, and an index past the end of `src` is ignored.
    #[inline(always)]
    fn prefetch<T>(self, src: &[T], i: usize) {
        if i < src.len() {
            prefetch_line(src[i..].as_ptr());
        }
    }

    /// Load `LANES` elements of any activation type, widened to f32.
    #[inline(always)]
    fn load<T: Element>(self, src: &[T]) -> Self::V {
        match T::DTYPE {
            DType::F32 => self.load_f32(cast_slice(src)),
            DType::F16 => self.load_f16(cast_slice(src)),
            DType::BF16 => self.load_bf16(cast_slice(src)),
        }
    }

    /// Round `LANES` f32 to the activation type and store them.
    #[inline(always)]
    fn store<T: Element>(self, dst: &mut [T], v: Self::V) {
        match T::DTYPE {
            DType::F32 => self.store_f32(cast_slice_mut(dst), v),
            DType::F16 => self.store_f16(cast_slice_mut(dst), v),
            DType::BF16 => self.store_bf16(cast_slice_mut(dst), v),
        }
    }

    /// Store like [`store`](Simd::store), non-temporal when `stream` and `dst` starts on a
    /// multiple of the vector's byte width (the kernels align their vector loops so that it
    /// does), a plain store otherwise.
    #[inline(always)]
    fn put<T: Element>(self, dst: &mut [T], v: Self::V, stream: bool) {
        if !stream || !(dst.as_ptr() as usize).is_multiple_of(Self::LANES * std::mem::size_of::<T>()) {
            return self.store(dst, v);
        }
        match T::DTYPE {
            DType::F32 => self.stream_f32(cast_slice_mut(dst), v),
            DType::F16 => self.stream_f16(cast_slice_mut(dst), v),
            DType::BF16 => self.stream_bf16(cast_slice_mut(dst), v),
        }
    }

    /// Store like [`put`](Simd::put) but with the conversion's fast path only, noting in
    /// `seen` (start from [`fast_seen`](Simd::fast_seen)) what
    /// [`fast_put_wrong`](Simd::fast_put_wrong) needs to tell whether some stored value is
    /// wrong and must be stored again with `put`. Only AVX512-BF16's conversion has such
    /// values (f32 denormals, which it reads as zero); a kernel notes many vectors and
    /// tests once, instead of a test and branch per vector in `put`.
    #[inline(always)]
    fn put_fast<T: Element>(self, dst: &mut [T], v: Self::V, stream: bool, seen: &mut Self::V) {
        let _ = seen;
        self.put(dst, v, stream);
    }

    /// The starting `seen` of [`put_fast`](Simd::put_fast).
    #[inline(always)]
    fn fast_seen(self) -> Self::V {
        self.splat(f32::from_bits(u32::MAX))
    }

    /// Whether a [`put_fast`](Simd::put_fast) that noted `seen` stored a wrong value.
    #[inline(always)]
    fn fast_put_wrong(self, seen: Self::V) -> bool {
        let _ = seen;
        false
    }

    /// The lanes as an array (only the first `LANES` entries are meaningful).
    #[inline(always)]
    fn to_array(self, v: Self::V) -> [f32; 16] {
        let mut a = [0.0f32; 16];
        self.store_f32(&mut a[..Self::LANES], v);
        a
    }
}

/// `prefetcht0` of the line holding `p` (x86_64; nothing elsewhere).
#[inline(always)]
fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing into the program (SSE, part of
    // x86_64); `p` points into a live slice (checked by the caller).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Reinterpret a slice of one element type as another of the same type (checked by DType).
#[inline(always)]
fn cast_slice<T: Element, U: Element>(s: &[T]) -> &[U] {
    assert!(T::DTYPE == U::DTYPE);
    // SAFETY: T and U are the same type (the sealed Element types have distinct DTYPEs),
    // so the pointer, length and lifetime are valid for U.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const U, s.len()) }
}

#[inline(always)]
fn cast_slice_mut<T: Element, U: Element>(s: &mut [T]) -> &mut [U] {
    assert!(T::DTYPE == U::DTYPE);
    // SAFETY: as in `cast_slice`; the unique borrow is moved into the result.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut U, s.len()) }
}

/// A kernel body generic over the instruction set.
pub(crate) trait Kernel {
    type Output;
    fn run<S: Simd>(self, s: S) -> Self::Output;
}

/// Run `k` with the instruction set `level`. The caller guarantees `level.is_supported()`
/// (checked when the CPU device is built); an unsupported level falls back to scalar.
#[inline]
pub(crate) fn dispatch<K: Kernel>(level: SimdLevel, k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        match level {
            SimdLevel::Avx512 if x86::avx512_bf16_ok() => {
                // SAFETY: the CPU supports AVX-512F/BF16/BW/VL/DQ, AVX2, FMA and F16C
                // (checked above).
                return unsafe { x86::run_avx512_bf16(k) };
            }
            SimdLevel::Avx512 if x86::avx512_ok() => {
                // SAFETY: the CPU supports AVX-512F, AVX2, FMA and F16C (checked above).
                return unsafe { x86::run_avx512(k) };
            }
            SimdLevel::Avx2 if x86::avx2_ok() => {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
                return unsafe { x86::run_avx2(k) };
            }
            _ => {}
        }
    }
    let _ = level;
    k.run(Scalar)
}

/// Portable fallback: 8 lanes in an array.
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 8;
    const REGS: usize = 16;
    type V = [f32; 8];

    #[inline(always)]
    fn splat(self, v: f32) -> Self::V {
        [v; 8]
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // mul_add without hardware FMA is a libm call; a*b+c rounds twice but stays within
        // the f32 contract (the scalar level is the fallback, not the fast path).
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn fma1(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    fn relu(self, v: Self::V) -> Self::V {
        std::array::from_fn(|i| if v[i] < 0.0 { 0.0 } else { v[i] })
    }
    #[inline(always)]
    fn where_positive(self, m: Self::V, v: Self::V) -> Self::V {
        std::array::from_fn(|i| if m[i] > 0.0 { v[i] } else { 0.0 })
    }
    #[inline(always)]
    fn select_first(self, k: usize, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if i < k { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn splice(self, k: usize, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if i < k { a[8 - k + i] } else { b[i - k] })
    }
    #[inline(always)]
    fn load_f32(self, src: &[f32]) -> Self::V {
        src[..8].try_into().unwrap()
    }
    #[inline(always)]
    fn store_f32(self, dst: &mut [f32], v: Self::V) {
        dst[..8].copy_from_slice(&v)
    }
    #[inline(always)]
    fn load_f16(self, src: &[half::f16]) -> Self::V {
        let s = &src[..8];
        std::array::from_fn(|i| s[i].to_f32())
    }
    #[inline(always)]
    fn store_f16(self, dst: &mut [half::f16], v: Self::V) {
        let d = &mut dst[..8];
        for i in 0..8 {
            d[i] = half::f16::from_f32(v[i]);
        }
    }
    #[inline(always)]
    fn load_bf16(self, src: &[half::bf16]) -> Self::V {
        let s = &src[..8];
        std::array::from_fn(|i| s[i].to_f32())
    }
    #[inline(always)]
    fn store_bf16(self, dst: &mut [half::bf16], v: Self::V) {
        let d = &mut dst[..8];
        for i in 0..8 {
            d[i] = half::bf16::from_f32(v[i]);
        }
    }
    // no portable non-temporal store: plain stores
    #[inline(always)]
    fn stream_f32(self, dst: &mut [f32], v: Self::V) {
        self.store_f32(dst, v)
    }
    #[inline(always)]
    fn stream_f16(self, dst: &mut [half::f16], v: Self::V) {
        self.store_f16(dst, v)
    }
    #[inline(always)]
    fn stream_bf16(self, dst: &mut [half::bf16], v: Self::V) {
        self.store_bf16(dst, v)
    }
    #[inline(always)]
    fn fence(self) {}
}

#[cfg(target_arch = "x86_64")]
#[allow(unused_imports)]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{DType, Element, Kernel, Simd};
    use std::arch::x86_64::*;

    pub(super) fn avx512_ok() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// AVX-512 plus the BF16 conversion (and the BW/VL/DQ parts its path uses), checked
    /// once per process.
    pub(super) fn avx512_bf16_ok() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            avx512_ok()
                && is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
        })
    }

    pub(super) fn avx2_ok() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
        k.run(Avx512::<false>(()))
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c,avx512bf16,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn run_avx512_bf16<K: Kernel>(k: K) -> K::Output {
        k.run(Avx512::<true>(()))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
        k.run(Avx2(()))
    }

    /// Proof that the CPU has AVX-512F (+AVX2, FMA, F16C), and with `BF16` also
    /// AVX512-BF16/BW/VL/DQ. Only `run_avx512` (`BF16 = false`) and `run_avx512_bf16` make
    /// one. The two differ only in `store_bf16`.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512<const BF16: bool>(());

    /// Proof that the CPU has AVX2, FMA and F16C. Only `run_avx2` makes one.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(());

    // SAFETY (for every `unsafe` block in the two impls below): a value of `Avx512`/`Avx2`
    // exists only inside `run_avx512`/`run_avx512_bf16`/`run_avx2`, which `dispatch` calls after checking
    // the CPU features those intrinsics need; every pointer access is preceded by a
    // bounds check of the slice against LANES.
    impl<const BF16: bool> Simd for Avx512<BF16> {
        const LANES: usize = 16;
        const REGS: usize = 32;
        type V = __m512;

        #[inline(always)]
        fn splat(self, v: f32) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn relu(self, v: __m512) -> __m512 {
            // max(0, v) returns the second operand when v is NaN, so NaN propagates.
            // SAFETY: see the impl comment.
            unsafe { _mm512_max_ps(_mm512_setzero_ps(), v) }
        }
        #[inline(always)]
        fn where_positive(self, m: __m512, v: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe {
                let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_setzero_ps());
                _mm512_maskz_mov_ps(k, v)
            }
        }
        #[inline(always)]
        fn select_first(self, k: usize, a: __m512, b: __m512) -> __m512 {
            let mask = ((1u32 << k.min(16)) - 1) as __mmask16;
            // SAFETY: see the impl comment.
            unsafe { _mm512_mask_blend_ps(mask, b, a) }
        }
        #[inline(always)]
        fn splice(self, k: usize, a: __m512, b: __m512) -> __m512 {
            // lane i takes index i + 16 - k of the pair (a, b): a[16 - k + i] for i < k,
            // b[i - k] after (indices 16..31 name b's lanes)
            // SAFETY: see the impl comment.
            unsafe {
                let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let idx = _mm512_add_epi32(lane, _mm512_set1_epi32(16 - k as i32));
                _mm512_permutex2var_ps(a, idx, b)
            }
        }
        #[inline(always)]
        fn load_f32(self, src: &[f32]) -> __m512 {
            assert!(src.len() >= 16);
            // SAFETY: 16 f32 are readable (checked); see the impl comment.
            unsafe { _mm512_loadu_ps(src.as_ptr()) }
        }
        #[inline(always)]
        fn store_f32(self, dst: &mut [f32], v: __m512) {
            assert!(dst.len() >= 16);
            // SAFETY: 16 f32 are writable (checked); see the impl comment.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_f16(self, src: &[half::f16]) -> __m512 {
            assert!(src.len() >= 16);
            // SAFETY: 32 bytes are readable (checked); see the impl comment.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr() as *const __m256i)) }
        }
        #[inline(always)]
        fn store_f16(self, dst: &mut [half::f16], v: __m512) {
            assert!(dst.len() >= 16);
            // SAFETY: 32 bytes are writable (checked); see the impl comment.
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, self.pack_f16(v)) }
        }
        #[inline(always)]
        fn load_bf16(self, src: &[half::bf16]) -> __m512 {
            assert!(src.len() >= 16);
            // SAFETY: 32 bytes are readable (checked); see the impl comment.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr() as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        fn store_bf16(self, dst: &mut [half::bf16], v: __m512) {
            assert!(dst.len() >= 16);
            // SAFETY: 32 bytes are writable (checked); see the impl comment.
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, self.pack_bf16(v)) }
        }
        #[inline(always)]
        fn stream_f32(self, dst: &mut [f32], v: __m512) {
            assert!(dst.len() >= 16 && (dst.as_ptr() as usize).is_multiple_of(64));
            // SAFETY: 64 bytes are writable and 64-byte aligned (checked); see the impl comment.
            unsafe { _mm512_stream_ps(dst.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn stream_f16(self, dst: &mut [half::f16], v: __m512) {
            assert!(dst.len() >= 16 && (dst.as_ptr() as usize).is_multiple_of(32));
            // SAFETY: 32 bytes are writable and 32-byte aligned (checked); see the impl comment.
            unsafe { _mm256_stream_si256(dst.as_mut_ptr() as *mut __m256i, self.pack_f16(v)) }
        }
        #[inline(always)]
        fn stream_bf16(self, dst: &mut [half::bf16], v: __m512) {
            assert!(dst.len() >= 16 && (dst.as_ptr() as usize).is_multiple_of(32));
            // SAFETY: 32 bytes are writable and 32-byte aligned (checked); see the impl comment.
            unsafe { _mm256_stream_si256(dst.as_mut_ptr() as *mut __m256i, self.pack_bf16(v)) }
        }
        #[inline(always)]
        fn fence(self) {
            // SAFETY: SSE is part of x86_64.
            unsafe { _mm_sfence() }
        }
        #[inline(always)]
        fn put_fast<T: Element>(self, dst: &mut [T], v: __m512, stream: bool, seen: &mut __m512) {
            if !(BF16 && T::DTYPE == DType::BF16) {
                self.put(dst, v, stream);
                return;
            }
            assert!(dst.len() >= 16);
            let d = dst.as_mut_ptr() as *mut __m256i;
            // SAFETY: `Avx512<true>` exists only where the CPU has AVX512-BF16 (see the impl
            // comment); 32 bytes from `d` are writable (checked), 32-byte aligned where
            // streamed (tested).
            unsafe {
                let p = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                if stream && (d as usize).is_multiple_of(32) {
                    _mm256_stream_si256(d, p)
                } else {
                    _mm256_storeu_si256(d, p)
                }
                // the bits without the sign, less one, as unsigned: zero wraps to the top,
                // a denormal lies below 0x00ff_ffff, a normal, infinity or NaN at or above;
                // `seen` keeps the lanes' minimum (three integer ops, no mask register and
                // no branch per vector)
                let t = _mm512_sub_epi32(_mm512_slli_epi32::<1>(_mm512_castps_si512(v)), _mm512_set1_epi32(1));
                *seen = _mm512_castsi512_ps(_mm512_min_epu32(_mm512_castps_si512(*seen), t));
            }
        }
        #[inline(always)]
        fn fast_put_wrong(self, seen: __m512) -> bool {
            // SAFETY: AVX-512F (see the impl comment).
            BF16 && unsafe { _mm512_cmplt_epu32_mask(_mm512_castps_si512(seen), _mm512_set1_epi32(0x00ff_ffff)) != 0 }
        }
    }

    impl<const BF16: bool> Avx512<BF16> {
        /// 16 lanes rounded to f16 (nearest even), packed.
        #[inline(always)]
        fn pack_f16(self, v: __m512) -> __m256i {
            // SAFETY: a value of `Avx512` proves AVX-512F (see the impl comment above).
            unsafe { _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v) }
        }

        /// 16 lanes rounded to bf16 (nearest even, NaN kept and quieted), packed.
        #[inline(always)]
        fn pack_bf16(self, v: __m512) -> __m256i {
            if BF16 && !self.bf16_denormal(v) {
                // SAFETY: `Avx512<true>` exists only where the CPU has AVX512-BF16 (see the
                // impl comment above).
                return unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) };
            }
            // SAFETY: a value of `Avx512` proves AVX-512F (see the impl comment above).
            unsafe {
                let bits = _mm512_castps_si512(v);
                let hi = _mm512_srli_epi32::<16>(bits);
                // round to nearest even: add 0x7fff plus the lowest kept bit
                let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
                let rounded =
                    _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
                // NaN: keep the sign and payload's top bits, force quiet
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
                _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
            }
        }

        /// Whether a lane of `v` is an f32 denormal: `vcvtneps2bf16` rounds to nearest
        /// even and quiets NaNs as `half` does (one instruction instead of ten) but reads
        /// denormal inputs as zero, so such vectors take the integer rounding. Only called
        /// when `BF16` (the test needs AVX512-DQ).
        #[inline(always)]
        fn bf16_denormal(self, v: __m512) -> bool {
            debug_assert!(BF16);
            // SAFETY: called only on `Avx512<true>`, which exists only where the CPU has
            // AVX512-DQ.
            unsafe { _mm512_fpclass_ps_mask::<0x20>(v) != 0 }
        }
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        const REGS: usize = 16;
        type V = __m256;

        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn relu(self, v: __m256) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe { _mm256_max_ps(_mm256_setzero_ps(), v) }
        }
        #[inline(always)]
        fn where_positive(self, m: __m256, v: __m256) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_setzero_ps()), v) }
        }
        #[inline(always)]
        fn select_first(self, k: usize, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            unsafe {
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let first = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32), lane);
                _mm256_blendv_ps(b, a, _mm256_castsi256_ps(first))
            }
        }
        #[inline(always)]
        fn splice(self, k: usize, a: __m256, b: __m256) -> __m256 {
            // rotate both by k lanes (a[8 - k + i] and b[i - k] land in lane i), keep the
            // first k lanes of a's rotation
            // SAFETY: see the impl comment above `impl Simd for Avx512`.
            let (ra, rb) = unsafe {
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let idx =
                    _mm256_and_si256(_mm256_add_epi32(lane, _mm256_set1_epi32(8 - k as i32)), _mm256_set1_epi32(7));
                (_mm256_permutevar8x32_ps(a, idx), _mm256_permutevar8x32_ps(b, idx))
            };
            self.select_first(k, ra, rb)
        }
        #[inline(always)]
        fn load_f32(self, src: &[f32]) -> __m256 {
            assert!(src.len() >= 8);
            // SAFETY: 8 f32 are readable (checked); see the impl comment.
            unsafe { _mm256_loadu_ps(src.as_ptr()) }
        }
        #[inline(always)]
        fn store_f32(self, dst: &mut [f32], v: __m256) {
            assert!(dst.len() >= 8);
            // SAFETY: 8 f32 are writable (checked); see the impl comment.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_f16(self, src: &[half::f16]) -> __m256 {
            assert!(src.len() >= 8);
            // SAFETY: 16 bytes are readable (checked); see the impl comment.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr() as *const __m128i)) }
        }
        #[inline(always)]
        fn store_f16(self, dst: &mut [half::f16], v: __m256) {
            assert!(dst.len() >= 8);
            // SAFETY: 16 bytes are writable (checked); see the impl comment.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, self.pack_f16(v)) }
        }
        #[inline(always)]
        fn load_bf16(self, src: &[half::bf16]) -> __m256 {
            assert!(src.len() >= 8);
            // SAFETY: 16 bytes are readable (checked); see the impl comment.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr() as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        fn store_bf16(self, dst: &mut [half::bf16], v: __m256) {
            assert!(dst.len() >= 8);
            // SAFETY: 16 bytes are writable (checked); see the impl comment.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, self.pack_bf16(v)) }
        }
        #[inline(always)]
        fn stream_f32(self, dst: &mut [f32], v: __m256) {
            assert!(dst.len() >= 8 && (dst.as_ptr() as usize).is_multiple_of(32));
            // SAFETY: 32 bytes are writable and 32-byte aligned (checked); see the impl comment.
            unsafe { _mm256_stream_ps(dst.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn stream_f16(self, dst: &mut [half::f16], v: __m256) {
            assert!(dst.len() >= 8 && (dst.as_ptr() as usize).is_multiple_of(16));
            // SAFETY: 16 bytes are writable and 16-byte aligned (checked); see the impl comment.
            unsafe { _mm_stream_si128(dst.as_mut_ptr() as *mut __m128i, self.pack_f16(v)) }
        }
        #[inline(always)]
        fn stream_bf16(self, dst: &mut [half::bf16], v: __m256) {
            assert!(dst.len() >= 8 && (dst.as_ptr() as usize).is_multiple_of(16));
            // SAFETY: 16 bytes are writable and 16-byte aligned (checked); see the impl comment.
            unsafe { _mm_stream_si128(dst.as_mut_ptr() as *mut __m128i, self.pack_bf16(v)) }
        }
        #[inline(always)]
        fn fence(self) {
            // SAFETY: SSE is part of x86_64.
            unsafe { _mm_sfence() }
        }
    }

    impl Avx2 {
        /// 8 lanes rounded to f16 (nearest even), packed.
        #[inline(always)]
        fn pack_f16(self, v: __m256) -> __m128i {
            // SAFETY: a value of `Avx2` proves F16C (see the impl comment above).
            unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v) }
        }

        /// 8 lanes rounded to bf16 (nearest even, NaN kept and quieted), packed.
        #[inline(always)]
        fn pack_bf16(self, v: __m256) -> __m128i {
            // SAFETY: a value of `Avx2` proves AVX2 (see the impl comment above).
            unsafe {
                let bits = _mm256_castps_si256(v);
                let hi = _mm256_srli_epi32::<16>(bits);
                let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
                let rounded =
                    _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
                let r = _mm256_blendv_epi8(rounded, quiet, nan);
                // values are < 2^16, so unsigned saturation keeps them; packus works per
                // 128-bit half, so gather qwords 0 and 2 into the low half.
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
                _mm256_castsi256_si128(packed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    struct RoundTrip<'a> {
        src: &'a [f32],
        f16_out: &'a mut [f16],
        bf16_out: &'a mut [bf16],
        back: &'a mut [f32],
        /// store the conversions with `put(.., stream)`
        stream: bool,
    }

    impl Kernel for RoundTrip<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self, s: S) {
            let l = S::LANES;
            for i in (0..self.src.len()).step_by(l) {
                let v = s.load_f32(&self.src[i..]);
                s.put(&mut self.f16_out[i..], v, self.stream);
                s.put(&mut self.bf16_out[i..], v, self.stream);
                s.fence();
                let w = s.add(s.load(&self.bf16_out[i..]), s.load(&self.f16_out[i..]));
                s.put(&mut self.back[i..], w, self.stream);
            }
        }
    }

    /// `v[..n]` moved up to start on a 64-byte boundary (so that `put` streams).
    fn aligned<T>(v: &mut [T], n: usize) -> &mut [T] {
        let skip = v.as_ptr().align_offset(64);
        &mut v[skip..skip + n]
    }

    /// Every level converts exactly like the `half` crate (round to nearest even, NaN kept),
    /// with plain stores and with streaming ones (outputs aligned so that they stream).
    #[test]
    fn conversions_match_half_on_every_level() {
        let mut src: Vec<f32> =
            (0..4096u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) ^ 0x3f00_0000) * 0.37).collect();
        src[..8].copy_from_slice(&[
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            65520.0,
            -0.0,
            1e-8,
        ]);
        // f32 denormals (the AVX512-BF16 conversion reads them as zero: those vectors must
        // take the integer rounding), alone in a vector and among normal values
        src[32..40].copy_from_slice(&[1e-39, -3e-40, f32::MIN_POSITIVE / 2.0, 1.0, -2.5, 7e-45, 1e-40, 3.0]);
        src[48] = -1.1e-38;
        // every level, and on AVX-512 both variants (with and without the BF16 conversion)
        let mut runs: Vec<(String, SimdLevel, bool)> = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .map(|l| (l.to_string(), l, false))
            .collect();
        #[cfg(target_arch = "x86_64")]
        if x86::avx512_ok() {
            runs.push(("avx512 without bf16".into(), SimdLevel::Avx512, true));
        }
        for ((level_name, lvl, plain), stream) in runs.into_iter().flat_map(|r| [(r.clone(), false), (r, true)]) {
            if !lvl.is_supported() {
                continue;
            }
            let level = format!("{level_name}{}", if stream { " streaming" } else { "" });
            let n = src.len();
            let (mut h_buf, mut b_buf, mut back_buf) =
                (vec![f16::ZERO; n + 64], vec![bf16::ZERO; n + 64], vec![0f32; n + 64]);
            let (h, b, back) = (aligned(&mut h_buf, n), aligned(&mut b_buf, n), aligned(&mut back_buf, n));
            let k = RoundTrip { src: &src, f16_out: &mut *h, bf16_out: &mut *b, back: &mut *back, stream };
            if plain {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F, AVX2, FMA and F16C are present (checked above).
                unsafe {
                    x86::run_avx512(k)
                };
            } else {
                dispatch(lvl, k);
            }
            for i in 0..n {
                let eh = f16::from_f32(src[i]);
                let eb = bf16::from_f32(src[i]);
                if src[i].is_nan() {
                    assert!(h[i].is_nan() && b[i].is_nan(), "{level} NaN at {i}");
                    continue;
                }
                assert_eq!(h[i].to_bits(), eh.to_bits(), "{level} f16 of {}", src[i]);
                assert_eq!(b[i].to_bits(), eb.to_bits(), "{level} bf16 of {}", src[i]);
                let sum = eh.to_f32() + eb.to_f32();
                assert!(back[i] == sum || (back[i].is_nan() && sum.is_nan()), "{level} load at {i}");
            }
        }
    }

    struct Splices<'a> {
        out: &'a mut Vec<(usize, Vec<f32>)>,
    }

    impl Kernel for Splices<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self, s: S) {
            let l = S::LANES;
            let a: Vec<f32> = (0..l).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..l).map(|i| 100.0 + i as f32).collect();
            for k in 1..l {
                let v = s.splice(k, s.load_f32(&a), s.load_f32(&b));
                self.out.push((k, s.to_array(v)[..l].to_vec()));
            }
        }
    }

    /// `splice(k, a, b)` is the last k lanes of a, then the first LANES - k of b.
    #[test]
    fn splice_joins_the_end_of_one_vector_to_the_start_of_the_next() {
        for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
            if !level.is_supported() {
                continue;
            }
            let mut out = Vec::new();
            dispatch(level, Splices { out: &mut out });
            let l = level.lanes();
            assert_eq!(out.len(), l - 1, "{level}");
            for (k, v) in out {
                let want: Vec<f32> =
                    (0..l).map(|i| if i < k { (l - k + i) as f32 } else { 100.0 + (i - k) as f32 }).collect();
                assert_eq!(v, want, "{level} k = {k}");
            }
        }
    }
}
