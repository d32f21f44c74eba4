//! The CUDA backend: probe, context/stream ownership, kernel registry, launches.
//!
//! A [`CudaDevice`] owns (shares, through an `Arc`) one context, the stream every op of
//! it is enqueued on, the lazily loaded kernels and a small workspace (per-channel
//! parameters, split-reduction partials and self-resetting counters). Ops never
//! synchronize the host: they only enqueue work on the stream, so they compose with the
//! caller's own kernels on that stream ([`CudaDevice::from_stream`]).
//!
//! Kernel design, launch heuristics and what is verified: docs/cuda.md.

pub(crate) mod launch;
pub(crate) mod ops;
mod registry;
#[cfg(bnorm_kernels)]
pub(crate) mod staging;

use crate::error::{Error, Result};
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use launch::Caps;
use registry::Registry;
use std::sync::{Arc, Mutex, MutexGuard};

/// The cudarc version bnorm is built against, for the caller's device buffers and streams.
pub use cudarc;
pub use registry::SASS_ARCHS;

/// Whether `build.rs` compiled the kernels and embedded them in this build.
pub const KERNELS_EMBEDDED: bool = cfg!(bnorm_kernels);

/// One CUDA device: its context, the stream bnorm enqueues on, the kernels loaded into the
/// context and the workspace of the ops. Cloning shares all of it.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
    caps: Caps,
    registry: Registry,
    workspace: Mutex<Option<Workspace>>,
    /// `BNORM_CUDA_PERSISTENT=1` when the device was opened: use the persistent kernels
    /// where a channel fits on chip (not yet measured on a GPU, so off by default).
    persistent: bool,
}

/// Whether `BNORM_CUDA_PERSISTENT` asks for the persistent kernels (`1`, `true`, `yes`).
fn persistent_requested() -> bool {
    matches!(std::env::var("BNORM_CUDA_PERSISTENT").as_deref(), Ok("1") | Ok("true") | Ok("yes"))
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal())
            .field("name", &self.inner.name)
            .field("cc", &self.inner.cc)
            .finish()
    }
}

fn unavailable(requested: String, reason: impl Into<String>) -> Error {
    Error::DeviceUnavailable { requested, reason: reason.into() }
}

/// An `Error::Cuda` for a failed driver call.
pub(crate) fn cuda_err(context: &'static str, message: impl std::fmt::Display) -> Error {
    Error::Cuda { context, message: message.to_string() }
}

/// Whether the driver library can be loaded (no panic, no CUDA call).
fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaDevice {
    /// Open device `ordinal` with its default stream. Probes for the driver library first,
    /// so this returns an error (never panics) on a machine without an NVIDIA driver.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let requested = format!("cuda:{ordinal}");
        if !KERNELS_EMBEDDED {
            return Err(unavailable(
                requested,
                "the CUDA kernels were not compiled into this build (no nvcc at build time)",
            ));
        }
        if !driver_present() {
            return Err(unavailable(requested, "no NVIDIA driver (libcuda) found"));
        }
        let opened = std::panic::catch_unwind(|| -> Result<CudaDevice> {
            let count = CudaContext::device_count()
                .map_err(|e| unavailable(requested.clone(), format!("cuInit/cuDeviceGetCount: {e}")))?;
            if ordinal >= count.max(0) as usize {
                return Err(unavailable(requested.clone(), format!("{count} CUDA device(s) present")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(requested.clone(), format!("context: {e}")))?;
            let stream = ctx.default_stream();
            CudaDevice::build(stream)
        });
        opened.unwrap_or_else(|_| Err(unavailable(format!("cuda:{ordinal}"), "the CUDA driver panicked while probing")))
    }

    /// Run bnorm's ops on the caller's stream (and its context): they are enqueued after
    /// the caller's earlier work on that stream and before its later work, with no host
    /// synchronization. Device buffers of the ops may come from any stream of the context
    /// (cudarc orders them with events when it tracks them).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<CudaDevice> {
        if !KERNELS_EMBEDDED {
            return Err(unavailable(
                format!("cuda:{}", stream.context().ordinal()),
                "the CUDA kernels were not compiled into this build (no nvcc at build time)",
            ));
        }
        CudaDevice::build(stream)
    }

    fn build(stream: Arc<CudaStream>) -> Result<CudaDevice> {
        let ctx = stream.context().clone();
        let requested = format!("cuda:{}", ctx.ordinal());
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc =
            ctx.compute_capability().map_err(|e| unavailable(requested.clone(), format!("compute capability: {e}")))?;
        usable(cc, driver_version()).map_err(|reason| unavailable(requested.clone(), format!("{name}: {reason}")))?;
        let attr = |a: Attr| -> Result<i32> {
            ctx.attribute(a).map_err(|e| unavailable(requested.clone(), format!("{a:?}: {e}")))
        };
        let caps = Caps {
            sms: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32,
            l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as u64,
            smem_per_sm: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?.max(0) as u64,
            smem_per_block: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as u64,
            cooperative: attr(Attr::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? != 0,
        };
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                registry: Registry::new(ctx.clone()),
                ctx,
                stream,
                name,
                cc,
                caps,
                workspace: Mutex::new(None),
                persistent: persistent_requested(),
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ctx.ordinal()
    }

    /// `cuda:N (NAME, sm_XY)`.
    pub fn describe(&self) -> String {
        format!("cuda:{} ({}, sm_{}{})", self.ordinal(), self.inner.name, self.inner.cc.0, self.inner.cc.1)
    }

    /// The GPU's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.cc
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The stream the ops are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// What `bnorm info` shows about this GPU.
    pub fn info(&self) -> CudaInfo {
        let (free, total) = self.inner.ctx.mem_get_info().unwrap_or((0, 0));
        let (major, minor) = self.inner.cc;
        CudaInfo {
            ordinal: self.ordinal(),
            name: self.inner.name.clone(),
            compute_capability: self.inner.cc,
            multiprocessors: self.inner.caps.sms,
            l2_bytes: self.inner.caps.l2_bytes,
            memory_total: total,
            memory_free: free,
            driver_version: driver_version(),
            kernels_embedded: KERNELS_EMBEDDED,
            sass_archs: SASS_ARCHS,
            native_code: sass_covers(major, minor),
        }
    }

    pub(crate) fn caps(&self) -> &Caps {
        &self.inner.caps
    }

    /// Whether the ops use the persistent kernels where they fit (`BNORM_CUDA_PERSISTENT=1`
    /// when the device was opened; docs/cuda.md).
    pub fn persistent(&self) -> bool {
        self.inner.persistent
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn workspace(&self) -> MutexGuard<'_, Option<Workspace>> {
        self.inner.workspace.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A GPU as `bnorm info` describes it.
#[derive(Debug, Clone)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub l2_bytes: u64,
    pub memory_total: usize,
    pub memory_free: usize,
    /// The driver's CUDA version (major, minor), e.g. (13, 0).
    pub driver_version: Option<(i32, i32)>,
    pub kernels_embedded: bool,
    /// Architectures with precompiled SASS in this build (e.g. [80, 90]).
    pub sass_archs: &'static [u32],
    /// Whether this GPU runs precompiled SASS (else the driver JIT-compiles the PTX once).
    pub native_code: bool,
}

/// Whether the kernels can run on a GPU of compute capability `cc` with a driver for CUDA
/// `driver` (major, minor): CUDA 13 code needs compute capability 7.5 and a CUDA 13 driver.
/// Checked when a device is opened, so `Device::auto` falls back to the CPU instead of
/// failing at the first op.
fn usable(cc: (i32, i32), driver: Option<(i32, i32)>) -> std::result::Result<(), String> {
    if cc < (7, 5) {
        return Err(format!(
            "compute capability {}.{} is below 7.5, the oldest the kernels (CUDA 13) support",
            cc.0, cc.1
        ));
    }
    match driver {
        Some(v) if v >= (13, 0) => Ok(()),
        Some(v) => Err(format!("the driver supports CUDA {}.{}; the kernels need a CUDA 13 driver (R580+)", v.0, v.1)),
        None => Err("cannot read the driver version".into()),
    }
}

/// Whether SASS for one of [`SASS_ARCHS`] runs on compute capability `major.minor`
/// (same major version, not newer than the device).
pub fn sass_covers(major: i32, minor: i32) -> bool {
    let cc = (major * 10 + minor).max(0) as u32;
    SASS_ARCHS.iter().any(|&a| a / 10 == major.max(0) as u32 && a <= cc)
}

/// The CUDA version of the installed driver, e.g. `Some((13, 0))`; `None` without a driver.
/// Never panics.
pub fn driver_version() -> Option<(i32, i32)> {
    if !driver_present() {
        return None;
    }
    std::panic::catch_unwind(|| {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: cuDriverGetVersion writes one int through the valid pointer; it needs no
        // cuInit and no context. The library was found just above.
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some((v / 1000, (v % 1000) / 10))
    })
    .ok()
    .flatten()
}

/// Number of CUDA devices; 0 without a driver. Never panics.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    std::panic::catch_unwind(|| CudaContext::device_count().map_or(0, |n| n.max(0) as usize)).unwrap_or(0)
}

// ---------------------------------------------------------------- workspace

/// Device scratch memory of a [`CudaDevice`]'s ops, used in stream order:
/// `[barrier: u32][pad to 256 B][counters: u32 x counter_cap][pad to 256 B][floats: f32 x float_cap]`.
///
/// The counters are zeroed once, when the buffer is allocated; every kernel that uses one
/// leaves it at zero again (the last block of a channel resets it), so no op needs a
/// memset. The barrier word is the grid-wide barrier of the persistent kernels' cooperative
/// launches: its bit 31 flips at every barrier and its low bits return to 0, so it needs no
/// reset either; nothing else touches it. The counter region never moves within a buffer, and nothing else is ever
/// written there. The float region holds the per-channel parameters handed from a
/// reduction kernel to its elementwise pass (`4 x C`) and the split partials.
pub(crate) struct Workspace {
    buf: CudaSlice<u8>,
    counter_cap: usize,
    float_cap: usize,
}

/// Device addresses of a workspace's regions for one op.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkspacePtrs {
    pub barrier: u64,
    pub counters: u64,
    pub params: u64,
    pub partials: u64,
}

/// Bytes before the counters: the barrier word, padded.
const BARRIER_BYTES: usize = 256;

fn counter_bytes(counters: usize) -> usize {
    (counters * 4).div_ceil(256) * 256
}

impl Workspace {
    /// A workspace with room for `counters` counters and `floats` floats, reusing the
    /// current one when it is large enough. A new buffer is zeroed on `stream` (after
    /// the work already there); the old one is freed in stream order too.
    pub(crate) fn ensure<'a>(
        slot: &'a mut Option<Workspace>,
        stream: &Arc<CudaStream>,
        counters: usize,
        floats: usize,
    ) -> Result<&'a mut Workspace> {
        let fits = slot.as_ref().is_some_and(|w| w.counter_cap >= counters && w.float_cap >= floats);
        if !fits {
            let (c0, f0) = slot.as_ref().map_or((0, 0), |w| (w.counter_cap, w.float_cap));
            let counter_cap = counters.max(c0).max(1024);
            let float_cap = floats.max(f0 + f0 / 2).max(16 * 1024);
            let bytes = BARRIER_BYTES + counter_bytes(counter_cap) + float_cap * 4;
            let buf = stream
                .alloc_zeros::<u8>(bytes)
                .map_err(|e| cuda_err("allocating the workspace", format!("{bytes} bytes: {e}")))?;
            *slot = Some(Workspace { buf, counter_cap, float_cap });
        }
        Ok(slot.as_mut().expect("just set"))
    }

    /// Region addresses, with `params_floats` floats of parameters before the partials.
    /// The returned guard must live until the op's launches are enqueued.
    pub(crate) fn ptrs<'a>(
        &'a mut self,
        stream: &'a CudaStream,
        params_floats: usize,
    ) -> (WorkspacePtrs, cudarc::driver::SyncOnDrop<'a>) {
        let counter_region = counter_bytes(self.counter_cap) as u64;
        let (base, guard) = self.buf.device_ptr_mut(stream);
        let counters = base + BARRIER_BYTES as u64;
        let params = counters + counter_region;
        (WorkspacePtrs { barrier: base, counters, params, partials: params + (params_floats * 4) as u64 }, guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_region_is_padded() {
        assert_eq!(counter_bytes(1), 256);
        assert_eq!(counter_bytes(64), 256);
        assert_eq!(counter_bytes(65), 512);
    }

    #[test]
    fn old_gpus_and_drivers_are_refused() {
        assert!(usable((9, 0), Some((13, 0))).is_ok());
        assert!(usable((7, 5), Some((13, 1))).is_ok());
        assert!(usable((7, 0), Some((13, 0))).unwrap_err().contains("7.0"));
        assert!(usable((8, 0), Some((12, 8))).unwrap_err().contains("12.8"));
        assert!(usable((8, 0), None).is_err());
    }

    #[test]
    fn probing_never_panics() {
        // On a machine without a driver these say so; with one they work. Either way no panic.
        let _ = driver_version();
        let _ = device_count();
        let _ = sass_covers(9, 0);
        match CudaDevice::new(0) {
            Ok(d) => assert!(d.describe().starts_with("cuda:0")),
            Err(e) => assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}"),
        }
    }

    #[cfg(bnorm_kernels)]
    #[test]
    fn sass_coverage_follows_binary_compatibility() {
        // default build: sm_80 and sm_90
        if SASS_ARCHS == [80, 90] {
            assert!(sass_covers(8, 0) && sass_covers(8, 6) && sass_covers(8, 9));
            assert!(sass_covers(9, 0));
            assert!(!sass_covers(7, 5) && !sass_covers(10, 0) && !sass_covers(12, 0));
        }
    }
}
