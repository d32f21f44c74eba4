//! The CPU backend: rayon threads over channels and over M (small ops on the calling
//! thread), SIMD kernels chosen at run time.
//!
//! Everything here runs after validation (`crate::validate`): lengths are right, per-channel
//! slices have C entries, and nothing can fail any more, so outputs are either fully
//! written or (on a validation error, before this module is entered) untouched.

mod kernels;
mod partition;
mod scratch;
pub(crate) mod simd;
mod team;

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::shape::{Pattern, Shape};
use crate::stats::Moments;
use kernels::*;
use partition::Split;
use simd::dispatch;
pub use simd::SimdLevel;
use std::sync::Arc;
pub(crate) use team::Order;

/// A CPU "device": a thread pool (rayon's global one unless told otherwise) and the SIMD
/// level the kernels run with.
///
/// An op runs on the thread that calls it, with `threads - 1` of the pool's threads
/// helping: each of its passes is cut into tasks that the caller and the helpers take
/// from a shared queue, so the caller starts at once instead of handing the op to the
/// pool and sleeping until it is done, and an op occupies as many threads as the pool
/// has. A helper that has run out of tasks waits without sleeping until the pass's last
/// task is done (up to a millisecond; spinning for 20 us, then yielding the CPU to any
/// thread that needs it) and the caller waits the same way up to 200 us for the helpers,
/// so that the next pass or op usually finds them awake (rayon's idle threads also spin
/// a little before they sleep); a helper woken from sleep may start late and then takes
/// fewer tasks.
/// Several threads calling ops at once each run their own op, with helpers from the same
/// pool.
///
/// The ops' per-channel temporaries (accumulators, partial statistics, parameter arrays)
/// come from per-thread pools that keep freed buffers for the next op, so a steady stream
/// of ops allocates only a few task lists per pass (a few bytes per task), whatever the
/// number of channels: each thread that ran or called an op holds at most 16 MiB of
/// them (32 buffers of at most 4 MiB) until it exits. Ops on fewer than [`INLINE_BELOW`]
/// values run on the calling thread alone ([`CpuDevice::with_inline_below`]).
///
/// ```
/// use bnorm::cpu::{CpuDevice, SimdLevel};
/// let cpu = CpuDevice::new();
/// assert!(cpu.threads() >= 1);
/// let scalar = CpuDevice::new().with_simd(SimdLevel::Scalar).unwrap();
/// assert_eq!(scalar.simd(), SimdLevel::Scalar);
/// ```
#[derive(Clone)]
pub struct CpuDevice {
    pool: Option<Arc<rayon::ThreadPool>>,
    simd: SimdLevel,
    stores: Stores,
    /// software prefetching forced on or off (tests); `None`: by size
    prefetch: Option<bool>,
    /// ops on fewer values run on the calling thread ([`CpuDevice::with_inline_below`])
    inline_below: usize,
    /// this op runs on the calling thread (set per op by [`CpuDevice::for_op`])
    inline: bool,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuDevice")
            .field("threads", &self.threads())
            .field("simd", &self.simd)
            .field("stores", &self.stores)
            .field("prefetch", &self.prefetch)
            .field("inline_below", &self.inline_below)
            .finish()
    }
}

/// How the CPU ops write their outputs (`y`; `dx` and `dz`): through the caches, or with
/// non-temporal ("streaming") stores, which write whole cache lines to memory without
/// first reading them in and without evicting other data.
///
/// A plain store reads each output line from memory before overwriting it, so a pass over
/// an output that does not stay in the caches moves three bytes for every two a copy
/// moves. Streaming skips that read but leaves the output in memory, not in the cache,
/// where the next layer would have found it had it fit.
///
/// ```
/// use bnorm::cpu::{CpuDevice, Stores};
/// use bnorm::DType;
/// assert_eq!(CpuDevice::new().stores(), Stores::Auto);
/// let cpu = CpuDevice::new().with_stores(Stores::Cached);
/// assert!(!cpu.streams(DType::F32, 1 << 30));
/// assert!(CpuDevice::new().with_stores(Stores::Streaming).streams(DType::BF16, 64));
/// // auto: an op moving 1 GiB streams, one moving 256 KiB does not
/// let auto = CpuDevice::new();
/// assert!(auto.streams(DType::F32, 1 << 28) && !auto.streams(DType::F32, 1 << 16));
/// assert_eq!("cached".parse::<Stores>(), Ok(Stores::Cached));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Stores {
    /// Stream the outputs of an op whose pass-count traffic (the bytes its passes read and
    /// write: `x`, `z` and `y` for inference, `x` twice in training) reaches the smaller of
    /// the L3 and 32 MiB per thread ([`CpuDevice::streams`]); cached below. Such an op's
    /// data cannot stay in the L3 from one call to the next, and streamed outputs skip the
    /// read of every output line; a smaller op's data can, and cached outputs then go to
    /// and from the L3 alone. The 32 MiB per thread caps the L3 that a VM reports when
    /// neighbours share it. (The channels-last input gradient of f16/bf16 with two
    /// channel tiles per row, 128 channels on AVX-512, or with several and a `dx` placed
    /// 1-4 vectors past an input modulo 4 KiB, streams only from 32 MiB of `dx`: see
    /// `grad_rows_cached` in `cpu::kernels`.)
    ///
    /// Measured on a 2-core AMD EPYC (Zen 4, 1 MiB L2 per core, 32 MiB L3; 2026-12-06):
    /// 144 resnet50 cases (batch 32, 6.4 to 51 MB of output, all ops, types and layouts),
    /// each cached and streamed, 4 alternated rounds, min. Against the better choice per
    /// case, this rule's choices took 1.03x the time (geomean), the former rule's (stream
    /// f32 outputs from 4x the threads' L2, 16-bit ones from 8x) 1.05x. Inference with
    /// 12.8 MB of output (x and y fit in the L3) took 0.83x the time cached (18 cases);
    /// training forward and backward there 1.08x and 1.14x. Earlier, on the 2-core
    /// AVX-512 machine with 260 MiB of L3: a normalize pass plus a pass that reads its
    /// output, streamed against cached, took 1.09-1.19x the time at 6.4 MB of f32 output,
    /// 0.87-0.98x at 12.8 MB, 0.77-0.80x from 25.7 MB (this rule streams from 16 MB of
    /// inference output there). On a 2-core Intel Xeon VM (AVX-512 FP16, 2 MiB L2 per
    /// core, 480 MiB L3; 2026-12-06), 252 resnet50 cases (the whole suite at batch 32),
    /// 3 alternated rounds, min, with the cap at 64 MiB per thread: 1.013x the per-case
    /// best (geomean), the former rule 1.016x, a cap of 16 MiB per thread 1.029x, always
    /// cached 1.043x, always streamed 1.063x. The same machine model in a later session,
    /// with element-wise tasks a few per thread (runs 3 rounds, same method): a cap of
    /// 64 MiB per thread 1.032x, 32 MiB 1.016x (this rule), 16 MiB 1.015x, always cached
    /// 1.105x, always streamed 1.026x; inference over 98 MiB of traffic (16 cases) took
    /// 0.85x the time streamed, forward over 73 MiB 0.99x, backward over 122 MiB 0.92x.
    /// At 6-18 MiB some ops ran up to 1.3x faster streamed only because the benchmark
    /// calls them back to back on the same `x` (kept in L2 when `y` bypasses it), which a
    /// network, whose next layer reads `y`, would not see: they stay cached.
    #[default]
    Auto,
    /// Always through the caches.
    Cached,
    /// Always streaming (vectors aligned to their width; heads and tails are cached).
    Streaming,
}

impl std::fmt::Display for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stores::Auto => "auto",
            Stores::Cached => "cached",
            Stores::Streaming => "streaming",
        })
    }
}

impl std::str::FromStr for Stores {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Stores::Auto),
            "cached" => Ok(Stores::Cached),
            "streaming" | "stream" => Ok(Stores::Streaming),
            _ => Err(format!("unknown store policy `{s}` (expected auto, cached or streaming)")),
        }
    }
}

/// [`Stores::Auto`] streams the outputs of an op moving at least the L3 or this many bytes
/// per thread, whichever is less (see [`Stores::Auto`]).
const STREAM_FROM_BYTES_PER_THREAD: usize = 32 << 20;

/// The vector loops prefetch their inputs (`prefetcht0`, [`PREFETCH_AHEAD`] values ahead)
/// when the op's input takes at least this many bytes. Measured here (2 threads, paired
/// in-process A/B, 2026-11-27): at 98 MiB per tensor the prefetched op took 0.85-0.95x the
/// time (f32 forward, inference and backward in both layouts; f16/bf16 inference 0.75-0.82,
/// forward 0.88-0.94, backward 1.00); at 49 MiB and below 0.98-1.03x for f32 and 0.99-1.14x
/// (geomean 1.05) for f16/bf16, where the data comes from L3 and the 16-bit loops are
/// bound by the core (the prefetches take load slots).
///
/// The backward counts both of its inputs (`x` and `dy`, and `y` with ReLU): re-measured on
/// the 480 MiB-L3 machine of 2026-11-27 (alternated A/B of two builds, min of 4, old/new
/// time), prefetching 49 MiB tensors made the backward 1.07-1.47x faster (bf16 channels-last
/// 32x64x112x112 1.46, 32x256x56x56 1.26; f32 32x128x56x56 1.07-1.11) but for one case (f32
/// channels-first 32x512x28x28, 0.95), while forward and inference went 0.94-1.14x and
/// 0.95-1.02x: they keep counting `x` alone.
const PREFETCH_FROM_BYTES: usize = 64 << 20;

/// Values ahead of the loop's position that a prefetching loop asks for: 4 KiB of f32, 2 KiB
/// of f16/bf16 (each the better of 1, 2 and 4 KiB in the same measurement).
const PREFETCH_AHEAD: usize = 1024;

/// Ops on fewer values than this run on the calling thread by default
/// ([`CpuDevice::with_inline_below`]).
pub const INLINE_BELOW: usize = 1 << 15;

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new()
    }
}

impl CpuDevice {
    /// rayon's global pool, the best SIMD level of this CPU and [`Stores::Auto`]; the
    /// environment variable `BNORM_CPU_SIMD=scalar|avx2|avx512` lowers the level and
    /// `BNORM_CPU_STORES=auto|cached|streaming` sets the store policy (an unsupported or
    /// unknown value is ignored here; use [`CpuDevice::with_simd`] and
    /// [`CpuDevice::with_stores`] instead).
    pub fn new() -> CpuDevice {
        let best = SimdLevel::detect();
        let simd = std::env::var("BNORM_CPU_SIMD")
            .ok()
            .and_then(|v| v.parse::<SimdLevel>().ok())
            .filter(|l| l.is_supported())
            .unwrap_or(best);
        let stores = std::env::var("BNORM_CPU_STORES").ok().and_then(|v| v.parse::<Stores>().ok()).unwrap_or_default();
        CpuDevice { pool: None, simd, stores, prefetch: None, inline_below: INLINE_BELOW, inline: false }
    }

    /// Write outputs as `stores` says (see [`Stores`]).
    pub fn with_stores(mut self, stores: Stores) -> CpuDevice {
        self.stores = stores;
        self
    }

    /// The store policy.
    pub fn stores(&self) -> Stores {
        self.stores
    }

    /// Whether an op whose passes move `elements` values of `dtype` (its pass-count
    /// traffic: an inference's `x`, `z` and `y`; a training forward's `x` twice, `z` and
    /// `y`; a backward's inputs twice and its outputs) writes its outputs with streaming
    /// stores: under [`Stores::Auto`], when they take at least the L3, or 32 MiB per
    /// thread if that is less.
    pub fn streams(&self, dtype: DType, elements: usize) -> bool {
        match self.stores {
            Stores::Cached => false,
            Stores::Streaming => true,
            Stores::Auto => self.beyond_l3(dtype, elements),
        }
    }

    /// Whether `elements` values of `dtype` outgrow the L3: at least
    /// [`CpuDevice::stream_from_bytes`], the bound from which [`Stores::Auto`] streams. The
    /// channels-last reductions then read f32 rows in order (see
    /// `kernels::rows_in_order`).
    pub(crate) fn beyond_l3(&self, dtype: DType, elements: usize) -> bool {
        elements.saturating_mul(dtype.size()) >= self.stream_from_bytes()
    }

    /// The pass-count traffic from which [`Stores::Auto`] streams: the L3 (where sysfs
    /// tells its size) or [`STREAM_FROM_BYTES_PER_THREAD`] per thread, whichever is less.
    fn stream_from_bytes(&self) -> usize {
        let cap = STREAM_FROM_BYTES_PER_THREAD.saturating_mul(self.threads());
        l3_bytes().map_or(cap, |l3| l3.min(cap))
    }

    /// Values ahead of their position that the vector loops of an op whose inputs are
    /// `elements` values of `dtype` prefetch: [`PREFETCH_AHEAD`] from
    /// [`PREFETCH_FROM_BYTES`] up, else 0 (no prefetching). The tiled channels-last
    /// reductions prefetch a sub-block of rows ahead instead, at the same threshold.
    pub(crate) fn prefetch_ahead(&self, dtype: DType, elements: usize) -> usize {
        let big = elements.saturating_mul(dtype.size()) >= PREFETCH_FROM_BYTES;
        if self.prefetch.unwrap_or(big) {
            PREFETCH_AHEAD
        } else {
            0
        }
    }

    /// Whether an op whose buffers (inputs and outputs) hold `elements` values of `dtype`
    /// together outgrows the L2 caches of the threads: the channels-last kernels then walk
    /// rows that take several register tiles in short sub-blocks and prefetch the next
    /// sub-block (see `kernels::MULTI_TILE_ROWS`); within L2 they keep the long ones.
    pub(crate) fn beyond_l2(&self, dtype: DType, elements: usize) -> bool {
        elements.saturating_mul(dtype.size()) > l2_bytes() * self.threads()
    }

    /// Force software prefetching on or off (`None`: by the input's size). Prefetches
    /// are hints and change no result; this exists so that tests run the prefetching
    /// loops on small inputs.
    #[doc(hidden)]
    pub fn with_prefetch(mut self, prefetch: Option<bool>) -> CpuDevice {
        self.prefetch = prefetch;
        self
    }

    /// Use a dedicated pool of `threads` threads: an op runs on its calling thread and
    /// `threads - 1` of them (the last one serves a second thread calling ops at the
    /// same time).
    pub fn with_threads(mut self, threads: usize) -> Result<CpuDevice> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bnorm-cpu-{i}"))
            .build()
            .map_err(|e| Error::DeviceUnavailable {
                requested: format!("cpu with {threads} threads"),
                reason: e.to_string(),
            })?;
        self.pool = Some(Arc::new(pool));
        Ok(self)
    }

    /// Force a SIMD level (for tests and comparisons). Errors if the CPU lacks it.
    pub fn with_simd(self, level: SimdLevel) -> Result<CpuDevice> {
        self.with_simd_within(level, SimdLevel::detect())
    }

    /// [`with_simd`](Self::with_simd) on a CPU whose best level is `best` (a parameter so
    /// the error path is tested on CPUs that have every level).
    fn with_simd_within(mut self, level: SimdLevel, best: SimdLevel) -> Result<CpuDevice> {
        if level > best {
            return Err(Error::SimdUnsupported { requested: level.to_string(), available: best.to_string() });
        }
        self.simd = level;
        Ok(self)
    }

    /// The SIMD level the kernels use.
    pub fn simd(&self) -> SimdLevel {
        self.simd
    }

    /// Threads an op runs on: the calling thread and `threads() - 1` helpers from the pool.
    pub fn threads(&self) -> usize {
        match &self.pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    /// Run ops on fewer than `values` values (elements of `x`) on the calling thread
    /// alone, without helpers from the pool ([`INLINE_BELOW`] by default; 0: always with
    /// helpers).
    ///
    /// Waking a helper and waiting for it costs a few microseconds, more than a small
    /// op's work: a 1x64x7x7 f32 inference took 6-9 us handed to the pool and under 1 us
    /// on the calling thread. An inlined op cuts its work into the same tasks in the same
    /// order as with helpers, so its results are the same, bit for bit.
    ///
    /// ```
    /// use bnorm::cpu::{CpuDevice, INLINE_BELOW};
    /// assert_eq!(CpuDevice::new().inline_below(), INLINE_BELOW);
    /// let pooled = CpuDevice::new().with_inline_below(0);
    /// assert_eq!(pooled.inline_below(), 0);
    /// ```
    pub fn with_inline_below(mut self, values: usize) -> CpuDevice {
        self.inline_below = values;
        self
    }

    /// Ops on fewer values than this run on the calling thread.
    pub fn inline_below(&self) -> usize {
        self.inline_below
    }

    /// This device for one op on `values` values: inline below the threshold.
    pub(crate) fn for_op(&self, values: usize) -> CpuDevice {
        CpuDevice { inline: values < self.inline_below, ..self.clone() }
    }

    /// Run `f` inside this device's thread pool (rayon calls in `f` use its threads), or
    /// right here for an inline op. The ops themselves do not need it: they run on the
    /// calling thread with `threads - 1` of the pool's threads helping (see [`CpuDevice`]).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) if !self.inline => p.install(f),
            _ => f(),
        }
    }

    /// `f(k, item k)` for every item, results in order into `out`: on the calling thread
    /// with `threads - 1` pool threads helping, or on the calling thread alone for an inline
    /// op.
    fn fork_join<I: Send, R: Send>(
        &self,
        items: (impl Iterator<Item = I> + Send, Order),
        f: impl Fn(usize, I) -> R + Sync,
        out: &mut Vec<R>,
    ) {
        let helpers = if self.inline { 0 } else { self.threads() - 1 };
        team::fork_join(self.pool.as_deref(), helpers, items, f, out);
    }

    /// `f(0), .., f(n - 1)` in order into `out` ([`fork_join`](Self::fork_join)), each
    /// thread walking its share forward.
    fn map_tasks<R: Send>(&self, n: usize, f: impl Fn(usize) -> R + Sync, out: &mut Vec<R>) {
        self.fork_join((0..n, Order::Forward), |k, _| f(k), out);
    }

    /// `f(k, items[k])` for every item, results in order ([`fork_join`](Self::fork_join)),
    /// each thread taking its share in `order`.
    fn map_items<I: Send, R: Send>(&self, items: Vec<I>, order: Order, f: impl Fn(usize, I) -> R + Sync) -> Vec<R> {
        let mut out = Vec::with_capacity(items.len());
        self.fork_join((items.into_iter(), order), f, &mut out);
        out
    }

    /// `f(t, piece t)` for the `chunk`-long pieces of `buf` ([`fork_join`](Self::fork_join)),
    /// each thread taking its share in `order`.
    fn for_chunks<T: Send>(&self, buf: &mut [T], chunk: usize, order: Order, f: impl Fn(usize, &mut [T]) + Sync) {
        self.fork_join((buf.chunks_mut(chunk), order), f, &mut Vec::new());
    }
}

// ---------------------------------------------------------------- host-side op arguments

/// Forward arguments after validation, all on the host.
pub(crate) struct Forward<'a, T> {
    pub x: &'a [T],
    pub z: Option<&'a [T]>,
    pub y: &'a mut [T],
    pub relu: bool,
}

impl<T> Forward<'_, T> {
    /// Values one pass over the buffers moves: `x`, `z` (when added) and `y`.
    fn moved(&self) -> usize {
        self.x.len() + self.z.map_or(0, |z| z.len()) + self.y.len()
    }

    /// Values the op's passes move when `x` is read `x_passes` times (a training forward
    /// reads it for the moments, then to normalize) and `z` and `y` once.
    fn traffic(&self, x_passes: usize) -> usize {
        self.moved() + (x_passes - 1) * self.x.len()
    }
}

/// Backward arguments after validation, all on the host.
pub(crate) struct Backward<'a, T> {
    pub x: &'a [T],
    pub y: Option<&'a [T]>,
    pub dy: &'a [T],
    pub dx: &'a mut [T],
    pub dz: Option<&'a mut [T]>,
}

impl<T> Backward<'_, T> {
    /// Values the backward writes: `dx`, and `dz` when asked.
    fn outputs(&self) -> usize {
        self.dx.len() + self.dz.as_ref().map_or(0, |d| d.len())
    }

    /// Values the backward reads: `x`, `dy` and `y` (with ReLU).
    fn inputs(&self) -> usize {
        backward_inputs(self.x, self.dy, self.y)
    }

    /// Values the backward's passes move: its inputs twice (the sums, then the input
    /// gradient) and its outputs once.
    fn traffic(&self) -> usize {
        2 * self.inputs() + self.outputs()
    }
}

/// Values a backward over `x`, `dy` and `y` reads (what its prefetch decision counts).
fn backward_inputs<T>(x: &[T], dy: &[T], y: Option<&[T]>) -> usize {
    x.len() + dy.len() + y.map_or(0, |y| y.len())
}

// ---------------------------------------------------------------- statistics

/// Per-channel moments of `x` (f32 Welford in chunks, merged in f64).
pub(crate) fn moments<T: Element>(dev: &CpuDevice, shape: &Shape, x: &[T]) -> Totals {
    let level = dev.simd;
    let ahead = dev.prefetch_ahead(T::DTYPE, x.len());
    // counted with the output of x's size that every caller writes next
    let beyond_l2 = dev.beyond_l2(T::DTYPE, 2 * x.len());
    let beyond_l3 = dev.beyond_l3(T::DTYPE, x.len());
    let threads = dev.threads();
    match shape.pattern() {
        Pattern::Planes { n, c, s } => {
            let split = Split::runs(n, c, s, threads);
            let mut parts = Scratch::with_capacity(c * split.parts);
            let task = |task| {
                let (ch, range) = split.task(task);
                let runs = Runs::planes(c, s, ch, range);
                // every task of a channel shifts by the channel's first value
                dispatch(level, RunMomentsKernel { x, runs, shift: x[ch * s].to_f32(), ahead })
            };
            dev.map_tasks(c * split.parts, task, parts.vec());
            merge_moments(c, split.parts, &parts)
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_reduce_task(rows, c, threads);
            let block = rows_per * c;
            let mut parts = Vec::new();
            let task = |t: usize| {
                let mut acc = RowMoments::new(Scratch::collect(c, x[..c].iter().map(|v| v.to_f32())));
                let x = &x[t * block..((t + 1) * block).min(x.len())];
                dispatch(level, RowMomentsKernel { acc: &mut acc, x, prefetch: ahead > 0, beyond_l2, beyond_l3 });
                acc.finish()
            };
            dev.map_tasks(rows.div_ceil(rows_per), task, &mut parts);
            // merged in task order, so the result does not depend on scheduling
            let mut total = Totals::new(c);
            parts.iter().for_each(|p| total.merge(p));
            total
        }
    }
}

/// Merge the `parts` partials of each channel (channel-major, in task order).
fn merge_moments(c: usize, parts: usize, partial: &[Moments]) -> Totals {
    let merged = partial.chunks_exact(parts).map(|p| {
        let mut m = Moments::default();
        p.iter().for_each(|p| m.merge(p));
        m
    });
    Totals::from_moments(c, merged)
}

// ---------------------------------------------------------------- fused, cache-blocked paths

/// The per-core L2 size (Linux sysfs; 1 MiB where it cannot be read).
fn l2_bytes() -> usize {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L2.get_or_init(|| {
        let s = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index2/size").unwrap_or_default();
        cache_size(&s).filter(|&b| b >= 256 << 10).unwrap_or(1 << 20)
    })
}

/// The L3 size seen from cpu0 (Linux sysfs), `None` where it cannot be read or is below
/// [`L3_FLOOR`] (a VM that reports a token L3 would otherwise make [`Stores::Auto`] stream
/// every op).
fn l3_bytes() -> Option<usize> {
    static L3: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *L3.get_or_init(|| l3_size(&std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok()?))
}

/// A sysfs L3 size in bytes, `None` below [`L3_FLOOR`].
fn l3_size(s: &str) -> Option<usize> {
    cache_size(s).filter(|&b| b >= L3_FLOOR)
}

/// The smallest L3 size [`l3_bytes`] believes (a real L3 holds a few MiB or more; less is
/// taken for a placeholder and treated as unknown).
const L3_FLOOR: usize = 1 << 20;

/// A sysfs cache size (`1024K`, `32M`) in bytes.
fn cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    match s.strip_suffix('K') {
        Some(k) => k.parse::<usize>().ok().map(|v| v << 10),
        None => s.strip_suffix('M').and_then(|m| m.parse::<usize>().ok()).map(|v| v << 20),
    }
}

/// A fused, cache-blocked plan for channels-first data: groups of `g` consecutive channels,
/// one task each: the group's reduction, then its element-wise pass while the group's data
/// is still in the core's L2 (2 passes of memory traffic in forward-train instead of 3,
/// 3 instead of 5 in backward). The group's working set (`tensors` buffers: x and y, or x,
/// dy and dx) fits in 3/4 of L2, and there are enough groups to keep every thread busy.
#[derive(Debug, Clone, Copy)]
struct Fused {
    n: usize,
    c: usize,
    s: usize,
    g: usize,
}

impl Fused {
    fn plan<T>(shape: &Shape, threads: usize, tensors: usize) -> Option<Fused> {
        let Pattern::Planes { n, c, s } = shape.pattern() else { return None };
        let channel = tensors * n * s * std::mem::size_of::<T>();
        let budget = l2_bytes() * 3 / 4;
        if channel > budget || c < 2 * threads {
            return None;
        }
        let g = (budget / channel).min(c.div_ceil(4 * threads)).max(1);
        Some(Fused { n, c, s, g })
    }

    fn groups(&self) -> usize {
        self.c.div_ceil(self.g)
    }

    /// Channels of group `k`.
    fn channels(&self, k: usize) -> std::ops::Range<usize> {
        k * self.g..((k + 1) * self.g).min(self.c)
    }

    /// `buf` cut into each group's slabs (one per sample).
    fn slabs<'a, T>(&self, buf: &'a mut [T]) -> Vec<Vec<&'a mut [T]>> {
        let mut out: Vec<Vec<&mut [T]>> = (0..self.groups()).map(|_| Vec::with_capacity(self.n)).collect();
        for sample in buf.chunks_mut(self.c * self.s) {
            for (k, slab) in sample.chunks_mut(self.g * self.s).enumerate() {
                out[k].push(slab);
            }
        }
        out
    }

    /// The read-only slab of group `k`, sample `ni`.
    fn slab<'a, T>(&self, buf: &'a [T], k: usize, ni: usize) -> &'a [T] {
        let ch = self.channels(k);
        &buf[(ni * self.c + ch.start) * self.s..(ni * self.c + ch.end) * self.s]
    }

    /// The runs (one per sample) of channel `ch`.
    fn runs(&self, ch: usize) -> Runs {
        Runs::planes(self.c, self.s, ch, 0..self.n)
    }
}

/// Training forward: per-channel moments and `1 / sqrt(var + eps)`, then `y` with
/// per-channel maps: `affine(first, t, invstd)` returns the maps of channels
/// `first..first + t.len()` from their moments `t` and their `invstd`. Returns the
/// moments and the `invstd` of every channel. Channels-first data with small channels
/// takes the fused path ([`Fused`]); the rest runs as two passes.
pub(crate) fn forward_training<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Forward<'_, T>,
    eps: f32,
    affine: impl Fn(usize, &Totals, &[f64]) -> Scratch<ChannelAffine> + Sync,
) -> (Totals, Scratch<f64>) {
    let Some(f) = Fused::plan::<T>(shape, dev.threads(), 2) else {
        let moments = moments(dev, shape, a.x);
        let invstd = moments.invstd(eps);
        normalize(dev, shape, a, &affine(0, &moments, &invstd), Order::Backward);
        return (moments, invstd);
    };
    let level = dev.simd;
    let stream = dev.streams(T::DTYPE, a.traffic(2));
    let Forward { x, z, y, relu } = a;
    let ahead = dev.prefetch_ahead(T::DTYPE, x.len());
    let groups = f.slabs(y);
    let per_group: Vec<(Totals, Scratch<f64>)> = dev.map_items(groups, Order::Forward, |k, ys: Vec<&mut [T]>| {
        let chs = f.channels(k);
        let moments =
            dispatch(level, ChannelMomentsKernel { x, runs: f.runs(chs.start), channels: chs.len(), step: f.s, ahead });
        let invstd = moments.invstd(eps);
        let maps = affine(f.channels(k).start, &moments, &invstd);
        let mut slabs: Vec<NormSlab<'_, T>> = ys
            .into_iter()
            .enumerate()
            .map(|(ni, y)| NormSlab { x: f.slab(x, k, ni), z: z.map(|z| f.slab(z, k, ni)), y, first: 0 })
            .collect();
        dispatch(level, NormalizeSlabs { slabs: &mut slabs, run: f.s, maps: &maps, relu, stream, ahead });
        (moments, invstd)
    });
    let (moments, invstd): (Vec<Totals>, Vec<Scratch<f64>>) = per_group.into_iter().unzip();
    (Totals::concat(&moments), Scratch::collect(f.c, invstd.iter().flat_map(|v| v.iter().copied())))
}

/// Backward with batch statistics: per-channel sums, then `dx` (and `dz`) with the map
/// `grad(channel, sums)`. Fused for small channels-first channels, as above.
pub(crate) fn backward<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Backward<'_, T>,
    mean: &[f32],
    grad: impl Fn(usize, &GradSums) -> GradMap + Sync,
) -> Scratch<GradSums> {
    let Some(f) = Fused::plan::<T>(shape, dev.threads(), 3) else {
        let sums = grad_sums(dev, shape, a.dy, a.x, a.y, mean);
        let maps = Scratch::collect(sums.len(), sums.iter().enumerate().map(|(ch, g)| grad(ch, g)));
        grad_input(dev, shape, a, &maps, Order::Backward);
        return sums;
    };
    let level = dev.simd;
    let stream = dev.streams(T::DTYPE, a.traffic());
    let ahead = dev.prefetch_ahead(T::DTYPE, a.inputs());
    let Backward { x, y, dy, dx, dz } = a;
    let groups = paired(f.slabs(dx).into_iter(), dz.map(|dz| f.slabs(dz).into_iter()));
    let per_group: Vec<Vec<GradSums>> =
        dev.map_items(groups, Order::Forward, |k, (dxs, dzs): (Vec<&mut [T]>, Option<Vec<&mut [T]>>)| {
            let inp = GradRun { dy, x, y };
            let sums: Vec<GradSums> = f
                .channels(k)
                .map(|ch| dispatch(level, GradSumRuns { inp, runs: f.runs(ch), mean: mean[ch], ahead }))
                .collect();
            let maps: Vec<GradMap> = f.channels(k).zip(&sums).map(|(ch, g)| grad(ch, g)).collect();
            let mut dzs = dzs.map(|v| v.into_iter());
            let mut slabs: Vec<GradSlab<'_, T>> = dxs
                .into_iter()
                .enumerate()
                .map(|(ni, dx)| GradSlab {
                    inp: GradRun { dy: f.slab(dy, k, ni), x: f.slab(x, k, ni), y: y.map(|y| f.slab(y, k, ni)) },
                    dx,
                    dz: dzs.as_mut().and_then(|it| it.next()),
                    first: 0,
                })
                .collect();
            dispatch(level, GradSlabs { slabs: &mut slabs, run: f.s, maps: &maps, stream, ahead });
            sums
        });
    Scratch::collect(f.c, per_group.into_iter().flatten())
}

// ---------------------------------------------------------------- normalize

/// `y = act((x - mean) * scale + shift + z)` with the per-channel maps, each thread taking
/// its share of the tasks in `order` ([`Order::Backward`] after a pass over `x`, which the
/// store policy counts as part of the op's traffic).
pub(crate) fn normalize<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Forward<'_, T>,
    maps: &[ChannelAffine],
    order: Order,
) {
    let level = dev.simd;
    let threads = dev.threads();
    let x_passes = if order == Order::Backward { 2 } else { 1 };
    let stream = dev.streams(T::DTYPE, a.traffic(x_passes));
    let beyond_l2 = dev.beyond_l2(T::DTYPE, a.moved());
    let Forward { x, z, y, relu } = a;
    let ahead = dev.prefetch_ahead(T::DTYPE, x.len());
    match shape.pattern() {
        Pattern::Planes { s, .. } => {
            // a task's chunk is consecutive runs: one slab, its first run at channel (t * runs_per) % C
            let runs_per = partition::runs_per_task(y.len() / s, s, threads);
            let chunk = runs_per * s;
            dev.for_chunks(y, chunk, order, |t, y| {
                let (lo, hi) = (t * chunk, t * chunk + y.len());
                let mut slab = [NormSlab { x: &x[lo..hi], z: z.map(|z| &z[lo..hi]), y, first: t * runs_per }];
                dispatch(level, NormalizeSlabs { slabs: &mut slab, run: s, maps, relu, stream, ahead });
            });
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_task(rows, c, threads);
            let mean = periodic(maps, |m| m.mean);
            let scale = periodic(maps, |m| m.scale);
            let shift = periodic(maps, |m| m.shift);
            dev.for_chunks(y, rows_per * c, order, |t, yb| {
                let lo = t * rows_per * c;
                let hi = lo + yb.len();
                dispatch(
                    level,
                    NormalizeRows {
                        x: &x[lo..hi],
                        z: z.map(|z| &z[lo..hi]),
                        y: yb,
                        c,
                        mean: &mean,
                        scale: &scale,
                        shift: &shift,
                        relu,
                        stream,
                        ahead,
                        beyond_l2,
                    },
                );
            });
        }
    }
}

// ---------------------------------------------------------------- backward

/// Per-channel `sum g` and `sum g * (x - mean)`, `g` gated by ReLU when `y` is given.
pub(crate) fn grad_sums<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    dy: &[T],
    x: &[T],
    y: Option<&[T]>,
    mean: &[f32],
) -> Scratch<GradSums> {
    let level = dev.simd;
    let ahead = dev.prefetch_ahead(T::DTYPE, backward_inputs(x, dy, y));
    // counted with the output of x's size that the backward writes next
    let beyond_l2 = dev.beyond_l2(T::DTYPE, backward_inputs(x, dy, y) + x.len());
    let beyond_l3 = dev.beyond_l3(T::DTYPE, backward_inputs(x, dy, y));
    let threads = dev.threads();
    match shape.pattern() {
        Pattern::Planes { n, c, s } => {
            let split = Split::runs(n, c, s, threads);
            let mut parts = Scratch::with_capacity(c * split.parts);
            let task = |task| {
                let (ch, range) = split.task(task);
                let runs = Runs::planes(c, s, ch, range);
                dispatch(level, GradSumRuns { inp: GradRun { dy, x, y }, runs, mean: mean[ch], ahead })
            };
            dev.map_tasks(c * split.parts, task, parts.vec());
            let merged = parts.chunks_exact(split.parts).map(|p| {
                let mut g = GradSums::default();
                p.iter().for_each(|p| g.add(p));
                g
            });
            Scratch::collect(c, merged)
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_reduce_task(rows, c, threads);
            let block = rows_per * c;
            let mut parts = Vec::new();
            let task = |t: usize| {
                let lo = t * block;
                let hi = (lo + block).min(x.len());
                let (dy, x, y) = (&dy[lo..hi], &x[lo..hi], y.map(|y| &y[lo..hi]));
                dispatch(level, GradSumRows { dy, x, y, mean, prefetch: ahead > 0, beyond_l2, beyond_l3 })
            };
            dev.map_tasks(rows.div_ceil(rows_per), task, &mut parts);
            let mut total = SumTotals::new(c);
            parts.iter().for_each(|p| total.add(p));
            total.sums()
        }
    }
}

/// `dx = a * ((g - gmean) + k * (x - mean))` per channel, and `dz = g` when asked, each
/// thread taking its share of the tasks in `order` ([`Order::Backward`] after a pass over
/// `x` and `dy`, the only order its callers use: the store policy counts that pass).
pub(crate) fn grad_input<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Backward<'_, T>,
    maps: &[GradMap],
    order: Order,
) {
    let level = dev.simd;
    let threads = dev.threads();
    let stream = dev.streams(T::DTYPE, a.traffic());
    let ahead = dev.prefetch_ahead(T::DTYPE, a.inputs());
    let beyond_l2 = dev.beyond_l2(T::DTYPE, a.inputs() + a.outputs());
    let large_dx = std::mem::size_of_val(&*a.dx) >= FLAT_STREAM_FROM_BYTES;
    let Backward { x, y, dy, dx, dz } = a;
    match shape.pattern() {
        Pattern::Planes { s, .. } => {
            let runs_per = partition::runs_per_task(dx.len() / s, s, threads);
            let chunk = runs_per * s;
            dev.map_items(paired(dx.chunks_mut(chunk), dz.map(|dz| dz.chunks_mut(chunk))), order, |t, (dx, dz)| {
                let (lo, hi) = (t * chunk, t * chunk + dx.len());
                let inp = GradRun { dy: &dy[lo..hi], x: &x[lo..hi], y: y.map(|y| &y[lo..hi]) };
                let mut slab = [GradSlab { inp, dx, dz, first: t * runs_per }];
                dispatch(level, GradSlabs { slabs: &mut slab, run: s, maps, stream, ahead });
            });
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_task(rows, c, threads);
            let chunk = rows_per * c;
            let mean = periodic(maps, |m| m.mean);
            let ca = periodic(maps, |m| m.a);
            let gmean = periodic(maps, |m| m.gmean);
            let k = periodic(maps, |m| m.k);
            dev.map_items(paired(dx.chunks_mut(chunk), dz.map(|dz| dz.chunks_mut(chunk))), order, |t, (dxb, dzb)| {
                let lo = t * chunk;
                let hi = lo + dxb.len();
                dispatch(
                    level,
                    GradRows {
                        inp: GradRun { dy: &dy[lo..hi], x: &x[lo..hi], y: y.map(|y| &y[lo..hi]) },
                        dx: dxb,
                        dz: dzb,
                        c,
                        mean: &mean,
                        a: &ca,
                        gmean: &gmean,
                        k: &k,
                        stream,
                        ahead,
                        beyond_l2,
                        large_dx,
                    },
                );
            });
        }
    }
}

/// The pieces of `dx` each paired with the same piece of `dz` when there is one (both cut
/// the same way).
fn paired<D>(dx: impl Iterator<Item = D>, dz: Option<impl Iterator<Item = D>>) -> Vec<(D, Option<D>)> {
    match dz {
        Some(dz) => dx.zip(dz.map(Some)).collect(),
        None => dx.map(|d| (d, None)).collect(),
    }
}

pub(crate) use kernels::{ChannelAffine, GradMap, GradSums, Totals};
pub(crate) use scratch::Scratch;

#[cfg(test)]
mod tests {
    use super::*;

    /// Asking for a level above the CPU's best is `SimdUnsupported` naming both levels and
    /// leaves nothing changed; a level at or below it is taken.
    #[test]
    fn simd_above_the_best_level_is_refused() {
        let dev = CpuDevice::new();
        let e = dev.clone().with_simd_within(SimdLevel::Avx512, SimdLevel::Avx2).unwrap_err();
        assert_eq!(e, Error::SimdUnsupported { requested: "avx512".into(), available: "avx2".into() });
        let e = dev.clone().with_simd_within(SimdLevel::Avx2, SimdLevel::Scalar).unwrap_err();
        assert_eq!(e, Error::SimdUnsupported { requested: "avx2".into(), available: "scalar".into() });
        let ok = dev.with_simd_within(SimdLevel::Avx2, SimdLevel::Avx512).unwrap();
        assert_eq!(ok.simd(), SimdLevel::Avx2);
    }

    /// Prefetching starts at `PREFETCH_FROM_BYTES` of input for every dtype; forcing it
    /// on or off wins over the size.
    #[test]
    fn prefetch_from_64_mib_of_input() {
        let dev = CpuDevice::new();
        let at = PREFETCH_FROM_BYTES / 4;
        assert_eq!(dev.prefetch_ahead(DType::F32, at - 1), 0);
        assert_eq!(dev.prefetch_ahead(DType::F32, at), PREFETCH_AHEAD);
        assert_eq!(dev.prefetch_ahead(DType::BF16, 2 * at - 1), 0);
        assert_eq!(dev.prefetch_ahead(DType::F16, 2 * at), PREFETCH_AHEAD);
        assert_eq!(dev.prefetch_ahead(DType::F32, usize::MAX), PREFETCH_AHEAD);
        assert_eq!(dev.clone().with_prefetch(Some(false)).prefetch_ahead(DType::F32, usize::MAX), 0);
        assert_eq!(dev.with_prefetch(Some(true)).prefetch_ahead(DType::BF16, 1), PREFETCH_AHEAD);
    }

    /// The backward's decision counts every input it reads: `x` and `dy` of half the
    /// threshold each turn prefetching on, and `y` (ReLU) counts too.
    #[test]
    fn backward_prefetch_counts_every_input() {
        let dev = CpuDevice::new();
        let half = vec![0u16; PREFETCH_FROM_BYTES / 4];
        let fourth = &half[..half.len() / 2];
        assert_eq!(dev.prefetch_ahead(DType::BF16, half.len()), 0);
        assert_eq!(dev.prefetch_ahead(DType::BF16, backward_inputs(&half, &half, None)), PREFETCH_AHEAD);
        assert_eq!(dev.prefetch_ahead(DType::BF16, backward_inputs(fourth, fourth, None)), 0);
        assert_eq!(backward_inputs(fourth, fourth, Some(&half)), 2 * half.len());
    }

    /// An op below the inline threshold runs on the calling thread alone, one at or above
    /// it on the calling thread and a helper; the threshold is the device's, 0 turns
    /// inlining off.
    #[test]
    fn small_ops_run_on_the_calling_thread() {
        let dev = CpuDevice::new().with_threads(2).unwrap();
        let here = std::thread::current().id();
        // the threads that ran 16 tasks of 1 ms (long enough for a helper to wake)
        let ran_on = |d: &CpuDevice| {
            let mut ids = Vec::new();
            let task = |_| {
                std::thread::sleep(std::time::Duration::from_millis(1));
                std::thread::current().id()
            };
            d.map_tasks(16, task, &mut ids);
            (ids.contains(&here), ids.iter().any(|id| *id != here))
        };
        assert_eq!(ran_on(&dev.for_op(INLINE_BELOW - 1)), (true, false));
        assert_eq!(ran_on(&dev.for_op(INLINE_BELOW)), (true, true));
        assert_eq!(ran_on(&dev.clone().with_inline_below(0).for_op(1)), (true, true));
        assert_eq!(ran_on(&dev.clone().with_inline_below(usize::MAX).for_op(1 << 40)), (true, false));
        // `install` runs user code on the pool, or here for an inline op
        let on = |d: &CpuDevice| d.install(|| std::thread::current().id());
        assert_eq!(on(&dev.for_op(INLINE_BELOW - 1)), here);
        assert_ne!(on(&dev.for_op(INLINE_BELOW)), here);
        // the task helpers keep the order, inline or not
        for d in [dev.for_op(0), dev.for_op(INLINE_BELOW)] {
            let mut out = Vec::new();
            d.map_tasks(100, |t| t * 3, &mut out);
            assert_eq!(out, (0..100).map(|t| t * 3).collect::<Vec<_>>());
            assert_eq!(d.map_items(vec![5, 6, 7], Order::Backward, |k, v| k * 10 + v), vec![5, 16, 27]);
            let mut buf = vec![0usize; 10];
            d.for_chunks(&mut buf, 3, Order::Backward, |t, b| b.iter_mut().for_each(|v| *v = t));
            assert_eq!(buf, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
        }
    }

    /// `Stores::Auto` streams an op moving the L3 or 32 MiB per thread (the lesser) and
    /// more, counted in bytes whatever the type, not less; an L3 under 1 MiB counts as
    /// unknown; the policy parses from its names and refuses others.
    #[test]
    fn auto_stores_stream_from_the_l3_or_32_mib_per_thread() {
        let dev = CpuDevice::new().with_threads(2).unwrap().with_stores(Stores::Auto);
        let from = l3_bytes().unwrap_or(usize::MAX).min(64 << 20);
        assert_eq!(dev.stream_from_bytes(), from);
        assert!(!dev.streams(DType::F32, from / 4 - 1));
        assert!(dev.streams(DType::F32, from / 4));
        assert!(!dev.streams(DType::F16, from / 2 - 1));
        assert!(dev.streams(DType::BF16, from / 2));
        let one = CpuDevice::new().with_threads(1).unwrap().with_stores(Stores::Auto);
        assert_eq!(one.stream_from_bytes(), l3_bytes().unwrap_or(usize::MAX).min(32 << 20));
        assert!(!one.streams(DType::F32, one.stream_from_bytes() / 4 - 1));
        assert_eq!(cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(cache_size("2M"), Some(2 << 20));
        assert_eq!(cache_size("lots"), None);
        assert_eq!(l3_size("32768K"), Some(32 << 20));
        assert_eq!(l3_size("512K"), None);
        for p in [Stores::Auto, Stores::Cached, Stores::Streaming] {
            assert_eq!(p.to_string().parse::<Stores>(), Ok(p));
        }
        assert!("nt".parse::<Stores>().unwrap_err().contains("expected auto, cached or streaming"));
    }
}
