//! The CPU kernel bodies, written once against [`Simd`] and run through
//! [`dispatch`](super::simd::dispatch) at each task.
//!
//! Two memory patterns (see `shape::Pattern`):
//! - *runs*: a channel is a list of contiguous runs (channels-first with spatial > 1); each
//!   kernel streams a run with several independent vector accumulators.
//! - *rows*: a channel is a column of a row-major `[rows][C]` matrix (channels-last, or any
//!   layout with one spatial position); vector lanes are channels, per-channel accumulators
//!   live in small arrays that stay in L1.
//!
//! Statistics accumulate in f32 (Welford for moments, plain sums for the backward
//! reductions) for at most [`FLUSH_STEPS`] ([`SUM_FLUSH_STEPS`] for sums) steps per lane,
//! then fold into f64 with Chan's
//! merge, so the f32 error never grows with M. Moments are taken of `x - shift` with a
//! per-channel shift (one of the channel's own values): the f32 running means then stay
//! near zero and their rounding stays at the scale of the spread, not of the offset
//! (x = 1e4 + N(0, 1) keeps 1e-7-level variance errors instead of 1e-5).
//!
//! Every kernel body is `#[inline(always)]` in optimized builds, so that it compiles inside
//! `run_avx2`/`run_avx512` with their target features (CI checks that no intrinsic is left
//! out of line). With debug assertions (unoptimized builds) they are ordinary functions:
//! at `opt-level = 0` every inlined call keeps its own stack slots, and the backward's
//! dispatch frame grew past the 2 MiB of a test or rayon thread.

use super::scratch::Scratch;
use super::simd::{Kernel, Simd};
use crate::dtype::Element;
use crate::stats::Moments;

/// Steps an f32 lane accumulates before it is folded into the f64 totals.
pub(crate) const FLUSH_STEPS: u32 = 64;

/// Steps a plain f32 sum lane accumulates before it is folded into f64. Sums of signed
/// terms (the backward's) grow like sqrt(steps) and their rounding with them; 32 keeps the
/// error of `sum g * (x - mean)` several times under the contract's 1e-6 * sqrt(sum of
/// squared terms) at every M.
pub(crate) const SUM_FLUSH_STEPS: u32 = 32;

/// `RECIP[k] = 1 / k` for Welford step counts up to [`FLUSH_STEPS`] (a table load instead of
/// a division in every step).
static RECIP: [f32; FLUSH_STEPS as usize + 1] = {
    let mut t = [0f32; FLUSH_STEPS as usize + 1];
    let mut k = 1;
    while k < t.len() {
        t[k] = 1.0 / k as f32;
        k += 1;
    }
    t
};

/// Independent vector accumulators per run kernel (hides the FMA latency).
const ACC: usize = 4;

/// f16/bf16 runs shorter than this many vectors are normalized run by run, the last vector
/// of each overlapping the one before (recomputing the same values) instead of blending
/// parameters where a vector straddles two runs: 7x7 f16 inference 14-30 % faster. Not
/// for f32: its 64-byte stores then split cache lines (f32 7x7 was up to 15 % slower).
const SHORT_RUN_VECTORS: usize = 4;

/// Runs ahead of the one being read whose lines the short-run loops prefetch (the moments
/// read `ACC` runs at a time and prefetch the next `ACC`). A channels-first channel's runs
/// lie a whole `C * H * W` apart, each on a new page, where the hardware prefetchers do
/// not follow. Measured here (2026-12-07, f16 32x512x7x7, one thread, medians): forward
/// 0.213 -> 0.205 ms, backward 0.45 -> 0.44 ms.
const RUN_AHEAD: usize = 4;

/// Runs of at most this many bytes are prefetched whole, [`RUN_AHEAD`] runs ahead (longer
/// runs are streams the hardware prefetchers pick up). 1024, taking in f32 14x14 planes,
/// was no better: backward 1.01-1.03x the speed, forward 0.95x.
const SHORT_RUN_BYTES: usize = 512;

/// Prefetch every line of run `i` of `buf` (runs of at most [`SHORT_RUN_BYTES`]; nothing
/// past the last run).
#[cfg_attr(not(debug_assertions), inline(always))]
fn prefetch_run<S: Simd, T>(s: S, buf: &[T], runs: &Runs, i: usize) {
    if i >= runs.count || runs.len == 0 {
        return;
    }
    let o = runs.first + i * runs.stride;
    for k in (0..runs.len).step_by(LINE / std::mem::size_of::<T>()) {
        s.prefetch(buf, o + k);
    }
    s.prefetch(buf, o + runs.len - 1);
}

/// Whether runs of `len` values of `T` are short enough for [`prefetch_run`].
#[cfg_attr(not(debug_assertions), inline(always))]
fn short_run<T>(len: usize) -> bool {
    len * std::mem::size_of::<T>() <= SHORT_RUN_BYTES
}

// ---------------------------------------------------------------- prefetching

/// Whether and how far ahead a kernel's vector loops prefetch their inputs (see
/// `CpuDevice::prefetch_ahead`), decided once per kernel call ([`with_fetch`]) and fixed
/// at compile time below it: a run-time `ahead > 0` test in the loops cost 13-15 % of a
/// single-thread bf16 channels-last forward and inference (32x256x28x28) with
/// prefetching off.
pub(crate) trait Fetch: Copy {
    /// Prefetch `src[i + ahead]` (nothing for [`NoFetch`]).
    fn fetch<S: Simd, T>(self, s: S, src: &[T], i: usize);
}

/// No prefetching.
#[derive(Clone, Copy)]
pub(crate) struct NoFetch;

/// Prefetch this many values ahead.
#[derive(Clone, Copy)]
pub(crate) struct FetchAhead(usize);

impl Fetch for NoFetch {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn fetch<S: Simd, T>(self, _: S, _: &[T], _: usize) {}
}

impl Fetch for FetchAhead {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn fetch<S: Simd, T>(self, s: S, src: &[T], i: usize) {
        s.prefetch(src, i + self.0);
    }
}

/// Run `body` with [`FetchAhead`] when `ahead > 0`, else with [`NoFetch`] (two
/// instantiations of the kernel body).
macro_rules! with_fetch {
    ($ahead:expr, |$pf:ident| $body:expr) => {
        if $ahead > 0 {
            let $pf = FetchAhead($ahead);
            $body
        } else {
            let $pf = NoFetch;
            $body
        }
    };
}

// ---------------------------------------------------------------- moments over runs

/// Welford moments of one channel streamed run by run.
pub(crate) struct RunMoments<S: Simd> {
    shift: f32,
    shift_v: S::V,
    mean: [S::V; ACC],
    m2: [S::V; ACC],
    steps: u32,
    mean1: S::V,
    m2_1: S::V,
    steps1: u32,
    /// Run tails (fewer than `LANES` values each) gathered into whole vectors for the spare
    /// accumulator: a 7x7 plane's one leftover value would otherwise take a scalar f64
    /// Welford step with a division, as long as the plane's three vector steps together.
    tail: [f32; 32],
    tail_len: usize,
    total: Moments,
}

impl<S: Simd> RunMoments<S> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub(crate) fn new(s: S, shift: f32) -> Self {
        let z = s.splat(0.0);
        RunMoments {
            shift,
            shift_v: s.splat(shift),
            mean: [z; ACC],
            m2: [z; ACC],
            steps: 0,
            mean1: z,
            m2_1: z,
            steps1: 0,
            tail: [0.0; 32],
            tail_len: 0,
            total: Moments::default(),
        }
    }

    /// Welford steps over `vectors` groups of `ACC` vectors, group `i` read by `src` (one
    /// vector per accumulator), on local copies of the accumulators: the struct stays in
    /// memory (its tail buffer is indexed at run time), so updating its fields in the loop
    /// made every step wait on a store and a reload.
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn steps(&mut self, s: S, vectors: usize, src: impl Groups<S>) {
        let (mut mean, mut m2, mut steps) = (self.mean, self.m2, self.steps);
        let shift = self.shift_v;
        for i in 0..vectors {
            let v = src.group(s, i);
            steps += 1;
            let inv = s.splat(RECIP[steps as usize]);
            for k in 0..ACC {
                (mean[k], m2[k]) = welford(s, s.sub(v[k], shift), inv, (mean[k], m2[k]));
            }
            if steps == FLUSH_STEPS {
                fold_groups(s, steps, &mean, &m2, &mut self.total);
                (mean, m2, steps) = ([s.splat(0.0); ACC], [s.splat(0.0); ACC], 0);
            }
        }
        (self.mean, self.m2, self.steps) = (mean, m2, steps);
    }

    /// Add one run: `ACC` consecutive vectors per step (prefetching as `pf` says), then
    /// single vectors, then scalars.
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub(crate) fn push_run<T: Element>(&mut self, s: S, x: &[T], pf: impl Fetch) {
        let l = S::LANES;
        let groups = x.len() / (ACC * l);
        let (body, rest) = x.split_at(groups * ACC * l);
        self.steps(s, groups, Consecutive(body, pf));
        if x.len() >= l {
            let whole = rest.len() / l * l;
            self.push_tail(s, &rest[..whole]);
            self.push_last(s, x, rest.len() - whole);
        } else {
            self.push_tail(s, rest);
        }
    }

    /// Add runs of one length `>= LANES`, `ACC` side by side (run `j * ACC + k` into
    /// accumulator `k`): each accumulator reads the concatenation of its runs, so every
    /// vector is whole; one that straddles two runs is the splice of the run's last vector
    /// and the next run's first. The `ACC` streams stay in step (equal lengths), so the
    /// straddle is found once per group of runs. Short runs (7x7, 14x14 planes) then take
    /// no per-value tails but the last group's; runs left over (fewer than `ACC`) go alone.
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub(crate) fn push_spliced_runs<T: Element>(&mut self, s: S, x: &[T], runs: Runs) {
        let l = S::LANES;
        let len = runs.len;
        debug_assert!(len >= l);
        let groups = runs.count / ACC;
        // where the group's next vector starts: the previous straddle took the values before
        let mut at = 0;
        let fetch = short_run::<T>(len);
        for gi in 0..groups {
            if fetch {
                for r in (gi + 1) * ACC..(gi + 2) * ACC {
                    prefetch_run(s, x, &runs, r);
                }
            }
            let g = runs.group(x, gi);
            let whole = (len - at) / l;
            self.steps(s, whole, SideBySide { runs: g, at });
            let left = len - (at + whole * l);
            at = 0;
            if left == 0 {
                continue;
            }
            if gi + 1 < groups {
                let mut v = [s.splat(0.0); ACC];
                for ((v, r), h) in v.iter_mut().zip(g).zip(runs.group(x, gi + 1)) {
                    *v = s.splice(left, s.load(&r[len - l..]), s.load(h));
                }
                self.steps(s, 1, Ready(v));
                at = l - left;
            } else {
                for r in g {
                    self.push_last(s, r, left);
                }
            }
        }
        for i in groups * ACC..runs.count {
            self.push_run(s, runs.get(x, i), NoFetch);
        }
    }

    /// The last `left < LANES` values of `run` (at least a vector long) into the tail
    /// buffer with one vector store (value by value, with a conversion each, they were a
    /// sixth of a 7x7 channel's moments).
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn push_last<T: Element>(&mut self, s: S, run: &[T], left: usize) {
        let l = S::LANES;
        debug_assert!(left < l && run.len() >= l && self.tail_len < l);
        if left == 0 {
            return;
        }
        let v = s.load(&run[run.len() - l..]);
        // the splice puts the last `left` lanes first; the lanes after them are scratch
        s.store_f32(&mut self.tail[self.tail_len..], s.splice(left, v, v));
        self.tail_len += left;
        if self.tail_len >= l {
            let v = s.load_f32(&self.tail[..l]);
            self.step1(s, v);
            let rest = s.load_f32(&self.tail[l..]);
            s.store_f32(&mut self.tail[..l], rest);
            self.tail_len -= l;
        }
    }

    /// Single vectors into the spare accumulator; the last values into the tail buffer,
    /// which joins the spare accumulator whenever it holds a whole vector.
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn push_tail<T: Element>(&mut self, s: S, rest: &[T]) {
        let l = S::LANES;
        let mut vecs = rest.chunks_exact(l);
        for v in &mut vecs {
            self.step1(s, s.load(v));
        }
        for v in vecs.remainder() {
            self.tail[self.tail_len] = v.to_f32();
            self.tail_len += 1;
            if self.tail_len == l {
                self.tail_len = 0;
                let v = s.load_f32(&self.tail[..l]);
                self.step1(s, v);
            }
        }
    }

    /// One Welford step of the spare accumulator with the (unshifted) vector `v`.
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn step1(&mut self, s: S, v: S::V) {
        self.steps1 += 1;
        let inv = s.splat(RECIP[self.steps1 as usize]);
        (self.mean1, self.m2_1) = welford(s, s.sub(v, self.shift_v), inv, (self.mean1, self.m2_1));
        if self.steps1 == FLUSH_STEPS {
            self.flush_single(s);
        }
    }

    #[cfg_attr(not(debug_assertions), inline(always))]
    fn flush_groups(&mut self, s: S) {
        if self.steps == 0 {
            return;
        }
        fold_groups(s, self.steps, &self.mean, &self.m2, &mut self.total);
        (self.mean, self.m2, self.steps) = ([s.splat(0.0); ACC], [s.splat(0.0); ACC], 0);
    }

    #[cfg_attr(not(debug_assertions), inline(always))]
    fn flush_single(&mut self, s: S) {
        if self.steps1 == 0 {
            return;
        }
        fold_lanes(s, self.steps1, self.mean1, self.m2_1, &mut self.total);
        self.mean1 = s.splat(0.0);
        self.m2_1 = s.splat(0.0);
        self.steps1 = 0;
    }

    #[cfg_attr(not(debug_assertions), inline(always))]
    /// The moments of the values pushed (the shift added back). Borrows: taking `self` by
    /// value copied the ~900-byte struct (a `memcpy` call per channel, a tenth of a
    /// 4x512x7x7 f16 channel's moments).
    pub(crate) fn finish(&mut self, s: S) -> Moments {
        self.flush_groups(s);
        self.flush_single(s);
        self.total.merge(&tail_moments(&self.tail[..self.tail_len], self.shift));
        let mut m = self.total;
        m.mean += self.shift as f64;
        m
    }
}

/// Moments of the (fewer than `LANES`) tail values less `shift`, two-pass in f64: one
/// division, where a Welford push per value took one each, in a chain (a quarter of a
/// 4x512x7x7 f16 channel's moments).
#[cfg_attr(not(debug_assertions), inline(always))]
fn tail_moments(tail: &[f32], shift: f32) -> Moments {
    if tail.is_empty() {
        return Moments::default();
    }
    let count = tail.len() as f64;
    let mean = tail.iter().map(|&v| (v - shift) as f64).sum::<f64>() / count;
    let m2 = tail.iter().map(|&v| ((v - shift) as f64 - mean) * ((v - shift) as f64 - mean)).sum();
    Moments { count, mean, m2 }
}

/// Where [`RunMoments::steps`] reads its groups of `ACC` vectors (types with inline(always)
/// methods, not closures: a closure may stay out of line, and then calls the intrinsics
/// without the caller's target features).
trait Groups<S: Simd> {
    fn group(&self, s: S, i: usize) -> [S::V; ACC];
}

/// Group `i`: the `ACC` consecutive vectors at `i * ACC * LANES`, prefetching ahead of
/// their lines as the [`Fetch`] says.
struct Consecutive<'a, T, F>(&'a [T], F);

impl<S: Simd, T: Element, F: Fetch> Groups<S> for Consecutive<'_, T, F> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn group(&self, s: S, i: usize) -> [S::V; ACC] {
        let l = S::LANES;
        for k in (0..ACC * l).step_by(LINE / std::mem::size_of::<T>()) {
            self.1.fetch(s, self.0, i * ACC * l + k);
        }
        let g = &self.0[i * ACC * l..][..ACC * l];
        let mut v = [s.splat(0.0); ACC];
        for (k, v) in v.iter_mut().enumerate() {
            *v = s.load(&g[k * l..]);
        }
        v
    }
}

/// Group `i`: vector `i` from `at` of each of `ACC` runs.
struct SideBySide<'a, T> {
    runs: [&'a [T]; ACC],
    at: usize,
}

impl<S: Simd, T: Element> Groups<S> for SideBySide<'_, T> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn group(&self, s: S, i: usize) -> [S::V; ACC] {
        let mut v = [s.splat(0.0); ACC];
        for (v, r) in v.iter_mut().zip(&self.runs) {
            *v = s.load(&r[self.at + i * S::LANES..]);
        }
        v
    }
}

/// One group, already loaded.
struct Ready<V>([V; ACC]);

impl<S: Simd> Groups<S> for Ready<S::V> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn group(&self, _: S, _: usize) -> [S::V; ACC] {
        self.0
    }
}

/// [`fold_lanes`] of `ACC` accumulators with the same step count: merged lane by lane in
/// the vectors first (Chan's merge of equal counts: the mean of the means, and the spread of
/// the means times the count added to the summed m2), then one f64 fold of the lanes
/// instead of `ACC`: the folds were a fifth of a 7x7 channel's moments.
#[cfg_attr(not(debug_assertions), inline(always))]
fn fold_groups<S: Simd>(s: S, steps: u32, mean: &[S::V; ACC], m2: &[S::V; ACC], total: &mut Moments) {
    const { assert!(ACC == 4) };
    let avg = s.mul(sum_acc(s, mean), s.splat(0.25));
    let d = [s.sub(mean[0], avg), s.sub(mean[1], avg), s.sub(mean[2], avg), s.sub(mean[3], avg)];
    let spread = s.add(s.fma(d[0], d[0], s.mul(d[1], d[1])), s.fma(d[2], d[2], s.mul(d[3], d[3])));
    let m2_sum = sum_acc(s, m2);
    let merged = s.fma(spread, s.splat(steps as f32), m2_sum);
    fold_lanes(s, steps * ACC as u32, avg, merged, total);
}

/// One Welford step of the lanes' (mean, m2) with the (shifted) value `v`, `inv` = 1 / the
/// step count: `d = v - mean; mean += d * inv; m2 += d * (v - mean)`.
#[cfg_attr(not(debug_assertions), inline(always))]
fn welford<S: Simd>(s: S, v: S::V, inv: S::V, (mean, m2): (S::V, S::V)) -> (S::V, S::V) {
    let d = s.sub(v, mean);
    let mean = s.fma(d, inv, mean);
    (mean, s.fma(d, s.sub(v, mean), m2))
}

/// Fold `LANES` Welford lanes, each over `steps` values, into `total`: the lanes halved in
/// f32 (`log2(LANES)` Chan merges of equal counts, each adding one rounding to sums of
/// positive terms), then one f64 merge. Three f64 sums over the lanes, with a conversion
/// per lane, were a third of a 4x512x7x7 f16 channel's moments.
#[cfg_attr(not(debug_assertions), inline(always))]
fn fold_lanes<S: Simd>(s: S, steps: u32, mean: S::V, m2: S::V, total: &mut Moments) {
    fold_lane_arrays::<S>(steps, &s.to_array(mean), &s.to_array(m2), total);
}

/// [`fold_lanes`] of lanes already stored as arrays.
#[cfg_attr(not(debug_assertions), inline(always))]
fn fold_lane_arrays<S: Simd>(steps: u32, means: &[f32; 16], m2s: &[f32; 16], total: &mut Moments) {
    let (mut mean, mut m2) = (*means, *m2s);
    // halve the lanes: lane i merges lane i + w, both over `count` values (Chan's merge of
    // equal counts: the mean of the means, the m2s plus d^2 * count / 2)
    let (mut w, mut count) = (S::LANES, steps as f32);
    while w > 1 {
        w /= 2;
        for i in 0..w {
            let d = mean[i] - mean[i + w];
            mean[i] = 0.5 * (mean[i] + mean[i + w]);
            m2[i] = (m2[i] + m2[i + w]) + d * d * (0.5 * count);
        }
        count *= 2.0;
    }
    total.merge(&Moments { count: count as f64, mean: mean[0] as f64, m2: m2[0] as f64 });
}

/// `sum f(v as f64)` over lanes (8 or 16 of them) with eight partial sums: a plain
/// `.sum()` is one serial chain of f64 adds (the compiler may not reorder them), 16 adds
/// of 4 cycles each, and the folds of a channel run several such chains; for a 7x7
/// channel they took longer than its vector work.
#[cfg_attr(not(debug_assertions), inline(always))]
fn sum_f64(v: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += f(c[i] as f64);
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&x| f(x as f64)).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

// ---------------------------------------------------------------- moments over rows

/// Accumulator sets a rows kernel interleaves (row `r` goes to set `r % sets`): the
/// update of channel j in row r waits on the same channel's update in row r - 1 through
/// memory (a store-to-load chain of ~20 cycles); with few channels per row there are too
/// few independent chains to hide it, so small C gets several sets, bounded to ~16 KiB of
/// accumulators so they stay in L1.
pub(crate) fn row_sets(c: usize) -> usize {
    (2048 / c.max(1)).clamp(1, 4)
}

/// Welford moments of every channel of a block of rows (`[rows][C]`), in `sets`
/// interleaved accumulator sets.
pub(crate) struct RowMoments {
    c: usize,
    shift: Scratch<f32>,
    /// `sets * c` running means and m2, set-major
    mean: Scratch<f32>,
    m2: Scratch<f32>,
    steps: Vec<u32>,
    /// lane `q` of the accumulators (and of `shift`, `total`) holds channel
    /// `(q + rot) % c`: see [`RowMomentsKernel`]
    rot: usize,
    /// the f64 totals, one array per moment (every channel sees the same rows, so one
    /// count serves them all and the fold is a plain loop over arrays that vectorizes)
    total: Totals,
}

/// f64 moments of channels that all hold `count` values (as every channel of a batch
/// does), struct-of-arrays: the per-channel arithmetic after a reduction (merges,
/// variances, `1/sqrt`) runs as loops over arrays that the compiler vectorizes, not as
/// one serial chain of f64 divisions per [`Moments`] struct (for 4096 channels the scalar
/// `1/sqrt(var + eps)` alone took 21 us here, the array loop 7).
pub(crate) struct Totals {
    pub count: f64,
    pub mean: Scratch<f64>,
    pub m2: Scratch<f64>,
}

impl Totals {
    /// No values yet, for `c` channels.
    pub(crate) fn new(c: usize) -> Totals {
        Totals { count: 0.0, mean: Scratch::filled(c, 0.0), m2: Scratch::filled(c, 0.0) }
    }

    /// The moments of `c` channels, in order, that all hold the same count.
    pub(crate) fn from_moments(c: usize, moments: impl IntoIterator<Item = Moments>) -> Totals {
        let mut t = Totals { count: 0.0, mean: Scratch::with_capacity(c), m2: Scratch::with_capacity(c) };
        for m in moments {
            debug_assert!(t.mean.is_empty() || m.count == t.count, "channels with different counts");
            t.count = m.count;
            t.mean.push(m.mean);
            t.m2.push(m.m2);
        }
        t
    }

    /// Channels.
    pub(crate) fn len(&self) -> usize {
        self.mean.len()
    }

    /// The channels' moments one after the other, `parts` in order.
    pub(crate) fn concat(parts: &[Totals]) -> Totals {
        let c = parts.iter().map(Totals::len).sum();
        let mut t = Totals {
            count: parts.first().map_or(0.0, |p| p.count),
            mean: Scratch::with_capacity(c),
            m2: Scratch::with_capacity(c),
        };
        for p in parts {
            debug_assert!(p.count == t.count, "channels with different counts");
            t.mean.extend_from_slice(&p.mean);
            t.m2.extend_from_slice(&p.m2);
        }
        t
    }

    /// Channel `j` as a [`Moments`].
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub(crate) fn get(&self, j: usize) -> Moments {
        Moments { count: self.count, mean: self.mean[j], m2: self.m2[j] }
    }

    /// `ops::invstd` of every channel's biased variance, in one loop over the arrays
    /// (vectorized: packed square roots and divisions).
    pub(crate) fn invstd(&self, eps: f32) -> Scratch<f64> {
        Scratch::collect(self.len(), (0..self.len()).map(|j| crate::ops::invstd(self.get(j).var_biased(), eps)))
    }

    /// Chan-merge `o` (the same channels) into these totals (see [`Totals::merge_with`]).
    pub(crate) fn merge(&mut self, o: &Totals) {
        let c = self.len();
        let (mean, m2) = (&o.mean[..c], &o.m2[..c]);
        self.merge_with(o.count, |j| (mean[j], m2[j]));
    }

    /// Chan-merge `n` more values of every channel, channel `j`'s with mean and m2
    /// `part(j)`. Every channel has the same count, so the merge's two count ratios (one
    /// division) are computed once, and the loop over the channels is straight-line f64
    /// arithmetic on arrays that the compiler vectorizes (with the kernel's instruction set
    /// inside a kernel). The results are bit for bit those of [`Moments::merge`].
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn merge_with(&mut self, n: f64, part: impl Fn(usize) -> (f64, f64)) {
        if n == 0.0 {
            return;
        }
        let c = self.len();
        let (tm, tq) = (&mut self.mean[..c], &mut self.m2[..c]);
        if self.count == 0.0 {
            for j in 0..c {
                (tm[j], tq[j]) = part(j);
            }
        } else {
            let count = self.count + n;
            let (fb, fab) = (n / count, self.count * n / count);
            for j in 0..c {
                let (mean, m2) = part(j);
                let d = mean - tm[j];
                tm[j] += d * fb;
                tq[j] += m2 + d * d * fab;
            }
        }
        self.count += n;
    }
}

impl RowMoments {
    /// Accumulators for `shift.len()` channels; `shift` holds one value of each channel.
    pub(crate) fn new(shift: Scratch<f32>) -> Self {
        let c = shift.len();
        let sets = row_sets(c);
        RowMoments {
            c,
            shift,
            mean: Scratch::filled(sets * c, 0.0),
            m2: Scratch::filled(sets * c, 0.0),
            steps: vec![0; sets],
            rot: 0,
            total: Totals::new(c),
        }
    }

    #[cfg_attr(not(debug_assertions), inline(always))]
    fn flush(&mut self, set: usize) {
        let n = self.steps[set] as f64;
        let range = set * self.c..(set + 1) * self.c;
        merge_lanes(&mut self.total, n, &mut self.mean[range.clone()], &mut self.m2[range]);
        self.steps[set] = 0;
    }

    /// Lay the lanes out rotated by `rot` channels (before anything was added).
    fn rotate(&mut self, rot: usize) {
        debug_assert!(self.total.count == 0.0 && self.steps.iter().all(|&n| n == 0));
        self.shift.rotate_left(rot);
        self.rot = rot;
    }

    /// The totals per channel (the shifts added back, in channel order).
    pub(crate) fn finish(mut self) -> Totals {
        for set in 0..self.steps.len() {
            if self.steps[set] > 0 {
                self.flush(set);
            }
        }
        let mut t = self.total;
        t.mean.iter_mut().zip(self.shift.iter()).for_each(|(m, &k)| *m += k as f64);
        t.mean.rotate_right(self.rot);
        t.m2.rotate_right(self.rot);
        t
    }
}

/// Kernel: add the rows of `x` (a whole number of rows of `acc.mean.len()` channels).
///
/// With `C % LANES == 0` the tiles load whole vectors at `row + col`; when `x` does not
/// start on a vector boundary (a `Vec` from the system allocator starts 16 bytes past one)
/// every such load would split across two cache lines (a channels-last f32 forward was
/// 12 % slower). The kernel then reads the rows from the first aligned element `o`: the
/// rows of `x[o..]` hold channels `o, o + 1, ..., c - 1, 0, ..., o - 1`, so the
/// accumulators are laid out rotated by `o`; the values left over, row 0's first `o` and
/// the last row's last `c - o`, make up one more (rotated) row.
pub(crate) struct RowMomentsKernel<'a, T> {
    pub acc: &'a mut RowMoments,
    pub x: &'a [T],
    /// prefetch each sub-block of rows while the one before it is summed (see
    /// [`first_of_line`])
    pub prefetch: bool,
    /// the op's data outgrows the threads' L2 (`CpuDevice::beyond_l2`): then prefetch
    /// anyway when a row takes several tiles
    pub beyond_l2: bool,
    /// `x` outgrows the L3 (`CpuDevice::beyond_l3`): see [`rows_in_order`]
    pub beyond_l3: bool,
}

impl<T: Element> Kernel for RowMomentsKernel<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) {
        let acc = self.acc;
        let (c, x) = (acc.c, self.x);
        if !c.is_multiple_of(S::LANES) {
            return row_moments_rows(s, acc, x);
        }
        let rows = x.len() / c;
        let o = lead_to_vector_boundary::<S, T>(x);
        let (body, rest) = if o > 0 && rows >= 2 {
            acc.rotate(o);
            let rest = Scratch::collect(
                c,
                (0..c).map(|q| (q + o) % c).map(|j| if j < o { x[j] } else { x[(rows - 1) * c + j] }),
            );
            (&x[o..o + (rows - 1) * c], rest)
        } else {
            (x, Scratch::with_capacity(0))
        };
        // whole vectors per row: register-blocked tiles; an odd last row, and f32 rows read
        // from memory ([`rows_in_order`]), go below
        let tiles = !rows_in_order::<S, T>(c, self.beyond_l3);
        let pairs_end = if tiles { body.len() / (2 * c) * 2 * c } else { 0 };
        let tiled = &body[..pairs_end];
        // several tiles per row walk each sub-block with a stride: prefetching the next
        // sub-block then pays from beyond L2 up (bf16 forward on 12.8 MB, C = 256 / 512 /
        // 1024: 0.94-0.96 / 0.90-0.91 / 0.96-0.97x the time, with the normalize's 4-row blocks)
        let prefetch = self.prefetch || (self.beyond_l2 && several_tiles::<S>(c));
        let ahead = if prefetch { block_pairs::<T>(c) * 2 * c } else { 0 };
        with_fetch!(ahead, |pf| row_moments_tiled(s, acc, tiled, pf));
        row_moments_rows(s, acc, &body[pairs_end..]);
        row_moments_rows(s, acc, &rest)
    }
}

/// Elements before the first one of `x` that starts a whole vector's worth of bytes
/// (`< LANES`; 0 when `x` is aligned, or cannot be).
#[cfg_attr(not(debug_assertions), inline(always))]
fn lead_to_vector_boundary<S: Simd, T>(x: &[T]) -> usize {
    lead_to_boundary(x, S::LANES * std::mem::size_of::<T>())
}

/// Cache line bytes.
const LINE: usize = 64;

/// Elements before the first one of `x` at a multiple of `width` bytes (`< width / size`;
/// 0 when `x` is aligned, or cannot be).
#[cfg_attr(not(debug_assertions), inline(always))]
fn lead_to_boundary<T>(x: &[T], width: usize) -> usize {
    let size = std::mem::size_of::<T>();
    let misalign = x.as_ptr() as usize % width;
    if misalign == 0 || !misalign.is_multiple_of(size) {
        0
    } else {
        (width - misalign) / size
    }
}

/// Rows kernels work on sub-blocks of rows this many bytes large (an L1's worth, so the
/// tiles after the first read the sub-block from L1), but of at least [`MIN_BLOCK_ROWS`]
/// rows: with thousands of channels a sub-block then lives in L2 instead, and each tile's
/// registers are loaded and stored once per 16 rows rather than per row.
const ROW_BLOCK_BYTES: usize = 32 * 1024;

/// The fewest rows in a rows kernels' sub-block.
const MIN_BLOCK_ROWS: usize = 16;

/// Rows per sub-block of the channels-last normalize and input gradient when a row takes
/// several channel tiles (bf16 C >= 256 on AVX-512), the op's data outgrows the threads'
/// L2 and the output goes through the caches: the tiles then walk the sub-block's rows
/// with a stride, each reading and writing part of every row; over 4 rows the walk stays
/// close to one forward stream (each tile reloads its parameters every 4 rows). Measured here (2026-11-28, 2 threads, bf16
/// inference on 12.8 MB, min of 40 calls, two alternations): C = 256 0.58 -> 0.50 ms, 512
/// 0.57 -> 0.52, 1024 0.54 -> 0.50, 2048 unchanged (its sub-block was 16 rows); 2 rows was
/// slower than the 32 KiB sub-blocks, 8 and 16 in between. Streamed outputs keep the long
/// sub-blocks (4 rows there: 0.95-0.98x the speed, `bnorm bench` alternated 3x), and so
/// does data within L2, where the loop is bound by the core (bf16 inference 32x512x7x7,
/// 1.6 MB: 4 rows took 1.16x the time, f16 1.30x). The f32 normalize on AVX-512 walks more
/// rows: see [`long_multi_tile_norm_rows`].
const MULTI_TILE_ROWS: usize = 4;

/// Whether the channels-last normalize keeps the long sub-blocks ([`block_rows`]) in the
/// case of [`MULTI_TILE_ROWS`] (a row of several tiles, data beyond L2, output cached), for
/// elements of `elem_bytes` on a level with `regs` vector registers: f32 rows on the
/// 32-register (AVX-512) levels whose 32 KiB sub-block holds at least [`MIN_BLOCK_ROWS`]
/// rows (C <= 512: 16 or more rows). An f32 tile holds 8 vectors of each of mean, scale and
/// shift in registers and reloads them every sub-block: over 4 rows that is 24 loads per 32
/// data vectors. Measured on Zen 4 (2026-12-07, 2 threads, f32, one process calling both
/// rules in alternation, 150-200 calls each, time of 4 rows over the long sub-block):
/// inference 32x512x14x14 (16 rows) 1.26 and 1.21, 32x256x14x14 (32 rows) 1.18,
/// forward_train 32x256x14x14 1.09, 32x512x14x14 1.00-1.02; C = 1024 did not gain from 8
/// rows (0.97, 0.98, and 1.02 for the same 8 rows run as a third rule: the probe's noise)
/// or 16 (1.01), so it keeps 4; C = 2048 lost with 16 (0.89); the input gradient's tiles
/// did not gain from 8 or 16 rows either (0.96-1.00). On AVX2 (16 registers, tiles of 4
/// vectors) the long sub-blocks lost: inference 32x128x28x28 0.79, 32x256x14x14 0.98. Not
/// measured on the Intel Xeon.
#[cfg_attr(not(debug_assertions), inline(always))]
fn long_multi_tile_norm_rows(regs: usize, elem_bytes: usize, c: usize) -> bool {
    regs >= 32 && elem_bytes == 4 && ROW_BLOCK_BYTES / (c * elem_bytes) >= MIN_BLOCK_ROWS
}

/// Pairs of rows per sub-block of the channels-last backward sums when a row takes several
/// channel tiles and the op's data outgrows the threads' L2 (see [`MULTI_TILE_ROWS`]; the
/// sums' tiles keep two row sets in registers, so the unit is a pair). Measured here
/// (2026-11-28, bf16 backward on 12.8 MB, min of 40 calls, three alternations, time of the
/// 32 KiB sub-blocks over this): C = 256 1.07-1.10, 512 1.04-1.08, 1024 0.98-1.07
/// (C = 64, one tile, unchanged: 0.95-1.04); 2 pairs, or prefetching the next sub-block as
/// well, no better.
const MULTI_TILE_SUM_PAIRS: usize = 4;

/// The widest rows that [`rows_in_order`] reads in order.
const IN_ORDER_MAX_CHANNELS: usize = 512;

/// Whether the channels-last reductions (the backward sums, the training forward's
/// moments) read rows of `c` channels of `T` in order, with their accumulators in L1
/// ([`grad_sums_rows`], [`row_moments_rows`]: per vector two more loads and two stores),
/// rather than in register tiles: f32 rows of several tiles and at most
/// [`IN_ORDER_MAX_CHANNELS`] on the 32-register levels, when the reduction's inputs
/// outgrow the L3 (`beyond_l3`). The tiles walk each sub-block of rows several times, a
/// few lines of each row at a time; from memory the rows read in order went faster.
/// Measured on Zen 4 (2026-12-07, 2 threads, f32, one process calling both in
/// alternation, 60-80 calls each, time of the tiles over the rows). Backward:
/// 32x28x28x256 1.19, 1.32, 1.36; 32x28x28x512 1.17; 32x56x56x128 1.16; 32x56x56x256
/// 1.20. Forward: 32x56x56x128 1.14, 1.20; 32x56x56x256 1.08; 32x28x28x512 0.98 (no
/// gain). Where they lost: inputs within the L3 (backward 32x14x14x512 0.93,
/// 32x14x14x256 0.94; forward 32x28x28x256 1.03, 0.95, 32x14x14x512 0.79), wider rows
/// (backward 32x14x14x1024 0.88, 0.96, 1.01, 32x7x7x2048 0.83; forward 32x14x14x1024
/// 0.74), rows of one tile (backward 32x56x56x64 0.85, tiles unchanged) and bf16, whose
/// loop converts each vector (backward 32x28x28x256 0.84, 32x28x28x512 1.05, 32x14x14x1024
/// 0.86, 32x56x56x128 0.91). Not measured on AVX2 or the Intel Xeon.
#[cfg_attr(not(debug_assertions), inline(always))]
fn rows_in_order<S: Simd, T>(c: usize, beyond_l3: bool) -> bool {
    beyond_l3 && S::REGS >= 32 && std::mem::size_of::<T>() == 4 && several_tiles::<S>(c) && c <= IN_ORDER_MAX_CHANNELS
}

/// Rows per sub-block for `c` channels of `T`.
#[cfg_attr(not(debug_assertions), inline(always))]
fn block_rows<T>(c: usize) -> usize {
    (ROW_BLOCK_BYTES / (c * std::mem::size_of::<T>())).max(MIN_BLOCK_ROWS)
}

/// Vectors per register tile: the accumulators of 2 interleaved row sets plus the tile's
/// per-channel constants must fit in the register file (4 on AVX-512, 2 on AVX2).
#[cfg_attr(not(debug_assertions), inline(always))]
fn tile_vectors<S: Simd>() -> usize {
    if S::REGS >= 32 {
        4
    } else {
        2
    }
}

/// Whether a row of `c` channels takes several register tiles of [`tile_vectors`] (the
/// rows reductions' and input gradient's tiles; their walk over a sub-block is then strided).
#[cfg_attr(not(debug_assertions), inline(always))]
fn several_tiles<S: Simd>(c: usize) -> bool {
    c / S::LANES > tile_vectors::<S>()
}

/// Pairs of rows per sub-block: a power of two (so sub-blocks never straddle a flush)
/// with the sub-block within [`ROW_BLOCK_BYTES`].
#[cfg_attr(not(debug_assertions), inline(always))]
fn block_pairs<T>(c: usize) -> usize {
    let pairs = block_rows::<T>(c) / 2;
    (1usize << (usize::BITS - 1 - pairs.leading_zeros())).min(FLUSH_STEPS as usize)
}

/// Pairs of rows per sub-block of the backward sums (a flush of them is due every
/// [`SUM_FLUSH_STEPS`] pairs).
#[cfg_attr(not(debug_assertions), inline(always))]
fn sums_block_pairs<T>(c: usize) -> usize {
    block_pairs::<T>(c).min(SUM_FLUSH_STEPS as usize)
}

/// Moments of whole pairs of rows with `c % LANES == 0`, register-blocked: channel tiles
/// of a few vectors keep their Welford accumulators (two sets, even and odd rows) in
/// registers across a sub-block of rows; only the tile boundaries touch memory.
#[cfg_attr(not(debug_assertions), inline(always))]
fn row_moments_tiled<S: Simd, T: Element>(s: S, acc: &mut RowMoments, x: &[T], pf: impl Fetch) {
    let c = acc.c;
    let l = S::LANES;
    let nv = c / l;
    let tv = tile_vectors::<S>();
    let mut mean = Scratch::filled(2 * c, 0f32);
    let mut m2 = Scratch::filled(2 * c, 0f32);
    let mut steps = 0usize;
    let per_block = block_pairs::<T>(c);
    for (b, block) in x.chunks(2 * c * per_block).enumerate() {
        let pairs = block.len() / (2 * c);
        let from = &x[b * 2 * c * per_block..];
        let mut t = 0;
        while t < nv {
            let w = (nv - t).min(tv);
            let col = t * l;
            let (shift, at) = (&acc.shift[..], (from, pf));
            match w {
                4 => moments_tile::<S, T, 4>(s, block, c, col, shift, &mut mean, &mut m2, steps, at),
                3 => moments_tile::<S, T, 3>(s, block, c, col, shift, &mut mean, &mut m2, steps, at),
                2 => moments_tile::<S, T, 2>(s, block, c, col, shift, &mut mean, &mut m2, steps, at),
                _ => moments_tile::<S, T, 1>(s, block, c, col, shift, &mut mean, &mut m2, steps, at),
            }
            t += w;
        }
        steps += pairs;
        if steps == FLUSH_STEPS as usize {
            flush_sets(acc, &mut mean, &mut m2, steps);
            steps = 0;
        }
    }
    if steps > 0 {
        flush_sets(acc, &mut mean, &mut m2, steps);
    }
}

/// Whether index `i` of a tile's walk starts its share of a cache line: every vector for
/// f32, every other one for f16/bf16 (a 16-bit vector is half a line; `i` steps by whole
/// vectors from a vector boundary of the tile). The tiled rows kernels prefetch the same
/// place in the next sub-block of rows there, once per line.
#[cfg_attr(not(debug_assertions), inline(always))]
fn first_of_line<S: Simd, T>(i: usize) -> bool {
    (i * std::mem::size_of::<T>()) % 64 < S::LANES * std::mem::size_of::<T>()
}

/// Fold two accumulator sets (set-major, `steps` values per lane) into the f64 totals.
#[cfg_attr(not(debug_assertions), inline(always))]
fn flush_sets(acc: &mut RowMoments, mean: &mut [f32], m2: &mut [f32], steps: usize) {
    let c = acc.c;
    for (set_mean, set_m2) in mean.chunks_exact_mut(c).zip(m2.chunks_exact_mut(c)) {
        merge_lanes(&mut acc.total, steps as f64, set_mean, set_m2);
    }
}

/// Chan-merge per-channel f32 moments of `n` values each (`mean[j]`, `m2[j]`) into the f64
/// totals ([`Totals::merge_with`]: vectorized, bit for bit [`Moments::merge`]; the scalar
/// fold over `Moments` structs was 7-9 % of a bf16 channels-last forward), and zero them.
#[cfg_attr(not(debug_assertions), inline(always))]
fn merge_lanes(total: &mut Totals, n: f64, mean: &mut [f32], m2: &mut [f32]) {
    if n == 0.0 {
        return;
    }
    let c = total.len();
    let (mean, m2) = (&mut mean[..c], &mut m2[..c]);
    total.merge_with(n, |j| (mean[j] as f64, m2[j] as f64));
    mean.fill(0.0);
    m2.fill(0.0);
}

/// One tile of `W` vectors at channel `col` over a sub-block of row pairs.
#[cfg_attr(not(debug_assertions), inline(always))]
#[allow(clippy::too_many_arguments)]
fn moments_tile<S: Simd, T: Element, const W: usize>(
    s: S,
    block: &[T],
    c: usize,
    col: usize,
    shift: &[f32],
    mean: &mut [f32],
    m2: &mut [f32],
    steps: usize,
    (from, pf): (&[T], impl Fetch),
) {
    let l = S::LANES;
    // plain loops, not array::from_fn: its closures can stay out of line and then call the
    // intrinsics without this function's target features (.ci/run checks for that)
    let z = s.splat(0.0);
    let (mut sh, mut mn, mut q) = ([z; W], [[z; W]; 2], [[z; W]; 2]);
    for k in 0..W {
        sh[k] = s.load_f32(&shift[col + k * l..]);
        for set in 0..2 {
            mn[set][k] = s.load_f32(&mean[set * c + col + k * l..]);
            q[set][k] = s.load_f32(&m2[set * c + col + k * l..]);
        }
    }
    for (i, pair) in block.chunks_exact(2 * c).enumerate() {
        let inv = s.splat(RECIP[steps + i + 1]);
        for set in 0..2 {
            for k in 0..W {
                let o = 2 * c * i + set * c + col + k * l;
                if first_of_line::<S, T>(o) {
                    pf.fetch(s, from, o);
                }
                let v = s.sub(s.load(&pair[set * c + col + k * l..]), sh[k]);
                (mn[set][k], q[set][k]) = welford(s, v, inv, (mn[set][k], q[set][k]));
            }
        }
    }
    for set in 0..2 {
        for k in 0..W {
            s.store_f32(&mut mean[set * c + col + k * l..], mn[set][k]);
            s.store_f32(&mut m2[set * c + col + k * l..], q[set][k]);
        }
    }
}

/// Row by row, accumulators in memory (any C; the rows' tails run scalar).
#[cfg_attr(not(debug_assertions), inline(always))]
fn row_moments_rows<S: Simd, T: Element>(s: S, acc: &mut RowMoments, x: &[T]) {
    let c = acc.c;
    let sets = acc.steps.len();
    let l = S::LANES;
    let cv = c - c % l;
    for (r, row) in x.chunks_exact(c).enumerate() {
        let set = r % sets;
        acc.steps[set] += 1;
        let inv1 = RECIP[acc.steps[set] as usize];
        let inv = s.splat(inv1);
        let base = set * c;
        let (mv, qv, kv) = (&mut acc.mean[base..base + c], &mut acc.m2[base..base + c], &acc.shift[..]);
        for j in (0..cv).step_by(l) {
            let v = s.sub(s.load(&row[j..]), s.load_f32(&kv[j..]));
            let (m, q) = welford(s, v, inv, (s.load_f32(&mv[j..]), s.load_f32(&qv[j..])));
            s.store_f32(&mut mv[j..], m);
            s.store_f32(&mut qv[j..], q);
        }
        for j in cv..c {
            let v = row[j].to_f32() - kv[j];
            let d = v - mv[j];
            mv[j] += d * inv1;
            qv[j] += d * (v - mv[j]);
        }
        if acc.steps[set] == FLUSH_STEPS {
            acc.flush(set);
        }
    }
}

/// `count` runs of `len` values, run `i` at `buf[first + i * stride..]`: the planes of a
/// channels-first channel (stride `C * H * W`) in any of the op's buffers, described rather
/// than listed (building a list of slices per channel was ~5 % of a 7x7 forward).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Runs {
    pub first: usize,
    pub stride: usize,
    pub count: usize,
    pub len: usize,
}

impl Runs {
    /// The planes of channel `ch` in samples `samples` of a channels-first `[N][C][S]`
    /// buffer with `c` channels of `s` values.
    pub(crate) fn planes(c: usize, s: usize, ch: usize, samples: std::ops::Range<usize>) -> Runs {
        Runs { first: (samples.start * c + ch) * s, stride: c * s, count: samples.len(), len: s }
    }

    /// Run `i` of `buf`.
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub(crate) fn get<'a, T>(&self, buf: &'a [T], i: usize) -> &'a [T] {
        &buf[self.first + i * self.stride..][..self.len]
    }

    /// Runs `ACC * gi ..` `ACC * (gi + 1)` of `buf`.
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn group<'a, T>(&self, buf: &'a [T], gi: usize) -> [&'a [T]; ACC] {
        // written out: `std::array::from_fn` here made a single-thread 7x7 forward 9 % slower
        const _: () = assert!(ACC == 4, "Runs::group lists ACC runs by hand");
        let b = gi * ACC;
        [self.get(buf, b), self.get(buf, b + 1), self.get(buf, b + 2), self.get(buf, b + 3)]
    }
}

/// Kernel: moments of one channel given as its runs of `x`.
pub(crate) struct RunMomentsKernel<'a, T> {
    pub x: &'a [T],
    pub runs: Runs,
    pub shift: f32,
    /// values ahead of the vector loops to prefetch, 0 for none (see `CpuDevice::prefetch_ahead`)
    pub ahead: usize,
}

impl<T: Element> Kernel for RunMomentsKernel<'_, T> {
    type Output = Moments;
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) -> Moments {
        run_moments(s, self.x, self.runs, self.shift, self.ahead)
    }
}

/// The moments of `runs` of `x`, shifted by `shift`.
#[cfg_attr(not(debug_assertions), inline(always))]
fn run_moments<S: Simd, T: Element>(s: S, x: &[T], runs: Runs, shift: f32, ahead: usize) -> Moments {
    let mut acc = RunMoments::new(s, shift);
    // runs of one to a few vectors: ACC spliced streams side by side; long runs: ACC
    // vectors of one run side by side; runs shorter than a vector: value by value into
    // the tail buffer (push_run does both of the latter)
    if (S::LANES..4 * ACC * S::LANES).contains(&runs.len) {
        acc.push_spliced_runs(s, x, runs);
    } else {
        with_fetch!(ahead, |pf| for i in 0..runs.count {
            acc.push_run(s, runs.get(x, i), pf);
        });
    }
    acc.finish(s)
}

/// Kernel: the moments of `channels` consecutive channels of a channels-first buffer, as
/// [`RunMomentsKernel`] of each: channel `k` is `runs` moved `k * step` values on, shifted
/// by its first value. One dispatch for all of them: per channel, the dispatch
/// and the collection of its moments were a tenth of a 4x512x7x7 f16 forward.
pub(crate) struct ChannelMomentsKernel<'a, T> {
    pub x: &'a [T],
    pub runs: Runs,
    pub channels: usize,
    pub step: usize,
    pub ahead: usize,
}

impl<T: Element> Kernel for ChannelMomentsKernel<'_, T> {
    type Output = Totals;
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) -> Totals {
        let mut t = Totals {
            count: 0.0,
            mean: Scratch::with_capacity(self.channels),
            m2: Scratch::with_capacity(self.channels),
        };
        for k in 0..self.channels {
            let runs = Runs { first: self.runs.first + k * self.step, ..self.runs };
            let shift = self.x[runs.first].to_f32();
            let m = run_moments(s, self.x, runs, shift, self.ahead);
            t.count = m.count;
            t.mean.push(m.mean);
            t.m2.push(m.m2);
        }
        t
    }
}

// ---------------------------------------------------------------- normalize

/// Per-channel affine map of the forward pass: `y = act((x - mean) * scale + shift + z)`.
#[derive(Clone, Copy)]
pub(crate) struct ChannelAffine {
    pub mean: f32,
    pub scale: f32,
    pub shift: f32,
}

/// A stretch of channels-first memory made of consecutive runs (planes) of `run` values:
/// run `r` of the slab belongs to channel `(first + r) % C`.
pub(crate) struct NormSlab<'a, T> {
    pub x: &'a [T],
    pub z: Option<&'a [T]>,
    pub y: &'a mut [T],
    pub first: usize,
}

/// Kernel: normalize slabs of runs with per-channel maps.
pub(crate) struct NormalizeSlabs<'a, 'b, T> {
    pub slabs: &'b mut [NormSlab<'a, T>],
    /// values per run (the spatial size)
    pub run: usize,
    /// one map per channel
    pub maps: &'b [ChannelAffine],
    pub relu: bool,
    /// write the output with non-temporal stores (see `CpuDevice::streams`)
    pub stream: bool,
    /// values ahead of the vector loops to prefetch, 0 for none (see `CpuDevice::prefetch_ahead`)
    pub ahead: usize,
}

impl<T: Element> Kernel for NormalizeSlabs<'_, '_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) {
        with_fetch!(self.ahead, |pf| self.slabs(s, pf))
    }
}

impl<T: Element> NormalizeSlabs<'_, '_, T> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn slabs<S: Simd>(self, s: S, pf: impl Fetch) {
        let (run, maps, stream) = (self.run, self.maps, (self.stream, pf));
        for sl in self.slabs.iter_mut() {
            let z = sl.z;
            match (z, self.relu) {
                (None, false) => norm_slab::<S, T, false, false>(s, sl, sl.x, run, maps, stream),
                (None, true) => norm_slab::<S, T, false, true>(s, sl, sl.x, run, maps, stream),
                (Some(z), false) => norm_slab::<S, T, true, false>(s, sl, z, run, maps, stream),
                (Some(z), true) => norm_slab::<S, T, true, true>(s, sl, z, run, maps, stream),
            }
        }
        if self.stream {
            s.fence();
        }
    }
}

/// A walk over the vectors `[lo, hi)` (whole vectors) of a stream of consecutive runs
/// of `run >= LANES` values, run `r` of channel `(first + r) % c`: each [`RunWalk::next`]
/// gives `(p, count, params)`, a stretch of `count` whole vectors from `p` in one run with
/// the splatted parameters `get(channel)` of that run; a vector straddling two runs goes
/// alone (`count` 1) with the two runs' parameters blended. The channel is stepped, not
/// divided out per run (a division per 7x7 run was a tenth of an f16 inference).
/// An iterator the caller drives with `while let`, not a helper taking the loop body as a
/// closure: the body then sits in the caller's `#[target_feature]` code. A body closure
/// that LLVM declined to inline lost those features and called every intrinsic (CI's
/// out-of-line check caught one in the input gradient).
struct RunWalk<S: Simd, G, const K: usize> {
    s: S,
    get: G,
    hi: usize,
    run: usize,
    c: usize,
    ch: usize,
    run_end: usize,
    cur: [S::V; K],
    p: usize,
}

impl<S: Simd, G: Fn(usize) -> [f32; K], const K: usize> RunWalk<S, G, K> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn new(s: S, (lo, hi): (usize, usize), run: usize, (first, c): (usize, usize), get: G) -> Self {
        let r = lo / run;
        let ch = (first + r) % c;
        let cur = Self::splat(s, &get, ch);
        RunWalk { s, get, hi, run, c, ch, run_end: (r + 1) * run, cur, p: lo }
    }

    #[cfg_attr(not(debug_assertions), inline(always))]
    fn splat(s: S, get: &G, ch: usize) -> [S::V; K] {
        let mut v = [s.splat(0.0); K];
        for (v, p) in v.iter_mut().zip(get(ch)) {
            *v = s.splat(p);
        }
        v
    }

    /// The next stretch `(p, count, params)`, or `None` past `hi`.
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn next(&mut self) -> Option<(usize, usize, [S::V; K])> {
        let (s, l, p) = (self.s, S::LANES, self.p);
        if p >= self.hi {
            return None;
        }
        // the whole vectors left in the current run go in one stretch (no per-vector test
        // of the run's end); a vector that starts the next run or straddles two runs goes
        // alone with its blended parameters
        let (params, count) = if p + l <= self.run_end {
            (self.cur, (self.run_end.min(self.hi) - p) / l)
        } else {
            // the vector starts run r + 1 or straddles runs r and r + 1 (run >= LANES)
            self.ch = if self.ch + 1 == self.c { 0 } else { self.ch + 1 };
            let next = Self::splat(s, &self.get, self.ch);
            let v = if p < self.run_end {
                let k = self.run_end - p;
                let mut v = next;
                for (v, c) in v.iter_mut().zip(self.cur) {
                    *v = s.select_first(k, c, *v);
                }
                v
            } else {
                next
            };
            self.run_end += self.run;
            self.cur = next;
            (v, 1)
        };
        self.p = p + count * l;
        Some((p, count, params))
    }
}

/// Vectors per block of [`pipelined!`].
const PIPE_BLOCK: usize = 4;

/// The channels-last normalize and input gradient leave their register tiles for the
/// pipelined flat stream when an output is 4K-aliased just past an input
/// ([`stores_alias`]) only on levels with fewer vector registers than this (AVX2, the
/// portable level). Measured with outputs placed 16 and 64 bytes past `x` modulo 4 KiB
/// (min over rounds, ms, tiles -> flat): on Zen 2 with AVX2 the flat stream won (bf16 cl
/// inference 32x512x28x28 8.26 -> 3.59, backward 15.45 -> 10.55); on Zen 4 with AVX-512
/// (6 rounds) the tiles lost little to the aliasing (backward 4.79 at +0, 5.15 at +16) and
/// the flat stream, which reads four periodic map arrays per vector, lost more (backward
/// 5.15 -> 7.20 at +16, 4.95 -> 6.74 at +64; inference 0.89 -> 1.40 at +64).
const CL_ALIAS_ROUTE_REGS: usize = 32;

/// The bytes modulo which a load is matched against older stores for store-to-load
/// forwarding before the full address is known (4 KiB on x86: bits 11..0).
const ALIAS_SPAN: usize = 4096;

/// Whether stores to `out` would be followed closely by loads from one of `inputs` at an
/// address equal modulo [`ALIAS_SPAN`]: `out` starts 1 to `PIPE_BLOCK` vectors' bytes past
/// an input's start, modulo the span (consecutive heap allocations of one size place the
/// second 16 bytes past the first). A vector loop that stores each result before the next
/// load then waits on each store (a false dependency): on Zen 2 a channels-first pass ran
/// 2-4x slower with `y` 16-64 bytes past `x`. [`pipelined!`] walks such outputs.
fn stores_alias<S: Simd, T>(out: &[T], inputs: &[&[T]]) -> bool {
    let block = PIPE_BLOCK * S::LANES * std::mem::size_of::<T>();
    let at = out.as_ptr() as usize;
    inputs.iter().any(|i| (1..=block).contains(&(at.wrapping_sub(i.as_ptr() as usize) % ALIAS_SPAN)))
}

/// For each vector `j` in `0..count`: `let v = load(j)`, then `store(j, v)`, with the
/// loads of each block of [`PIPE_BLOCK`] vectors issued before the previous block is
/// stored, so that no load follows a store of fewer than a block's bytes before it (see
/// [`stores_alias`]). A macro, not a function taking closures: the bodies must be
/// expanded inside the caller's `#[target_feature]` code (a closure called from several
/// sites of a generic helper is not inlined, and each intrinsic becomes a call).
macro_rules! pipelined {
    ($count:expr, |$j:ident| $load:expr, |$i:ident, $v:ident| $store:expr) => {{
        let count: usize = $count;
        let mut at = 0usize;
        if count >= 2 * PIPE_BLOCK {
            let mut cur = [
                {
                    let $j = 0usize;
                    $load
                },
                {
                    let $j = 1usize;
                    $load
                },
                {
                    let $j = 2usize;
                    $load
                },
                {
                    let $j = 3usize;
                    $load
                },
            ];
            at = PIPE_BLOCK;
            loop {
                let b = at;
                let next = if b + PIPE_BLOCK <= count {
                    Some([
                        {
                            let $j = b;
                            $load
                        },
                        {
                            let $j = b + 1;
                            $load
                        },
                        {
                            let $j = b + 2;
                            $load
                        },
                        {
                            let $j = b + 3;
                            $load
                        },
                    ])
                } else {
                    None
                };
                for (k, $v) in cur.into_iter().enumerate() {
                    let $i = b - PIPE_BLOCK + k;
                    $store;
                }
                match next {
                    Some(n) => {
                        cur = n;
                        at += PIPE_BLOCK;
                    }
                    None => break,
                }
            }
        }
        while at < count {
            let $v = {
                let $j = at;
                $load
            };
            let $i = at;
            $store;
            at += 1;
        }
    }};
}

/// One slab: a flat vector loop (aligned stores, parameters blended where a vector
/// straddles two runs) when runs hold at least a vector, else run by run.
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_slab<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    sl: &mut NormSlab<'_, T>,
    z: &[T],
    run: usize,
    maps: &[ChannelAffine],
    (stream, pf): (bool, impl Fetch),
) {
    let c = maps.len();
    let map_of = |r: usize| maps[channel_of(sl.first + r, c)];
    if run < S::LANES {
        for (r, (x, y)) in sl.x.chunks(run).zip(sl.y.chunks_mut(run)).enumerate() {
            norm_run::<S, T, ADD, RELU>(s, x, &z[r * run..], y, map_of(r), (stream, pf));
        }
        return;
    }
    let (x, y) = (sl.x, &mut *sl.y);
    let n = y.len();
    // (run by run, the stores are not aligned: not when streaming)
    if !stream && std::mem::size_of::<T>() == 2 && run < SHORT_RUN_VECTORS * S::LANES && n % run == 0 {
        let l = S::LANES;
        let mut ch = sl.first % c;
        let mut at = 0;
        while at < n {
            let m = maps[ch];
            let (mean, scale, shift) = (s.splat(m.mean), s.splat(m.scale), s.splat(m.shift));
            let (x, y) = (&x[at..at + run], &mut y[at..at + run]);
            let z = if ADD { &z[at..at + run] } else { z };
            let mut p = 0;
            loop {
                norm_vec::<S, T, ADD, RELU>(s, x, z, y, p, (mean, scale, shift), (false, pf));
                if p + l == run {
                    break;
                }
                p = (p + l).min(run - l);
            }
            at += run;
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
        return;
    }
    let (lo, hi) = vector_span::<S, T>(y, n);
    let get = |ch: usize| {
        let m = maps[ch];
        [m.mean, m.scale, m.shift]
    };
    let inputs: &[&[T]] = if ADD { &[x, z] } else { &[x] };
    let alias = stores_alias::<S, T>(y, inputs);
    let l = S::LANES;
    let mut walk = RunWalk::new(s, (lo, hi), run, (sl.first, c), get);
    while let Some((p, count, [mean, scale, shift])) = walk.next() {
        if alias {
            pipelined!(
                count,
                |j| norm_value::<S, T, ADD, RELU>(s, x, z, p + j * l, (mean, scale, shift), pf),
                |i, v| s.put(&mut y[p + i * l..], v, stream)
            );
        } else if stream {
            norm_stretch::<S, T, ADD, RELU, true>(s, (x, z, y), (p, count), (mean, scale, shift), pf);
        } else {
            norm_stretch::<S, T, ADD, RELU, false>(s, (x, z, y), (p, count), (mean, scale, shift), pf);
        }
    }
    for p in (0..lo).chain(hi..n) {
        let m = map_of(p / run);
        y[p] = norm_scalar::<S, T, ADD, RELU>(s, x, z, p, (m.mean, m.scale, m.shift));
    }
}

/// `count` whole vectors from `p` with one channel's parameters (`STREAM`: see
/// [`Simd::put`]): the slices are cut to the stretch once and walked in vector chunks, so
/// the loop has no bounds test per vector and no per-vector choice of store.
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_stretch<S: Simd, T: Element, const ADD: bool, const RELU: bool, const STREAM: bool>(
    s: S,
    (x, z, y): (&[T], &[T], &mut [T]),
    (p, count): (usize, usize),
    (mean, scale, shift): (S::V, S::V, S::V),
    pf: impl Fetch,
) {
    let l = S::LANES;
    let end = p + count * l;
    let (xs, ys) = (&x[p..end], &mut y[p..end]);
    let zs = if ADD { &z[p..end] } else { xs };
    let mut at = p;
    for ((xv, zv), yv) in xs.chunks_exact(l).zip(zs.chunks_exact(l)).zip(ys.chunks_exact_mut(l)) {
        pf.fetch(s, x, at);
        if ADD {
            pf.fetch(s, z, at);
        }
        let v = norm_value::<S, T, ADD, RELU>(s, xv, zv, 0, (mean, scale, shift), NoFetch);
        s.put(yv, v, STREAM);
        at += l;
    }
}

/// The vector at `p`: `y = act((x - mean) * scale + shift + z)` (streamed: see
/// [`Simd::put`]), prefetching further on as `pf` says.
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_vec<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    x: &[T],
    z: &[T],
    y: &mut [T],
    p: usize,
    (mean, scale, shift): (S::V, S::V, S::V),
    (stream, pf): (bool, impl Fetch),
) {
    let v = norm_value::<S, T, ADD, RELU>(s, x, z, p, (mean, scale, shift), pf);
    s.put(&mut y[p..], v, stream);
}

/// The vector at `p` of `act((x - mean) * scale + shift + z)`, prefetching further on as
/// `pf` says.
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_value<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    x: &[T],
    z: &[T],
    p: usize,
    (mean, scale, shift): (S::V, S::V, S::V),
    pf: impl Fetch,
) -> S::V {
    pf.fetch(s, x, p);
    if ADD {
        pf.fetch(s, z, p);
    }
    let mut v = s.fma(s.sub(s.load(&x[p..]), mean), scale, shift);
    if ADD {
        v = s.add(v, s.load(&z[p..]));
    }
    if RELU {
        v = s.relu(v);
    }
    v
}

#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_run<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    x: &[T],
    z: &[T],
    y: &mut [T],
    m: ChannelAffine,
    (stream, pf): (bool, impl Fetch),
) {
    let l = S::LANES;
    let n = x.len();
    let (lo, hi) = vector_span::<S, T>(y, n);
    let (mean, scale, shift) = (s.splat(m.mean), s.splat(m.scale), s.splat(m.shift));
    for i in (lo..hi).step_by(l) {
        norm_vec::<S, T, ADD, RELU>(s, x, z, y, i, (mean, scale, shift), (stream, pf));
    }
    for i in (0..lo).chain(hi..n) {
        y[i] = norm_scalar::<S, T, ADD, RELU>(s, x, z, i, (m.mean, m.scale, m.shift));
    }
}

/// Channel of run `i` of a channels-first stream (`i % c`) without a division when `i < c`
/// (every run of a fused group): a division per run was a visible share of a 7x7 pass.
#[cfg_attr(not(debug_assertions), inline(always))]
fn channel_of(i: usize, c: usize) -> usize {
    if i < c {
        i
    } else {
        i % c
    }
}

/// The span `[lo, hi)` of `out[..n]` that the vector loop covers: from the first element
/// whose address is a multiple of the vector's byte width (stores that split cache lines
/// cost ~6% on a memory-bound pass) to the last whole vector. The rest runs scalar.
#[cfg_attr(not(debug_assertions), inline(always))]
fn vector_span<S: Simd, T>(out: &[T], n: usize) -> (usize, usize) {
    let lo = lead_to_vector_boundary::<S, T>(out).min(n);
    (lo, lo + (n - lo) / S::LANES * S::LANES)
}

/// Kernel: normalize whole rows of `[rows][C]` with per-channel arrays, extended
/// periodically past C (see [`periodic`]).
pub(crate) struct NormalizeRows<'a, T> {
    pub x: &'a [T],
    pub z: Option<&'a [T]>,
    pub y: &'a mut [T],
    pub c: usize,
    pub mean: &'a [f32],
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub relu: bool,
    /// write the output with non-temporal stores (see `CpuDevice::streams`)
    pub stream: bool,
    /// values ahead of the vector loops to prefetch, 0 for none (see `CpuDevice::prefetch_ahead`)
    pub ahead: usize,
    /// the op's data outgrows the threads' L2 (`CpuDevice::beyond_l2`): see [`MULTI_TILE_ROWS`]
    pub beyond_l2: bool,
}

impl<T: Element> Kernel for NormalizeRows<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) {
        let stream = self.stream;
        with_fetch!(self.ahead, |pf| match (self.z, self.relu) {
            (None, false) => norm_rows::<S, T, false, false>(s, self.x, self.x, self, pf),
            (None, true) => norm_rows::<S, T, false, true>(s, self.x, self.x, self, pf),
            (Some(z), false) => norm_rows::<S, T, true, false>(s, self.x, z, self, pf),
            (Some(z), true) => norm_rows::<S, T, true, true>(s, self.x, z, self, pf),
        });
        if stream {
            s.fence();
        }
    }
}

#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_rows<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    x: &[T],
    z: &[T],
    k: NormalizeRows<'_, T>,
    pf: impl Fetch,
) {
    let c = k.c;
    let l = S::LANES;
    let n = x.len();
    let (stream, params) = (k.stream, (k.mean, k.scale, k.shift));
    // Streamed, a cache line must be written whole before its write-combining buffer is
    // let go (a partial line costs a read-modify-write in memory: 5x slower measured),
    // and the tiles write a row's lines in tile order: only when a row is whole lines.
    // An output 1-4 vectors past an input modulo 4 KiB, on the 16-register levels: the flat
    // stream, whose stores `norm_flat` pipelines (a tile's stores would each be followed by
    // a load they alias). See [`CL_ALIAS_ROUTE_REGS`] for why not with 32 registers.
    let inputs: &[&[T]] = if ADD { &[x, z] } else { &[x] };
    let alias = S::REGS < CL_ALIAS_ROUTE_REGS && stores_alias::<S, T>(k.y, inputs);
    if alias || !c.is_multiple_of(l) || (stream && !(c * std::mem::size_of::<T>()).is_multiple_of(LINE)) {
        return norm_flat::<S, T, ADD, RELU>(s, (x, z, k.y), c, params, (0, n, stream, pf));
    }
    // Whole vectors per row: channel tiles whose parameters stay in registers over a
    // sub-block of rows (one load and one store per vector instead of four and one).
    // Streamed, the tiles start at the first element `o` on a cache line (tiles are whole
    // lines wide, see above): a tile row covers the last c - o channels of one row and the
    // first o of the next (parameters from the periodic arrays at o), and the o values
    // before and the c - o after run flat.
    let o = if stream { lead_to_boundary(k.y, LINE) } else { 0 };
    let body = if o == 0 { n } else { (n / c).saturating_sub(1) * c };
    let max_w = if S::REGS >= 32 { 8 } else { 4 };
    let several = c / l > max_w && k.beyond_l2 && !stream;
    let rows = if several && !long_multi_tile_norm_rows(S::REGS, std::mem::size_of::<T>(), c) {
        MULTI_TILE_ROWS
    } else {
        block_rows::<T>(c)
    };
    let shifted = (&params.0[o..], &params.1[o..], &params.2[o..]);
    for lo in (o..o + body).step_by(rows * c) {
        let hi = (lo + rows * c).min(o + body);
        let mut t = 0;
        let mut seen = s.fast_seen();
        while t < c / l {
            let w = (c / l - t).min(max_w);
            let (col, y) = (t * l, &mut k.y[lo..hi]);
            let (x, z) = (&x[lo..hi], &z[lo.min(z.len())..hi.min(z.len())]);
            let at = (c, col, (stream, pf));
            let seen = &mut seen;
            match w {
                8 => norm_tile::<S, T, ADD, RELU, 8>(s, x, z, y, at, shifted, seen),
                4..=7 => norm_tile::<S, T, ADD, RELU, 4>(s, x, z, y, at, shifted, seen),
                2 | 3 => norm_tile::<S, T, ADD, RELU, 2>(s, x, z, y, at, shifted, seen),
                _ => norm_tile::<S, T, ADD, RELU, 1>(s, x, z, y, at, shifted, seen),
            }
            t += match w {
                8 => 8,
                4..=7 => 4,
                2 | 3 => 2,
                _ => 1,
            };
        }
        if s.fast_put_wrong(seen) {
            // a value was an f32 denormal, which the fast bf16 conversion reads as zero
            // (|y| < 2^-126, rare): the sub-block again, each vector converted exactly
            norm_flat::<S, T, ADD, RELU>(s, (x, z, &mut *k.y), c, params, (lo, hi, stream, pf));
        }
    }
    if o > 0 {
        norm_flat::<S, T, ADD, RELU>(s, (x, z, &mut *k.y), c, params, (0, o, stream, pf));
        norm_flat::<S, T, ADD, RELU>(s, (x, z, k.y), c, params, (o + body, n, stream, pf));
    }
}

/// `[start, end)` of a block of rows as one flat stream whose element p belongs to channel
/// p % c: the vectors take their per-channel parameters from arrays extended periodically
/// past c, so a vector may straddle two rows and any C (3, 17, 64) vectorizes; the vector
/// loop is aligned ([`vector_span`]), the rest runs scalar.
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_flat<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    (x, z, y): (&[T], &[T], &mut [T]),
    c: usize,
    (mean, scale, shift): (&[f32], &[f32], &[f32]),
    (start, end, stream, pf): (usize, usize, bool, impl Fetch),
) {
    let l = S::LANES;
    let (a, b) = vector_span::<S, T>(&y[start..end], end - start);
    let (lo, hi) = (start + a, start + b);
    let mut j = lo % c;
    let params = (mean, scale, shift);
    let inputs: &[&[T]] = if ADD { &[x, z] } else { &[x] };
    if stores_alias::<S, T>(y, inputs) {
        // (`pipelined!` loads in index order, so the phase steps once per load)
        pipelined!(
            (hi - lo) / l,
            |i| {
                let at = (lo + i * l, j);
                j = next_phase(j, l, c);
                flat_value::<S, T, ADD, RELU>(s, x, z, at, params, pf)
            },
            |i, v| s.put(&mut y[lo + i * l..], v, stream)
        );
    } else {
        for p in (lo..hi).step_by(l) {
            let v = flat_value::<S, T, ADD, RELU>(s, x, z, (p, j), params, pf);
            s.put(&mut y[p..], v, stream);
            j = next_phase(j, l, c);
        }
    }
    for p in (start..lo).chain(hi..end) {
        let j = p % c;
        y[p] = norm_scalar::<S, T, ADD, RELU>(s, x, z, p, (mean[j], scale[j], shift[j]));
    }
}

/// Element `p` outside the vectors: `act((x - mean) * scale + shift + z)`, its multiply-add
/// rounded as the level's vectors round theirs ([`Simd::fma1`]), so an output does not
/// depend on whether its element fell in a vector or at an end.
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_scalar<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    x: &[T],
    z: &[T],
    p: usize,
    (mean, scale, shift): (f32, f32, f32),
) -> T {
    let mut v = s.fma1(x[p].to_f32() - mean, scale, shift);
    if ADD {
        v += z[p].to_f32();
    }
    if RELU && v < 0.0 {
        v = 0.0;
    }
    T::from_f32_rounded(v)
}

/// The vector at `p` of a flat row-major stream, its channels from phase `j` of the
/// periodic parameter arrays: `act((x - mean) * scale + shift + z)`.
#[cfg_attr(not(debug_assertions), inline(always))]
fn flat_value<S: Simd, T: Element, const ADD: bool, const RELU: bool>(
    s: S,
    x: &[T],
    z: &[T],
    (p, j): (usize, usize),
    (mean, scale, shift): (&[f32], &[f32], &[f32]),
    pf: impl Fetch,
) -> S::V {
    pf.fetch(s, x, p);
    if ADD {
        pf.fetch(s, z, p);
    }
    let mut v = s.fma(s.sub(s.load(&x[p..]), s.load_f32(&mean[j..])), s.load_f32(&scale[j..]), s.load_f32(&shift[j..]));
    if ADD {
        v = s.add(v, s.load(&z[p..]));
    }
    if RELU {
        v = s.relu(v);
    }
    v
}

/// One tile of `W` vectors at channel `col` over a sub-block of rows of `c` channels (`y`,
/// `x`, `z` cut to the sub-block; the per-channel mean, scale and shift; `stream`: see
/// [`Simd::put`]), stored with [`Simd::put_fast`], which notes in `seen` whether the
/// caller must store the sub-block again (bf16 denormals on AVX512-BF16). The tile's maps
/// stay in registers; the exact redo runs outside it so that they need not be kept for it
/// (a redo inside the tile, or a test and branch per vector, spilled them: the bf16 tiles
/// then took 1.3-1.5x the time of f16 ones on Zen 4).
#[cfg_attr(not(debug_assertions), inline(always))]
fn norm_tile<S: Simd, T: Element, const ADD: bool, const RELU: bool, const W: usize>(
    s: S,
    x: &[T],
    z: &[T],
    y: &mut [T],
    (c, col, stream): (usize, usize, (bool, impl Fetch)),
    (mean, scale, shift): (&[f32], &[f32], &[f32]),
    seen: &mut S::V,
) {
    let l = S::LANES;
    let zero = s.splat(0.0);
    let (mut m, mut sc, mut sh) = ([zero; W], [zero; W], [zero; W]);
    for i in 0..W {
        m[i] = s.load_f32(&mean[col + i * l..]);
        sc[i] = s.load_f32(&scale[col + i * l..]);
        sh[i] = s.load_f32(&shift[col + i * l..]);
    }
    for r in (0..x.len()).step_by(c) {
        for i in 0..W {
            let o = r + col + i * l;
            let v = norm_value::<S, T, ADD, RELU>(s, x, z, o, (m[i], sc[i], sh[i]), stream.1);
            s.put_fast(&mut y[o..], v, stream.0, seen);
        }
    }
}

/// The most f32 lanes of any SIMD level.
const MAX_LANES: usize = 16;

/// How far [`periodic`] arrays run past C: a vector at any phase below C plus a cache
/// line of 2-byte elements (the streamed rows tiles start up to that far in).
const PERIODIC_EXTRA: usize = MAX_LANES + LINE / 2;

/// `f` of every channel's map, repeated until it is `maps.len() + PERIODIC_EXTRA` long:
/// `out[j..j + lanes]` holds the values of channels `j, j + 1, ...` (mod C) for any phase
/// `j < C + LINE / 2`. Built once per op.
pub(crate) fn periodic<M>(maps: &[M], f: impl Fn(&M) -> f32) -> Scratch<f32> {
    let c = maps.len();
    let len = c + PERIODIC_EXTRA;
    let mut out = Scratch::filled(len, 0.0);
    out[..c].iter_mut().zip(maps).for_each(|(o, m)| *o = f(m));
    let mut at = c;
    while c > 0 && at < len {
        let take = (len - at).min(c);
        out.copy_within(..take, at);
        at += take;
    }
    out
}

/// The channel phase `lanes` elements further along a row-major `[rows][c]` stream.
#[cfg_attr(not(debug_assertions), inline(always))]
fn next_phase(j: usize, lanes: usize, c: usize) -> usize {
    let j = j + lanes;
    if j < c {
        j
    } else if j < 2 * c {
        j - c
    } else {
        j % c
    }
}

// ---------------------------------------------------------------- backward reductions

/// f64 totals of the backward reduction of one channel: `sum g` and `sum g * (x - mean)`.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct GradSums {
    pub g: f64,
    pub gx: f64,
}

impl GradSums {
    pub(crate) fn add(&mut self, o: &GradSums) {
        self.g += o.g;
        self.gx += o.gx;
    }
}

/// The backward inputs of a run, a slab, or whole buffers cut by [`Runs`].
#[derive(Clone, Copy)]
pub(crate) struct GradRun<'a, T> {
    pub dy: &'a [T],
    pub x: &'a [T],
    /// the forward output, present when ReLU was fused
    pub y: Option<&'a [T]>,
}

/// Prefetch the backward inputs ahead of `i` as `pf` says.
#[cfg_attr(not(debug_assertions), inline(always))]
fn prefetch_grad<S: Simd, T>(s: S, inp: &GradRun<'_, T>, i: usize, pf: impl Fetch) {
    pf.fetch(s, inp.dy, i);
    pf.fetch(s, inp.x, i);
    if let Some(y) = inp.y {
        pf.fetch(s, y, i);
    }
}

/// `mean` split as `m_hi + m_lo` with `m_hi` on the activation type's grid.
///
/// The backward sums subtract `m_hi` in f32 and take `m_lo * sum g` off the f64 total. With
/// f16/bf16 inputs every `x - m_hi` is then exact in f32, whereas `x - mean` rounds by the
/// same amount for every x of a binade (x lies on a coarser grid than mean): a bias that
/// `sum g` multiplies, far above the contract when g has a large mean.
#[cfg_attr(not(debug_assertions), inline(always))]
fn split_mean<T: Element>(mean: f32) -> (f32, f64) {
    let hi = T::from_f32_rounded(mean).to_f32();
    if hi.is_finite() {
        (hi, mean as f64 - hi as f64)
    } else {
        // a mean beyond the type's range (an eval-mode running mean, say): no x is near it,
        // so x - mean has no bias to correct
        (mean, 0.0)
    }
}

/// Kernel: backward sums of one channel given as its runs of the inputs.
pub(crate) struct GradSumRuns<'a, T> {
    pub inp: GradRun<'a, T>,
    pub runs: Runs,
    pub mean: f32,
    /// values ahead of the vector loops to prefetch, 0 for none (see `CpuDevice::prefetch_ahead`)
    pub ahead: usize,
}

impl<T: Element> Kernel for GradSumRuns<'_, T> {
    type Output = GradSums;
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) -> GradSums {
        with_fetch!(self.ahead, |pf| if self.inp.y.is_some() {
            grad_sums_runs::<S, T, true>(s, &self.inp, self.runs, (self.mean, pf))
        } else {
            grad_sums_runs::<S, T, false>(s, &self.inp, self.runs, (self.mean, pf))
        })
    }
}

/// [`GradSumRuns`] with the ReLU gate (`RELU`: `g = dy` where `y > 0`, else 0) fixed at
/// compile time. The accumulators are locals indexed by constants only, so they stay in
/// registers (an accumulator struct indexed in a loop with a branch stayed in memory, and
/// each add waited on a store and a reload).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_sums_runs<S: Simd, T: Element, const RELU: bool>(
    s: S,
    inp: &GradRun<'_, T>,
    runs: Runs,
    (mean, pf): (f32, impl Fetch),
) -> GradSums {
    let l = S::LANES;
    let z = s.splat(0.0);
    let (m_hi, m_lo) = split_mean::<T>(mean);
    let mv = s.splat(m_hi);
    let (mut g, mut gx) = ([z; ACC], [z; ACC]);
    let mut steps = 0u32;
    let mut out = GradSums::default();
    let n = runs.len;
    if (l..ACC * l).contains(&n) {
        return grad_sums_short_runs::<S, T, RELU>(s, inp, runs, (m_hi, m_lo));
    }
    let fetch = short_run::<T>(n);
    for i in 0..runs.count {
        let (dy, y, x) = grad_run::<S, T, RELU>(s, inp, &runs, i, fetch);
        // a plain function, not a closure: a closure can stay out of line and then call the
        // intrinsics without this function's target features (.ci/run checks for that)
        let term = grad_term::<S, T, RELU>;
        let full = n / (ACC * l) * (ACC * l);
        for i in (0..full).step_by(ACC * l) {
            for k in (0..ACC * l).step_by(LINE / std::mem::size_of::<T>()) {
                pf.fetch(s, dy, i + k);
                pf.fetch(s, x, i + k);
                if RELU {
                    pf.fetch(s, y, i + k);
                }
            }
            for k in 0..ACC {
                let (gv, xc) = term(s, dy, y, x, mv, i + k * l);
                g[k] = s.add(g[k], gv);
                gx[k] = s.fma(gv, xc, gx[k]);
            }
            steps += 1;
            if steps == SUM_FLUSH_STEPS {
                fold_sum_lanes(s, &mut g, &mut gx, &mut out);
                steps = 0;
            }
        }
        // the (< ACC) leftover vectors, each in its own accumulator: short runs (7x7 planes)
        // keep independent chains too
        let left = (n - full) / l;
        for k in 0..ACC - 1 {
            if k < left {
                let (gv, xc) = term(s, dy, y, x, mv, full + k * l);
                g[k] = s.add(g[k], gv);
                gx[k] = s.fma(gv, xc, gx[k]);
            }
        }
        // the last values (< LANES) as the run's last whole vector, the lanes already
        // counted zeroed, in the accumulator the leftover vectors leave free (one vector
        // instead of a scalar f64 step per value: a 7x7 plane has one such value, 14x14 four)
        let tail = n - full - left * l;
        if tail > 0 && n >= l {
            let (gv, xc) = term(s, dy, y, x, mv, n - l);
            let (gv, xc) = (s.select_first(l - tail, z, gv), s.select_first(l - tail, z, xc));
            g[ACC - 1] = s.add(g[ACC - 1], gv);
            gx[ACC - 1] = s.fma(gv, xc, gx[ACC - 1]);
        }
        if left > 0 || (tail > 0 && n >= l) {
            steps += 1;
            if steps == SUM_FLUSH_STEPS {
                fold_sum_lanes(s, &mut g, &mut gx, &mut out);
                steps = 0;
            }
        }
        let scalar_from = if n >= l { n } else { full + left * l };
        for j in scalar_from..n {
            let gj = if RELU && y[j].to_f32() <= 0.0 { 0.0 } else { dy[j].to_f64() };
            out.g += gj;
            out.gx += gj * (x[j].to_f64() - m_hi as f64);
        }
    }
    fold_sum_lanes(s, &mut g, &mut gx, &mut out);
    out.gx -= m_lo * out.g;
    out
}

/// Run `i` of the backward inputs as `(dy, y, x)` (`y` is `dy` without the ReLU gate),
/// first prefetching run `i + RUN_AHEAD` when `fetch` (short runs: see [`RUN_AHEAD`]).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_run<'a, S: Simd, T, const RELU: bool>(
    s: S,
    inp: &GradRun<'a, T>,
    runs: &Runs,
    i: usize,
    fetch: bool,
) -> (&'a [T], &'a [T], &'a [T]) {
    if fetch {
        prefetch_run(s, inp.dy, runs, i + RUN_AHEAD);
        prefetch_run(s, inp.x, runs, i + RUN_AHEAD);
        if let (true, Some(y)) = (RELU, inp.y) {
            prefetch_run(s, y, runs, i + RUN_AHEAD);
        }
    }
    let dy = runs.get(inp.dy, i);
    let y = match inp.y {
        Some(y) if RELU => runs.get(y, i),
        _ => dy,
    };
    (dy, y, runs.get(inp.x, i))
}

/// [`grad_sums_runs`] of runs one to `ACC` vectors long (7x7 and 14x14 planes): each run's
/// whole vectors in accumulators `0..`, its last values as its last whole vector (the
/// lanes already counted zeroed) in the last accumulator, one step per run. A loop of its
/// own: inside the general one's branches the accumulators lived on the stack, stored and
/// reloaded around every run (a 32x512x7x7 f16 backward's sums spent most of their time
/// there).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_sums_short_runs<S: Simd, T: Element, const RELU: bool>(
    s: S,
    inp: &GradRun<'_, T>,
    runs: Runs,
    (m_hi, m_lo): (f32, f64),
) -> GradSums {
    let l = S::LANES;
    let n = runs.len;
    debug_assert!((l..ACC * l).contains(&n));
    let (whole, tail) = (n / l, n % l);
    let z = s.splat(0.0);
    let mv = s.splat(m_hi);
    let (mut g, mut gx) = ([z; ACC], [z; ACC]);
    let mut steps = 0u32;
    let mut out = GradSums::default();
    let term = grad_term::<S, T, RELU>;
    let fetch = short_run::<T>(n);
    for i in 0..runs.count {
        let (dy, y, x) = grad_run::<S, T, RELU>(s, inp, &runs, i, fetch);
        for k in 0..ACC - 1 {
            if k < whole {
                let (gv, xc) = term(s, dy, y, x, mv, k * l);
                g[k] = s.add(g[k], gv);
                gx[k] = s.fma(gv, xc, gx[k]);
            }
        }
        if tail > 0 {
            let (gv, xc) = term(s, dy, y, x, mv, n - l);
            let (gv, xc) = (s.select_first(l - tail, z, gv), s.select_first(l - tail, z, xc));
            g[ACC - 1] = s.add(g[ACC - 1], gv);
            gx[ACC - 1] = s.fma(gv, xc, gx[ACC - 1]);
        }
        steps += 1;
        if steps == SUM_FLUSH_STEPS {
            fold_sum_lanes(s, &mut g, &mut gx, &mut out);
            steps = 0;
        }
    }
    fold_sum_lanes(s, &mut g, &mut gx, &mut out);
    out.gx -= m_lo * out.g;
    out
}

/// The gated gradient `g` and the centred input `x - mean` of the vector at `o`.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_term<S: Simd, T: Element, const RELU: bool>(
    s: S,
    dy: &[T],
    y: &[T],
    x: &[T],
    mean: S::V,
    o: usize,
) -> (S::V, S::V) {
    let d = s.load(&dy[o..]);
    let g = if RELU { s.where_positive(s.load(&y[o..]), d) } else { d };
    (g, s.sub(s.load(&x[o..]), mean))
}

/// Add the lanes of the backward-sum accumulators into the f64 totals and reset them: the
/// `ACC` accumulators summed in the vectors first (two more f32 roundings on sums of at most
/// `SUM_FLUSH_STEPS` vectors each), then one f64 sum of the lanes for each total: eight
/// of them were longer than a 7x7 channel's vector work.
#[cfg_attr(not(debug_assertions), inline(always))]
fn fold_sum_lanes<S: Simd>(s: S, g: &mut [S::V; ACC], gx: &mut [S::V; ACC], out: &mut GradSums) {
    const { assert!(ACC == 4) };
    let l = S::LANES;
    let (ga, gxa) = (s.to_array(sum_acc(s, g)), s.to_array(sum_acc(s, gx)));
    out.g += sum_f64(&ga[..l], |v| v);
    out.gx += sum_f64(&gxa[..l], |v| v);
    (*g, *gx) = ([s.splat(0.0); ACC], [s.splat(0.0); ACC]);
}

/// The sum of `ACC` accumulators, pairwise.
#[cfg_attr(not(debug_assertions), inline(always))]
fn sum_acc<S: Simd>(s: S, v: &[S::V; ACC]) -> S::V {
    s.add(s.add(v[0], v[1]), s.add(v[2], v[3]))
}

/// Kernel: backward sums of every channel over whole rows of `[rows][C]`.
pub(crate) struct GradSumRows<'a, T> {
    pub dy: &'a [T],
    pub x: &'a [T],
    pub y: Option<&'a [T]>,
    pub mean: &'a [f32],
    /// prefetch each sub-block of rows while the one before it is summed
    pub prefetch: bool,
    /// the op's data outgrows the threads' L2 (`CpuDevice::beyond_l2`): see
    /// [`MULTI_TILE_SUM_PAIRS`]
    pub beyond_l2: bool,
    /// the inputs (`x`, `dy` and `y`) outgrow the L3 (`CpuDevice::beyond_l3`): see
    /// [`rows_in_order`]
    pub beyond_l3: bool,
}

impl<T: Element> Kernel for GradSumRows<'_, T> {
    type Output = SumTotals;
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) -> SumTotals {
        let c = self.mean.len();
        let mut m_hi = Scratch::with_capacity(c);
        let mut m_lo = Scratch::with_capacity(c);
        self.mean.iter().map(|&m| split_mean::<T>(m)).for_each(|(hi, lo)| {
            m_hi.push(hi);
            m_lo.push(lo);
        });
        let mut tot = SumTotals::new(c);
        // whole vectors per row: register-blocked tiles over pairs of rows, as for the
        // moments; the odd last row, any C, and f32 rows read from memory
        // ([`rows_in_order`]) row by row
        let tiles = c.is_multiple_of(S::LANES) && !rows_in_order::<S, T>(c, self.beyond_l3);
        let tiled = if tiles { self.x.len() / (2 * c) * 2 * c } else { 0 };
        let part =
            |lo: usize, hi: usize| GradRun { dy: &self.dy[lo..hi], x: &self.x[lo..hi], y: self.y.map(|y| &y[lo..hi]) };
        if tiled > 0 {
            let short = self.beyond_l2 && several_tiles::<S>(c);
            let pairs = if short { MULTI_TILE_SUM_PAIRS } else { sums_block_pairs::<T>(c) };
            let ahead = if self.prefetch { pairs * 2 * c } else { 0 };
            with_fetch!(ahead, |pf| grad_sums_tiled(s, &part(0, tiled), &m_hi, &mut tot, (pairs, pf)));
        }
        grad_sums_rows(s, &part(tiled, self.x.len()), &m_hi, &mut tot);
        tot.gx.iter_mut().zip(tot.g.iter()).zip(m_lo.iter()).for_each(|((gx, &g), &lo)| *gx -= lo * g);
        tot
    }
}

/// Backward sums of whole pairs of rows with `c % LANES == 0`, register-blocked like
/// [`row_moments_tiled`]: per channel tile, two row sets of `sum g` and `sum g * xc`
/// stay in registers across a sub-block of rows.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_sums_tiled<S: Simd, T: Element>(
    s: S,
    inp: &GradRun<'_, T>,
    mean: &[f32],
    out: &mut SumTotals,
    (pairs, pf): (usize, impl Fetch),
) {
    let c = mean.len();
    let l = S::LANES;
    let nv = c / l;
    let tv = tile_vectors::<S>();
    let mut sg = Scratch::filled(2 * c, 0f32);
    let mut sgx = Scratch::filled(2 * c, 0f32);
    let block = 2 * c * pairs;
    let mut steps = 0;
    for lo in (0..inp.x.len()).step_by(block) {
        let hi = (lo + block).min(inp.x.len());
        let b = GradRun { dy: &inp.dy[lo..hi], x: &inp.x[lo..hi], y: inp.y.map(|y| &y[lo..hi]) };
        let from = GradRun { dy: &inp.dy[lo..], x: &inp.x[lo..], y: inp.y.map(|y| &y[lo..]) };
        let mut t = 0;
        while t < nv {
            let w = (nv - t).min(tv);
            let col = t * l;
            let at = (&from, pf);
            match w {
                4 => sums_tile::<S, T, 4>(s, &b, c, col, mean, &mut sg, &mut sgx, at),
                3 => sums_tile::<S, T, 3>(s, &b, c, col, mean, &mut sg, &mut sgx, at),
                2 => sums_tile::<S, T, 2>(s, &b, c, col, mean, &mut sg, &mut sgx, at),
                _ => sums_tile::<S, T, 1>(s, &b, c, col, mean, &mut sg, &mut sgx, at),
            }
            t += w;
        }
        steps += (hi - lo) / (2 * c);
        if steps >= SUM_FLUSH_STEPS as usize {
            fold_sums(&mut sg, &mut sgx, out);
            steps = 0;
        }
    }
    fold_sums(&mut sg, &mut sgx, out);
}

/// f64 totals of the rows kernels' backward sums, one array per sum (the fold is then a
/// plain loop over arrays that vectorizes with the kernel's instruction set).
/// f64 backward sums of `c` channels, struct-of-arrays.
pub(crate) struct SumTotals {
    g: Scratch<f64>,
    gx: Scratch<f64>,
}

impl SumTotals {
    /// Zero sums for `c` channels.
    pub(crate) fn new(c: usize) -> SumTotals {
        SumTotals { g: Scratch::filled(c, 0.0), gx: Scratch::filled(c, 0.0) }
    }

    /// Add `o` (the same channels; a loop that vectorizes).
    pub(crate) fn add(&mut self, o: &SumTotals) {
        let c = self.g.len();
        let (g, gx, og, ogx) = (&mut self.g[..c], &mut self.gx[..c], &o.g[..c], &o.gx[..c]);
        for j in 0..c {
            g[j] += og[j];
            gx[j] += ogx[j];
        }
    }

    /// The sums per channel.
    pub(crate) fn sums(&self) -> Scratch<GradSums> {
        let per_channel = self.g.iter().zip(self.gx.iter());
        Scratch::collect(self.g.len(), per_channel.map(|(&g, &gx)| GradSums { g, gx }))
    }
}

/// Add set-major f32 partial sums into the f64 totals and reset them.
#[cfg_attr(not(debug_assertions), inline(always))]
fn fold_sums(sg: &mut [f32], sgx: &mut [f32], out: &mut SumTotals) {
    let c = out.g.len();
    for (a, b) in sg.chunks_exact_mut(c).zip(sgx.chunks_exact_mut(c)) {
        let (tg, tgx, a, b) = (&mut out.g[..c], &mut out.gx[..c], &mut a[..c], &mut b[..c]);
        for j in 0..c {
            tg[j] += a[j] as f64;
            tgx[j] += b[j] as f64;
            (a[j], b[j]) = (0.0, 0.0);
        }
    }
}

/// One tile of `W` vectors at channel `col` over a sub-block of row pairs.
#[cfg_attr(not(debug_assertions), inline(always))]
#[allow(clippy::too_many_arguments)]
fn sums_tile<S: Simd, T: Element, const W: usize>(
    s: S,
    b: &GradRun<'_, T>,
    c: usize,
    col: usize,
    mean: &[f32],
    sg: &mut [f32],
    sgx: &mut [f32],
    (from, pf): (&GradRun<'_, T>, impl Fetch),
) {
    let l = S::LANES;
    let z = s.splat(0.0);
    let (mut mv, mut ag, mut agx) = ([z; W], [[z; W]; 2], [[z; W]; 2]);
    for k in 0..W {
        mv[k] = s.load_f32(&mean[col + k * l..]);
        for set in 0..2 {
            ag[set][k] = s.load_f32(&sg[set * c + col + k * l..]);
            agx[set][k] = s.load_f32(&sgx[set * c + col + k * l..]);
        }
    }
    for p in (0..b.x.len()).step_by(2 * c) {
        for set in 0..2 {
            for k in 0..W {
                let o = p + set * c + col + k * l;
                if first_of_line::<S, T>(o) {
                    prefetch_grad(s, from, o, pf);
                }
                let dy = s.load(&b.dy[o..]);
                let g = match b.y {
                    Some(y) => s.where_positive(s.load(&y[o..]), dy),
                    None => dy,
                };
                ag[set][k] = s.add(ag[set][k], g);
                agx[set][k] = s.fma(g, s.sub(s.load(&b.x[o..]), mv[k]), agx[set][k]);
            }
        }
    }
    for k in 0..W {
        for set in 0..2 {
            s.store_f32(&mut sg[set * c + col + k * l..], ag[set][k]);
            s.store_f32(&mut sgx[set * c + col + k * l..], agx[set][k]);
        }
    }
}

/// Backward sums row by row, accumulators in memory (any C; the rows' tails run scalar).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_sums_rows<S: Simd, T: Element>(s: S, inp: &GradRun<'_, T>, mean: &[f32], out: &mut SumTotals) {
    let c = mean.len();
    let l = S::LANES;
    let cv = c - c % l;
    // interleaved accumulator sets, as in `RowMoments`
    let sets = row_sets(c);
    let mut sg = Scratch::filled(sets * c, 0f32);
    let mut sgx = Scratch::filled(sets * c, 0f32);
    let rows = inp.x.len() / c;
    for r in 0..rows {
        let (xr, dyr) = (&inp.x[r * c..][..c], &inp.dy[r * c..][..c]);
        let yr = inp.y.map(|y| &y[r * c..][..c]);
        let base = (r % sets) * c;
        let (ag, agx) = (&mut sg[base..base + c], &mut sgx[base..base + c]);
        for j in (0..cv).step_by(l) {
            let dy = s.load(&dyr[j..]);
            let g = match yr {
                Some(y) => s.where_positive(s.load(&y[j..]), dy),
                None => dy,
            };
            let a = s.add(s.load_f32(&ag[j..]), g);
            let xc = s.sub(s.load(&xr[j..]), s.load_f32(&mean[j..]));
            let b = s.fma(g, xc, s.load_f32(&agx[j..]));
            s.store_f32(&mut ag[j..], a);
            s.store_f32(&mut agx[j..], b);
        }
        for j in cv..c {
            let dy = dyr[j].to_f32();
            let g = match yr {
                Some(y) if y[j].to_f32() <= 0.0 => 0.0,
                _ => dy,
            };
            ag[j] += g;
            agx[j] += g * (xr[j].to_f32() - mean[j]);
        }
        if (r + 1) % (SUM_FLUSH_STEPS as usize * sets) == 0 {
            fold_sums(&mut sg, &mut sgx, out);
        }
    }
    fold_sums(&mut sg, &mut sgx, out);
}

// ---------------------------------------------------------------- backward elementwise

/// Per-channel map of the input gradient: `dx = a * ((g - gmean) + k * (x - mean))`.
///
/// This grouping rounds once at the scale of `g` before the final product, so `dx` keeps
/// its accuracy when the two terms cancel (small M, or g nearly affine in x).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GradMap {
    pub mean: f32,
    pub a: f32,
    pub gmean: f32,
    pub k: f32,
}

/// A slab of consecutive channels-first runs for the input gradient (see [`NormSlab`]).
pub(crate) struct GradSlab<'a, T> {
    pub inp: GradRun<'a, T>,
    pub dx: &'a mut [T],
    pub dz: Option<&'a mut [T]>,
    pub first: usize,
}

/// Kernel: input gradient (and residual gradient) of slabs of runs.
pub(crate) struct GradSlabs<'a, 'b, T> {
    pub slabs: &'b mut [GradSlab<'a, T>],
    pub run: usize,
    /// one map per channel
    pub maps: &'b [GradMap],
    /// write the output with non-temporal stores (see `CpuDevice::streams`)
    pub stream: bool,
    /// values ahead of the vector loops to prefetch, 0 for none (see `CpuDevice::prefetch_ahead`)
    pub ahead: usize,
}

impl<T: Element> Kernel for GradSlabs<'_, '_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) {
        with_fetch!(self.ahead, |pf| self.slabs(s, pf))
    }
}

impl<T: Element> GradSlabs<'_, '_, T> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn slabs<S: Simd>(self, s: S, pf: impl Fetch) {
        let (run, maps, stream) = (self.run, self.maps, (self.stream, pf));
        for sl in self.slabs.iter_mut() {
            match (sl.inp.y.is_some(), sl.dz.is_some()) {
                (false, false) => grad_slab::<S, T, false, false>(s, sl, run, maps, stream),
                (false, true) => grad_slab::<S, T, false, true>(s, sl, run, maps, stream),
                (true, false) => grad_slab::<S, T, true, false>(s, sl, run, maps, stream),
                (true, true) => grad_slab::<S, T, true, true>(s, sl, run, maps, stream),
            }
        }
        if self.stream {
            s.fence();
        }
    }
}

/// One slab of [`GradSlabs`] with the ReLU gate (`RELU`, `y` given) and the residual
/// gradient (`DZ`, `dz` given) fixed at compile time, so the vector loop tests neither.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_slab<S: Simd, T: Element, const RELU: bool, const DZ: bool>(
    s: S,
    sl: &mut GradSlab<'_, T>,
    run: usize,
    maps: &[GradMap],
    (stream, pf): (bool, impl Fetch),
) {
    let c = maps.len();
    let map_of = |p: usize| maps[channel_of(sl.first + p / run, c)];
    let n = sl.dx.len();
    if run < S::LANES {
        // runs shorter than a vector: run by run (grad_span vectorizes within a run)
        for r in 0..n / run {
            let m = map_of(r * run);
            let span = (r * run, (r + 1) * run, stream, pf);
            grad_span(s, &sl.inp, &mut *sl.dx, sl.dz.as_deref_mut(), span, |_| m);
        }
        return;
    }
    let (lo, hi) = vector_span::<S, T>(sl.dx, n);
    let get = |ch: usize| {
        let m = maps[ch];
        [m.mean, m.a, m.gmean, m.k]
    };
    let (dy, x) = (&sl.inp.dy[..n], &sl.inp.x[..n]);
    let y = if RELU { sl.inp.y.map_or(dy, |y| &y[..n]) } else { dy };
    let dx = &mut sl.dx[..n];
    let mut no_dz: [T; 0] = [];
    let dz: &mut [T] = if DZ { sl.dz.as_deref_mut().map_or(&mut no_dz[..], |d| &mut d[..n]) } else { &mut no_dz };
    let inputs: &[&[T]] = if RELU { &[dy, x, y] } else { &[dy, x] };
    let alias = stores_alias::<S, T>(dx, inputs) || (DZ && stores_alias::<S, T>(dz, inputs));
    let l = S::LANES;
    let mut walk = RunWalk::new(s, (lo, hi), run, (sl.first, c), get);
    while let Some((p0, count, [mean, a, gmean, k])) = walk.next() {
        let params = (mean, a, gmean, k);
        if alias {
            pipelined!(count, |j| gate_value::<S, T, RELU>(s, (dy, x, y), p0 + j * l, params, pf), |i, v| {
                s.put(&mut dx[p0 + i * l..], v.0, stream);
                if DZ {
                    s.put(&mut dz[p0 + i * l..], v.1, stream);
                }
            });
        } else if stream {
            grad_stretch::<S, T, RELU, DZ, true>(s, (dy, x, y), (&mut *dx, &mut *dz), (p0, count), params, pf);
        } else {
            grad_stretch::<S, T, RELU, DZ, false>(s, (dy, x, y), (&mut *dx, &mut *dz), (p0, count), params, pf);
        }
    }
    // heads and tails shorter than a vector: grad_span runs them scalar
    grad_span(s, &sl.inp, &mut *sl.dx, sl.dz.as_deref_mut(), (0, lo, stream, pf), map_of);
    grad_span(s, &sl.inp, &mut *sl.dx, sl.dz.as_deref_mut(), (hi, n, stream, pf), map_of);
}

/// `count` whole vectors from `p` of `dx` (and of `dz = g` when `DZ`) with one channel's
/// parameters (`STREAM`: see [`Simd::put`]): like [`norm_stretch`], slices cut to the
/// stretch once and walked in vector chunks.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_stretch<S: Simd, T: Element, const RELU: bool, const DZ: bool, const STREAM: bool>(
    s: S,
    (dy, x, y): (&[T], &[T], &[T]),
    (dx, dz): (&mut [T], &mut [T]),
    (p, count): (usize, usize),
    params: (S::V, S::V, S::V, S::V),
    pf: impl Fetch,
) {
    let l = S::LANES;
    let end = p + count * l;
    let (dys, xs) = (&dy[p..end], &x[p..end]);
    let ys = if RELU { &y[p..end] } else { dys };
    let mut dzs = if DZ { dz[p..end].chunks_exact_mut(l) } else { dz[..0].chunks_exact_mut(l) };
    let mut at = p;
    let ins = dys.chunks_exact(l).zip(xs.chunks_exact(l)).zip(ys.chunks_exact(l));
    for (((dyv, xv), yv), dxv) in ins.zip(dx[p..end].chunks_exact_mut(l)) {
        pf.fetch(s, dy, at);
        pf.fetch(s, x, at);
        if RELU {
            pf.fetch(s, y, at);
        }
        let (v, g) = gate_value::<S, T, RELU>(s, (dyv, xv, yv), 0, params, NoFetch);
        s.put(dxv, v, STREAM);
        if let (true, Some(d)) = (DZ, dzs.next()) {
            s.put(d, g, STREAM);
        }
        at += l;
    }
}

/// The vectors at `p` of `dx = a * (k * (x - mean) + g - gmean)` and of `g` (= `dz`):
/// `g` is `dy`, zeroed where `y <= 0` when `RELU` (else `y` is not read), prefetching
/// further on as `pf` says.
#[cfg_attr(not(debug_assertions), inline(always))]
fn gate_value<S: Simd, T: Element, const RELU: bool>(
    s: S,
    (dy, x, y): (&[T], &[T], &[T]),
    p: usize,
    (mean, a, gmean, k): (S::V, S::V, S::V, S::V),
    pf: impl Fetch,
) -> (S::V, S::V) {
    pf.fetch(s, dy, p);
    pf.fetch(s, x, p);
    if RELU {
        pf.fetch(s, y, p);
    }
    let d = s.load(&dy[p..]);
    let g = if RELU { s.where_positive(s.load(&y[p..]), d) } else { d };
    (s.mul(a, s.fma(k, s.sub(s.load(&x[p..]), mean), s.sub(g, gmean))), g)
}

/// The vector at `p`: `dx = a * (k * (x - mean) + g - gmean)` with `g` = `dy`, zeroed
/// where `y <= 0` when `y` is given, and `dz = g` when asked (streamed: see [`Simd::put`]).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_vec<S: Simd, T: Element>(
    s: S,
    inp: &GradRun<'_, T>,
    (dx, dz): (&mut [T], Option<&mut [T]>),
    p: usize,
    (mean, a, gmean, k): (S::V, S::V, S::V, S::V),
    stream: bool,
) {
    let (v, g) = grad_values(s, inp, p, (mean, a, gmean, k));
    s.put(&mut dx[p..], v, stream);
    if let Some(dz) = dz {
        s.put(&mut dz[p..], g, stream);
    }
}

/// The vectors at `p` of `dx` and of `g` (= `dz`), as [`grad_vec`] stores them.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_values<S: Simd, T: Element>(
    s: S,
    inp: &GradRun<'_, T>,
    p: usize,
    params: (S::V, S::V, S::V, S::V),
) -> (S::V, S::V) {
    match inp.y {
        Some(y) => gate_value::<S, T, true>(s, (inp.dy, inp.x, y), p, params, NoFetch),
        None => gate_value::<S, T, false>(s, (inp.dy, inp.x, inp.dy), p, params, NoFetch),
    }
}

/// `dx`, `dz` over `[start, end)` of one span where channel maps come from `map_of(i)`; the
/// vector part (aligned, see [`vector_span`]) takes the map of its first element (callers
/// give spans where that is right: one run, or a row tail shorter than a vector).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_span<S: Simd, T: Element>(
    s: S,
    inp: &GradRun<'_, T>,
    dx: &mut [T],
    mut dz: Option<&mut [T]>,
    (start, end, stream, pf): (usize, usize, bool, impl Fetch),
    map_of: impl Fn(usize) -> GradMap,
) {
    let l = S::LANES;
    let (a, b) = vector_span::<S, T>(&dx[start..], end - start);
    let (lo, hi) = (start + a, start + b);
    if lo < hi {
        let m = map_of(lo);
        let maps = (s.splat(m.mean), s.splat(m.a), s.splat(m.gmean), s.splat(m.k));
        for i in (lo..hi).step_by(l) {
            prefetch_grad(s, inp, i, pf);
            grad_vec(s, inp, (&mut *dx, dz.as_deref_mut()), i, maps, stream);
        }
    }
    for i in (start..lo).chain(hi..end) {
        let m = map_of(i);
        let dy = inp.dy[i].to_f32();
        let g = match inp.y {
            Some(y) if y[i].to_f32() <= 0.0 => 0.0,
            _ => dy,
        };
        dx[i] = T::from_f32_rounded(m.a * s.fma1(m.k, inp.x[i].to_f32() - m.mean, g - m.gmean));
        if let Some(dz) = dz.as_deref_mut() {
            dz[i] = T::from_f32_rounded(g);
        }
    }
}

/// Kernel: input gradient over whole rows of `[rows][C]` with per-channel arrays,
/// extended periodically past C (see [`periodic`]).
pub(crate) struct GradRows<'a, T> {
    pub inp: GradRun<'a, T>,
    pub dx: &'a mut [T],
    pub dz: Option<&'a mut [T]>,
    pub c: usize,
    pub mean: &'a [f32],
    pub a: &'a [f32],
    pub gmean: &'a [f32],
    pub k: &'a [f32],
    /// write the output with non-temporal stores (see `CpuDevice::streams`)
    pub stream: bool,
    /// values ahead of the vector loops to prefetch, 0 for none (see `CpuDevice::prefetch_ahead`)
    pub ahead: usize,
    /// the op's data outgrows the threads' L2 (`CpuDevice::beyond_l2`): see [`MULTI_TILE_ROWS`]
    pub beyond_l2: bool,
    /// the op's whole `dx` takes at least [`FLAT_STREAM_FROM_BYTES`]: a streaming `dx` then
    /// streams in every case (see [`grad_rows_cached`])
    pub large_dx: bool,
}

impl<T: Element> Kernel for GradRows<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn run<S: Simd>(self, s: S) {
        // the store kind fixed at compile time: as a third run-time choice in the loop
        // (with `y` and `dz`) it cost 7-10 % of a single-thread bf16 cl backward
        let aliased = grad_stores_alias::<S, T>(&self.inp, self.dx, self.dz.as_deref());
        let stream = self.stream && !grad_rows_cached::<S, T>(self.c, self.large_dx, aliased);
        with_fetch!(self.ahead, |pf| if stream {
            grad_rows::<S, T, true>(s, self, pf);
        } else {
            grad_rows::<S, T, false>(s, self, pf);
        });
        if stream {
            s.fence();
        }
    }
}

/// The whole op's `dx` from which the channels-last input gradient streams f16/bf16 rows
/// of several channel tiles too (the flat stream), not only in the cases
/// [`grad_rows_cached`] leaves streamed. Measured on the 2-core Intel Xeon (AVX-512 FP16,
/// 480 MiB L3; 2026-12-07, f16 backward, 2 threads, 30 calls, medians of two alternated
/// rounds): 32x56x56x256 (51 MB of `dx`) took 7.8-8.2 ms streamed flat against
/// 10.8-11.1 ms in cached tiles; 32x56x56x128 (25.7 MB) 3.20-3.25 ms against 2.98-3.13 ms,
/// and 32x28x28x512 (25.7 MB) 3.21-3.51 against 3.38-3.46 ms. On a 2-core Zen 4 (32 MiB
/// L3; 2026-12-07, 4 alternated rounds) bf16 32x56x56x256 took 8.05 ms streamed flat
/// against 9.48 cached, f16 8.64 against 9.98.
pub(crate) const FLAT_STREAM_FROM_BYTES: usize = 32 << 20;

/// Channel tiles per row up to which the 16-bit channels-last input gradient stays cached
/// under a streaming policy (see [`grad_rows_cached`]).
const CACHED_MAX_TILES: usize = 2;

/// Whether the channels-last input gradient writes through the caches even under a
/// streaming policy: f16 and bf16 rows of several channel tiles, whose streamed stores
/// would take the flat stream (see [`grad_rows`]), when the row takes at most
/// [`CACHED_MAX_TILES`] tiles (128 channels on AVX-512: the cached tiles walk their
/// sub-block almost in order) or `dx` (or `dz`) sits 1-4 vectors past an input modulo
/// 4 KiB (`aliased`, [`grad_stores_alias`]: the flat stream slows down there, the tiles
/// little). From [`FLAT_STREAM_FROM_BYTES`] of `dx` (`large_dx`) no row stays cached.
///
/// Measured on a 2-core Zen 4 (AVX-512 BF16, 32 MiB L3; 2026-12-07, 2 threads, medians of
/// 20 calls, min over alternated rounds; the VM's speed moved by up to 2x that hour).
/// Streamed flat over cached tiles, `ci/ab_bench.py` (one case per process), 4-6 rounds:
/// 32x128x56x56 (25.7 MB of `dx`) bf16 1.05, 1.07, f16 1.02; 32x512x28x28 (25.7 MB)
/// bf16 0.67, 0.77, 0.70, f16 0.77; 32x256x28x28 (12.8 MB) bf16 0.96, f16 0.90;
/// 32x1024x14x14 (12.8 MB) bf16 0.69, f16 0.87. PyTorch took 4.68 ms on bf16 32x512x28x28
/// there, the cached tiles 5.8-6.6 ms. In one process timing those cases one after the
/// other (buffers from the heap, at other placements) the flat stream lost some of them
/// (bf16 32x1024x14x14 3.0-4.7 ms in 4 rounds against 2.0-4.8 cached); with every buffer
/// mapped on its own pages (`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072`, no
/// aliasing) it won all six, 3 rounds: 1.08-1.58x the speed of the cached tiles, and this
/// rule (aliasing checked) 1.12-1.40x. The same placement dependence was measured on this
/// model on 2026-12-06 (the thirteenth run in docs/BENCHMARKS.md: a flat bf16 32x512x28x28
/// backward at 4.66 ms with `dx` at +0 bytes, 6.7-7.2 at +16 and +64), and a session that
/// day had found the cached tiles faster at C = 128 to 2048 in 13 of 14 cases with heap
/// placements. On the 2-core Intel Xeon (AVX-512 FP16, 480 MiB L3) 32x28x28x512 took
/// 3.21-3.51 ms streamed flat against 3.38-3.46 cached. Rows of one tile stream in tiles
/// (C = 64: streaming took 0.92-0.99x the time on Zen 4). Unmeasured on AVX2, where two
/// tiles are 32 channels.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_rows_cached<S: Simd, T>(c: usize, large_dx: bool, aliased: bool) -> bool {
    let tiles = (c / S::LANES).div_ceil(tile_vectors::<S>());
    !large_dx
        && std::mem::size_of::<T>() == 2
        && c.is_multiple_of(S::LANES)
        && several_tiles::<S>(c)
        && (aliased || tiles <= CACHED_MAX_TILES)
}

/// [`GradRows`] with the store kind `STREAM` (see [`Simd::put`]).
///
/// With whole vectors per row, channel tiles keep their four per-channel maps in registers
/// over a sub-block of rows, as [`norm_rows`] does (streamed, from the first element on a
/// cache line, the values before and after running flat); otherwise one flat stream
/// reads the maps' periodic arrays at every vector.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_rows<S: Simd, T: Element, const STREAM: bool>(s: S, kr: GradRows<'_, T>, pf: impl Fetch) {
    let (c, l, n) = (kr.c, S::LANES, kr.inp.x.len());
    let maps = (kr.mean, kr.a, kr.gmean, kr.k);
    let (inp, dx, mut dz) = (kr.inp, kr.dx, kr.dz);
    let (nv, tv, several) = (c / l, tile_vectors::<S>(), several_tiles::<S>(c));
    // streamed, several tiles per row were slower than the flat stream (f32 32x256x56x56
    // 1.14x the time, bf16 1.13x), as the normalize's short sub-blocks were (1.03-1.05x)
    // outputs 1-4 vectors past an input modulo 4 KiB, on the 16-register levels: the flat
    // stream, pipelined (see norm_rows and [`CL_ALIAS_ROUTE_REGS`])
    let alias = S::REGS < CL_ALIAS_ROUTE_REGS && grad_stores_alias::<S, T>(&inp, dx, dz.as_deref());
    if alias || !c.is_multiple_of(l) || (STREAM && (several || !(c * std::mem::size_of::<T>()).is_multiple_of(LINE))) {
        return grad_flat::<S, T, STREAM>(s, &inp, (dx, dz), c, maps, (0, n, pf));
    }
    let o = if STREAM { lead_to_boundary(dx, LINE) } else { 0 };
    let body = if o == 0 { n } else { (n / c).saturating_sub(1) * c };
    let rows = if several && kr.beyond_l2 { MULTI_TILE_ROWS } else { block_rows::<T>(c) };
    let shifted = (&maps.0[o..], &maps.1[o..], &maps.2[o..], &maps.3[o..]);
    for lo in (o..o + body).step_by(rows * c) {
        let hi = (lo + rows * c).min(o + body);
        let mut t = 0;
        let mut seen = s.fast_seen();
        while t < nv {
            let w = (nv - t).min(tv);
            let out = (&mut *dx, dz.as_deref_mut(), &mut seen);
            let at = (lo, hi, c, t * l, pf);
            match w {
                4 => grad_tile::<S, T, STREAM, 4>(s, &inp, out, at, shifted),
                3 => grad_tile::<S, T, STREAM, 3>(s, &inp, out, at, shifted),
                2 => grad_tile::<S, T, STREAM, 2>(s, &inp, out, at, shifted),
                _ => grad_tile::<S, T, STREAM, 1>(s, &inp, out, at, shifted),
            }
            t += w;
        }
        if s.fast_put_wrong(seen) {
            // a value was an f32 denormal, which the fast bf16 conversion reads as zero
            // (rare): the sub-block again, each vector converted exactly (see `norm_tile`)
            grad_flat::<S, T, STREAM>(s, &inp, (&mut *dx, dz.as_deref_mut()), c, maps, (lo, hi, pf));
        }
    }
    if o > 0 {
        grad_flat::<S, T, STREAM>(s, &inp, (&mut *dx, dz.as_deref_mut()), c, maps, (0, o, pf));
        grad_flat::<S, T, STREAM>(s, &inp, (dx, dz), c, maps, (o + body, n, pf));
    }
}

/// One tile of `W` vectors at channel `col` over the rows of `[lo, hi)` (a whole number of
/// rows of `c` channels), the maps read at `col` (of arrays starting at the channel of `lo`),
/// stored with [`Simd::put_fast`] noting in `seen` whether the caller must store the rows
/// again (see [`norm_tile`]).
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_tile<S: Simd, T: Element, const STREAM: bool, const W: usize>(
    s: S,
    inp: &GradRun<'_, T>,
    (dx, mut dz, seen): (&mut [T], Option<&mut [T]>, &mut S::V),
    (lo, hi, c, col, pf): (usize, usize, usize, usize, impl Fetch),
    (mean, a, gmean, k): (&[f32], &[f32], &[f32], &[f32]),
) {
    let l = S::LANES;
    let zero = s.splat(0.0);
    let mut maps = [(zero, zero, zero, zero); W];
    for (i, m) in maps.iter_mut().enumerate() {
        let j = col + i * l;
        *m = (s.load_f32(&mean[j..]), s.load_f32(&a[j..]), s.load_f32(&gmean[j..]), s.load_f32(&k[j..]));
    }
    for r in (lo..hi).step_by(c) {
        for (i, &m) in maps.iter().enumerate() {
            let p = r + col + i * l;
            prefetch_grad(s, inp, p, pf);
            let (v, g) = grad_values(s, inp, p, m);
            s.put_fast(&mut dx[p..], v, STREAM, seen);
            if let Some(dz) = dz.as_deref_mut() {
                s.put_fast(&mut dz[p..], g, STREAM, seen);
            }
        }
    }
}

/// Whether `dx` or `dz` starts 1-4 vectors past one of the backward's inputs modulo
/// 4 KiB (see [`stores_alias`]).
fn grad_stores_alias<S: Simd, T>(inp: &GradRun<'_, T>, dx: &[T], dz: Option<&[T]>) -> bool {
    let (y, dy) = (inp.y.unwrap_or(inp.dy), inp.dy);
    let inputs: &[&[T]] = &[dy, inp.x, y];
    stores_alias::<S, T>(dx, inputs) || dz.is_some_and(|dz| stores_alias::<S, T>(dz, inputs))
}

/// The four backward maps' vectors at phase `j` of their periodic arrays.
#[cfg_attr(not(debug_assertions), inline(always))]
fn maps_at<S: Simd>(s: S, (mean, a, gmean, k): (&[f32], &[f32], &[f32], &[f32]), j: usize) -> (S::V, S::V, S::V, S::V) {
    (s.load_f32(&mean[j..]), s.load_f32(&a[j..]), s.load_f32(&gmean[j..]), s.load_f32(&k[j..]))
}

/// `[start, end)` as one flat stream whose element p belongs to channel p % c, the maps
/// read from their periodic arrays at every vector (any C); the ends that are not whole
/// aligned vectors run scalar.
#[cfg_attr(not(debug_assertions), inline(always))]
fn grad_flat<S: Simd, T: Element, const STREAM: bool>(
    s: S,
    inp: &GradRun<'_, T>,
    (dx, mut dz): (&mut [T], Option<&mut [T]>),
    c: usize,
    (mean, a, gmean, k): (&[f32], &[f32], &[f32], &[f32]),
    (start, end, pf): (usize, usize, impl Fetch),
) {
    let l = S::LANES;
    let (va, vb) = vector_span::<S, T>(&dx[start..end], end - start);
    let (lo, hi) = (start + va, start + vb);
    let mut j = lo % c;
    let maps = (mean, a, gmean, k);
    if grad_stores_alias::<S, T>(inp, dx, dz.as_deref()) {
        // (`pipelined!` loads in index order, so the phase steps once per load)
        pipelined!(
            (hi - lo) / l,
            |i| {
                let p = lo + i * l;
                prefetch_grad(s, inp, p, pf);
                let m = maps_at(s, maps, j);
                j = next_phase(j, l, c);
                grad_values(s, inp, p, m)
            },
            |i, v| {
                let p = lo + i * l;
                s.put(&mut dx[p..], v.0, STREAM);
                if let Some(dz) = dz.as_deref_mut() {
                    s.put(&mut dz[p..], v.1, STREAM);
                }
            }
        );
    } else {
        for p in (lo..hi).step_by(l) {
            prefetch_grad(s, inp, p, pf);
            grad_vec(s, inp, (&mut *dx, dz.as_deref_mut()), p, maps_at(s, maps, j), STREAM);
            j = next_phase(j, l, c);
        }
    }
    let map = |p: usize| {
        let j = p % c;
        GradMap { mean: mean[j], a: a[j], gmean: gmean[j], k: k[j] }
    };
    // spans shorter than a vector: grad_span runs them scalar
    grad_span(s, inp, &mut *dx, dz.as_deref_mut(), (start, lo, STREAM, pf), map);
    grad_span(s, inp, dx, dz, (hi, end, STREAM, pf), map);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::{dispatch, SimdLevel};
    use half::f16;

    /// Runs whose lengths leave tails (7x7 planes: 49 values, one past three AVX-512
    /// vectors; every length 1 to 40 in groups of runs that are not a multiple of `ACC`),
    /// on every level, against the f64 moments: spliced vectors and tails must count each
    /// value exactly once.
    #[test]
    fn run_moments_with_tails_match_f64() {
        let data: Vec<f32> =
            (0..40_000u32).map(|i| 1e3 + ((i.wrapping_mul(2_654_435_761) >> 8) % 1000) as f32 / 7.0).collect();
        let mut cases: Vec<Vec<usize>> = vec![vec![49; 32], vec![3; 70], vec![196; 9], vec![17; 5], vec![300; 3]];
        cases.extend((1..=40).map(|n| vec![n; 7]));
        let halves: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        for lens in cases {
            // runs 3 values apart, starting 5 values in
            let (count, len) = (lens.len(), lens[0]);
            let runs = Runs { first: 5, stride: len + 3, count, len };
            let all: Vec<f64> = (0..count).flat_map(|i| runs.get(&data, i).iter().map(|&v| v as f64)).collect();
            let want = Moments::of(&all);
            let half_all: Vec<f64> = (0..count).flat_map(|i| runs.get(&halves, i).iter().map(|v| v.to_f64())).collect();
            let want_half = Moments::of(&half_all);
            let levels = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];
            // prefetching off, and on with a distance that runs past the buffer's end
            for (level, ahead) in levels.into_iter().flat_map(|l| [(l, 0), (l, 1024)]) {
                if !level.is_supported() {
                    continue;
                }
                for (got, want) in [
                    (dispatch(level, RunMomentsKernel { x: &data, runs, shift: data[5], ahead }), want),
                    (
                        dispatch(level, RunMomentsKernel { x: &halves, runs, shift: halves[5].to_f32(), ahead }),
                        want_half,
                    ),
                ] {
                    assert_eq!(got.count, want.count, "{level} {lens:?}");
                    assert!((got.mean - want.mean).abs() <= 1e-6 * want.mean.abs(), "{level} mean {got:?} {want:?}");
                    assert!((got.m2 - want.m2).abs() <= 1e-5 * want.m2, "{level} m2 {got:?} {want:?}");
                }
            }
        }
    }

    /// Rows moments of a block that starts at every element offset from a cache line (the
    /// aligned, rotated read of [`RowMomentsKernel`] and its left-over row), with C a
    /// multiple of the lanes and not, odd and even row counts, on every level, in tiles and
    /// read in order ([`rows_in_order`]), against the f64 moments of each channel: every
    /// value must be counted once, in its channel.
    #[test]
    fn row_moments_at_every_offset_match_f64() {
        let value =
            |i: usize| 1e3 + ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 % 1000.0 / 7.0 + i as f32 % 3.0;
        // (300, 16): three sub-blocks of rows, so the tiles prefetch the next one
        for (rows, c) in
            [(2usize, 16usize), (3, 16), (37, 32), (40, 48), (9, 64), (5, 20), (200, 16), (300, 16), (37, 96)]
        {
            let store: Vec<f32> = (0..rows * c + 16).map(value).collect();
            for off in 0..16 {
                let x = &store[off..off + rows * c];
                let want: Vec<Moments> =
                    (0..c).map(|j| Moments::of(&(0..rows).map(|r| x[r * c + j] as f64).collect::<Vec<_>>())).collect();
                for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
                    if !level.is_supported() {
                        continue;
                    }
                    let run = |prefetch: bool, beyond_l2: bool, beyond_l3: bool| {
                        let mut acc = RowMoments::new(Scratch::collect(c, x[..c].iter().copied()));
                        dispatch(level, RowMomentsKernel { acc: &mut acc, x, prefetch, beyond_l2, beyond_l3 });
                        acc.finish()
                    };
                    // beyond L2, rows of several tiles (C > 16 on AVX2) prefetch too; beyond
                    // L3, f32 rows of several tiles on AVX-512 (C = 96) are read in order
                    let (t, fetched) = (run(false, false, false), run(true, false, false));
                    let (beyond, in_order) = (run(false, true, false), run(false, true, true));
                    for (j, (got, want)) in (0..c).map(|j| t.get(j)).zip(&want).enumerate() {
                        let at = format!("{level} rows {rows} c {c} offset {off} channel {j}");
                        assert_eq!(got.count, want.count, "{at}");
                        assert!((got.mean - want.mean).abs() <= 1e-6 * want.mean.abs(), "{at}: {got:?} {want:?}");
                        assert!((got.m2 - want.m2).abs() <= 1e-5 * want.m2 + 1e-3, "{at}: {got:?} {want:?}");
                        // prefetches are hints: the same bits with them (the last sub-block's
                        // run past the end of `x` and must be dropped)
                        let bits = |m: Moments| (m.count.to_bits(), m.mean.to_bits(), m.m2.to_bits());
                        assert_eq!(bits(fetched.get(j)), bits(got), "{at}");
                        assert_eq!(bits(beyond.get(j)), bits(got), "{at}");
                        let o = in_order.get(j);
                        assert_eq!(o.count, want.count, "{at} in order");
                        assert!((o.mean - want.mean).abs() <= 1e-6 * want.mean.abs(), "{at} in order: {o:?} {want:?}");
                        assert!((o.m2 - want.m2).abs() <= 1e-5 * want.m2 + 1e-3, "{at} in order: {o:?} {want:?}");
                    }
                }
            }
        }
    }

    /// A value in [-1, 1) hashed from index `i` and stream `k`.
    fn signed(i: usize, k: u32) -> f32 {
        ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(k) >> 8) as f32 % 1000.0 / 500.0 - 1.0
    }

    /// Backward sums of rows over several sub-blocks (so the tiles prefetch the next one,
    /// and the last one's prefetches run past the end), with and without ReLU, on every
    /// level: the f64 sums of each channel, and the same bits with prefetching as without,
    /// and in the short sub-blocks used beyond L2 (rows of several tiles: C = 32 on AVX2,
    /// C = 160 on both) as in the long ones; beyond L3 (f32 C = 160 read row by row on
    /// AVX-512, see [`rows_in_order`]) the f64 sums again.
    #[test]
    fn grad_sum_rows_match_f64_with_and_without_prefetch() {
        for (rows, c) in [(300usize, 16usize), (130, 32), (7, 16), (75, 160)] {
            let n = rows * c;
            let (x, dy, y): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..n).map(|i| signed(i, 1)).collect(),
                (0..n).map(|i| signed(i, 2)).collect(),
                (0..n).map(|i| signed(i, 3)).collect(),
            );
            let mean: Vec<f32> = (0..c).map(|j| j as f32 * 0.01).collect();
            for relu in [false, true] {
                let yr = relu.then_some(&y[..]);
                for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
                    if !level.is_supported() {
                        continue;
                    }
                    let run = |prefetch, beyond_l2, beyond_l3| {
                        let k = GradSumRows { dy: &dy, x: &x, y: yr, mean: &mean, prefetch, beyond_l2, beyond_l3 };
                        dispatch(level, k).sums()
                    };
                    let (got, fetched) = (run(false, false, false), run(true, false, false));
                    let (beyond, in_order) = (run(false, true, false), run(false, true, true));
                    for j in 0..c {
                        let g = |r: usize| if relu && y[r * c + j] <= 0.0 { 0.0 } else { dy[r * c + j] as f64 };
                        let want_g: f64 = (0..rows).map(g).sum();
                        let want_gx: f64 = (0..rows).map(|r| g(r) * (x[r * c + j] as f64 - mean[j] as f64)).sum();
                        let at = format!("{level} rows {rows} c {c} relu {relu} channel {j}");
                        assert!((got[j].g - want_g).abs() <= 1e-5 * rows as f64, "{at}: {} {want_g}", got[j].g);
                        assert!((got[j].gx - want_gx).abs() <= 1e-5 * rows as f64, "{at}: {} {want_gx}", got[j].gx);
                        let bits = |s: &GradSums| (s.g.to_bits(), s.gx.to_bits());
                        assert_eq!(bits(&fetched[j]), bits(&got[j]), "{at}");
                        assert_eq!(bits(&beyond[j]), bits(&got[j]), "{at}");
                        let (g, gx) = (in_order[j].g, in_order[j].gx);
                        assert!((g - want_g).abs() <= 1e-5 * rows as f64, "{at} in order: {g} {want_g}");
                        assert!((gx - want_gx).abs() <= 1e-5 * rows as f64, "{at} in order: {gx} {want_gx}");
                    }
                }
            }
        }
    }

    /// Backward sums of one channel given as runs of every length from 1 to 70 (shorter
    /// than a vector, the one-to-`ACC`-vector runs of the short-run loop with and without
    /// a tail, and longer), 33 runs each (past one `SUM_FLUSH_STEPS` fold), with and without
    /// the ReLU gate and prefetching, on every level: the f64 sums, each value counted once.
    #[test]
    fn grad_sum_runs_of_every_length_match_f64() {
        let n = 40_000;
        let (x, dy, y): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..n).map(|i| 1.0 + signed(i, 1)).collect(),
            (0..n).map(|i| 0.5 + signed(i, 2)).collect(),
            (0..n).map(|i| signed(i, 3)).collect(),
        );
        let mean = 0.9f32;
        for len in 1..=70 {
            // runs 3 values apart, starting 5 values in
            let runs = Runs { first: 5, stride: len + 3, count: 33, len };
            let at: Vec<usize> = (0..runs.count).flat_map(|i| (0..len).map(move |k| 5 + i * (len + 3) + k)).collect();
            for relu in [false, true] {
                let g = |p: usize| if relu && y[p] <= 0.0 { 0.0 } else { dy[p] as f64 };
                let want_g: f64 = at.iter().map(|&p| g(p)).sum();
                let want_gx: f64 = at.iter().map(|&p| g(p) * (x[p] as f64 - mean as f64)).sum();
                let scale: f64 = at.iter().map(|&p| g(p).abs() * (1.0 + (x[p] as f64 - mean as f64).abs())).sum();
                let inp = GradRun { dy: &dy[..], x: &x[..], y: relu.then_some(&y[..]) };
                for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
                    if !level.is_supported() {
                        continue;
                    }
                    for ahead in [0, 1024] {
                        let got = dispatch(level, GradSumRuns { inp, runs, mean, ahead });
                        let at = format!("{level} len {len} relu {relu} ahead {ahead}");
                        assert!((got.g - want_g).abs() <= 1e-6 * scale, "{at}: g {} {want_g}", got.g);
                        assert!((got.gx - want_gx).abs() <= 1e-6 * scale, "{at}: gx {} {want_gx}", got.gx);
                    }
                }
            }
        }
    }

    /// The channels-last normalize and input gradient with rows of several register tiles
    /// (C = 48, 160, 256, 512, 2048: at every level) and of one (C = 32 on AVX-512), walked
    /// in the sub-blocks used beyond L2 (on AVX-512, the normalize for f32: C = 256 one of
    /// 32 rows and a partial one of 5, C = 2048 4, 4 and 3 rows) and in the long ones: the
    /// f64 formulas' values, and the same bits both ways.
    #[test]
    fn rows_normalize_and_grad_match_f64_in_short_and_long_sub_blocks() {
        for (rows, c) in [(27usize, 160usize), (45, 48), (9, 512), (13, 32), (37, 256), (11, 2048)] {
            let n = rows * c;
            let x: Vec<f32> = (0..n).map(|i| signed(i, 1)).collect();
            let dy: Vec<f32> = (0..n).map(|i| signed(i, 2)).collect();
            let ch = |j: usize, k: f32| 1.0 + k * j as f32;
            let norm: Vec<ChannelAffine> = (0..c)
                .map(|j| ChannelAffine { mean: ch(j, 0.01) - 1.0, scale: ch(j, 0.003), shift: 0.5 - ch(j, 0.002) })
                .collect();
            let maps: Vec<GradMap> = (0..c)
                .map(|j| GradMap { mean: ch(j, -0.004), a: ch(j, 0.002), gmean: ch(j, 0.001) - 1.0, k: ch(j, -0.001) })
                .collect();
            let (mean, scale, shift) =
                (periodic(&norm, |m| m.mean), periodic(&norm, |m| m.scale), periodic(&norm, |m| m.shift));
            let (gm, ga, gg, gk) = (
                periodic(&maps, |m| m.mean),
                periodic(&maps, |m| m.a),
                periodic(&maps, |m| m.gmean),
                periodic(&maps, |m| m.k),
            );
            for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
                if !level.is_supported() {
                    continue;
                }
                let normalize = |beyond_l2| {
                    let mut y = vec![0f32; n];
                    let (mean, scale, shift) = (&mean[..], &scale[..], &shift[..]);
                    let k = NormalizeRows {
                        x: &x,
                        z: None,
                        y: &mut y,
                        c,
                        mean,
                        scale,
                        shift,
                        relu: false,
                        stream: false,
                        ahead: 0,
                        beyond_l2,
                    };
                    dispatch(level, k);
                    y
                };
                let grad = |beyond_l2| {
                    let mut dx = vec![0f32; n];
                    let inp = GradRun { dy: &dy, x: &x, y: None };
                    let (mean, a, gmean, k) = (&gm[..], &ga[..], &gg[..], &gk[..]);
                    let kr = GradRows {
                        inp,
                        dx: &mut dx,
                        dz: None,
                        c,
                        mean,
                        a,
                        gmean,
                        k,
                        stream: false,
                        ahead: 0,
                        beyond_l2,
                        large_dx: false,
                    };
                    dispatch(level, kr);
                    dx
                };
                let (y_long, y_short, dx_long, dx_short) = (normalize(false), normalize(true), grad(false), grad(true));
                for i in 0..n {
                    let (j, at) = (i % c, format!("{level} rows {rows} c {c} element {i}"));
                    let (xi, f) = (x[i] as f64, |v: f32| v as f64);
                    let (nm, m) = (&norm[j], &maps[j]);
                    let want_y = (xi - f(nm.mean)) * f(nm.scale) + f(nm.shift);
                    let want_dx = f(m.a) * (f(m.k) * (xi - f(m.mean)) + f(dy[i]) - f(m.gmean));
                    assert!(
                        (f(y_long[i]) - want_y).abs() <= 1e-6 * (1.0 + want_y.abs()),
                        "{at}: y {} {want_y}",
                        y_long[i]
                    );
                    assert!(
                        (f(dx_long[i]) - want_dx).abs() <= 1e-6 * (1.0 + want_dx.abs()),
                        "{at}: dx {} {want_dx}",
                        dx_long[i]
                    );
                    assert_eq!(y_short[i].to_bits(), y_long[i].to_bits(), "{at}");
                    assert_eq!(dx_short[i].to_bits(), dx_long[i].to_bits(), "{at}");
                }
            }
        }
    }

    /// `pipelined!` for every count from 0 to 21: each vector loaded once and stored
    /// once with its own value, stores in order, and (the point of it) every store of a
    /// whole block issued after the loads of the next whole block.
    #[test]
    fn pipelined_stores_each_vector_once_after_the_next_blocks_loads() {
        use std::cell::RefCell;
        for count in 0..=21usize {
            let log = RefCell::new(Vec::new());
            pipelined!(
                count,
                |j| {
                    log.borrow_mut().push(('l', j));
                    j * 10 + 1
                },
                |i, v| {
                    assert_eq!(v, i * 10 + 1, "count {count}: vector {i} stored another's value");
                    log.borrow_mut().push(('s', i));
                }
            );
            let log = log.into_inner();
            let at = |e: (char, usize)| log.iter().position(|&x| x == e);
            assert_eq!(log.len(), 2 * count, "count {count}: {log:?}");
            let stores: Vec<usize> = log.iter().filter(|e| e.0 == 's').map(|e| e.1).collect();
            assert_eq!(stores, (0..count).collect::<Vec<_>>(), "count {count}");
            for j in 0..count {
                assert!(at(('l', j)).unwrap() < at(('s', j)).unwrap(), "count {count}: {j} stored before loaded");
            }
            let whole = if count >= 2 * PIPE_BLOCK { count / PIPE_BLOCK * PIPE_BLOCK } else { 0 };
            for i in 0..whole.saturating_sub(PIPE_BLOCK) {
                let last_of_next = (i / PIPE_BLOCK + 2) * PIPE_BLOCK - 1;
                assert!(
                    at(('l', last_of_next)).unwrap() < at(('s', i)).unwrap(),
                    "count {count}: {i} stored before {last_of_next} was loaded: {log:?}"
                );
            }
        }
    }

    /// `stores_alias` flags an output 1 to `PIPE_BLOCK` vectors' bytes past an input's
    /// start modulo 4 KiB, and not one at the same offset, behind it, or further on.
    #[test]
    fn stores_alias_flags_outputs_a_block_past_an_input() {
        use crate::cpu::simd::Scalar;
        let block = PIPE_BLOCK * Scalar::LANES * 4;
        let buf = vec![0f32; 3 * ALIAS_SPAN];
        let x = &buf[..64];
        for (bytes, want) in [(0, false), (16, true), (block, true), (block + 4, false), (ALIAS_SPAN - 16, false)] {
            for pages in [0, 1] {
                let y = &buf[(pages * ALIAS_SPAN + bytes) / 4..][..64];
                let got = stores_alias::<Scalar, f32>(y, &[x]);
                assert_eq!(got, want, "y {bytes} bytes past x (+{pages} pages)");
                assert_eq!(stores_alias::<Scalar, f32>(y, &[y, x]), want, "second input");
            }
        }
    }

    /// `out` of `len` values in `buf`, placed `bytes` past `from` modulo 4 KiB.
    fn placed<'a, T>(buf: &'a mut [T], from: &[T], bytes: usize, len: usize) -> &'a mut [T] {
        let size = std::mem::size_of::<T>();
        let lead = (from.as_ptr() as usize + bytes).wrapping_sub(buf.as_ptr() as usize) % ALIAS_SPAN;
        assert_eq!(lead % size, 0);
        &mut buf[lead / size..][..len]
    }

    /// Channels-first normalize and input gradient (with and without z, ReLU and dz, streamed
    /// or not) whose outputs sit 0 to 128 bytes past the inputs modulo 4 KiB (the pipelined
    /// walk) or behind them, on every level, f32 and bf16, with runs that straddle vectors:
    /// within the f64 formulas' rounding at every placement (which moves the scalar heads).
    #[test]
    fn slabs_with_outputs_just_past_the_inputs_match_f64() {
        fn check<T: Element + std::fmt::Debug>(tol: f64) {
            for (run, c, runs) in [(784usize, 3usize, 4usize), (20, 5, 23), (9, 2, 11)] {
                let n = run * runs;
                let (xbuf, z, dy, maps, gmaps) = placement_data::<T>(n, c, 0.1);
                let x = &xbuf[ALIAS_SPAN..][..n];
                let first = 1;
                let ch = |p: usize| (first + p / run) % c;
                each_placement(|level, (add, relu, stream), bytes, reference| {
                    let at = format!("{level} run {run} add {add} relu {relu} stream {stream} +{bytes}");
                    let mut ybuf = vec![T::from_f32_rounded(0.0); n + 2 * ALIAS_SPAN];
                    let y = placed(&mut ybuf, x, bytes, n);
                    let mut slabs = [NormSlab { x, z: add.then_some(&z[..]), y, first }];
                    let k = NormalizeSlabs { slabs: &mut slabs, run, maps: &maps, relu, stream, ahead: 0 };
                    dispatch(level, k);
                    let y = slabs[0].y.to_vec();
                    let mut dxbuf = vec![T::from_f32_rounded(0.0); n + 2 * ALIAS_SPAN];
                    let mut dzbuf = vec![T::from_f32_rounded(0.0); n + 2 * ALIAS_SPAN];
                    let dx = placed(&mut dxbuf, x, bytes, n);
                    let dz = placed(&mut dzbuf, x, bytes, n);
                    let inp = GradRun { dy: &dy, x, y: relu.then_some(&y[..]) };
                    let mut gs = [GradSlab { inp, dx, dz: add.then_some(dz), first }];
                    dispatch(level, GradSlabs { slabs: &mut gs, run, maps: &gmaps, stream, ahead: 0 });
                    let dx = gs[0].dx.to_vec();
                    let dz = gs[0].dz.as_deref().map_or(Vec::new(), |d| d.to_vec());
                    let outputs = (&y[..], &dx[..], &dz[..]);
                    check_placed(
                        &at,
                        (x, add.then_some(&z[..]), &dy),
                        outputs,
                        |p| (maps[ch(p)], gmaps[ch(p)]),
                        (relu, tol),
                        reference,
                    );
                });
            }
        }
        check::<f32>(1e-6);
        check::<half::bf16>(1e-2);
    }

    /// Channels-last normalize and input gradient (tiles when C is whole vectors, else the
    /// flat stream; both pipelined when an output sits 1-4 vectors past an input modulo
    /// 4 KiB) at output placements 0 to 128 and -16 bytes, on every level, f32 and bf16,
    /// with and without the residual, ReLU and streamed stores, against f64, and the same
    /// values at every placement.
    #[test]
    fn rows_with_outputs_just_past_the_inputs_match_f64() {
        fn check<T: Element + std::fmt::Debug>(tol: f64) {
            for (rows, c) in [(37usize, 64usize), (21, 48), (30, 17), (9, 512)] {
                let n = rows * c;
                let (xbuf, z, dy, maps, gmaps) = placement_data::<T>(n, c, 0.01);
                let x = &xbuf[ALIAS_SPAN..][..n];
                let (mean, scale, shift) =
                    (periodic(&maps, |m| m.mean), periodic(&maps, |m| m.scale), periodic(&maps, |m| m.shift));
                let (gm, ga, gg, gk) = (
                    periodic(&gmaps, |m| m.mean),
                    periodic(&gmaps, |m| m.a),
                    periodic(&gmaps, |m| m.gmean),
                    periodic(&gmaps, |m| m.k),
                );
                each_placement(|level, (add, relu, stream), bytes, reference| {
                    let at = format!("{level} c {c} add {add} relu {relu} stream {stream} +{bytes}");
                    let mut ybuf = vec![T::from_f32_rounded(0.0); n + 2 * ALIAS_SPAN];
                    let y = placed(&mut ybuf, x, bytes, n);
                    let z = add.then_some(&z[..]);
                    let (mean, scale, shift) = (&mean[..], &scale[..], &shift[..]);
                    let (ahead, beyond_l2) = (0, false);
                    let k = NormalizeRows { x, z, y, c, mean, scale, shift, relu, stream, ahead, beyond_l2 };
                    dispatch(level, k);
                    let y = ybuf_values(&ybuf, x, bytes, n);
                    let mut dxbuf = vec![T::from_f32_rounded(0.0); n + 2 * ALIAS_SPAN];
                    let mut dzbuf = vec![T::from_f32_rounded(0.0); n + 2 * ALIAS_SPAN];
                    let dx = placed(&mut dxbuf, x, bytes, n);
                    let dz = add.then(|| placed(&mut dzbuf, x, bytes, n));
                    let inp = GradRun { dy: &dy, x, y: relu.then_some(&y[..]) };
                    let (mean, a, gmean, k) = (&gm[..], &ga[..], &gg[..], &gk[..]);
                    // large_dx: streamed, f16/bf16 rows of several tiles take the flat stream
                    let large_dx = true;
                    let kr = GradRows { inp, dx, dz, c, mean, a, gmean, k, stream, ahead, beyond_l2, large_dx };
                    dispatch(level, kr);
                    let dx = ybuf_values(&dxbuf, x, bytes, n);
                    let dz = ybuf_values(&dzbuf, x, bytes, n);
                    let outputs = (&y[..], &dx[..], &dz[..]);
                    check_placed(&at, (x, z, &dy), outputs, |p| (maps[p % c], gmaps[p % c]), (relu, tol), reference);
                });
            }
        }
        check::<f32>(1e-6);
        check::<half::bf16>(1e-2);
    }

    /// The placement tests' loops: `case(level, (add, relu, stream), bytes, reference)` on
    /// every supported level, four sets of flags, and outputs 0 to 128 and -16 bytes past the
    /// inputs modulo 4 KiB. `reference` holds the first placement's outputs of a level and
    /// set of flags: every placement must give them, whether it ran tiled, flat or
    /// pipelined, and wherever its vector loop's scalar ends fell.
    #[allow(clippy::type_complexity)]
    fn each_placement(mut case: impl FnMut(SimdLevel, (bool, bool, bool), usize, &mut Option<(Vec<f64>, Vec<f64>)>)) {
        for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
            if !level.is_supported() {
                continue;
            }
            for flags in [(false, false, false), (true, true, false), (false, true, true), (true, false, true)] {
                let mut reference = None;
                for bytes in [0, 16, 32, 48, 64, 128, ALIAS_SPAN - 16] {
                    case(level, flags, bytes, &mut reference);
                }
            }
        }
    }

    /// The placement tests' data: `x` (in a buffer with [`ALIAS_SPAN`] values of room on
    /// each side), `z`, `dy`, and per-channel maps stepping by `k` per channel.
    #[allow(clippy::type_complexity)]
    fn placement_data<T: Element>(
        n: usize,
        c: usize,
        k: f32,
    ) -> (Vec<T>, Vec<T>, Vec<T>, Vec<ChannelAffine>, Vec<GradMap>) {
        let xbuf = (0..n + 2 * ALIAS_SPAN).map(|i| T::from_f32_rounded(signed(i, 1))).collect();
        let z = (0..n).map(|i| T::from_f32_rounded(signed(i, 2))).collect();
        let dy = (0..n).map(|i| T::from_f32_rounded(signed(i, 3))).collect();
        let maps = (0..c)
            .map(|j| ChannelAffine { mean: k * j as f32, scale: 1.0 + 3.0 * k * j as f32, shift: 0.2 - k * j as f32 })
            .collect();
        let gmaps =
            (0..c).map(|j| GradMap { mean: 0.5 * k * j as f32, a: 0.7 + k * j as f32, gmean: 0.02, k: -0.3 }).collect();
        (xbuf, z, dy, maps, gmaps)
    }

    /// One placement's normalize and input-gradient outputs (`y`, `dx`, and `dz` when `z`
    /// is given) against the f64 formulas with the per-element maps `maps(p)`, and equal to
    /// the first placement's (kept in `reference`).
    fn check_placed<T: Element + std::fmt::Debug>(
        at: &str,
        (x, z, dy): (&[T], Option<&[T]>, &[T]),
        (y, dx, dz): (&[T], &[T], &[T]),
        maps: impl Fn(usize) -> (ChannelAffine, GradMap),
        (relu, tol): (bool, f64),
        reference: &mut Option<(Vec<f64>, Vec<f64>)>,
    ) {
        let f = |v: T| v.to_f64();
        for p in 0..x.len() {
            let (m, g) = maps(p);
            let mut want = (f(x[p]) - m.mean as f64) * m.scale as f64 + m.shift as f64;
            if let Some(z) = z {
                want += f(z[p]);
            }
            if relu {
                want = want.max(0.0);
            }
            let err = (f(y[p]) - want).abs();
            assert!(err <= tol * (1.0 + want.abs()), "{at} y[{p}] {:?} {want}", y[p]);
            let gate = if relu && f(y[p]) <= 0.0 { 0.0 } else { f(dy[p]) };
            let want_dx = g.a as f64 * (g.k as f64 * (f(x[p]) - g.mean as f64) + gate - g.gmean as f64);
            let err = (f(dx[p]) - want_dx).abs();
            assert!(err <= tol * (1.0 + want_dx.abs()), "{at} dx[{p}] {:?} {want_dx}", dx[p]);
            if z.is_some() {
                assert_eq!(f(dz[p]), gate, "{at} dz[{p}]");
            }
        }
        let got = (y.iter().map(|&v| f(v)).collect(), dx.iter().map(|&v| f(v)).collect());
        match reference {
            None => *reference = Some(got),
            Some(want) => assert!(got == *want, "{at}: not the outputs of placement +0"),
        }
    }

    /// The `len` values [`placed`] put `bytes` past `from` in `buf`.
    fn ybuf_values<T: Copy>(buf: &[T], from: &[T], bytes: usize, len: usize) -> Vec<T> {
        let size = std::mem::size_of::<T>();
        let lead = (from.as_ptr() as usize + bytes).wrapping_sub(buf.as_ptr() as usize) % ALIAS_SPAN;
        buf[lead / size..][..len].to_vec()
    }

    /// bf16 channels-last normalize whose outputs are f32 denormals in some sub-blocks
    /// only (AVX512-BF16's conversion reads those as zero, and the sub-block is stored
    /// again exactly): at every level, in short and long sub-blocks, streamed or not, with
    /// and without ReLU, each output is its f32 value rounded as `half` rounds it.
    #[test]
    fn rows_normalize_rounds_bf16_denormal_outputs_exactly() {
        use half::bf16;
        for (rows, c) in [(24usize, 160usize), (16, 512), (20, 32), (12, 128)] {
            let n = rows * c;
            // channels 3 and 4 (mod 5) scale by 2^-120: the small x of the second half of
            // the rows gives |y| < 2^-126 there
            let x: Vec<bf16> = (0..n)
                .map(|i| {
                    let mag = if i / c < rows / 2 { 1.0 } else { 2f32.powi(-10) };
                    bf16::from_f32(mag * ((i % 13) as f32 - 6.0) * 0.375)
                })
                .collect();
            let norm: Vec<ChannelAffine> = (0..c)
                .map(|j| ChannelAffine { mean: 0.0, scale: if j % 5 >= 3 { 2f32.powi(-120) } else { 1.5 }, shift: 0.0 })
                .collect();
            let (mean, scale, shift) =
                (periodic(&norm, |m| m.mean), periodic(&norm, |m| m.scale), periodic(&norm, |m| m.shift));
            let want = |i: usize, relu: bool| {
                let m = &norm[i % c];
                let v = (x[i].to_f32() - m.mean).mul_add(m.scale, m.shift);
                bf16::from_f32(if relu && v < 0.0 { 0.0 } else { v })
            };
            let denormal =
                (0..n).filter(|&i| want(i, false).to_f32() != 0.0 && want(i, false).to_f32().abs() < f32::MIN_POSITIVE);
            assert!(denormal.count() >= rows / 2, "the data must have denormal outputs");
            for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
                if !level.is_supported() {
                    continue;
                }
                for (beyond_l2, stream, relu) in
                    (0..8).map(|k| (k & 1 == 1, k & 2 == 2, k & 4 == 4)).collect::<Vec<_>>()
                {
                    let mut y = vec![bf16::ZERO; n];
                    let k = NormalizeRows {
                        x: &x,
                        z: None,
                        y: &mut y,
                        c,
                        mean: &mean,
                        scale: &scale,
                        shift: &shift,
                        relu,
                        stream,
                        ahead: 0,
                        beyond_l2,
                    };
                    dispatch(level, k);
                    for (i, got) in y.iter().enumerate() {
                        let at = format!("{level} c {c} element {i} beyond_l2 {beyond_l2} stream {stream} relu {relu}");
                        assert_eq!(got.to_bits(), want(i, relu).to_bits(), "{at}");
                    }
                }
            }
        }
    }

    /// The normalize's sub-blocks of rows of several tiles beyond L2: 32 KiB of f32 rows up
    /// to C = 512 with 32 registers, else 4 rows (wider f32 rows, 16-bit elements, 16
    /// registers).
    #[test]
    fn long_multi_tile_norm_rows_follow_the_measured_rule() {
        // f32 on 32 registers up to C = 512 keeps the 32 KiB sub-block (32, 16, 51 rows) ...
        assert!(long_multi_tile_norm_rows(32, 4, 256));
        assert!(long_multi_tile_norm_rows(32, 4, 512));
        assert!(long_multi_tile_norm_rows(32, 4, 160));
        assert_eq!(block_rows::<f32>(256), 32);
        assert_eq!(block_rows::<f32>(512), 16);
        assert_eq!(block_rows::<f32>(160), 51);
        // ... wider f32 rows, 16-bit elements and 16 registers walk MULTI_TILE_ROWS
        assert!(!long_multi_tile_norm_rows(32, 4, 1024));
        assert!(!long_multi_tile_norm_rows(32, 4, 2048));
        assert!(!long_multi_tile_norm_rows(32, 4, 8192));
        assert!(!long_multi_tile_norm_rows(32, 2, 512));
        assert!(!long_multi_tile_norm_rows(16, 4, 256));
    }

    /// The channels-last reductions read rows in order beyond L3 for f32 rows of several
    /// tiles up to 512 channels with 32 registers, else in tiles.
    #[test]
    fn rows_in_order_follow_the_measured_rule() {
        use crate::cpu::simd::{Scalar, Simd};
        use half::bf16;
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::simd::Avx512;
            // 16 lanes, tiles of 4 vectors: C = 64 is one tile, 80 two
            assert!(rows_in_order::<Avx512<false>, f32>(256, true));
            assert!(rows_in_order::<Avx512<false>, f32>(512, true));
            assert!(rows_in_order::<Avx512<false>, f32>(80, true));
            assert!(!rows_in_order::<Avx512<false>, f32>(256, false));
            assert!(!rows_in_order::<Avx512<false>, f32>(64, true));
            assert!(!rows_in_order::<Avx512<false>, f32>(1024, true));
            assert!(!rows_in_order::<Avx512<false>, bf16>(256, true));
        }
        // the portable level has 16 registers
        const { assert!(Scalar::REGS < 32) };
        assert!(!rows_in_order::<Scalar, f32>(256, true));
    }

    /// The 16-bit channels-last input gradient stays cached under a streaming policy for
    /// rows of two tiles, or of more when `dx` aliases an input, never from
    /// `FLAT_STREAM_FROM_BYTES` of `dx`, for f32 or for rows of one tile or partial vectors.
    #[test]
    fn grad_rows_cached_keeps_two_tile_or_aliased_16_bit_rows() {
        use crate::cpu::simd::Scalar;
        use half::bf16;
        // the portable level: 8 lanes, tiles of 2 vectors; C = 16 is one tile, 32 two, 48 three
        assert!(grad_rows_cached::<Scalar, bf16>(32, false, false));
        assert!(grad_rows_cached::<Scalar, f16>(32, false, false));
        assert!(!grad_rows_cached::<Scalar, bf16>(48, false, false));
        assert!(grad_rows_cached::<Scalar, bf16>(48, false, true));
        assert!(!grad_rows_cached::<Scalar, bf16>(48, true, true));
        assert!(!grad_rows_cached::<Scalar, bf16>(32, true, false));
        assert!(!grad_rows_cached::<Scalar, bf16>(16, false, true));
        assert!(!grad_rows_cached::<Scalar, f32>(32, false, true));
        assert!(!grad_rows_cached::<Scalar, bf16>(36, false, true));
    }

    /// The same for the channels-last input gradient: `dx` and `dz` (= `dy` here, some of
    /// it bf16 denormals) at f32 denormal values in some sub-blocks only, bit for bit (C =
    /// 128: two tiles on AVX-512, cached under a streaming policy; 160 and 512: more, the
    /// flat stream unless aliased; 32: one tile on AVX-512, two on AVX2).
    #[test]
    fn rows_grad_rounds_bf16_denormal_outputs_exactly() {
        use half::bf16;
        for (rows, c) in [(24usize, 160usize), (16, 512), (20, 32), (12, 128)] {
            let n = rows * c;
            let dy: Vec<bf16> = (0..n)
                .map(|i| match (i / c < rows / 2, i % 29) {
                    (false, 0) => bf16::from_bits(0x8003),
                    (false, 1) => bf16::from_bits(0x0041),
                    (true, _) => bf16::from_f32(((i % 13) as f32 - 6.0) * 0.375),
                    (false, _) => bf16::from_f32(2f32.powi(-10) * ((i % 13) as f32 - 6.0) * 0.375),
                })
                .collect();
            let x: Vec<bf16> = (0..n).map(|i| bf16::from_f32((i % 7) as f32)).collect();
            // k = 0: dx = a * dy, with a = 2^-120 on channels 3 and 4 (mod 5)
            let a_of = |j: usize| if j % 5 >= 3 { 2f32.powi(-120) } else { 1.5 };
            let maps: Vec<GradMap> = (0..c).map(|j| GradMap { mean: 0.0, a: a_of(j), gmean: 0.0, k: 0.0 }).collect();
            let (gm, ga, gg, gk) = (
                periodic(&maps, |m| m.mean),
                periodic(&maps, |m| m.a),
                periodic(&maps, |m| m.gmean),
                periodic(&maps, |m| m.k),
            );
            let want = |i: usize| bf16::from_f32(a_of(i % c) * dy[i].to_f32());
            let tiny = |v: bf16| v.to_f32() != 0.0 && v.to_f32().abs() < f32::MIN_POSITIVE;
            assert!((0..n).filter(|&i| tiny(want(i))).count() >= rows / 2, "the data must have denormal outputs");
            for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512] {
                if !level.is_supported() {
                    continue;
                }
                let modes = [(false, false, false), (true, false, false), (false, true, false), (true, true, false)];
                for (beyond_l2, stream, large_dx) in modes.into_iter().chain([(false, true, true), (true, true, true)])
                {
                    let (mut dx, mut dz) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
                    let kr = GradRows {
                        inp: GradRun { dy: &dy, x: &x, y: None },
                        dx: &mut dx,
                        dz: Some(&mut dz),
                        c,
                        mean: &gm,
                        a: &ga,
                        gmean: &gg,
                        k: &gk,
                        stream,
                        ahead: 0,
                        beyond_l2,
                        large_dx,
                    };
                    dispatch(level, kr);
                    for i in 0..n {
                        let at = format!(
                            "{level} c {c} element {i} beyond_l2 {beyond_l2} stream {stream} large_dx {large_dx}"
                        );
                        assert_eq!(dx[i].to_bits(), want(i).to_bits(), "dx {at}");
                        assert_eq!(dz[i].to_bits(), dy[i].to_bits(), "dz {at}");
                    }
                }
            }
        }
    }

    /// `merge_lanes` gives exactly `Moments::merge`'s totals, from the first merge (into
    /// empty totals) on, and zeroes the lanes.
    #[test]
    fn merge_lanes_equals_moments_merge_bit_for_bit() {
        let c = 37;
        let lane =
            |j: usize, k: u32| ((j as f32 * 0.37 + k as f32).sin() * 3.0, (j as f32 * 0.11 + k as f32).cos().abs());
        let mut fast = Totals::new(c);
        let mut slow = vec![Moments::default(); c];
        for k in 0..4u32 {
            let n = (16 + 3 * k) as f64;
            let (mut mean, mut m2): (Vec<f32>, Vec<f32>) = (0..c).map(|j| lane(j, k)).unzip();
            for (t, (&m, &q)) in slow.iter_mut().zip(mean.iter().zip(&m2)) {
                t.merge(&Moments { count: n, mean: m as f64, m2: q as f64 });
            }
            merge_lanes(&mut fast, n, &mut mean, &mut m2);
            assert!(mean.iter().chain(&m2).all(|&v| v == 0.0));
            for (j, w) in slow.iter().enumerate() {
                let got = (fast.count, fast.mean[j].to_bits(), fast.m2[j].to_bits());
                assert_eq!(got, (w.count, w.mean.to_bits(), w.m2.to_bits()), "merge {k}, channel {j}");
            }
        }
    }

    /// `Totals::merge` (the rows tasks' partials) gives exactly `Moments::merge`'s result,
    /// into empty totals and into non-empty ones; empty partials change nothing.
    #[test]
    fn totals_merge_equals_moments_merge_bit_for_bit() {
        let c = 29;
        let part = |k: u32, n: f64| {
            let mut t = Totals::new(c);
            t.count = n;
            for j in 0..c {
                t.mean[j] = (j as f64 * 0.31 + k as f64).sin() * 1e3;
                t.m2[j] = (j as f64 * 0.17 + k as f64).cos().abs() * n;
            }
            t
        };
        let mut fast = Totals::new(c);
        let mut slow = vec![Moments::default(); c];
        for (k, n) in [(0, 128.0), (1, 0.0), (2, 128.0), (3, 77.0)] {
            let p = part(k, n);
            fast.merge(&p);
            for (j, m) in slow.iter_mut().enumerate() {
                m.merge(&Moments { count: p.count, mean: p.mean[j], m2: p.m2[j] });
            }
            for (j, (got, want)) in (0..c).map(|j| fast.get(j)).zip(&slow).enumerate() {
                let (g, w) = (
                    (got.count, got.mean.to_bits(), got.m2.to_bits()),
                    (want.count, want.mean.to_bits(), want.m2.to_bits()),
                );
                assert_eq!(g, w, "part {k}, channel {j}");
            }
        }
    }
}
