//! The float64 oracle and the correctness contract's comparisons.
//!
//! These functions are written for clarity, not speed: plain loops over `(n, c, s)` in
//! f64 with a two-pass variance. Tests and `bnorm check` compare every backend against
//! them, with the tolerances of DESIGN.md implemented in [`compare_activations`] and
//! [`compare_channels`].
//!
//! ```
//! use bnorm::{reference, Config, Shape};
//! let shape = Shape::channels_first(&[2, 1, 2]).unwrap();
//! let x = [1.0f32, 2.0, 3.0, 4.0];
//! let r = reference::forward_training(&shape, &Config::default(), &x, None, None, None, None);
//! assert_eq!(r.mean, vec![2.5]);
//! assert_eq!(r.var, vec![1.25]);
//! // running stats start from (0, 1) when none are given: 0.9 * 0 + 0.1 * 2.5
//! // (momentum is an f32, 0.1 to 8 digits)
//! assert!((r.running_mean[0] - 0.25).abs() < 1e-8);
//! ```

use crate::config::{Activation, Config};
use crate::dtype::{DType, Element};
use crate::shape::Shape;

/// Reference results of a training forward.
#[derive(Debug, Clone)]
pub struct ForwardRef {
    /// Output, in f64 (before rounding to the activation type).
    pub y: Vec<f64>,
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// Biased batch variance per channel.
    pub var: Vec<f64>,
    /// `1 / sqrt(var + eps)` per channel.
    pub invstd: Vec<f64>,
    /// Updated running mean (from the given running stats, or from (0, 1)).
    pub running_mean: Vec<f64>,
    /// Updated running variance.
    pub running_var: Vec<f64>,
    /// Per channel: the allowance for the input's own rounding on offset data
    /// (`4 * ulp_f32(max|x|) * invstd * |w|` where `|mean| > 10 std`, else 0).
    pub offset_allowance: Vec<f64>,
}

fn each<F: FnMut(usize, usize)>(shape: &Shape, mut f: F) {
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            for s in 0..shape.spatial() {
                f(c, shape.offset(n, c, s));
            }
        }
    }
}

fn channel_values<T: Element>(shape: &Shape, x: &[T]) -> Vec<Vec<f64>> {
    let mut v = vec![Vec::with_capacity(shape.m()); shape.c()];
    each(shape, |c, i| v[c].push(x[i].to_f64()));
    v
}

fn act(a: Activation, v: f64) -> f64 {
    match a {
        Activation::Identity => v,
        Activation::Relu => {
            if v < 0.0 {
                0.0
            } else {
                v
            }
        }
    }
}

/// Training forward in f64. `running` is `(running_mean, running_var, num_batches_tracked)`
/// before the update; without it the update starts from PyTorch's initial (0, 1, 0).
pub fn forward_training<T: Element>(
    shape: &Shape,
    cfg: &Config,
    x: &[T],
    z: Option<&[T]>,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    running: Option<(&[f32], &[f32], u64)>,
) -> ForwardRef {
    let c = shape.c();
    let m = shape.m() as f64;
    let vals = channel_values(shape, x);
    let mean: Vec<f64> = vals.iter().map(|v| v.iter().sum::<f64>() / m).collect();
    let var: Vec<f64> =
        vals.iter().zip(&mean).map(|(v, mu)| v.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / m).collect();
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + cfg.eps as f64).sqrt()).collect();
    let w = |ch: usize| weight.map_or(1.0, |w| w[ch] as f64);
    let b = |ch: usize| bias.map_or(0.0, |b| b[ch] as f64);
    let mut y = vec![0.0; shape.numel()];
    each(shape, |ch, i| {
        let v = (x[i].to_f64() - mean[ch]) * invstd[ch] * w(ch) + b(ch) + z.map_or(0.0, |z| z[i].to_f64());
        y[i] = act(cfg.activation, v);
    });
    let (rm0, rv0, tracked) = match running {
        Some((m, v, t)) => (m.to_vec(), v.to_vec(), t),
        None => (vec![0.0; c], vec![1.0; c], 0),
    };
    let factor = cfg.running_stats.batch_weight(tracked) as f64;
    let unbiased = cfg.running_stats.unbiased_variance();
    let running_mean = (0..c).map(|ch| (1.0 - factor) * rm0[ch] as f64 + factor * mean[ch]).collect();
    let running_var = (0..c)
        .map(|ch| {
            let bv = if unbiased { var[ch] * m / (m - 1.0) } else { var[ch] };
            (1.0 - factor) * rv0[ch] as f64 + factor * bv
        })
        .collect();
    let offset_allowance = (0..c)
        .map(|ch| {
            if mean[ch].abs() > 10.0 * var[ch].sqrt() {
                let maxabs = vals[ch].iter().fold(0.0f64, |a, v| a.max(v.abs()));
                4.0 * <f32 as Element>::ulp(maxabs) * invstd[ch] * w(ch).abs()
            } else {
                0.0
            }
        })
        .collect();
    ForwardRef { y, mean, var, invstd, running_mean, running_var, offset_allowance }
}

/// Inference forward in f64.
#[allow(clippy::too_many_arguments)]
pub fn forward_inference<T: Element>(
    shape: &Shape,
    cfg: &Config,
    x: &[T],
    z: Option<&[T]>,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    running_mean: &[f32],
    running_var: &[f32],
) -> Vec<f64> {
    let mut y = vec![0.0; shape.numel()];
    each(shape, |ch, i| {
        let inv = 1.0 / (running_var[ch] as f64 + cfg.eps as f64).sqrt();
        let v = (x[i].to_f64() - running_mean[ch] as f64) * inv * weight.map_or(1.0, |w| w[ch] as f64)
            + bias.map_or(0.0, |b| b[ch] as f64)
            + z.map_or(0.0, |z| z[i].to_f64());
        y[i] = act(cfg.activation, v);
    });
    y
}

/// Which statistics the backward pass differentiates through.
#[derive(Debug, Clone, Copy)]
pub enum StatsRef<'a> {
    /// Training mode: saved batch mean and invstd (the values the forward returned).
    Saved { mean: &'a [f32], invstd: &'a [f32] },
    /// Eval mode: frozen running mean and variance.
    Running { mean: &'a [f32], var: &'a [f32] },
}

/// Reference results of a backward pass.
#[derive(Debug, Clone)]
pub struct BackwardRef {
    pub dx: Vec<f64>,
    /// `g` (the residual's gradient).
    pub dz: Vec<f64>,
    pub dweight: Vec<f64>,
    pub dbias: Vec<f64>,
    /// Natural scales of the per-channel sums (`sqrt(sum of squared terms)`), used as the
    /// absolute part of their tolerance.
    pub dweight_scale: Vec<f64>,
    pub dbias_scale: Vec<f64>,
    /// Per channel: the extra absolute allowance of `dx`, `1e-6 * (s - 1)` where
    /// `s = |w| * invstd * rms(g)` is the magnitude of the terms whose difference `dx` is
    /// (0 when `s <= 1`). Where those terms cancel (M = 2, nearly constant channels) the
    /// contract's fixed 1e-6 would ask for more than f32 carries at that magnitude.
    pub dx_allowance: Vec<f64>,
}

/// Backward in f64. `y` is the forward output (needed for a fused ReLU: `g = dy * (y > 0)`).
pub fn backward<T: Element>(
    shape: &Shape,
    cfg: &Config,
    x: &[T],
    y: Option<&[T]>,
    dy: &[T],
    weight: Option<&[f32]>,
    stats: StatsRef<'_>,
) -> BackwardRef {
    let c = shape.c();
    let m = shape.m() as f64;
    let (mean, invstd, training): (Vec<f64>, Vec<f64>, bool) = match stats {
        StatsRef::Saved { mean, invstd } => {
            (mean.iter().map(|&v| v as f64).collect(), invstd.iter().map(|&v| v as f64).collect(), true)
        }
        StatsRef::Running { mean, var } => (
            mean.iter().map(|&v| v as f64).collect(),
            var.iter().map(|&v| 1.0 / (v as f64 + cfg.eps as f64).sqrt()).collect(),
            false,
        ),
    };
    let g: Vec<f64> = (0..shape.numel())
        .map(|i| {
            let gate = match (cfg.activation, y) {
                (Activation::Relu, Some(y)) => y[i].to_f64() > 0.0,
                _ => true,
            };
            if gate {
                dy[i].to_f64()
            } else {
                0.0
            }
        })
        .collect();
    let mut dbias = vec![0.0; c];
    let mut dweight = vec![0.0; c];
    let mut dbias_sq = vec![0.0; c];
    let mut dweight_sq = vec![0.0; c];
    each(shape, |ch, i| {
        let xhat = (x[i].to_f64() - mean[ch]) * invstd[ch];
        dbias[ch] += g[i];
        dweight[ch] += g[i] * xhat;
        dbias_sq[ch] += g[i] * g[i];
        dweight_sq[ch] += (g[i] * xhat) * (g[i] * xhat);
    });
    let w = |ch: usize| weight.map_or(1.0, |w| w[ch] as f64);
    let dx_allowance = (0..c)
        .map(|ch| {
            let scale = w(ch).abs() * invstd[ch] * (dbias_sq[ch] / m).sqrt();
            F32_ABS * (scale - 1.0).max(0.0)
        })
        .collect();
    let mut dx = vec![0.0; shape.numel()];
    each(shape, |ch, i| {
        dx[i] = if training {
            let xhat = (x[i].to_f64() - mean[ch]) * invstd[ch];
            w(ch) * invstd[ch] * (g[i] - dbias[ch] / m - xhat * dweight[ch] / m)
        } else {
            g[i] * w(ch) * invstd[ch]
        };
    });
    BackwardRef {
        dx,
        dz: g,
        dweight,
        dbias,
        dweight_scale: dweight_sq.iter().map(|v| v.sqrt()).collect(),
        dbias_scale: dbias_sq.iter().map(|v| v.sqrt()).collect(),
        dx_allowance,
    }
}

// ---------------------------------------------------------------- comparisons

/// Relative part of the f32 contract.
pub const F32_REL: f64 = 1e-5;
/// Absolute part of the f32 contract (also the floor for f16/bf16, whose arithmetic is f32).
pub const F32_ABS: f64 = 1e-6;
/// Units in the last place allowed for f16/bf16 outputs.
pub const HALF_ULPS: f64 = 2.0;

/// Outcome of one comparison.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Comparison {
    /// Largest |got - want|.
    pub max_abs: f64,
    /// Largest |got - want| / |want| over entries with want != 0.
    pub max_rel: f64,
    /// Largest error as a fraction of its allowed bound (<= 1 passes).
    pub worst_ratio: f64,
    /// Index of the worst entry.
    pub worst_index: usize,
    /// Entries compared.
    pub count: usize,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.worst_ratio <= 1.0
    }

    fn add(&mut self, i: usize, got: f64, want: f64, bound: f64) {
        self.count += 1;
        let err = if got.is_nan() || want.is_nan() {
            if got.is_nan() && want.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (got - want).abs()
        };
        self.max_abs = self.max_abs.max(err);
        if want != 0.0 {
            self.max_rel = self.max_rel.max(err / want.abs());
        }
        let ratio = if bound > 0.0 {
            err / bound
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if ratio > self.worst_ratio {
            self.worst_ratio = ratio;
            self.worst_index = i;
        }
    }
}

/// Compare activations of type `T` with f64 reference values under the contract:
/// f32: `1e-5 * |want| + 1e-6`; f16/bf16: 2 ulps of the correctly rounded reference
/// `+ 1e-6`. `extra(i)` adds an allowance per element (the offset-data term).
pub fn compare_activations<T: Element>(got: &[T], want: &[f64], extra: impl Fn(usize) -> f64) -> Comparison {
    assert_eq!(got.len(), want.len(), "compare_activations: lengths differ");
    let mut cmp = Comparison::default();
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let (target, bound) = match T::DTYPE {
            DType::F32 => (w, F32_REL * w.abs() + F32_ABS + extra(i)),
            DType::F16 | DType::BF16 => {
                let r = T::from_f64_rounded(w).to_f64();
                (r, HALF_ULPS * T::ulp(r) + F32_ABS + extra(i))
            }
        };
        cmp.add(i, g.to_f64(), target, bound);
    }
    cmp
}

/// Compare per-channel f32 outputs: `1e-5 * |want| + 1e-6 * scale[c]` (`scale` is the
/// natural magnitude of the quantity, e.g. the root of the summed squares of a sum's terms;
/// pass `None` for quantities with no cancellation, such as variances).
pub fn compare_channels(got: &[f32], want: &[f64], scale: Option<&[f64]>) -> Comparison {
    assert_eq!(got.len(), want.len(), "compare_channels: lengths differ");
    let mut cmp = Comparison::default();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = F32_REL * w.abs() + F32_ABS * scale.map_or(1.0, |s| s[i]);
        cmp.add(i, g as f64, w, bound);
    }
    cmp
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn comparisons_fail_when_they_should() {
        let want = [1.0, -2.0, 3.0];
        assert!(compare_activations(&[1.0f32, -2.0, 3.0], &want, |_| 0.0).passed());
        assert!(!compare_activations(&[1.0f32, -2.0, 3.0001], &want, |_| 0.0).passed());
        // 3 bf16 ulps off at 1.0 fails, 2 passes
        let one = bf16::ONE.to_bits();
        let off = |k: u16| bf16::from_bits(one + k);
        assert!(compare_activations(&[off(2)], &[1.0], |_| 0.0).passed());
        assert!(!compare_activations(&[off(3)], &[1.0], |_| 0.0).passed());
        assert!(!compare_activations(&[f32::NAN], &[1.0], |_| 0.0).passed());
        assert!(!compare_channels(&[1.0001], &[1.0], None).passed());
    }

    #[test]
    fn eval_backward_is_a_scaled_copy() {
        let shape = Shape::channels_last(&[2, 2]).unwrap();
        let x = [0.5f32, 1.0, -0.5, 2.0];
        let dy = [1.0f32, 2.0, 3.0, 4.0];
        let r = backward(
            &shape,
            &Config::default().with_eps(1.0),
            &x,
            None,
            &dy,
            Some(&[2.0, 1.0]),
            StatsRef::Running { mean: &[0.0, 0.0], var: &[3.0, 0.0] },
        );
        assert_eq!(r.dx, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(r.dbias, vec![4.0, 6.0]);
    }
}
