// bnorm device code shared by every kernel family: the argument block, flags, element
// types with f32 conversions, 16-byte vector I/O, index helpers and the strided loop.
//
// Everything here is header-only and __forceinline__, so the argument block (a kernel
// parameter) is read straight from the parameter space and never copied to local memory.
//
// No CUDA header beyond what nvcc includes by itself is used: the f16 / bf16 conversions
// are written out (PTX cvt for f16, round-to-nearest-even bit arithmetic for bf16, which has
// no cvt instruction before sm_80), so one compute_75 PTX serves every architecture.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Every kernel runs with 256 threads per block: 1-D for channels-first, 2-D
// (channels x rows, bdx * bdy == 256) for channels-last. The host (src/cuda/launch.rs)
// mirrors these constants; a unit test there reads them from this file.
#define BN_THREADS 256
#define BN_WARPS (BN_THREADS / 32)

// Unrolling: how many vectors (of V elements) a thread loads before it uses them.
// Reductions keep 16 lanes (accumulators) per thread: U = 16 / V (f32 float4: 4, 8 halves:
// 2, channels-last 4-element vectors: 4), 8 on the scalar path. Elementwise passes keep
// 8 elements per tensor in flight: U = 8 / V (at least 1), 4 on the scalar path.
// The host (src/cuda/launch.rs) mirrors these numbers; a unit test there reads this file.
#define BN_REDUCE_LANES 16
#define BN_REDUCE_UNROLL_SCALAR 8
#define BN_EW_ELEMS 8
#define BN_EW_UNROLL_SCALAR 4
// Groups per loop iteration of the channels-last forward statistics (strided's G). 1 by
// default; 2 is an experiment for the next GPU run (BNORM_NVCC_FLAGS=
// -DBN_STATS_ROWS_GROUPS=2, ci/gpu-bundle.sh's variant): 8 loads in flight instead of 4,
// 124 registers instead of 102 on sm_90, no spills; not measured yet (docs/perf-notes.md).
// The backward's sums, with two tensors per group, spill at 2.
#ifndef BN_STATS_ROWS_GROUPS
#define BN_STATS_ROWS_GROUPS 1
#endif
template <int V>
struct Unroll {
  static constexpr int value = V == 1 ? BN_REDUCE_UNROLL_SCALAR : BN_REDUCE_LANES / V;
};
template <int V>
struct EwUnroll {
  static constexpr int value = V == 1 ? BN_EW_UNROLL_SCALAR : (BN_EW_ELEMS / V > 0 ? BN_EW_ELEMS / V : 1);
};

// Vector widths (elements). Channels-first kernels use 16-byte vectors (4 f32, 8 halves);
// channels-last kernels 4 elements (16 bytes of f32, 8 of f16/bf16): a thread owns V
// channels there, and 8 channels of per-channel state per thread would cost too many
// registers. The flag BN_F_VEC selects the vector path; else V = 1.
template <class E>
struct VecCF {
  static constexpr int value = 16 / (int)sizeof(typename E::T);
};
#define BN_VEC_CL 4

// ---------------------------------------------------------------- flags (BnArgs::flags)
#define BN_F_VEC 1u           // 16-byte vectors (host checked alignment and divisibility)
#define BN_F_RELU 2u          // fused ReLU (forward: y = max(., 0); backward: gate y > 0)
#define BN_F_ADD 4u           // fused residual add (forward reads z)
#define BN_F_FUSED 8u         // reduction and elementwise pass in one launch (one block per channel/tile)
#define BN_F_UNBIASED 16u     // running_var takes the unbiased batch variance
#define BN_F_TRAINING 32u     // backward with saved batch statistics (else eval: running stats)
#define BN_F_FROM_RUNNING 64u // elementwise kernels derive per-channel params from running stats

// ---------------------------------------------------------------- the argument block
// Division by a runtime constant as a multiply-high and a shift (Granlund-Montgomery,
// round-up variant): q = (umulhi(n, magic) + n) >> shift for 0 <= n < 2^(W-1).
// The host computes both magics (src/cuda/launch.rs, DivMod::new, unit-tested).
struct DivMod {
  u64 d;
  u64 magic64;
  u32 magic32;
  u32 shift;
};

// One argument block for every kernel (passed by value; unused pointers are null).
// Layout mirrored by `BnArgs` in src/cuda/launch.rs (a test checks size and offsets).
struct BnArgs {
  const void* x;        // input activations
  const void* z;        // forward: residual (BN_F_ADD)
  void* y;              // forward: output; backward: forward output (ReLU gate, read)
  const void* dy;       // backward: gradient of y
  void* dx;             // backward: gradient of x
  void* dz;             // backward: gradient of the residual (nullable)
  const float* weight;  // nullable: 1
  const float* bias;    // nullable: 0
  float* running_mean;  // forward training: updated (nullable); else read
  float* running_var;   // idem
  float* saved_mean;    // forward: written (nullable); backward training: read
  float* saved_invstd;  // idem
  float* dweight;       // backward: written (nullable)
  float* dbias;         // backward: written (nullable)
  float* params;        // workspace: per-channel params, [4][C]
  float* partials;      // workspace: per-(channel, split) partial results
  u32* counters;        // workspace: per channel (cf) or channel tile (cl); zero between launches
  u64 n;                // batch
  u64 c;                // channels
  u64 s;                // spatial positions per sample (rows = n * s for channels-last)
  u64 numel;            // n * c * s
  DivMod div_inner;     // channels-first: divides a vector index by vectors per plane (S / V)
  DivMod div_c;         // channels-first: divides a plane index by C
  double m;             // values per channel, n * s
  double factor;        // running-statistics weight of this batch (host: batch_weight)
  float eps;
  u32 flags;
  u32 slots;            // persistent kernels: storage slots per thread in shared memory
  u32 pad1;
};
static_assert(sizeof(DivMod) == 24, "DivMod layout");
static_assert(sizeof(BnArgs) == 248, "BnArgs layout (mirrored in src/cuda/launch.rs)");
static_assert(__builtin_offsetof(BnArgs, counters) == 128, "BnArgs layout");
static_assert(__builtin_offsetof(BnArgs, div_inner) == 168, "BnArgs layout");
static_assert(__builtin_offsetof(BnArgs, m) == 216, "BnArgs layout");
static_assert(__builtin_offsetof(BnArgs, eps) == 232, "BnArgs layout");
static_assert(__builtin_offsetof(BnArgs, flags) == 236, "BnArgs layout");

// ---------------------------------------------------------------- index helpers
template <class I>
__device__ __forceinline__ I fast_div(I n, const DivMod& d);

template <>
__device__ __forceinline__ u32 fast_div<u32>(u32 n, const DivMod& d) {
  return (__umulhi(n, d.magic32) + n) >> d.shift;
}

template <>
__device__ __forceinline__ u64 fast_div<u64>(u64 n, const DivMod& d) {
  return (__umul64hi(n, d.magic64) + n) >> d.shift;
}

// Visit i = start, start + stride, ... < end: groups of U indices (i, i + stride, ...,
// i + (U-1) * stride) first, so a thread has U independent loads in flight, then the
// leftover indices one by one. No overflow for I = u32: the host only picks 32-bit
// indices when every index and stride is below 2^31.
//
// G > 1 first visits G groups per iteration, written out, so the compiler may issue the
// later groups' loads before the first group's arithmetic (G * U loads in flight where the
// registers allow). (G * U - 1) * stride must fit in I: the channels-last statistics, the
// only caller with G > 1 (BN_STATS_ROWS_GROUPS), stride by splits * bdy < 2^24 rows.
template <int U, int G = 1, class I, class Group, class Single>
__device__ __forceinline__ void strided(I start, I end, I stride, Group group, Single single) {
  I i = start;
  if (G > 1) {
    const I gspan = (I)(G * U - 1) * stride;
    const I glimit = end > gspan ? end - gspan : (I)0;
#pragma unroll 1
    for (; i < glimit; i += (I)(G * U) * stride) {
#pragma unroll
      for (int g = 0; g < G; ++g) group(i + (I)(g * U) * stride);
    }
  }
  const I span = (I)(U - 1) * stride;
  const I limit = end > span ? end - span : (I)0;
  // Unrolled by hand (U); further unrolling by the compiler would only add registers.
#pragma unroll 1
  for (; i < limit; i += (I)U * stride) group(i);
#pragma unroll 1
  for (; i < end; i += stride) single(i);
}

// ---------------------------------------------------------------- element types
struct F32 {
  typedef float T;
  static __device__ __forceinline__ float to_f32(float v) { return v; }
  static __device__ __forceinline__ float from_f32(float v) { return v; }
};

struct F16 {
  typedef u16 T;
#ifndef BN_HOST_EMULATION
  static __device__ __forceinline__ float to_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ u16 from_f32(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
#else  // kernels/emu: the same conversions on the host (_Float16, round to nearest even)
  static float to_f32(u16 v) { return emu_f16_to_f32(v); }
  static u16 from_f32(float f) { return emu_f32_to_f16(f); }
#endif
};

struct BF16 {
  typedef u16 T;
  static __device__ __forceinline__ float to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
  // Round to nearest even; NaN stays a (quiet) NaN with its sign, as half::bf16::from_f32.
  static __device__ __forceinline__ u16 from_f32(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
  }
};

// ---------------------------------------------------------------- vector I/O
// IO<E, V>: V consecutive elements to/from V floats. V == 1 is the scalar path; V == E::VEC
// is one 16-byte access (the host guarantees 16-byte alignment). Loads use the read-only
// path (ld.global.nc): the host rejects outputs that overlap any input.
template <class E, int V>
struct IO;

template <class E>
struct IO<E, 1> {
  static __device__ __forceinline__ void load(const typename E::T* p, float (&v)[1]) {
    v[0] = E::to_f32(__ldg(p));
  }
  static __device__ __forceinline__ void store(typename E::T* p, const float (&v)[1]) {
    *p = E::from_f32(v[0]);
  }
};

template <>
struct IO<F32, 4> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[4]) {
    const float4 r = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = r.x;
    v[1] = r.y;
    v[2] = r.z;
    v[3] = r.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <class E>
struct IO16 {
  static __device__ __forceinline__ void unpack2(u32 w, float& lo, float& hi) {
    lo = E::to_f32((u16)(w & 0xffffu));
    hi = E::to_f32((u16)(w >> 16));
  }
  static __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)E::from_f32(lo) | ((u32)E::from_f32(hi) << 16);
  }
  static __device__ __forceinline__ void load(const u16* p, float (&v)[8]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    unpack2(r.x, v[0], v[1]);
    unpack2(r.y, v[2], v[3]);
    unpack2(r.z, v[4], v[5]);
    unpack2(r.w, v[6], v[7]);
  }
  static __device__ __forceinline__ void store(u16* p, const float (&v)[8]) {
    uint4 r;
    r.x = pack2(v[0], v[1]);
    r.y = pack2(v[2], v[3]);
    r.z = pack2(v[4], v[5]);
    r.w = pack2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = r;
  }
};

// 8-byte vectors of 4 halves (channels-last).
template <class E>
struct IO8 {
  static __device__ __forceinline__ void load(const u16* p, float (&v)[4]) {
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
    IO16<E>::unpack2(r.x, v[0], v[1]);
    IO16<E>::unpack2(r.y, v[2], v[3]);
  }
  static __device__ __forceinline__ void store(u16* p, const float (&v)[4]) {
    uint2 r;
    r.x = IO16<E>::pack2(v[0], v[1]);
    r.y = IO16<E>::pack2(v[2], v[3]);
    *reinterpret_cast<uint2*>(p) = r;
  }
};

template <>
struct IO<F16, 8> : IO16<F16> {};
template <>
struct IO<BF16, 8> : IO16<BF16> {};
template <>
struct IO<F16, 4> : IO8<F16> {};
template <>
struct IO<BF16, 4> : IO8<BF16> {};

// ---------------------------------------------------------------- small helpers
#ifndef BN_HOST_EMULATION
// Spin-wait hint (sm_70+; the PTX targets compute_75): back off while polling a counter.
__device__ __forceinline__ void bn_pause() { asm volatile("nanosleep.u32 64;"); }
#endif

__device__ __forceinline__ u32 ld_volatile(const u32* p) { return *(const volatile u32*)p; }

__device__ __forceinline__ float ldg_or(const float* p, u64 i, float dflt) {
  return p ? __ldg(p + i) : dflt;
}

// ReLU that keeps NaN (as PyTorch and the CPU backend: v < 0 ? 0 : v).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// Per-channel (mean, scale, shift) of inference from the running statistics, in f32:
// scale = w / sqrt(running_var + eps) with IEEE sqrt and division.
__device__ __forceinline__ void params_from_running(const BnArgs& a, u64 c, float& mean, float& scale,
                                                    float& shift) {
  mean = __ldg(a.running_mean + c);
  const float inv = 1.0f / sqrtf(__ldg(a.running_var + c) + a.eps);
  scale = ldg_or(a.weight, c, 1.f) * inv;
  shift = ldg_or(a.bias, c, 0.f);
}

// Channels-last tiling shared by every 2-D kernel: a block is bdx x bdy threads, thread
// (tx, ty) owns channels [tile * bdx * V + tx * V, + V) and visits rows ty + k * bdy.
struct Tile2D {
  u32 bdx, bdy, tx, ty, tid;
  __device__ __forceinline__ Tile2D()
      : bdx(blockDim.x), bdy(blockDim.y), tx(threadIdx.x), ty(threadIdx.y),
        tid(threadIdx.y * blockDim.x + threadIdx.x) {}
};

// Dynamic shared memory of the channels-last reduction kernels (sized by the host).
#ifndef BN_DYNAMIC_SMEM
#define BN_DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

// Reduction kernels may use up to 128 registers (2 blocks of 256 per SM: 512 threads with
// 64 bytes of loads in flight each); elementwise kernels up to 64 (4 blocks per SM).
#define BN_REDUCE_KERNEL extern "C" __global__ void __launch_bounds__(BN_THREADS, 2)
#define BN_EW_KERNEL extern "C" __global__ void __launch_bounds__(BN_THREADS, 4)
