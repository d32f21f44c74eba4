//! Options shared by the ops and the layer: epsilon, the running-statistics convention,
//! and the fused activation.

use crate::error::{Error, Result};
use std::fmt;

/// How the running mean and variance follow the batch statistics in training.
///
/// The three conventions in use, named for what they do:
///
/// | variant | update of `running` | variance stored | as in |
/// |---|---|---|---|
/// | `Momentum(m)` | `(1 - m) * running + m * batch` | unbiased `var * M / (M - 1)` | PyTorch `momentum=m` (default 0.1) |
/// | `CumulativeAverage` | `running + (batch - running) / t`, `t` = batches seen | unbiased | PyTorch `momentum=None` |
/// | `Retention(d)` | `d * running + (1 - d) * batch` | biased `var` | Keras `momentum=d` (0.99), ONNX `momentum` (0.9) |
///
/// ```
/// use bnorm::RunningStats;
/// assert_eq!(RunningStats::default(), RunningStats::Momentum(0.1));
/// // batch weight after 4 batches seen under the cumulative average: 1/4
/// assert_eq!(RunningStats::CumulativeAverage.batch_weight(3), 0.25);
/// assert!((RunningStats::Retention(0.99).batch_weight(0) - 0.01).abs() < 1e-7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunningStats {
    /// PyTorch: `running = (1 - momentum) * running + momentum * batch`, unbiased variance.
    Momentum(f32),
    /// PyTorch's `momentum=None`: equal-weight average over all batches seen, unbiased variance.
    CumulativeAverage,
    /// Keras / ONNX: `running = retention * running + (1 - retention) * batch`, biased variance.
    Retention(f32),
}

impl Default for RunningStats {
    fn default() -> Self {
        RunningStats::Momentum(0.1)
    }
}

impl RunningStats {
    /// Weight of the batch statistic in the update, given how many batches were tracked
    /// before this one (`num_batches_tracked` before it is incremented).
    pub fn batch_weight(self, tracked_before: u64) -> f32 {
        match self {
            RunningStats::Momentum(m) => m,
            RunningStats::CumulativeAverage => (1.0 / (tracked_before as f64 + 1.0)) as f32,
            RunningStats::Retention(d) => 1.0 - d,
        }
    }

    /// Whether the running variance takes the unbiased batch variance `var * M / (M - 1)`.
    pub fn unbiased_variance(self) -> bool {
        !matches!(self, RunningStats::Retention(_))
    }

    pub(crate) fn validate(self) -> Result<()> {
        let (convention, m) = match self {
            RunningStats::Momentum(m) => ("PyTorch", m),
            RunningStats::Retention(d) => ("retention (Keras/ONNX)", d),
            RunningStats::CumulativeAverage => return Ok(()),
        };
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::InvalidMomentum { convention, momentum: m });
        }
        Ok(())
    }
}

impl fmt::Display for RunningStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunningStats::Momentum(m) => write!(f, "momentum {m} (PyTorch)"),
            RunningStats::CumulativeAverage => f.write_str("cumulative average (PyTorch momentum=None)"),
            RunningStats::Retention(d) => write!(f, "retention {d} (Keras/ONNX)"),
        }
    }
}

/// The activation applied after the (optional) residual add: `y = act(bn(x) + z)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Activation {
    #[default]
    Identity,
    Relu,
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Activation::Identity => "identity",
            Activation::Relu => "relu",
        })
    }
}

/// Options of one batch-norm op: epsilon, running-stats convention, fused activation.
///
/// ```
/// use bnorm::{Activation, Config, RunningStats};
/// let cfg = Config::default()
///     .with_eps(1e-3)
///     .with_running_stats(RunningStats::Retention(0.99))
///     .with_activation(Activation::Relu);
/// assert_eq!(cfg.eps, 1e-3);
/// assert!(Config::default().with_eps(0.0).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Added to the variance before the square root. Default 1e-5.
    pub eps: f32,
    /// The running-statistics convention. Default PyTorch momentum 0.1.
    pub running_stats: RunningStats,
    /// Activation after the optional residual add. Default identity.
    pub activation: Activation,
}

impl Default for Config {
    fn default() -> Self {
        Config { eps: 1e-5, running_stats: RunningStats::default(), activation: Activation::Identity }
    }
}

impl Config {
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    pub fn with_running_stats(mut self, r: RunningStats) -> Self {
        self.running_stats = r;
        self
    }
    pub fn with_activation(mut self, a: Activation) -> Self {
        self.activation = a;
        self
    }

    /// Checks eps (finite, > 0) and the momentum range.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::InvalidEps { eps: self.eps });
        }
        self.running_stats.validate()
    }
}
