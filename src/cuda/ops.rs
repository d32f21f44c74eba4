//! CUDA launches of the ops (work in progress: the kernels land with the CUDA backend).
use super::CudaDevice;
use crate::config::Config;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{Backward, ForwardInference, ForwardTraining};
use crate::shape::Shape;

fn todo(dev: &CudaDevice) -> Error {
    Error::DeviceUnavailable { requested: dev.describe(), reason: "CUDA ops are not implemented yet".into() }
}

pub(crate) fn forward_training<T: Element>(
    d: &CudaDevice,
    _: &Shape,
    _: &Config,
    _: ForwardTraining<'_, T>,
) -> Result<()> {
    Err(todo(d))
}
pub(crate) fn forward_inference<T: Element>(
    d: &CudaDevice,
    _: &Shape,
    _: &Config,
    _: ForwardInference<'_, T>,
) -> Result<()> {
    Err(todo(d))
}
pub(crate) fn backward<T: Element>(d: &CudaDevice, _: &Shape, _: &Config, _: Backward<'_, T>) -> Result<()> {
    Err(todo(d))
}
