//! Conformance harness: runs the ops on a device against the float64 [`reference`](mod@crate::reference) and
//! reports the error of every output under the contract's tolerances.
//!
//! `bnorm check` prints what [`run_suite`] returns; the integration tests (CPU) and the GPU
//! tests run the same cases. Inputs are generated from a seed (SplitMix64 + Box-Muller),
//! so every run of a case sees the same data.
//!
//! ```
//! use bnorm::check::{run_case, CaseSpec, Op};
//! use bnorm::{DType, Device, Layout};
//! let spec = CaseSpec::new(Op::ForwardTraining, &[4, 3, 5, 5], Layout::ChannelsLast, DType::BF16);
//! let r = run_case(&Device::cpu(), &spec).unwrap();
//! assert!(r.passed(), "{r:?}");
//! ```

use crate::buffer::{Buf, BufMut};
use crate::config::{Activation, Config, RunningStats};
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::ops::{self, Backward, ForwardInference, ForwardTraining};
use crate::reference::{self, compare_activations, compare_channels, Comparison, StatsRef};
use crate::shape::{Layout, Shape};
use half::{bf16, f16};
use std::fmt;

/// The op a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    ForwardTraining,
    ForwardInference,
    /// Backward with saved batch statistics.
    Backward,
    /// Backward in eval mode (frozen running statistics).
    BackwardEval,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::ForwardTraining, Op::ForwardInference, Op::Backward, Op::BackwardEval];
    pub fn name(self) -> &'static str {
        match self {
            Op::ForwardTraining => "forward_train",
            Op::ForwardInference => "inference",
            Op::Backward => "backward",
            Op::BackwardEval => "backward_eval",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Input data of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Data {
    /// x ~ N(mean_c, std_c) with per-channel mean in [-2, 2] and std in [0.5, 2].
    Normal,
    /// x = offset + N(0, 1): the adversarial data of the contract (e.g. offset 1e4).
    Offset(f32),
}

/// One conformance case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSpec {
    pub op: Op,
    /// `(N, C, *spatial)`, whatever the layout.
    pub logical_dims: Vec<usize>,
    pub layout: Layout,
    pub dtype: DType,
    pub residual: bool,
    pub activation: Activation,
    pub affine: bool,
    pub running_stats: RunningStats,
    pub data: Data,
    pub seed: u64,
}

impl CaseSpec {
    /// A case with defaults: no fusion, affine, PyTorch momentum, normal data, seed 1.
    pub fn new(op: Op, logical_dims: &[usize], layout: Layout, dtype: DType) -> CaseSpec {
        CaseSpec {
            op,
            logical_dims: logical_dims.to_vec(),
            layout,
            dtype,
            residual: false,
            activation: Activation::Identity,
            affine: true,
            running_stats: RunningStats::default(),
            data: Data::Normal,
            seed: 1,
        }
    }

    pub fn shape(&self) -> Result<Shape> {
        Shape::from_logical(&self.logical_dims, self.layout)
    }

    fn config(&self) -> Config {
        Config { eps: 1e-5, running_stats: self.running_stats, activation: self.activation }
    }

    /// Short description: `forward_train f32 cl 4x3x5x5 add+relu momentum 0.1`.
    pub fn label(&self) -> String {
        let dims: Vec<String> = self.logical_dims.iter().map(|d| d.to_string()).collect();
        let fusion = match (self.residual, self.activation) {
            (false, Activation::Identity) => "plain",
            (false, Activation::Relu) => "relu",
            (true, Activation::Identity) => "add",
            (true, Activation::Relu) => "add+relu",
        };
        let data = match self.data {
            Data::Normal => String::new(),
            Data::Offset(o) => format!(" offset {o:e}"),
        };
        let conv = match self.running_stats {
            RunningStats::Momentum(m) => format!("momentum {m}"),
            RunningStats::CumulativeAverage => "cumulative".into(),
            RunningStats::Retention(d) => format!("retention {d}"),
        };
        format!(
            "{} {} {} {} {}{}{}{}",
            self.op,
            self.dtype,
            self.layout.short(),
            dims.join("x"),
            fusion,
            if self.affine { "" } else { " no-affine" },
            if self.op == Op::ForwardTraining { format!(" {conv}") } else { String::new() },
            data
        )
    }
}

/// Result of one case: each output's comparison with the reference.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub spec: CaseSpec,
    pub outputs: Vec<(&'static str, Comparison)>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.outputs.iter().all(|(_, c)| c.passed())
    }
    /// The output with the largest error relative to its bound.
    pub fn worst(&self) -> Option<&(&'static str, Comparison)> {
        self.outputs.iter().max_by(|a, b| a.1.worst_ratio.total_cmp(&b.1.worst_ratio))
    }

    /// `label: output max_abs .. max_rel .. ratio .. at index` of the worst output.
    pub fn describe_worst(&self) -> String {
        match self.worst() {
            Some((name, c)) => format!(
                "{}: {name} max_abs {:.3e} max_rel {:.3e} ratio {:.2} at {}",
                self.spec.label(),
                c.max_abs,
                c.max_rel,
                c.worst_ratio,
                c.worst_index
            ),
            None => format!("{}: no outputs", self.spec.label()),
        }
    }
}

// ---------------------------------------------------------------- data

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// `n` values per the data kind, in memory order of `shape` (channel stats per channel).
pub fn generate<T: Element>(rng: &mut Rng, shape: &Shape, data: Data) -> Vec<T> {
    let c = shape.c();
    let (mu, sd): (Vec<f64>, Vec<f64>) = match data {
        Data::Normal => (0..c).map(|_| (rng.uniform() * 4.0 - 2.0, 0.5 + rng.uniform() * 1.5)).unzip(),
        Data::Offset(o) => (vec![o as f64; c], vec![1.0; c]),
    };
    let mut v = vec![T::default(); shape.numel()];
    for n in 0..shape.n() {
        for ch in 0..c {
            for s in 0..shape.spatial() {
                v[shape.offset(n, ch, s)] = T::from_f64_rounded(mu[ch] + sd[ch] * rng.normal());
            }
        }
    }
    v
}

fn normal_vec(rng: &mut Rng, n: usize, mean: f64, sd: f64) -> Vec<f32> {
    (0..n).map(|_| (mean + sd * rng.normal()) as f32).collect()
}

fn uniform_vec(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect()
}

// ---------------------------------------------------------------- running a case

/// Run one case on `dev` and compare with the reference.
pub fn run_case(dev: &Device, spec: &CaseSpec) -> Result<CaseResult> {
    match spec.dtype {
        DType::F32 => run_typed::<f32>(dev, spec),
        DType::F16 => run_typed::<f16>(dev, spec),
        DType::BF16 => run_typed::<bf16>(dev, spec),
    }
}

fn run_typed<T: Element>(dev: &Device, spec: &CaseSpec) -> Result<CaseResult> {
    let shape = spec.shape()?;
    let cfg = spec.config();
    let (numel, c) = (shape.numel(), shape.c());
    let mut rng = Rng::new(spec.seed);
    let x: Vec<T> = generate(&mut rng, &shape, spec.data);
    let z: Option<Vec<T>> = spec.residual.then(|| generate(&mut rng, &shape, Data::Normal));
    let (w, b) = if spec.affine {
        (Some(normal_vec(&mut rng, c, 1.0, 0.3)), Some(normal_vec(&mut rng, c, 0.0, 0.5)))
    } else {
        (None, None)
    };
    let rm0 = normal_vec(&mut rng, c, 0.0, 0.5);
    let rv0 = uniform_vec(&mut rng, c, 0.5, 2.0);
    let tracked0 = 3u64;
    let mut outputs = Vec::new();
    let mut exec = Exec::new(dev);

    match spec.op {
        Op::ForwardTraining => {
            let r = reference::forward_training(
                &shape,
                &cfg,
                &x,
                z.as_deref(),
                w.as_deref(),
                b.as_deref(),
                Some((&rm0, &rv0, tracked0)),
            );
            let mut y = vec![T::default(); numel];
            let (mut rm, mut rv, mut tracked) = (rm0.clone(), rv0.clone(), tracked0);
            let (mut sm, mut si) = (vec![0f32; c], vec![0f32; c]);
            exec.forward_training(
                &shape,
                &cfg,
                TrainingBufs {
                    x: &x,
                    z: z.as_deref(),
                    y: &mut y,
                    w: w.as_deref(),
                    b: b.as_deref(),
                    rm: &mut rm,
                    rv: &mut rv,
                    tracked: &mut tracked,
                    saved_mean: &mut sm,
                    saved_invstd: &mut si,
                },
            )?;
            let ch_of = |i: usize| channel_of(&shape, i);
            let add = residual_allowance(z.as_deref());
            outputs.push(("y", compare_activations(&y, &r.y, |i| r.offset_allowance[ch_of(i)] + add(i))));
            let sd: Vec<f64> = r.var.iter().map(|v| v.sqrt()).collect();
            outputs.push(("saved_mean", compare_channels(&sm, &r.mean, Some(&sd))));
            outputs.push(("saved_invstd", compare_channels(&si, &r.invstd, None)));
            let rm_scale: Vec<f64> = sd.iter().zip(&rm0).map(|(s, m)| s + m.abs() as f64).collect();
            outputs.push(("running_mean", compare_channels(&rm, &r.running_mean, Some(&rm_scale))));
            outputs.push(("running_var", compare_channels(&rv, &r.running_var, None)));
            let count_ok = tracked == tracked0 + 1;
            outputs.push((
                "num_batches_tracked",
                Comparison { count: 1, worst_ratio: if count_ok { 0.0 } else { f64::INFINITY }, ..Default::default() },
            ));
        }
        Op::ForwardInference => {
            let want =
                reference::forward_inference(&shape, &cfg, &x, z.as_deref(), w.as_deref(), b.as_deref(), &rm0, &rv0);
            let mut y = vec![T::default(); numel];
            let a = ForwardInference {
                x: (&x).into(),
                residual: z.as_ref().map(|z| z.into()),
                y: (&mut y).into(),
                weight: w.as_ref().map(|v| v.into()),
                bias: b.as_ref().map(|v| v.into()),
                running_mean: (&rm0).into(),
                running_var: (&rv0).into(),
            };
            exec.forward_inference(&shape, &cfg, a)?;
            outputs.push(("y", compare_activations(&y, &want, residual_allowance(z.as_deref()))));
        }
        Op::Backward | Op::BackwardEval => {
            // Backward is checked on its own: its saved statistics and forward output come
            // from the reference forward (rounded to the storage types).
            let fwd = reference::forward_training(&shape, &cfg, &x, z.as_deref(), w.as_deref(), b.as_deref(), None);
            let y: Vec<T> = fwd.y.iter().map(|&v| T::from_f64_rounded(v)).collect();
            let saved_mean: Vec<f32> = fwd.mean.iter().map(|&v| v as f32).collect();
            let saved_invstd: Vec<f32> = fwd.invstd.iter().map(|&v| v as f32).collect();
            let dy: Vec<T> = generate(&mut rng, &shape, Data::Normal);
            let relu = spec.activation == Activation::Relu;
            let stats = if spec.op == Op::Backward {
                StatsRef::Saved { mean: &saved_mean, invstd: &saved_invstd }
            } else {
                StatsRef::Running { mean: &rm0, var: &rv0 }
            };
            let r = reference::backward(&shape, &cfg, &x, relu.then_some(&y[..]), &dy, w.as_deref(), stats);
            let mut dx = vec![T::default(); numel];
            let mut dz = spec.residual.then(|| vec![T::default(); numel]);
            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
            let a = Backward {
                x: (&x).into(),
                y: relu.then(|| (&y).into()),
                dy: (&dy).into(),
                dx: (&mut dx).into(),
                dz: dz.as_mut().map(|d| d.into()),
                weight: w.as_ref().map(|v| v.into()),
                stats: match stats {
                    StatsRef::Saved { mean, invstd } => {
                        ops::BackwardStats::Saved { mean: mean.into(), invstd: invstd.into() }
                    }
                    StatsRef::Running { mean, var } => {
                        ops::BackwardStats::Running { mean: mean.into(), var: var.into() }
                    }
                },
                dweight: Some((&mut dw).into()),
                dbias: Some((&mut db).into()),
            };
            exec.backward(&shape, &cfg, a)?;
            outputs.push(("dx", compare_activations(&dx, &r.dx, |i| r.dx_allowance[channel_of(&shape, i)])));
            if let Some(dz) = &dz {
                outputs.push(("dz", compare_activations(dz, &r.dz, |_| 0.0)));
            }
            outputs.push(("dweight", compare_channels(&dw, &r.dweight, Some(&r.dweight_scale))));
            outputs.push(("dbias", compare_channels(&db, &r.dbias, Some(&r.dbias_scale))));
        }
    }
    Ok(CaseResult { spec: spec.clone(), outputs })
}

/// With a fused residual add the relative bound applies to the terms, not only to their
/// sum: `y = bn(x) + z` can cancel to near zero, and no f32 computation of it is then
/// accurate relative to `y` (PyTorch's separate add rounds at the terms' scale too). The
/// extra allowance is `1e-5 * |z|` per element.
///
/// ```
/// use bnorm::check::residual_allowance;
/// let z = [2.0f32, -4.0];
/// assert_eq!(residual_allowance(Some(&z[..]))(1), 4e-5);
/// assert_eq!(residual_allowance::<f32>(None)(1), 0.0);
/// ```
pub fn residual_allowance<T: Element>(z: Option<&[T]>) -> impl Fn(usize) -> f64 + '_ {
    move |i| z.map_or(0.0, |z| reference::F32_REL * z[i].to_f64().abs())
}

/// The channel of the element at flat index `i` of a tensor of `shape`.
///
/// ```
/// use bnorm::{check::channel_of, Shape};
/// let cf = Shape::channels_first(&[2, 3, 4]).unwrap(); // N=2, C=3, 4 values per plane
/// assert_eq!(channel_of(&cf, 5), 1);
/// let cl = Shape::channels_last(&[2, 4, 3]).unwrap(); // the same tensor, channels last
/// assert_eq!(channel_of(&cl, 5), 2);
/// ```
pub fn channel_of(shape: &Shape, i: usize) -> usize {
    match shape.layout() {
        Layout::ChannelsFirst => (i / shape.spatial()) % shape.c(),
        Layout::ChannelsLast => i % shape.c(),
    }
}

/// Host buffers of a training forward.
struct TrainingBufs<'a, T> {
    x: &'a [T],
    z: Option<&'a [T]>,
    y: &'a mut [T],
    w: Option<&'a [f32]>,
    b: Option<&'a [f32]>,
    rm: &'a mut [f32],
    rv: &'a mut [f32],
    tracked: &'a mut u64,
    saved_mean: &'a mut [f32],
    saved_invstd: &'a mut [f32],
}

/// Runs ops with host buffers on any device (a GPU device gets copies in its memory).
struct Exec<'d> {
    dev: &'d Device,
}

impl<'d> Exec<'d> {
    fn new(dev: &'d Device) -> Self {
        Exec { dev }
    }

    fn forward_training<T: Element>(&mut self, shape: &Shape, cfg: &Config, t: TrainingBufs<'_, T>) -> Result<()> {
        #[cfg(all(feature = "cuda", bnorm_kernels))]
        if let Some(g) = self.dev.as_cuda() {
            return crate::cuda::staging::forward_training(
                self.dev,
                g,
                shape,
                cfg,
                t.x,
                t.z,
                t.y,
                t.w,
                t.b,
                t.rm,
                t.rv,
                t.tracked,
                t.saved_mean,
                t.saved_invstd,
            );
        }
        let a = ForwardTraining {
            x: Buf::Host(t.x),
            residual: t.z.map(Buf::Host),
            y: BufMut::Host(t.y),
            weight: t.w.map(Buf::Host),
            bias: t.b.map(Buf::Host),
            running: Some(ops::RunningStatsMut {
                mean: BufMut::Host(t.rm),
                var: BufMut::Host(t.rv),
                num_batches_tracked: t.tracked,
            }),
            saved_mean: Some(BufMut::Host(t.saved_mean)),
            saved_invstd: Some(BufMut::Host(t.saved_invstd)),
        };
        ops::forward_training(self.dev, shape, cfg, a)
    }

    fn forward_inference<T: Element>(&mut self, shape: &Shape, cfg: &Config, a: ForwardInference<'_, T>) -> Result<()> {
        #[cfg(all(feature = "cuda", bnorm_kernels))]
        if let Some(g) = self.dev.as_cuda() {
            return crate::cuda::staging::forward_inference(self.dev, g, shape, cfg, a);
        }
        ops::forward_inference(self.dev, shape, cfg, a)
    }

    fn backward<T: Element>(&mut self, shape: &Shape, cfg: &Config, a: Backward<'_, T>) -> Result<()> {
        #[cfg(all(feature = "cuda", bnorm_kernels))]
        if let Some(g) = self.dev.as_cuda() {
            return crate::cuda::staging::backward(self.dev, g, shape, cfg, a);
        }
        ops::backward(self.dev, shape, cfg, a)
    }
}

// ---------------------------------------------------------------- suites

/// Shapes (logical dims) of the standard suite: edge cases (M = 2, C = 1, N = 1 with
/// spatial > 1, odd sizes, C not a multiple of the vector width) and sizes that cross the
/// kernels' internal block and flush boundaries.
pub fn standard_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![2, 1],
        vec![1, 1, 2],
        vec![2, 3, 1],
        vec![1, 3, 5],
        vec![3, 5, 7],
        vec![7, 33],
        vec![600, 24],
        vec![2, 3, 5, 7],
        vec![5, 17, 3, 3],
        vec![2, 32, 8, 8],
        vec![3, 40, 13, 11],
        vec![8, 6, 7, 7],
        vec![13, 5, 9, 9],
        vec![4, 3, 64, 80],
        // channels-last rows of several register tiles at every SIMD level (160 channels:
        // 10 AVX-512 vectors), an odd row count
        vec![3, 160, 3, 3],
        vec![2, 4, 3, 5, 7],
        vec![1, 2, 2, 3, 3],
    ]
}

/// Every op x dtype x layout x fusion (x running-stats convention for the training
/// forward) over [`standard_shapes`]. Affine is off for every third case.
pub fn standard_suite() -> Vec<CaseSpec> {
    let conventions = [RunningStats::Momentum(0.1), RunningStats::CumulativeAverage, RunningStats::Retention(0.9)];
    let fusions = [
        (false, Activation::Identity),
        (false, Activation::Relu),
        (true, Activation::Identity),
        (true, Activation::Relu),
    ];
    let mut out = Vec::new();
    let mut seed = 1;
    for dims in standard_shapes() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            for dtype in DType::ALL {
                for op in Op::ALL {
                    for (residual, activation) in fusions {
                        let convs: &[RunningStats] =
                            if op == Op::ForwardTraining { &conventions } else { &conventions[..1] };
                        for &running_stats in convs {
                            seed += 1;
                            out.push(CaseSpec {
                                op,
                                logical_dims: dims.clone(),
                                layout,
                                dtype,
                                residual,
                                activation,
                                affine: seed % 3 != 0,
                                running_stats,
                                data: Data::Normal,
                                seed,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// The contract's adversarial data: f32, x = 1e4 + N(0, 1), M = `m` values per channel,
/// both layouts, training forward (momentum 1, so running_var is the unbiased batch
/// variance) and backward.
pub fn adversarial_suite(m: usize) -> Vec<CaseSpec> {
    let mut out = Vec::new();
    let n = 4;
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        for op in [Op::ForwardTraining, Op::Backward] {
            let mut s = CaseSpec::new(op, &[n, 2, m / n], layout, DType::F32);
            s.data = Data::Offset(1e4);
            s.running_stats = RunningStats::Momentum(1.0);
            s.seed = 7;
            out.push(s);
        }
    }
    out
}

/// One line per failing case (worst output, its errors and where); empty when all pass.
/// Errors of the op itself count as failures, with the error text.
pub fn failures(dev: &Device, cases: &[CaseSpec]) -> Vec<String> {
    run_suite(dev, cases, |_| {})
        .into_iter()
        .filter_map(|r| match r {
            Ok(r) if r.passed() => None,
            Ok(r) => Some(r.describe_worst()),
            Err((spec, e)) => Some(format!("{}: error {e}", spec.label())),
        })
        .collect()
}

/// Run every case, calling `progress` after each; errors of the op itself are reported
/// as failed cases with the error text.
pub fn run_suite(
    dev: &Device,
    cases: &[CaseSpec],
    mut progress: impl FnMut(usize),
) -> Vec<std::result::Result<CaseResult, (CaseSpec, String)>> {
    cases
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let r = run_case(dev, spec).map_err(|e| (spec.clone(), e.to_string()));
            progress(i + 1);
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_normal() {
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        assert_eq!(a.next_u64(), b.next_u64());
        let v: Vec<f64> = (0..20000).map(|_| a.normal()).collect();
        let m = crate::stats::Moments::of(&v);
        assert!(m.mean.abs() < 0.05 && (m.var_biased() - 1.0).abs() < 0.05);
    }
}
