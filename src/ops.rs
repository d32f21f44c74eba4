//! The functional API, in the style of cuDNN's batch-norm calls: the caller owns every
//! buffer, each op validates all of them, then runs on the given [`Device`].
//!
//! | op | computes |
//! |---|---|
//! | [`forward_training`] | batch mean/var, `y = act((x - mean) * invstd * w + b [+ z])`, running-stats update, saved mean/invstd |
//! | [`forward_inference`] | `y = act((x - running_mean) * rsqrt(running_var + eps) * w + b [+ z])` |
//! | [`backward`] | `dx` (and `dz`, `dweight`, `dbias`) from saved batch statistics or frozen running statistics |
//!
//! ```
//! use bnorm::{ops, Config, Device, Shape};
//! let shape = Shape::channels_first(&[2, 3, 4])?; // N=2, C=3, L=4
//! let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut y = vec![0f32; 24];
//! let (mut rm, mut rv, mut tracked) = (vec![0f32; 3], vec![1f32; 3], 0u64);
//! let (mut mean, mut invstd) = (vec![0f32; 3], vec![0f32; 3]);
//! ops::forward_training(
//!     &Device::cpu(),
//!     &shape,
//!     &Config::default(),
//!     ops::ForwardTraining::new(&x, &mut y)
//!         .running(&mut rm, &mut rv, &mut tracked)
//!         .saved(&mut mean, &mut invstd),
//! )?;
//! assert_eq!(tracked, 1);
//! // each channel of y now has mean 0 and (biased) variance 1 - eps-ish
//! let ch0: Vec<f32> = (0..2).flat_map(|n| y[n * 12..n * 12 + 4].to_vec()).collect();
//! assert!(ch0.iter().sum::<f32>().abs() < 1e-5);
//! # Ok::<(), bnorm::Error>(())
//! ```

use crate::buffer::{Buf, BufMut, Location};
use crate::config::{Activation, Config, RunningStats};
use crate::cpu::{self, GradMap, Scratch};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::validate;

/// The running statistics a training forward updates: mean, variance (f32, C each) and
/// the number of batches tracked so far.
pub struct RunningStatsMut<'a> {
    pub mean: BufMut<'a, f32>,
    pub var: BufMut<'a, f32>,
    pub num_batches_tracked: &'a mut u64,
}

/// Arguments of [`forward_training`]. `x` and `y` are required; the rest is optional:
/// without `weight`/`bias` the affine part is the identity, without `running` no running
/// statistics are kept, without `saved` the batch statistics are not returned.
pub struct ForwardTraining<'a, T> {
    pub x: Buf<'a, T>,
    pub residual: Option<Buf<'a, T>>,
    pub y: BufMut<'a, T>,
    pub weight: Option<Buf<'a, f32>>,
    pub bias: Option<Buf<'a, f32>>,
    pub running: Option<RunningStatsMut<'a>>,
    pub saved_mean: Option<BufMut<'a, f32>>,
    pub saved_invstd: Option<BufMut<'a, f32>>,
}

impl<'a, T> ForwardTraining<'a, T> {
    pub fn new(x: impl Into<Buf<'a, T>>, y: impl Into<BufMut<'a, T>>) -> Self {
        ForwardTraining {
            x: x.into(),
            residual: None,
            y: y.into(),
            weight: None,
            bias: None,
            running: None,
            saved_mean: None,
            saved_invstd: None,
        }
    }
    /// Per-channel scale `w` and shift `b` (f32, C each).
    pub fn affine(mut self, weight: impl Into<Buf<'a, f32>>, bias: impl Into<Buf<'a, f32>>) -> Self {
        self.weight = Some(weight.into());
        self.bias = Some(bias.into());
        self
    }
    /// Fused residual add: `y = act(bn(x) + z)`.
    pub fn residual(mut self, z: impl Into<Buf<'a, T>>) -> Self {
        self.residual = Some(z.into());
        self
    }
    /// Running statistics to update (per the config's [`RunningStats`] convention).
    pub fn running(
        mut self,
        mean: impl Into<BufMut<'a, f32>>,
        var: impl Into<BufMut<'a, f32>>,
        num_batches_tracked: &'a mut u64,
    ) -> Self {
        self.running = Some(RunningStatsMut { mean: mean.into(), var: var.into(), num_batches_tracked });
        self
    }
    /// Where to save the batch mean and `1 / sqrt(var + eps)` for [`backward`].
    pub fn saved(mut self, mean: impl Into<BufMut<'a, f32>>, invstd: impl Into<BufMut<'a, f32>>) -> Self {
        self.saved_mean = Some(mean.into());
        self.saved_invstd = Some(invstd.into());
        self
    }
}

/// Arguments of [`forward_inference`].
pub struct ForwardInference<'a, T> {
    pub x: Buf<'a, T>,
    pub residual: Option<Buf<'a, T>>,
    pub y: BufMut<'a, T>,
    pub weight: Option<Buf<'a, f32>>,
    pub bias: Option<Buf<'a, f32>>,
    pub running_mean: Buf<'a, f32>,
    pub running_var: Buf<'a, f32>,
}

impl<'a, T> ForwardInference<'a, T> {
    pub fn new(
        x: impl Into<Buf<'a, T>>,
        y: impl Into<BufMut<'a, T>>,
        running_mean: impl Into<Buf<'a, f32>>,
        running_var: impl Into<Buf<'a, f32>>,
    ) -> Self {
        ForwardInference {
            x: x.into(),
            residual: None,
            y: y.into(),
            weight: None,
            bias: None,
            running_mean: running_mean.into(),
            running_var: running_var.into(),
        }
    }
    pub fn affine(mut self, weight: impl Into<Buf<'a, f32>>, bias: impl Into<Buf<'a, f32>>) -> Self {
        self.weight = Some(weight.into());
        self.bias = Some(bias.into());
        self
    }
    pub fn residual(mut self, z: impl Into<Buf<'a, T>>) -> Self {
        self.residual = Some(z.into());
        self
    }
}

/// The statistics the forward pass normalized with, as the backward pass needs them.
pub enum BackwardStats<'a> {
    /// Training mode: the batch mean and invstd saved by [`forward_training`].
    Saved { mean: Buf<'a, f32>, invstd: Buf<'a, f32> },
    /// Eval mode (frozen statistics): running mean and variance; invstd is
    /// `1 / sqrt(var + eps)` with the config's eps.
    Running { mean: Buf<'a, f32>, var: Buf<'a, f32> },
}

/// Arguments of [`backward`].
pub struct Backward<'a, T> {
    /// The forward input.
    pub x: Buf<'a, T>,
    /// The forward output; required when the config fuses a ReLU (the gate is `y > 0`).
    pub y: Option<Buf<'a, T>>,
    /// Gradient of the loss with respect to `y`.
    pub dy: Buf<'a, T>,
    /// Gradient with respect to `x` (written).
    pub dx: BufMut<'a, T>,
    /// Gradient with respect to the fused residual `z` (written when given).
    pub dz: Option<BufMut<'a, T>>,
    pub weight: Option<Buf<'a, f32>>,
    pub stats: BackwardStats<'a>,
    pub dweight: Option<BufMut<'a, f32>>,
    pub dbias: Option<BufMut<'a, f32>>,
}

impl<'a, T> Backward<'a, T> {
    /// Backward from the statistics a training forward saved.
    pub fn from_saved(
        x: impl Into<Buf<'a, T>>,
        dy: impl Into<Buf<'a, T>>,
        dx: impl Into<BufMut<'a, T>>,
        saved_mean: impl Into<Buf<'a, f32>>,
        saved_invstd: impl Into<Buf<'a, f32>>,
    ) -> Self {
        Backward::new(x, dy, dx, BackwardStats::Saved { mean: saved_mean.into(), invstd: saved_invstd.into() })
    }

    /// Backward in eval mode, from the frozen running statistics.
    pub fn from_running(
        x: impl Into<Buf<'a, T>>,
        dy: impl Into<Buf<'a, T>>,
        dx: impl Into<BufMut<'a, T>>,
        running_mean: impl Into<Buf<'a, f32>>,
        running_var: impl Into<Buf<'a, f32>>,
    ) -> Self {
        Backward::new(x, dy, dx, BackwardStats::Running { mean: running_mean.into(), var: running_var.into() })
    }

    fn new(
        x: impl Into<Buf<'a, T>>,
        dy: impl Into<Buf<'a, T>>,
        dx: impl Into<BufMut<'a, T>>,
        stats: BackwardStats<'a>,
    ) -> Self {
        Backward {
            x: x.into(),
            y: None,
            dy: dy.into(),
            dx: dx.into(),
            dz: None,
            weight: None,
            stats,
            dweight: None,
            dbias: None,
        }
    }
    /// The forward output, needed when a ReLU was fused.
    pub fn output(mut self, y: impl Into<Buf<'a, T>>) -> Self {
        self.y = Some(y.into());
        self
    }
    pub fn weight(mut self, w: impl Into<Buf<'a, f32>>) -> Self {
        self.weight = Some(w.into());
        self
    }
    /// Where to write the gradient of the fused residual.
    pub fn residual_grad(mut self, dz: impl Into<BufMut<'a, T>>) -> Self {
        self.dz = Some(dz.into());
        self
    }
    /// Where to write the gradients of the weight and bias.
    pub fn param_grads(mut self, dweight: impl Into<BufMut<'a, f32>>, dbias: impl Into<BufMut<'a, f32>>) -> Self {
        self.dweight = Some(dweight.into());
        self.dbias = Some(dbias.into());
        self
    }
}

/// Training forward: batch statistics, normalization (with the config's fused activation
/// and the optional residual), running-statistics update, saved statistics.
///
/// Errors (nothing written): bad config, `M < 2`, any length or device mismatch,
/// non-finite running statistics or a negative running variance.
pub fn forward_training<T: Element>(
    dev: &Device,
    shape: &Shape,
    cfg: &Config,
    a: ForwardTraining<'_, T>,
) -> Result<()> {
    cfg.validate()?;
    if shape.m() < 2 {
        return Err(Error::SingleValuePerChannel { dims: shape.dims().to_vec(), m: shape.m() });
    }
    let (numel, c, at) = (shape.numel(), shape.c(), dev.location());
    validate::input("x", &a.x, numel, at)?;
    validate::opt_input("residual", a.residual.as_ref(), numel, at)?;
    validate::output("y", &a.y, numel, at)?;
    validate::opt_input("weight", a.weight.as_ref(), c, at)?;
    validate::opt_input("bias", a.bias.as_ref(), c, at)?;
    if let Some(r) = &a.running {
        validate::output("running_mean", &r.mean, c, at)?;
        validate::output("running_var", &r.var, c, at)?;
        validate::finite("running_mean", r.mean.as_host())?;
        validate::variance("running_var", r.var.as_host())?;
    }
    validate::opt_output("saved_mean", a.saved_mean.as_ref(), c, at)?;
    validate::opt_output("saved_invstd", a.saved_invstd.as_ref(), c, at)?;
    match dev.backend() {
        Backend::Cpu(cpu) => cpu_forward_training(&cpu.for_op(shape.numel()), shape, cfg, a),
        #[cfg(feature = "cuda")]
        Backend::Cuda(g) => crate::cuda::ops::forward_training(g, shape, cfg, a),
    }
}

/// Inference forward with frozen running statistics, as one per-channel scale and shift.
///
/// Errors (nothing written): bad eps, any length or device mismatch, non-finite running
/// statistics or a negative running variance.
pub fn forward_inference<T: Element>(
    dev: &Device,
    shape: &Shape,
    cfg: &Config,
    a: ForwardInference<'_, T>,
) -> Result<()> {
    cfg.validate()?;
    let (numel, c, at) = (shape.numel(), shape.c(), dev.location());
    validate::input("x", &a.x, numel, at)?;
    validate::opt_input("residual", a.residual.as_ref(), numel, at)?;
    validate::output("y", &a.y, numel, at)?;
    validate::opt_input("weight", a.weight.as_ref(), c, at)?;
    validate::opt_input("bias", a.bias.as_ref(), c, at)?;
    validate::input("running_mean", &a.running_mean, c, at)?;
    validate::input("running_var", &a.running_var, c, at)?;
    validate::finite("running_mean", a.running_mean.as_host())?;
    validate::variance("running_var", a.running_var.as_host())?;
    match dev.backend() {
        Backend::Cpu(cpu) => cpu_forward_inference(&cpu.for_op(shape.numel()), shape, cfg, a),
        #[cfg(feature = "cuda")]
        Backend::Cuda(g) => crate::cuda::ops::forward_inference(g, shape, cfg, a),
    }
}

/// Backward: `dx` always; `dz = g` when `dz` is given; `dweight = sum(g * xhat)` and
/// `dbias = sum(g)` when given. `g = dy`, gated by `y > 0` when the config fuses a ReLU.
///
/// Errors (nothing written): any length or device mismatch, `y` missing with a fused
/// ReLU or given without one, non-finite statistics or a negative running variance.
pub fn backward<T: Element>(dev: &Device, shape: &Shape, cfg: &Config, a: Backward<'_, T>) -> Result<()> {
    cfg.validate()?;
    let (numel, c, at) = (shape.numel(), shape.c(), dev.location());
    validate::input("x", &a.x, numel, at)?;
    match (cfg.activation, &a.y) {
        (Activation::Relu, None) => {
            return Err(Error::MissingArgument {
                arg: "y",
                reason: "the config fuses a ReLU, whose gradient gate is y > 0",
            })
        }
        (Activation::Identity, Some(_)) => {
            return Err(Error::UnexpectedArgument {
                arg: "y",
                reason: "the config's activation is identity; set Activation::Relu if the forward fused one",
            })
        }
        _ => {}
    }
    validate::opt_input("y", a.y.as_ref(), numel, at)?;
    validate::input("dy", &a.dy, numel, at)?;
    validate::output("dx", &a.dx, numel, at)?;
    validate::opt_output("dz", a.dz.as_ref(), numel, at)?;
    validate::opt_input("weight", a.weight.as_ref(), c, at)?;
    match &a.stats {
        BackwardStats::Saved { mean, invstd } => {
            validate::input("saved_mean", mean, c, at)?;
            validate::input("saved_invstd", invstd, c, at)?;
            validate::finite("saved_mean", mean.as_host())?;
            validate::finite("saved_invstd", invstd.as_host())?;
        }
        BackwardStats::Running { mean, var } => {
            validate::input("running_mean", mean, c, at)?;
            validate::input("running_var", var, c, at)?;
            validate::finite("running_mean", mean.as_host())?;
            validate::variance("running_var", var.as_host())?;
        }
    }
    validate::opt_output("dweight", a.dweight.as_ref(), c, at)?;
    validate::opt_output("dbias", a.dbias.as_ref(), c, at)?;
    match dev.backend() {
        Backend::Cpu(cpu) => cpu_backward(&cpu.for_op(shape.numel()), shape, cfg, a),
        #[cfg(feature = "cuda")]
        Backend::Cuda(g) => crate::cuda::ops::backward(g, shape, cfg, a),
    }
}

// ---------------------------------------------------------------- shared per-channel math

/// `1 / sqrt(var + eps)` in f64.
#[inline(always)]
pub(crate) fn invstd(var: f64, eps: f32) -> f64 {
    1.0 / (var + eps as f64).sqrt()
}

/// The running-statistics update for one channel, in f64: returns (new mean, new var).
pub(crate) fn running_update(
    conv: RunningStats,
    tracked_before: u64,
    m: usize,
    old: (f32, f32),
    batch_mean: f64,
    batch_var_biased: f64,
) -> (f32, f32) {
    let f = conv.batch_weight(tracked_before) as f64;
    let var = if conv.unbiased_variance() { batch_var_biased * m as f64 / (m as f64 - 1.0) } else { batch_var_biased };
    (((1.0 - f) * old.0 as f64 + f * batch_mean) as f32, ((1.0 - f) * old.1 as f64 + f * var) as f32)
}

/// The host slice of a validated buffer.
fn host<'a, T>(arg: &'static str, b: Buf<'a, T>) -> Result<&'a [T]> {
    match b {
        Buf::Host(s) => Ok(s),
        #[allow(unreachable_patterns)]
        other => {
            Err(Error::WrongDevice { arg, expected: Location::Host.to_string(), found: other.location().to_string() })
        }
    }
}

fn host_mut<'a, T>(arg: &'static str, b: BufMut<'a, T>) -> Result<&'a mut [T]> {
    let found = b.location();
    b.into_host().ok_or_else(|| Error::WrongDevice {
        arg,
        expected: Location::Host.to_string(),
        found: found.to_string(),
    })
}

fn opt_host<'a, T>(arg: &'static str, b: Option<Buf<'a, T>>) -> Result<Option<&'a [T]>> {
    b.map(|b| host(arg, b)).transpose()
}

fn opt_host_mut<'a, T>(arg: &'static str, b: Option<BufMut<'a, T>>) -> Result<Option<&'a mut [T]>> {
    b.map(|b| host_mut(arg, b)).transpose()
}

fn cpu_forward_training<T: Element>(
    dev: &cpu::CpuDevice,
    shape: &Shape,
    cfg: &Config,
    a: ForwardTraining<'_, T>,
) -> Result<()> {
    // Resolve every buffer first: after this point nothing can fail.
    let x = host("x", a.x)?;
    let z = opt_host("residual", a.residual)?;
    let y = host_mut("y", a.y)?;
    let w = opt_host("weight", a.weight)?;
    let b = opt_host("bias", a.bias)?;
    let running = match a.running {
        Some(r) => Some((host_mut("running_mean", r.mean)?, host_mut("running_var", r.var)?, r.num_batches_tracked)),
        None => None,
    };
    let saved_mean = opt_host_mut("saved_mean", a.saved_mean)?;
    let saved_invstd = opt_host_mut("saved_invstd", a.saved_invstd)?;

    let relu = cfg.activation == Activation::Relu;
    // channels `first..` from their moments and 1 / sqrt(var + eps)
    let affine = |first: usize, t: &cpu::Totals, is: &[f64]| {
        let ch = first..first + t.len();
        let (w, b) = (w.map(|w| &w[ch.clone()]), b.map(|b| &b[ch]));
        channel_maps(t.mean.iter().map(|&m| m as f32), is.iter().copied(), w, b)
    };
    let (moments, is) = cpu::forward_training(dev, shape, cpu::Forward { x, z, y, relu }, cfg.eps, affine);
    if let Some((rm, rv, tracked)) = running {
        update_running(cfg.running_stats, shape.m(), &moments, rm, rv, tracked);
    }
    if let Some(s) = saved_mean {
        s.iter_mut().zip(moments.mean.iter()).for_each(|(s, &m)| *s = m as f32);
    }
    if let Some(s) = saved_invstd {
        s.iter_mut().zip(is.iter()).for_each(|(s, &is)| *s = is as f32);
    }
    Ok(())
}

/// The forward maps of consecutive channels: `mean`, `scale = weight * invstd` and
/// `shift = bias` (1 and 0 without weight and bias). One loop over zipped slices with no
/// per-channel branches or bounds checks: with thousands of channels these loops are a
/// visible part of an op (the f64 `invstd` in it is bound by the divider).
fn channel_maps(
    mean: impl ExactSizeIterator<Item = f32>,
    invstd: impl Iterator<Item = f64>,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Scratch<cpu::ChannelAffine> {
    let c = mean.len();
    let (ones, zeros);
    let weight = match weight {
        Some(w) => w,
        None => {
            ones = Scratch::filled(c, 1f32);
            &ones[..]
        }
    };
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Scratch::filled(c, 0f32);
            &zeros[..]
        }
    };
    let maps = mean.zip(invstd).zip(weight).zip(bias).map(|(((mean, is), &w), &shift)| cpu::ChannelAffine {
        mean,
        scale: (w as f64 * is) as f32,
        shift,
    });
    Scratch::collect(c, maps)
}

/// Apply the running-statistics update of every channel and count the batch.
pub(crate) fn update_running(
    conv: RunningStats,
    m: usize,
    moments: &cpu::Totals,
    rm: &mut [f32],
    rv: &mut [f32],
    tracked: &mut u64,
) {
    for ch in 0..moments.len() {
        let mo = moments.get(ch);
        (rm[ch], rv[ch]) = running_update(conv, *tracked, m, (rm[ch], rv[ch]), mo.mean, mo.var_biased());
    }
    *tracked += 1;
}

fn cpu_forward_inference<T: Element>(
    dev: &cpu::CpuDevice,
    shape: &Shape,
    cfg: &Config,
    a: ForwardInference<'_, T>,
) -> Result<()> {
    let x = host("x", a.x)?;
    let z = opt_host("residual", a.residual)?;
    let y = host_mut("y", a.y)?;
    let w = opt_host("weight", a.weight)?;
    let b = opt_host("bias", a.bias)?;
    let rm = host("running_mean", a.running_mean)?;
    let rv = host("running_var", a.running_var)?;
    let maps = channel_maps(rm.iter().copied(), rv.iter().map(|&v| invstd(v as f64, cfg.eps)), w, b);
    let relu = cfg.activation == Activation::Relu;
    cpu::normalize(dev, shape, cpu::Forward { x, z, y, relu }, &maps, cpu::Order::Forward);
    Ok(())
}

fn cpu_backward<T: Element>(dev: &cpu::CpuDevice, shape: &Shape, cfg: &Config, a: Backward<'_, T>) -> Result<()> {
    let x = host("x", a.x)?;
    let y = opt_host("y", a.y)?;
    let dy = host("dy", a.dy)?;
    let dx = host_mut("dx", a.dx)?;
    let dz = opt_host_mut("dz", a.dz)?;
    let w = opt_host("weight", a.weight)?;
    let dweight = opt_host_mut("dweight", a.dweight)?;
    let dbias = opt_host_mut("dbias", a.dbias)?;
    let c = shape.c();
    let (mean, inv, training) = match a.stats {
        BackwardStats::Saved { mean, invstd } => {
            let mean = host("saved_mean", mean)?;
            let inv = host("saved_invstd", invstd)?;
            (mean, Scratch::collect(c, inv.iter().map(|&v| v as f64)), true)
        }
        BackwardStats::Running { mean, var } => {
            let mean = host("running_mean", mean)?;
            let var = host("running_var", var)?;
            let inv = var.iter().map(|&v| invstd(v as f64, cfg.eps) as f32 as f64);
            (mean, Scratch::collect(c, inv), false)
        }
    };
    let m = shape.m() as f64;
    let wi = |ch: usize| w.map_or(1.0, |w| w[ch] as f64) * inv[ch];
    let args = cpu::Backward { x, y, dy, dx, dz };
    let sums = if training {
        let grad = |ch: usize, s: &cpu::GradSums| GradMap {
            mean: mean[ch],
            a: wi(ch) as f32,
            gmean: (s.g / m) as f32,
            k: (-inv[ch] * inv[ch] * s.gx / m) as f32,
        };
        cpu::backward(dev, shape, args, mean, grad)
    } else {
        // frozen statistics: dx = g * w * invstd, the sums only feed dweight / dbias
        let (sums, order) = if dweight.is_some() || dbias.is_some() {
            (cpu::grad_sums(dev, shape, dy, x, y, mean), cpu::Order::Backward)
        } else {
            (Scratch::with_capacity(0), cpu::Order::Forward)
        };
        let maps =
            Scratch::collect(c, (0..c).map(|ch| GradMap { mean: mean[ch], a: wi(ch) as f32, gmean: 0.0, k: 0.0 }));
        cpu::grad_input(dev, shape, args, &maps, order);
        sums
    };
    if let Some(d) = dweight {
        d.iter_mut().enumerate().for_each(|(ch, v)| *v = (sums[ch].gx * inv[ch]) as f32);
    }
    if let Some(d) = dbias {
        d.iter_mut().enumerate().for_each(|(ch, v)| *v = sums[ch].g as f32);
    }
    Ok(())
}
