//! Host-buffer staging for the conformance harness ([`crate::check`]): copy the host
//! inputs (and the initial contents of in/out buffers such as running statistics) to fresh
//! device buffers, run the op through the public API on the device, copy every output back
//! and wait for the copies. Used by `bnorm check --device cuda` and the GPU tests.

use super::{cuda_err, CudaDevice};
use crate::buffer::{Buf, BufMut};
use crate::config::Config;
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{self, Backward, BackwardStats, ForwardInference, ForwardTraining, RunningStatsMut};
use crate::shape::Shape;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// A host slice's bytes.
fn bytes<T: Element>(h: &[T]) -> &[u8] {
    // SAFETY: `Element` is sealed to f32, f16 and bf16: plain data without padding, every
    // byte initialized; u8 has no alignment requirement; the length is the slice's size.
    unsafe { std::slice::from_raw_parts(h.as_ptr().cast::<u8>(), std::mem::size_of_val(h)) }
}

fn bytes_mut<T: Element>(h: &mut [T]) -> &mut [u8] {
    // SAFETY: as `bytes`; in addition every bit pattern is a valid f32 / f16 / bf16, so
    // whatever the device writes through this view leaves the slice valid.
    unsafe { std::slice::from_raw_parts_mut(h.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(h)) }
}

fn up<T: Element>(s: &Arc<CudaStream>, h: &[T]) -> Result<CudaSlice<u8>> {
    s.clone_htod(bytes(h)).map_err(|e| cuda_err("staging: host to device copy", e))
}

fn view<T>(b: &CudaSlice<u8>, len: usize) -> CudaView<'_, T> {
    // SAFETY: the buffer was allocated for exactly `len` values of T (`up`) and cudarc
    // allocations are 256-byte aligned; the view is only handed to the ops.
    unsafe { b.transmute::<T>(len) }.expect("staging buffer sized for len elements")
}

fn view_mut<T>(b: &mut CudaSlice<u8>, len: usize) -> CudaViewMut<'_, T> {
    // SAFETY: as in `view`.
    unsafe { b.transmute_mut::<T>(len) }.expect("staging buffer sized for len elements")
}

fn down<T: Element>(s: &Arc<CudaStream>, d: &CudaSlice<u8>, h: &mut [T]) -> Result<()> {
    s.memcpy_dtoh(d, bytes_mut(h)).map_err(|e| cuda_err("staging: device to host copy", e))
}

fn sync(s: &Arc<CudaStream>) -> Result<()> {
    s.synchronize().map_err(|e| cuda_err("staging: stream synchronize", e))
}

fn host<'a, T>(arg: &'static str, b: &Buf<'a, T>) -> Result<&'a [T]> {
    match b {
        Buf::Host(h) => Ok(h),
        #[allow(unreachable_patterns)]
        other => Err(Error::WrongDevice {
            arg,
            expected: "host memory (staging)".into(),
            found: other.location().to_string(),
        }),
    }
}

fn host_mut<'a, T>(arg: &'static str, b: BufMut<'a, T>) -> Result<&'a mut [T]> {
    let found = b.location().to_string();
    b.into_host().ok_or_else(|| Error::WrongDevice { arg, expected: "host memory (staging)".into(), found })
}

/// Training forward with host buffers (the harness's call; arguments as its call site).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_training<T: Element>(
    dev: &Device,
    g: &CudaDevice,
    shape: &Shape,
    cfg: &Config,
    x: &[T],
    z: Option<&[T]>,
    y: &mut [T],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    rm: &mut [f32],
    rv: &mut [f32],
    tracked: &mut u64,
    saved_mean: &mut [f32],
    saved_invstd: &mut [f32],
) -> Result<()> {
    let s = g.stream();
    let (n, c) = (x.len(), rm.len());
    let dx = up(s, x)?;
    let dz = z.map(|z| up(s, z)).transpose()?;
    let mut dy = up(s, y)?;
    let dw = w.map(|w| up(s, w)).transpose()?;
    let db = b.map(|b| up(s, b)).transpose()?;
    let mut drm = up(s, rm)?;
    let mut drv = up(s, rv)?;
    let mut dsm = up(s, saved_mean)?;
    let mut dsi = up(s, saved_invstd)?;
    let a = ForwardTraining {
        x: Buf::Cuda(view::<T>(&dx, n)),
        residual: dz.as_ref().map(|d| Buf::Cuda(view::<T>(d, n))),
        y: BufMut::Cuda(view_mut::<T>(&mut dy, n)),
        weight: dw.as_ref().map(|d| Buf::Cuda(view::<f32>(d, c))),
        bias: db.as_ref().map(|d| Buf::Cuda(view::<f32>(d, c))),
        running: Some(RunningStatsMut {
            mean: BufMut::Cuda(view_mut::<f32>(&mut drm, c)),
            var: BufMut::Cuda(view_mut::<f32>(&mut drv, c)),
            num_batches_tracked: tracked,
        }),
        saved_mean: Some(BufMut::Cuda(view_mut::<f32>(&mut dsm, c))),
        saved_invstd: Some(BufMut::Cuda(view_mut::<f32>(&mut dsi, c))),
    };
    ops::forward_training(dev, shape, cfg, a)?;
    down(s, &dy, y)?;
    down(s, &drm, rm)?;
    down(s, &drv, rv)?;
    down(s, &dsm, saved_mean)?;
    down(s, &dsi, saved_invstd)?;
    sync(s)
}

/// Inference forward with host buffers.
pub(crate) fn forward_inference<T: Element>(
    dev: &Device,
    g: &CudaDevice,
    shape: &Shape,
    cfg: &Config,
    a: ForwardInference<'_, T>,
) -> Result<()> {
    let s = g.stream();
    let x = host("x", &a.x)?;
    let z = a.residual.as_ref().map(|z| host("residual", z)).transpose()?;
    let w = a.weight.as_ref().map(|w| host("weight", w)).transpose()?;
    let b = a.bias.as_ref().map(|b| host("bias", b)).transpose()?;
    let rm = host("running_mean", &a.running_mean)?;
    let rv = host("running_var", &a.running_var)?;
    let y = host_mut("y", a.y)?;
    let (n, c) = (x.len(), rm.len());
    let dx = up(s, x)?;
    let dz = z.map(|z| up(s, z)).transpose()?;
    let mut dy = up(s, y)?;
    let dw = w.map(|w| up(s, w)).transpose()?;
    let db = b.map(|b| up(s, b)).transpose()?;
    let drm = up(s, rm)?;
    let drv = up(s, rv)?;
    let d = ForwardInference {
        x: Buf::Cuda(view::<T>(&dx, n)),
        residual: dz.as_ref().map(|d| Buf::Cuda(view::<T>(d, n))),
        y: BufMut::Cuda(view_mut::<T>(&mut dy, n)),
        weight: dw.as_ref().map(|d| Buf::Cuda(view::<f32>(d, c))),
        bias: db.as_ref().map(|d| Buf::Cuda(view::<f32>(d, c))),
        running_mean: Buf::Cuda(view::<f32>(&drm, c)),
        running_var: Buf::Cuda(view::<f32>(&drv, c)),
    };
    ops::forward_inference(dev, shape, cfg, d)?;
    down(s, &dy, y)?;
    sync(s)
}

/// Backward with host buffers.
pub(crate) fn backward<T: Element>(
    dev: &Device,
    g: &CudaDevice,
    shape: &Shape,
    cfg: &Config,
    a: Backward<'_, T>,
) -> Result<()> {
    let s = g.stream();
    let x = host("x", &a.x)?;
    let y = a.y.as_ref().map(|y| host("y", y)).transpose()?;
    let dy = host("dy", &a.dy)?;
    let w = a.weight.as_ref().map(|w| host("weight", w)).transpose()?;
    let (saved, m, sv) = match &a.stats {
        BackwardStats::Saved { mean, invstd } => (true, host("saved_mean", mean)?, host("saved_invstd", invstd)?),
        BackwardStats::Running { mean, var } => (false, host("running_mean", mean)?, host("running_var", var)?),
    };
    let dxh = host_mut("dx", a.dx)?;
    let dzh = a.dz.map(|d| host_mut("dz", d)).transpose()?;
    let dwh = a.dweight.map(|d| host_mut("dweight", d)).transpose()?;
    let dbh = a.dbias.map(|d| host_mut("dbias", d)).transpose()?;
    let (n, c) = (x.len(), m.len());

    let d_x = up(s, x)?;
    let d_y = y.map(|y| up(s, y)).transpose()?;
    let d_dy = up(s, dy)?;
    let mut d_dx = up(s, &*dxh)?;
    let mut d_dz = dzh.as_deref().map(|d| up(s, d)).transpose()?;
    let d_w = w.map(|w| up(s, w)).transpose()?;
    let d_m = up(s, m)?;
    let d_sv = up(s, sv)?;
    let mut d_dw = dwh.as_deref().map(|d| up(s, d)).transpose()?;
    let mut d_db = dbh.as_deref().map(|d| up(s, d)).transpose()?;
    let stats = if saved {
        BackwardStats::Saved { mean: Buf::Cuda(view::<f32>(&d_m, c)), invstd: Buf::Cuda(view::<f32>(&d_sv, c)) }
    } else {
        BackwardStats::Running { mean: Buf::Cuda(view::<f32>(&d_m, c)), var: Buf::Cuda(view::<f32>(&d_sv, c)) }
    };
    let d = Backward {
        x: Buf::Cuda(view::<T>(&d_x, n)),
        y: d_y.as_ref().map(|d| Buf::Cuda(view::<T>(d, n))),
        dy: Buf::Cuda(view::<T>(&d_dy, n)),
        dx: BufMut::Cuda(view_mut::<T>(&mut d_dx, n)),
        dz: d_dz.as_mut().map(|d| BufMut::Cuda(view_mut::<T>(d, n))),
        weight: d_w.as_ref().map(|d| Buf::Cuda(view::<f32>(d, c))),
        stats,
        dweight: d_dw.as_mut().map(|d| BufMut::Cuda(view_mut::<f32>(d, c))),
        dbias: d_db.as_mut().map(|d| BufMut::Cuda(view_mut::<f32>(d, c))),
    };
    ops::backward(dev, shape, cfg, d)?;
    down(s, &d_dx, dxh)?;
    if let (Some(d), Some(h)) = (&d_dz, dzh) {
        down(s, d, h)?;
    }
    if let (Some(d), Some(h)) = (&d_dw, dwh) {
        down(s, d, h)?;
    }
    if let (Some(d), Some(h)) = (&d_db, dbh) {
        down(s, d, h)?;
    }
    sync(s)
}
