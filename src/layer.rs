//! [`BatchNorm`]: a layer that owns its parameters and running statistics, like PyTorch's
//! `nn.BatchNorm1d/2d/3d`, with train/eval modes and PyTorch's state-dict names.

use crate::buffer::{Buf, BufMut};
use crate::config::{Activation, Config, RunningStats};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{self, Backward, BackwardStats, ForwardInference, ForwardTraining};
use crate::shape::Shape;
use std::collections::BTreeMap;

/// One entry of a state dict: an f32 vector or the batch counter (PyTorch stores
/// `num_batches_tracked` as an int64 scalar).
#[derive(Debug, Clone, PartialEq)]
pub enum StateValue {
    Tensor(Vec<f32>),
    Count(i64),
}

/// A state dict: PyTorch's names (`weight`, `bias`, `running_mean`, `running_var`,
/// `num_batches_tracked`), optionally behind a prefix such as `layer1.0.bn1.`.
pub type StateDict = BTreeMap<String, StateValue>;

/// Builder of a [`BatchNorm`] layer; defaults are PyTorch's.
#[derive(Debug, Clone)]
pub struct BatchNormBuilder {
    num_features: usize,
    config: Config,
    affine: bool,
    track_running_stats: bool,
    device: Option<Device>,
}

impl BatchNormBuilder {
    pub fn eps(mut self, eps: f32) -> Self {
        self.config.eps = eps;
        self
    }
    /// The running-statistics convention (PyTorch momentum 0.1 by default).
    pub fn running_stats(mut self, r: RunningStats) -> Self {
        self.config.running_stats = r;
        self
    }
    /// Activation fused after the normalization (and the residual add, when given).
    pub fn activation(mut self, a: Activation) -> Self {
        self.config.activation = a;
        self
    }
    /// Learnable weight and bias (default true).
    pub fn affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }
    /// Keep running statistics (default true). Without them the layer normalizes with
    /// batch statistics in eval mode too, as PyTorch does.
    pub fn track_running_stats(mut self, t: bool) -> Self {
        self.track_running_stats = t;
        self
    }
    /// Where the layer runs (default: [`Device::auto`]).
    pub fn device(mut self, d: Device) -> Self {
        self.device = Some(d);
        self
    }

    pub fn build(self) -> Result<BatchNorm> {
        self.config.validate()?;
        if self.num_features == 0 {
            return Err(Error::ZeroChannels { dims: vec![0] });
        }
        let device = match self.device {
            Some(d) => d,
            None => Device::auto()?,
        };
        let c = self.num_features;
        Ok(BatchNorm {
            num_features: c,
            config: self.config,
            affine: self.affine,
            track_running_stats: self.track_running_stats,
            weight: vec![1.0; c],
            bias: vec![0.0; c],
            running_mean: vec![0.0; c],
            running_var: vec![1.0; c],
            num_batches_tracked: 0,
            grad_weight: vec![0.0; c],
            grad_bias: vec![0.0; c],
            training: true,
            saved: None,
            device,
        })
    }
}

struct Saved {
    shape: Shape,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

/// A batch-norm layer for `(N, C)`, `(N, C, L)`, `(N, C, H, W)` and `(N, C, D, H, W)`
/// inputs in either layout, with PyTorch's semantics.
///
/// ```
/// use bnorm::{BatchNorm, Device, Shape};
/// let mut bn = BatchNorm::builder(3).device(Device::cpu()).build()?;
/// let shape = Shape::channels_last(&[4, 5, 5, 3])?; // NHWC
/// let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32).collect();
/// let mut y = vec![0f32; x.len()];
/// bn.forward(&shape, &x, &mut y)?;           // training mode: batch statistics
/// assert_eq!(bn.num_batches_tracked(), 1);
/// let dy = vec![1f32; x.len()];
/// let mut dx = vec![0f32; x.len()];
/// bn.backward(&shape, &x, None, &dy, &mut dx, None)?;
/// assert!(dx.iter().all(|v| v.abs() < 1e-4)); // a constant gradient cancels out
/// assert!((bn.grad_bias()[0] - 100.0).abs() < 1e-3);
/// bn.eval();
/// bn.forward(&shape, &x, &mut y)?;           // eval mode: running statistics
/// let sd = bn.state_dict();
/// assert!(sd.contains_key("running_var"));
/// # Ok::<(), bnorm::Error>(())
/// ```
pub struct BatchNorm {
    num_features: usize,
    config: Config,
    affine: bool,
    track_running_stats: bool,
    weight: Vec<f32>,
    bias: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    num_batches_tracked: u64,
    grad_weight: Vec<f32>,
    grad_bias: Vec<f32>,
    training: bool,
    saved: Option<Saved>,
    device: Device,
}

impl BatchNorm {
    /// A builder with PyTorch's defaults: eps 1e-5, momentum 0.1, affine, tracking running
    /// statistics, no fused activation, device [`Device::auto`].
    pub fn builder(num_features: usize) -> BatchNormBuilder {
        BatchNormBuilder {
            num_features,
            config: Config::default(),
            affine: true,
            track_running_stats: true,
            device: None,
        }
    }

    /// `BatchNorm::builder(num_features).build()`.
    pub fn new(num_features: usize) -> Result<BatchNorm> {
        BatchNorm::builder(num_features).build()
    }

    pub fn num_features(&self) -> usize {
        self.num_features
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Training mode (batch statistics, running-stats updates).
    pub fn train(&mut self) {
        self.training = true;
    }
    /// Eval mode (running statistics, no updates).
    pub fn eval(&mut self) {
        self.training = false;
    }
    pub fn is_training(&self) -> bool {
        self.training
    }
    pub fn is_affine(&self) -> bool {
        self.affine
    }
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }
    /// Mutable weight (for optimizers and initialization).
    pub fn weight_mut(&mut self) -> &mut [f32] {
        &mut self.weight
    }
    pub fn bias_mut(&mut self) -> &mut [f32] {
        &mut self.bias
    }
    pub fn running_mean(&self) -> &[f32] {
        &self.running_mean
    }
    pub fn running_var(&self) -> &[f32] {
        &self.running_var
    }
    pub fn num_batches_tracked(&self) -> u64 {
        self.num_batches_tracked
    }
    /// Accumulated gradient of the weight (summed over `backward` calls, like PyTorch's `.grad`).
    pub fn grad_weight(&self) -> &[f32] {
        &self.grad_weight
    }
    pub fn grad_bias(&self) -> &[f32] {
        &self.grad_bias
    }
    /// Set the accumulated parameter gradients to zero.
    pub fn zero_grad(&mut self) {
        self.grad_weight.iter_mut().for_each(|v| *v = 0.0);
        self.grad_bias.iter_mut().for_each(|v| *v = 0.0);
    }

    /// Reset running statistics to (0, 1) and the batch counter to 0.
    pub fn reset_running_stats(&mut self) {
        self.running_mean.iter_mut().for_each(|v| *v = 0.0);
        self.running_var.iter_mut().for_each(|v| *v = 1.0);
        self.num_batches_tracked = 0;
    }

    fn check_shape(&self, shape: &Shape) -> Result<()> {
        if shape.c() != self.num_features {
            return Err(Error::NumFeaturesMismatch { expected: self.num_features, actual: shape.c() });
        }
        Ok(())
    }

    /// `y = bn(x)` (with the configured activation).
    pub fn forward<'a, T: Element>(
        &mut self,
        shape: &Shape,
        x: impl Into<Buf<'a, T>>,
        y: impl Into<BufMut<'a, T>>,
    ) -> Result<()> {
        self.forward_impl(shape, x.into(), None, y.into())
    }

    /// `y = act(bn(x) + z)`: the fused residual add.
    pub fn forward_add<'a, T: Element>(
        &mut self,
        shape: &Shape,
        x: impl Into<Buf<'a, T>>,
        z: impl Into<Buf<'a, T>>,
        y: impl Into<BufMut<'a, T>>,
    ) -> Result<()> {
        self.forward_impl(shape, x.into(), Some(z.into()), y.into())
    }

    fn forward_impl<T: Element>(
        &mut self,
        shape: &Shape,
        x: Buf<'_, T>,
        z: Option<Buf<'_, T>>,
        y: BufMut<'_, T>,
    ) -> Result<()> {
        self.check_shape(shape)?;
        let c = self.num_features;
        let (w, b) = if self.affine { (Some((&self.weight).into()), Some((&self.bias).into())) } else { (None, None) };
        if self.training || !self.track_running_stats {
            let mut mean = vec![0f32; c];
            let mut invstd = vec![0f32; c];
            let running = if self.training && self.track_running_stats {
                Some(ops::RunningStatsMut {
                    mean: (&mut self.running_mean).into(),
                    var: (&mut self.running_var).into(),
                    num_batches_tracked: &mut self.num_batches_tracked,
                })
            } else {
                None
            };
            let args = ForwardTraining {
                x,
                residual: z,
                y,
                weight: w,
                bias: b,
                running,
                saved_mean: Some((&mut mean).into()),
                saved_invstd: Some((&mut invstd).into()),
            };
            ops::forward_training(&self.device, shape, &self.config, args)?;
            self.saved = Some(Saved { shape: shape.clone(), mean, invstd });
        } else {
            let args = ForwardInference {
                x,
                residual: z,
                y,
                weight: w,
                bias: b,
                running_mean: (&self.running_mean).into(),
                running_var: (&self.running_var).into(),
            };
            ops::forward_inference(&self.device, shape, &self.config, args)?;
        }
        Ok(())
    }

    /// Backward of the last `forward` (same mode, same shape): writes `dx` (and `dz`, the
    /// residual's gradient, when given) and adds the parameter gradients to
    /// [`grad_weight`](Self::grad_weight) / [`grad_bias`](Self::grad_bias) when affine.
    /// `y`, the forward output, is required when a ReLU is fused.
    pub fn backward<'a, T: Element>(
        &mut self,
        shape: &Shape,
        x: impl Into<Buf<'a, T>>,
        y: Option<Buf<'a, T>>,
        dy: impl Into<Buf<'a, T>>,
        dx: impl Into<BufMut<'a, T>>,
        dz: Option<BufMut<'a, T>>,
    ) -> Result<()> {
        self.check_shape(shape)?;
        let c = self.num_features;
        let uses_batch_stats = self.training || !self.track_running_stats;
        let stats = if uses_batch_stats {
            let saved = self.saved.as_ref().ok_or(Error::NoSavedStatistics {
                reason: "no forward has run in training mode (or without running statistics)",
            })?;
            if &saved.shape != shape {
                return Err(Error::NoSavedStatistics { reason: "the last forward ran on another shape" });
            }
            BackwardStats::Saved { mean: (&saved.mean).into(), invstd: (&saved.invstd).into() }
        } else {
            BackwardStats::Running { mean: (&self.running_mean).into(), var: (&self.running_var).into() }
        };
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        let args = Backward {
            x: x.into(),
            y,
            dy: dy.into(),
            dx: dx.into(),
            dz,
            weight: if self.affine { Some((&self.weight).into()) } else { None },
            stats,
            dweight: if self.affine { Some((&mut dw).into()) } else { None },
            dbias: if self.affine { Some((&mut db).into()) } else { None },
        };
        ops::backward(&self.device, shape, &self.config, args)?;
        if self.affine {
            self.grad_weight.iter_mut().zip(&dw).for_each(|(g, d)| *g += d);
            self.grad_bias.iter_mut().zip(&db).for_each(|(g, d)| *g += d);
        }
        Ok(())
    }

    /// The layer's state under PyTorch's names: `weight`, `bias` (when affine),
    /// `running_mean`, `running_var`, `num_batches_tracked` (when tracking).
    pub fn state_dict(&self) -> StateDict {
        self.state_dict_with_prefix("")
    }

    /// [`state_dict`](Self::state_dict) with every key behind `prefix` (e.g. `"bn1."`).
    pub fn state_dict_with_prefix(&self, prefix: &str) -> StateDict {
        let mut sd = StateDict::new();
        let key = |k: &str| format!("{prefix}{k}");
        if self.affine {
            sd.insert(key("weight"), StateValue::Tensor(self.weight.clone()));
            sd.insert(key("bias"), StateValue::Tensor(self.bias.clone()));
        }
        if self.track_running_stats {
            sd.insert(key("running_mean"), StateValue::Tensor(self.running_mean.clone()));
            sd.insert(key("running_var"), StateValue::Tensor(self.running_var.clone()));
            sd.insert(key("num_batches_tracked"), StateValue::Count(self.num_batches_tracked as i64));
        }
        sd
    }

    /// Load a state dict strictly, like PyTorch's `load_state_dict(strict=True)`: every
    /// key the layer has must be present with the right length, no other key may be there.
    /// Everything is checked before anything is written.
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        if let Some(k) = sd.keys().find(|k| !self.state_dict().contains_key(*k)) {
            return Err(Error::UnexpectedStateKey { key: k.clone() });
        }
        self.load_state_dict_with_prefix(sd, "")
    }

    /// Load this layer's keys (`prefix` + name) from a larger state dict (other keys are
    /// left alone, as for a submodule). Everything is checked before anything is written.
    pub fn load_state_dict_with_prefix(&mut self, sd: &StateDict, prefix: &str) -> Result<()> {
        let c = self.num_features;
        let tensor = |name: &str| -> Result<Option<Vec<f32>>> {
            let key = format!("{prefix}{name}");
            match sd.get(&key) {
                None => Err(Error::MissingStateKey { key }),
                Some(StateValue::Tensor(v)) if v.len() == c => {
                    if let Some((channel, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                        return Err(Error::NonFiniteStatistic { arg: "state dict tensor", channel, value });
                    }
                    Ok(Some(v.clone()))
                }
                Some(StateValue::Tensor(v)) => Err(Error::StateMismatch {
                    key,
                    expected: format!("a tensor of {c} values"),
                    actual: format!("a tensor of {} values", v.len()),
                }),
                Some(StateValue::Count(_)) => Err(Error::StateMismatch {
                    key,
                    expected: format!("a tensor of {c} values"),
                    actual: "an integer".into(),
                }),
            }
        };
        let (w, b) = if self.affine { (tensor("weight")?, tensor("bias")?) } else { (None, None) };
        let (rm, rv, nbt) = if self.track_running_stats {
            let rm = tensor("running_mean")?;
            let rv = tensor("running_var")?;
            if let Some((channel, &value)) = rv.iter().flatten().enumerate().find(|(_, v)| **v < 0.0) {
                return Err(Error::NegativeVariance { arg: "running_var", channel, value });
            }
            let key = format!("{prefix}num_batches_tracked");
            let nbt = match sd.get(&key) {
                // PyTorch's older checkpoints lack the counter; it loads them as 0.
                None => 0,
                Some(StateValue::Count(n)) if *n >= 0 => *n as u64,
                Some(other) => {
                    return Err(Error::StateMismatch {
                        key,
                        expected: "a non-negative integer".into(),
                        actual: format!("{other:?}"),
                    })
                }
            };
            (rm, rv, Some(nbt))
        } else {
            (None, None, None)
        };
        // All checked: write.
        if let Some(v) = w {
            self.weight = v;
        }
        if let Some(v) = b {
            self.bias = v;
        }
        if let Some(v) = rm {
            self.running_mean = v;
        }
        if let Some(v) = rv {
            self.running_var = v;
        }
        if let Some(n) = nbt {
            self.num_batches_tracked = n;
        }
        Ok(())
    }
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNorm")
            .field("num_features", &self.num_features)
            .field("config", &self.config)
            .field("affine", &self.affine)
            .field("track_running_stats", &self.track_running_stats)
            .field("training", &self.training)
            .field("device", &self.device.name())
            .finish()
    }
}
