//! The one error type of the crate.
//!
//! Every public entry point validates all of its arguments before it writes anything, so
//! an `Err` always means: no output buffer, running statistic or counter was touched.

use std::fmt;

/// Everything that can go wrong in bnorm. Each kind of bad input has its own variant,
/// naming the argument and the values involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The shape has fewer than 2 or more than 5 dimensions.
    #[error("shape {dims:?}: batch norm takes 2 to 5 dimensions (N, C, *spatial), got {}", dims.len())]
    InvalidRank { dims: Vec<usize> },

    /// The channel dimension is zero.
    #[error("shape {dims:?}: the channel count C is 0")]
    ZeroChannels { dims: Vec<usize> },

    /// The batch or a spatial dimension is zero, so there is nothing to reduce over.
    #[error("shape {dims:?}: N * spatial is 0, there are no values per channel")]
    EmptyReduction { dims: Vec<usize> },

    /// The element count does not fit in `usize`.
    #[error("shape {dims:?}: the element count overflows usize")]
    ShapeOverflow { dims: Vec<usize> },

    /// Training needs at least two values per channel to form a variance.
    #[error("shape {dims:?}: expected more than 1 value per channel when training, got M = N * spatial = {m}")]
    SingleValuePerChannel { dims: Vec<usize>, m: usize },

    /// A buffer's length does not match what the shape asks for.
    #[error("argument `{arg}`: expected {expected} elements, got {actual}")]
    LengthMismatch { arg: &'static str, expected: usize, actual: usize },

    /// `eps` must be finite and > 0.
    #[error("eps must be finite and > 0, got {eps}")]
    InvalidEps { eps: f32 },

    /// A momentum / decay value outside [0, 1] or not finite.
    #[error("{convention} momentum must be in [0, 1], got {momentum}")]
    InvalidMomentum { convention: &'static str, momentum: f32 },

    /// A running statistic (or a saved statistic) that is NaN or infinite.
    #[error("argument `{arg}`: value {value} at channel {channel} is not finite")]
    NonFiniteStatistic { arg: &'static str, channel: usize, value: f32 },

    /// A running variance that is negative (it would make `sqrt(var + eps)` NaN).
    #[error("argument `{arg}`: variance {value} at channel {channel} is negative")]
    NegativeVariance { arg: &'static str, channel: usize, value: f32 },

    /// An argument that the chosen options require was not given.
    #[error("argument `{arg}` is required: {reason}")]
    MissingArgument { arg: &'static str, reason: &'static str },

    /// An argument was given that the chosen options do not use (so it would stay unwritten).
    #[error("argument `{arg}` was given but is not used: {reason}")]
    UnexpectedArgument { arg: &'static str, reason: &'static str },

    /// A buffer lives on another device than the one running the op.
    #[error("argument `{arg}` is on {found}, but the op runs on {expected}")]
    WrongDevice { arg: &'static str, expected: String, found: String },

    /// Two buffers overlap where the op needs them to be distinct.
    #[error("arguments `{a}` and `{b}` overlap in memory; they must be distinct buffers")]
    Aliasing { a: &'static str, b: &'static str },

    /// The layer was built for another channel count than the input has.
    #[error("the layer has {expected} features, the input has C = {actual} channels")]
    NumFeaturesMismatch { expected: usize, actual: usize },

    /// `backward` was called without a training-mode `forward` before it (no saved statistics).
    #[error("backward needs the statistics saved by a training-mode forward on the same shape; {reason}")]
    NoSavedStatistics { reason: &'static str },

    /// A state-dict key the layer needs is missing.
    #[error("state dict: missing key `{key}`")]
    MissingStateKey { key: String },

    /// A state-dict key the layer does not know.
    #[error("state dict: unexpected key `{key}`")]
    UnexpectedStateKey { key: String },

    /// A state-dict entry of the wrong kind or length.
    #[error("state dict: key `{key}`: expected {expected}, got {actual}")]
    StateMismatch { key: String, expected: String, actual: String },

    /// `BNORM_DEVICE` or a device string that cannot be parsed.
    #[error("invalid device `{value}`: expected `cpu`, `cuda` or `cuda:N` (N a device index)")]
    InvalidDeviceSpec { value: String },

    /// The requested device cannot be used here.
    #[error("device {requested} is not available: {reason}")]
    DeviceUnavailable { requested: String, reason: String },

    /// A SIMD level was forced that this CPU does not support.
    #[error("SIMD level {requested} is not supported by this CPU (best available: {available})")]
    SimdUnsupported { requested: String, available: String },

    /// The CUDA driver reported an error.
    #[error("CUDA error in {context}: {message}")]
    Cuda { context: &'static str, message: String },
}

/// Shorthand for `Result<T, bnorm::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A short display helper for `Vec<usize>` dims in messages built elsewhere.
pub(crate) struct Dims<'a>(pub &'a [usize]);

impl fmt::Display for Dims<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("x")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
