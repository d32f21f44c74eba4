//! The CPU backend: rayon threads over channels and over M, SIMD kernels chosen at run time.
//!
//! Everything here runs after validation (`crate::validate`): lengths are right, per-channel
//! slices have C entries, and nothing can fail any more, so outputs are either fully
//! written or (on a validation error, before this module is entered) untouched.

mod kernels;
mod partition;
pub(crate) mod simd;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::{Pattern, Shape};
use crate::stats::Moments;
use kernels::*;
use partition::Split;
use rayon::prelude::*;
use simd::dispatch;
pub use simd::SimdLevel;
use std::sync::Arc;

/// A CPU "device": a thread pool (rayon's global one unless told otherwise) and the SIMD
/// level the kernels run with.
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
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuDevice").field("threads", &self.threads()).field("simd", &self.simd).finish()
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new()
    }
}

impl CpuDevice {
    /// rayon's global pool and the best SIMD level of this CPU; the environment variable
    /// `BNORM_CPU_SIMD=scalar|avx2|avx512` lowers the level (an unsupported or unknown
    /// value is ignored here; use [`CpuDevice::with_simd`] to get an error instead).
    pub fn new() -> CpuDevice {
        let best = SimdLevel::detect();
        let simd = std::env::var("BNORM_CPU_SIMD")
            .ok()
            .and_then(|v| v.parse::<SimdLevel>().ok())
            .filter(|l| l.is_supported())
            .unwrap_or(best);
        CpuDevice { pool: None, simd }
    }

    /// Use a dedicated pool of `threads` threads.
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
    pub fn with_simd(mut self, level: SimdLevel) -> Result<CpuDevice> {
        if !level.is_supported() {
            return Err(Error::SimdUnsupported {
                requested: level.to_string(),
                available: SimdLevel::detect().to_string(),
            });
        }
        self.simd = level;
        Ok(self)
    }

    /// The SIMD level the kernels use.
    pub fn simd(&self) -> SimdLevel {
        self.simd
    }

    /// Threads the ops run on.
    pub fn threads(&self) -> usize {
        match &self.pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    /// Run `f` inside this device's thread pool (rayon calls in `f` use its threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
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

/// Backward arguments after validation, all on the host.
pub(crate) struct Backward<'a, T> {
    pub x: &'a [T],
    pub y: Option<&'a [T]>,
    pub dy: &'a [T],
    pub dx: &'a mut [T],
    pub dz: Option<&'a mut [T]>,
}

// ---------------------------------------------------------------- statistics

/// Per-channel moments of `x` (f32 Welford in chunks, merged in f64).
pub(crate) fn moments<T: Element>(dev: &CpuDevice, shape: &Shape, x: &[T]) -> Vec<Moments> {
    let level = dev.simd;
    let threads = dev.threads();
    dev.install(|| match shape.pattern() {
        Pattern::Planes { n, c, s } => {
            let split = Split::runs(n, c, s, threads);
            let parts: Vec<Moments> = (0..c * split.parts)
                .into_par_iter()
                .map(|task| {
                    let (ch, range) = split.task(task);
                    let runs: Vec<&[T]> = range.map(|ni| &x[(ni * c + ch) * s..][..s]).collect();
                    // every task of a channel shifts by the channel's first value
                    dispatch(level, RunMomentsKernel { runs: &runs, shift: x[ch * s].to_f32() })
                })
                .collect();
            merge_moments(c, split.parts, &parts)
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_task(rows, c, threads);
            let parts: Vec<Vec<Moments>> = x
                .par_chunks(rows_per * c)
                .map(|block| {
                    let shift: Vec<f32> = x[..c].iter().map(|v| v.to_f32()).collect();
                    let mut acc = RowMoments::new(shift);
                    dispatch(level, RowMomentsKernel { acc: &mut acc, x: block });
                    acc.finish()
                })
                .collect();
            let mut out = vec![Moments::default(); c];
            for p in &parts {
                for (o, m) in out.iter_mut().zip(p) {
                    o.merge(m);
                }
            }
            out
        }
    })
}

fn merge_moments(c: usize, parts: usize, partial: &[Moments]) -> Vec<Moments> {
    (0..c)
        .map(|ch| {
            let mut m = Moments::default();
            for p in &partial[ch * parts..(ch + 1) * parts] {
                m.merge(p);
            }
            m
        })
        .collect()
}

// ---------------------------------------------------------------- fused, cache-blocked paths

/// The per-core L2 size (Linux sysfs; 1 MiB where it cannot be read).
fn l2_bytes() -> usize {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L2.get_or_init(|| {
        let s = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index2/size").unwrap_or_default();
        let s = s.trim();
        let parsed = match s.strip_suffix('K') {
            Some(k) => k.parse::<usize>().ok().map(|v| v << 10),
            None => s.strip_suffix('M').and_then(|m| m.parse::<usize>().ok()).map(|v| v << 20),
        };
        parsed.filter(|&b| b >= 256 << 10).unwrap_or(1 << 20)
    })
}

/// `(n, c, s)` when channels-first data can take the fused per-channel path: a channel's
/// working set (`tensors` buffers of its size: x and y, or x, dy and dx) fits in 3/4 of
/// L2, so the second pass reads it from there (2 passes of memory traffic in
/// forward-train instead of 3, 3 instead of 5 in backward); and there are enough channels
/// to keep every thread busy without splitting one.
fn fused_planes<T>(shape: &Shape, threads: usize, tensors: usize) -> Option<(usize, usize, usize)> {
    match shape.pattern() {
        Pattern::Planes { n, c, s }
            if tensors * n * s * std::mem::size_of::<T>() <= l2_bytes() * 3 / 4 && c >= 2 * threads =>
        {
            Some((n, c, s))
        }
        _ => None,
    }
}

/// The runs of length `s` of a channels-first buffer, grouped by channel.
fn runs_by_channel<T>(buf: &mut [T], c: usize, s: usize) -> Vec<Vec<&mut [T]>> {
    let mut out: Vec<Vec<&mut [T]>> = (0..c).map(|_| Vec::with_capacity(buf.len() / (c * s))).collect();
    for (i, run) in buf.chunks_mut(s).enumerate() {
        out[i % c].push(run);
    }
    out
}

/// Training forward: per-channel moments, then `y` with the map `affine(channel, moments)`.
/// Channels-first data with small channels takes the fused path (one task per channel:
/// moments, then normalize while the channel is in L2); the rest runs as two passes.
pub(crate) fn forward_training<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Forward<'_, T>,
    affine: impl Fn(usize, &Moments) -> ChannelAffine + Sync,
) -> Vec<Moments> {
    let Some((n, c, s)) = fused_planes::<T>(shape, dev.threads(), 2) else {
        let moments = moments(dev, shape, a.x);
        let maps: Vec<ChannelAffine> = moments.iter().enumerate().map(|(ch, m)| affine(ch, m)).collect();
        let mean: Vec<f32> = maps.iter().map(|m| m.mean).collect();
        let scale: Vec<f32> = maps.iter().map(|m| m.scale).collect();
        let shift: Vec<f32> = maps.iter().map(|m| m.shift).collect();
        normalize(dev, shape, a, &mean, &scale, &shift);
        return moments;
    };
    let level = dev.simd;
    let Forward { x, z, y, relu } = a;
    let y_runs = runs_by_channel(y, c, s);
    dev.install(|| {
        y_runs
            .into_par_iter()
            .enumerate()
            .map(|(ch, ys)| {
                let xs: Vec<&[T]> = (0..n).map(|ni| &x[(ni * c + ch) * s..][..s]).collect();
                let m = dispatch(level, RunMomentsKernel { runs: &xs, shift: xs[0][0].to_f32() });
                let map = affine(ch, &m);
                let mut runs: Vec<NormRun<'_, T>> = ys
                    .into_iter()
                    .enumerate()
                    .map(|(ni, yr)| NormRun { x: xs[ni], z: z.map(|z| &z[(ni * c + ch) * s..][..s]), y: yr, map })
                    .collect();
                dispatch(level, NormalizeRuns { runs: &mut runs, relu });
                m
            })
            .collect()
    })
}

/// Backward with batch statistics: per-channel sums, then `dx` (and `dz`) with the map
/// `grad(channel, sums)`. Fused per channel for small channels-first channels, as above.
pub(crate) fn backward<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Backward<'_, T>,
    mean: &[f32],
    grad: impl Fn(usize, &GradSums) -> GradMap + Sync,
) -> Vec<GradSums> {
    let Some((n, c, s)) = fused_planes::<T>(shape, dev.threads(), 3) else {
        let sums = grad_sums(dev, shape, a.dy, a.x, a.y, mean);
        let maps: Vec<GradMap> = sums.iter().enumerate().map(|(ch, g)| grad(ch, g)).collect();
        grad_input(dev, shape, a, &maps);
        return sums;
    };
    let level = dev.simd;
    let Backward { x, y, dy, dx, dz } = a;
    let dx_runs = runs_by_channel(dx, c, s);
    let mut dz_runs: Vec<Option<Vec<&mut [T]>>> = match dz {
        Some(dz) => runs_by_channel(dz, c, s).into_iter().map(Some).collect(),
        None => (0..c).map(|_| None).collect(),
    };
    dev.install(|| {
        dx_runs
            .into_par_iter()
            .zip(dz_runs.par_iter_mut())
            .enumerate()
            .map(|(ch, (dxs, dzs))| {
                let inputs = |ni: usize| {
                    let o = (ni * c + ch) * s;
                    GradRun { dy: &dy[o..][..s], x: &x[o..][..s], y: y.map(|y| &y[o..][..s]) }
                };
                let ins: Vec<GradRun<'_, T>> = (0..n).map(inputs).collect();
                let sums = dispatch(level, GradSumRuns { runs: &ins, mean: mean[ch] });
                let map = grad(ch, &sums);
                let mut dzs = dzs.take().map(|v| v.into_iter());
                let mut runs: Vec<GradOutRun<'_, T>> = dxs
                    .into_iter()
                    .enumerate()
                    .map(|(ni, dxr)| GradOutRun {
                        inp: inputs(ni),
                        dx: dxr,
                        dz: dzs.as_mut().and_then(|it| it.next()),
                        map,
                    })
                    .collect();
                dispatch(level, GradRuns { runs: &mut runs });
                sums
            })
            .collect()
    })
}

// ---------------------------------------------------------------- normalize

/// `y = act((x - mean) * scale + shift + z)` with per-channel `mean`, `scale`, `shift`.
pub(crate) fn normalize<T: Element>(
    dev: &CpuDevice,
    shape: &Shape,
    a: Forward<'_, T>,
    mean: &[f32],
    scale: &[f32],
    shift: &[f32],
) {
    let level = dev.simd;
    let threads = dev.threads();
    let Forward { x, z, y, relu } = a;
    dev.install(|| match shape.pattern() {
        Pattern::Planes { c, s, .. } => {
            let runs_per = partition::runs_per_task(s);
            y.par_chunks_mut(runs_per * s).enumerate().for_each(|(t, yb)| {
                let first = t * runs_per;
                let mut runs: Vec<NormRun<'_, T>> = yb
                    .chunks_mut(s)
                    .enumerate()
                    .map(|(k, yr)| {
                        let i = first + k;
                        let ch = i % c;
                        NormRun {
                            x: &x[i * s..][..s],
                            z: z.map(|z| &z[i * s..][..s]),
                            y: yr,
                            map: ChannelAffine { mean: mean[ch], scale: scale[ch], shift: shift[ch] },
                        }
                    })
                    .collect();
                dispatch(level, NormalizeRuns { runs: &mut runs, relu });
            });
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_task(rows, c, threads);
            y.par_chunks_mut(rows_per * c).enumerate().for_each(|(t, yb)| {
                let lo = t * rows_per * c;
                let hi = lo + yb.len();
                dispatch(
                    level,
                    NormalizeRows { x: &x[lo..hi], z: z.map(|z| &z[lo..hi]), y: yb, mean, scale, shift, relu },
                );
            });
        }
    })
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
) -> Vec<GradSums> {
    let level = dev.simd;
    let threads = dev.threads();
    dev.install(|| match shape.pattern() {
        Pattern::Planes { n, c, s } => {
            let split = Split::runs(n, c, s, threads);
            let parts: Vec<GradSums> = (0..c * split.parts)
                .into_par_iter()
                .map(|task| {
                    let (ch, range) = split.task(task);
                    let runs: Vec<GradRun<'_, T>> = range
                        .map(|ni| {
                            let o = (ni * c + ch) * s;
                            GradRun { dy: &dy[o..][..s], x: &x[o..][..s], y: y.map(|y| &y[o..][..s]) }
                        })
                        .collect();
                    dispatch(level, GradSumRuns { runs: &runs, mean: mean[ch] })
                })
                .collect();
            (0..c)
                .map(|ch| {
                    let mut g = GradSums::default();
                    parts[ch * split.parts..(ch + 1) * split.parts].iter().for_each(|p| g.add(p));
                    g
                })
                .collect()
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_task(rows, c, threads);
            let block = rows_per * c;
            let parts: Vec<Vec<GradSums>> = (0..rows.div_ceil(rows_per))
                .into_par_iter()
                .map(|t| {
                    let lo = t * block;
                    let hi = (lo + block).min(x.len());
                    dispatch(level, GradSumRows { dy: &dy[lo..hi], x: &x[lo..hi], y: y.map(|y| &y[lo..hi]), mean })
                })
                .collect();
            let mut out = vec![GradSums::default(); c];
            for p in &parts {
                out.iter_mut().zip(p).for_each(|(o, g)| o.add(g));
            }
            out
        }
    })
}

/// `dx = a * ((g - gmean) + k * (x - mean))` per channel, and `dz = g` when asked.
pub(crate) fn grad_input<T: Element>(dev: &CpuDevice, shape: &Shape, a: Backward<'_, T>, maps: &[GradMap]) {
    let level = dev.simd;
    let threads = dev.threads();
    let Backward { x, y, dy, dx, dz } = a;
    dev.install(|| match shape.pattern() {
        Pattern::Planes { c, s, .. } => {
            let runs_per = partition::runs_per_task(s);
            let chunk = runs_per * s;
            let mut dzs: Vec<Option<&mut [T]>> = match dz {
                Some(dz) => dz.chunks_mut(chunk).map(Some).collect(),
                None => (0..dx.len().div_ceil(chunk)).map(|_| None).collect(),
            };
            dx.par_chunks_mut(chunk).zip(dzs.par_iter_mut()).enumerate().for_each(|(t, (dxb, dzb))| {
                let first = t * runs_per;
                let mut dz_runs = dzb.take().map(|d| d.chunks_mut(s));
                let mut runs: Vec<GradOutRun<'_, T>> = dxb
                    .chunks_mut(s)
                    .enumerate()
                    .map(|(k, dxr)| {
                        let i = first + k;
                        let o = i * s;
                        GradOutRun {
                            inp: GradRun { dy: &dy[o..][..s], x: &x[o..][..s], y: y.map(|y| &y[o..][..s]) },
                            dx: dxr,
                            dz: dz_runs.as_mut().and_then(|it| it.next()),
                            map: maps[i % c],
                        }
                    })
                    .collect();
                dispatch(level, GradRuns { runs: &mut runs });
            });
        }
        Pattern::Rows { rows, c } => {
            let rows_per = partition::rows_per_task(rows, c, threads);
            let chunk = rows_per * c;
            let mean: Vec<f32> = maps.iter().map(|m| m.mean).collect();
            let ca: Vec<f32> = maps.iter().map(|m| m.a).collect();
            let gmean: Vec<f32> = maps.iter().map(|m| m.gmean).collect();
            let k: Vec<f32> = maps.iter().map(|m| m.k).collect();
            let mut dzs: Vec<Option<&mut [T]>> = match dz {
                Some(dz) => dz.chunks_mut(chunk).map(Some).collect(),
                None => (0..dx.len().div_ceil(chunk)).map(|_| None).collect(),
            };
            dx.par_chunks_mut(chunk).zip(dzs.par_iter_mut()).enumerate().for_each(|(t, (dxb, dzb))| {
                let lo = t * chunk;
                let hi = lo + dxb.len();
                dispatch(
                    level,
                    GradRows {
                        inp: GradRun { dy: &dy[lo..hi], x: &x[lo..hi], y: y.map(|y| &y[lo..hi]) },
                        dx: dxb,
                        dz: dzb.take(),
                        mean: &mean,
                        a: &ca,
                        gmean: &gmean,
                        k: &k,
                    },
                );
            });
        }
    })
}

pub(crate) use kernels::{ChannelAffine, GradMap, GradSums};
