//! The CUDA backend: probe, context/stream ownership, kernel registry, launches.

pub(crate) mod ops;

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::Arc;

/// Whether `build.rs` compiled the kernels to PTX and embedded them.
pub const KERNELS_EMBEDDED: bool = cfg!(bnorm_kernels);

/// One CUDA device: its context and the stream bnorm enqueues on.
#[derive(Clone)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("ordinal", &self.ordinal()).field("name", &self.name).finish()
    }
}

fn unavailable(ordinal: usize, reason: impl Into<String>) -> Error {
    Error::DeviceUnavailable { requested: format!("cuda:{ordinal}"), reason: reason.into() }
}

impl CudaDevice {
    /// Open device `ordinal`. Probes for the driver library first, so this returns an
    /// error (never panics) on a machine without an NVIDIA driver.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        if !KERNELS_EMBEDDED {
            return Err(unavailable(
                ordinal,
                "the CUDA kernels were not compiled into this build (no nvcc at build time)",
            ));
        }
        // SAFETY: only tries to dlopen the driver library by its known names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable(ordinal, "no NVIDIA driver (libcuda) found"));
        }
        let opened = std::panic::catch_unwind(|| -> Result<CudaDevice> {
            let count = CudaContext::device_count()
                .map_err(|e| unavailable(ordinal, format!("cuInit/cuDeviceGetCount: {e}")))?;
            if ordinal >= count.max(0) as usize {
                return Err(unavailable(ordinal, format!("{count} CUDA device(s) present")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(ordinal, format!("context: {e}")))?;
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let cc = ctx.compute_capability().map_err(|e| unavailable(ordinal, format!("compute capability: {e}")))?;
            let stream = ctx.default_stream();
            Ok(CudaDevice { ctx, stream, name, cc })
        });
        opened.unwrap_or_else(|_| Err(unavailable(ordinal, "the CUDA driver panicked while probing")))
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// `cuda:N (NAME, sm_XY)`.
    pub fn describe(&self) -> String {
        format!("cuda:{} ({}, sm_{}{})", self.ordinal(), self.name, self.cc.0, self.cc.1)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
