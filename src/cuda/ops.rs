//! The ops on a CUDA device, after `crate::ops` validated every argument: resolve device
//! pointers, make the checks only the GPU path needs, plan, and enqueue the kernels on the
//! device's stream. Nothing here synchronizes the host.
//!
//! GPU-only checks, before any launch (so an error still means nothing was written):
//! - no output overlaps another output or any input (device ranges; on the host the
//!   borrow checker already forbids it). The kernels read inputs through the read-only
//!   cache and split each op over several launches, so in-place use is never allowed.
//! - the workspace is allocated (or grown) before the first launch.
//!
//! Not checked: the *values* of device-resident running or saved statistics. Checking
//! them would need a device-to-host copy and a synchronization inside every op. A
//! non-finite or negative running variance in device memory is used as it is: the outputs
//! of the channel become NaN (as in PyTorch) and no error is returned. Host-resident
//! statistics are checked by `crate::ops` as always.
//!
//! Launch failures are reported as [`Error::Cuda`]. A training forward or backward that
//! is split over two launches has already enqueued the first when the second fails to
//! launch (the driver rejects a launch only when the context is broken, e.g. by an earlier
//! fault); the running statistics may then hold the update of the first launch.

use super::launch::{self, flags, BnArgs, DivMod, Geometry, Reduction};
use super::registry::{kernel_name, Family};
use super::{cuda_err, CudaDevice, Workspace};
use crate::buffer::{Buf, BufMut};
use crate::config::{Activation, Config};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{Backward, BackwardStats, ForwardInference, ForwardTraining};
use crate::shape::{Pattern, Shape};
use crate::validate;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, PushKernelArg, SyncOnDrop};
use std::mem::size_of;

/// A device buffer of the op: its address range, and the cudarc guard that orders the
/// op after earlier writers (and readers, for outputs) on other streams and records the
/// op's access when dropped, after the launches.
struct DevBuf<'a> {
    name: &'static str,
    ptr: u64,
    bytes: u64,
    written: bool,
    _sync: SyncOnDrop<'a>,
}

fn wrong_device(name: &'static str, s: &CudaStream, found: String) -> Error {
    Error::WrongDevice { arg: name, expected: format!("cuda:{}", s.context().ordinal()), found }
}

fn input<'a, T>(name: &'static str, b: &'a Buf<'_, T>, s: &'a CudaStream) -> Result<DevBuf<'a>> {
    match b {
        Buf::Cuda(v) => {
            let (ptr, sync) = v.device_ptr(s);
            Ok(DevBuf { name, ptr, bytes: (v.len() * size_of::<T>()) as u64, written: false, _sync: sync })
        }
        Buf::Host(_) => Err(wrong_device(name, s, b.location().to_string())),
    }
}

fn output<'a, T>(name: &'static str, b: &'a mut BufMut<'_, T>, s: &'a CudaStream) -> Result<DevBuf<'a>> {
    let found = b.location().to_string();
    match b {
        BufMut::Cuda(v) => {
            let bytes = (v.len() * size_of::<T>()) as u64;
            let (ptr, sync) = v.device_ptr_mut(s);
            Ok(DevBuf { name, ptr, bytes, written: true, _sync: sync })
        }
        BufMut::Host(_) => Err(wrong_device(name, s, found)),
    }
}

fn opt_input<'a, T>(name: &'static str, b: Option<&'a Buf<'_, T>>, s: &'a CudaStream) -> Result<Option<DevBuf<'a>>> {
    b.map(|b| input(name, b, s)).transpose()
}

fn opt_output<'a, T>(
    name: &'static str,
    b: Option<&'a mut BufMut<'_, T>>,
    s: &'a CudaStream,
) -> Result<Option<DevBuf<'a>>> {
    b.map(|b| output(name, b, s)).transpose()
}

fn addr(b: &Option<DevBuf<'_>>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr)
}

/// No written buffer may overlap any other buffer of the op.
fn check_aliasing(bufs: &[Option<&DevBuf<'_>>]) -> Result<()> {
    let bufs: Vec<&DevBuf<'_>> = bufs.iter().flatten().copied().collect();
    for (i, a) in bufs.iter().enumerate() {
        if !a.written {
            continue;
        }
        for (j, b) in bufs.iter().enumerate() {
            if i != j {
                validate::disjoint(a.name, Some((a.ptr, a.ptr + a.bytes)), b.name, Some((b.ptr, b.ptr + b.bytes)))?;
            }
        }
    }
    Ok(())
}

/// The geometry part of the argument block: dims as the kernels see them (rows of C are
/// `n = rows, s = 1`), divisors for `v`-element steps.
fn base_args(shape: &Shape, p: Pattern, v: usize, eps: f32) -> BnArgs {
    let (n, c, s) = match p {
        Pattern::Planes { n, c, s } => (n, c, s),
        Pattern::Rows { rows, c } => (rows, c, 1),
    };
    let inner = match p {
        Pattern::Planes { s, .. } => (s / v).max(1),
        Pattern::Rows { .. } => 1,
    };
    BnArgs {
        n: n as u64,
        c: c as u64,
        s: s as u64,
        numel: shape.numel() as u64,
        div_inner: DivMod::new(inner as u64),
        div_c: DivMod::new(c as u64),
        m: shape.m() as f64,
        eps,
        ..BnArgs::default()
    }
}

fn launch(d: &CudaDevice, family: Family, name: &str, geo: Geometry, args: &BnArgs) -> Result<()> {
    let f = d.registry().function(family, name)?;
    let mut b = d.stream().launch_builder(&f);
    b.arg(args);
    // SAFETY: every kernel takes exactly one parameter, a `BnArgs` by value, whose layout
    // the `launch` tests check against kernels/common.cuh. Every non-null pointer in it
    // is a live device allocation of this context, borrowed (by a `DevBuf` guard or the
    // locked workspace) until after this call, and at least as long as the kernel reads or
    // writes it given the validated shape: activations have `numel` elements, per-channel
    // buffers `C`, the workspace the sizes `Workspace::ensure` was asked for. Outputs
    // overlap nothing (`check_aliasing`). `geo` comes from `launch::plan_*`, within CUDA's
    // limits (256 threads, gridDim.y <= 65535, dynamic shared memory < 48 KiB).
    unsafe { b.launch(geo.config()) }.map(|_| ()).map_err(|e| cuda_err("cuLaunchKernel", format!("{name}: {e}")))
}

/// The persistent path (kernels/persistent.cu), when the device asks for it
/// (`BNORM_CUDA_PERSISTENT=1`) and a channel's share fits on chip: one launch that reads the
/// activations once. `family` is `FwdPersist` (stores x; partials of 3 moments) or
/// `BwdPersist` (stores x and g; partials of 2 sums); `args` is complete but for the
/// workspace. Returns `Ok(false)`, with nothing enqueued, when the path does not apply (the
/// caller then takes the usual one), including when the device cannot keep a cooperative
/// grid resident.
fn try_persistent(
    d: &CudaDevice,
    family: Family,
    p: Pattern,
    dtype: crate::dtype::DType,
    v: usize,
    args: &mut BnArgs,
) -> Result<bool> {
    let (tensors, fields) = if family == Family::BwdPersist { (2, 2) } else { (1, 3) };
    if !d.persistent() || launch::wide_index(args.numel as usize) {
        return Ok(false);
    }
    let Some(plan) = launch::plan_persistent(d.caps(), p, v, tensors) else {
        return Ok(false);
    };
    let name = kernel_name(family, p, dtype, false);
    let f = d.registry().function(family, &name)?;
    let smem = plan.geo.smem as i32;
    if smem > 48 * 1024 {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            .map_err(|e| cuda_err("cuFuncSetAttribute", format!("{name}: {smem} bytes of shared memory: {e}")))?;
    }
    if plan.cooperative() {
        let threads = plan.geo.block.0 * plan.geo.block.1;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, plan.geo.smem as usize, None)
            .map_err(|e| cuda_err("cuOccupancyMaxActiveBlocksPerMultiprocessor", format!("{name}: {e}")))?;
        if (per_sm as usize) * (d.caps().sms as usize) < plan.blocks() {
            return Ok(false);
        }
    }
    let c = args.c as usize;
    let mut slot = d.workspace();
    let ws = Workspace::ensure(&mut slot, d.stream(), 0, 4 * c + fields * plan.partial_slots)?;
    let (wp, _ws_sync) = ws.ptrs(d.stream(), 4 * c);
    args.params = wp.params;
    args.partials = wp.partials;
    args.counters = wp.barrier;
    args.slots = plan.slots;
    let mut b = d.stream().launch_builder(&f);
    b.arg(&*args);
    // SAFETY: as in `launch`: one `BnArgs` by value, every pointer a live allocation of this
    // context borrowed until after this call and sized for the validated shape; the
    // workspace holds 4 * C params and `partial_slots` partials, and `counters` points at
    // its barrier word, which only these kernels use. The geometry comes from
    // `plan_persistent` (dynamic shared memory within the opt-in limit just set); a
    // cooperative grid was checked to fit the device's resident blocks, and the driver
    // refuses the launch otherwise rather than run a grid whose barrier could not complete.
    let r = unsafe {
        if plan.cooperative() {
            b.launch_cooperative(plan.geo.config())
        } else {
            b.launch(plan.geo.config())
        }
    };
    r.map(|_| true).map_err(|e| cuda_err("cuLaunchKernel (persistent)", format!("{name}: {e}")))
}

fn fusion_flags(cfg: &Config, residual: bool) -> u32 {
    let mut f = 0;
    if cfg.activation == Activation::Relu {
        f |= flags::RELU;
    }
    if residual {
        f |= flags::ADD;
    }
    f
}

// ---------------------------------------------------------------- forward, training

pub(crate) fn forward_training<T: Element>(
    d: &CudaDevice,
    shape: &Shape,
    cfg: &Config,
    a: ForwardTraining<'_, T>,
) -> Result<()> {
    let s = &**d.stream();
    let ForwardTraining { x, residual, mut y, weight, bias, running, mut saved_mean, mut saved_invstd } = a;
    let (mut rm, mut rv, tracked) = match running {
        Some(r) => (Some(r.mean), Some(r.var), Some(r.num_batches_tracked)),
        None => (None, None, None),
    };
    let bx = input("x", &x, s)?;
    let bz = opt_input("residual", residual.as_ref(), s)?;
    let by = output("y", &mut y, s)?;
    let bw = opt_input("weight", weight.as_ref(), s)?;
    let bb = opt_input("bias", bias.as_ref(), s)?;
    let brm = opt_output("running_mean", rm.as_mut(), s)?;
    let brv = opt_output("running_var", rv.as_mut(), s)?;
    let bsm = opt_output("saved_mean", saved_mean.as_mut(), s)?;
    let bsi = opt_output("saved_invstd", saved_invstd.as_mut(), s)?;
    check_aliasing(&[
        Some(&bx),
        bz.as_ref(),
        Some(&by),
        bw.as_ref(),
        bb.as_ref(),
        brm.as_ref(),
        brv.as_ref(),
        bsm.as_ref(),
        bsi.as_ref(),
    ])?;

    let p = shape.pattern();
    let eb = size_of::<T>();
    let vec = launch::use_vectors(p, eb, &[bx.ptr, by.ptr, addr(&bz)]);
    let v = launch::step_elems(p, eb, vec);
    let wide = launch::wide_index(shape.numel());
    let plan = launch::plan_reduce(d.caps(), p, v, Reduction::Moments, eb, true);

    let mut args = base_args(shape, p, v, cfg.eps);
    args.x = bx.ptr;
    args.z = addr(&bz);
    args.y = by.ptr;
    args.weight = addr(&bw);
    args.bias = addr(&bb);
    args.running_mean = addr(&brm);
    args.running_var = addr(&brv);
    args.saved_mean = addr(&bsm);
    args.saved_invstd = addr(&bsi);
    if let Some(t) = &tracked {
        args.factor = cfg.running_stats.batch_weight(**t) as f64;
    }
    let mut f = fusion_flags(cfg, bz.is_some());
    if vec {
        f |= flags::VEC;
    }
    if cfg.running_stats.unbiased_variance() {
        f |= flags::UNBIASED;
    }

    args.flags = f;
    if try_persistent(d, Family::FwdPersist, p, T::DTYPE, v, &mut args)? {
        if let Some(t) = tracked {
            *t += 1;
        }
        return Ok(());
    }

    let c = shape.c();
    let mut slot = d.workspace();
    let ws = Workspace::ensure(&mut slot, d.stream(), plan.counters, 4 * c + 3 * plan.partial_slots)?;
    let (wp, _ws_sync) = ws.ptrs(s, 4 * c);
    args.params = wp.params;
    args.partials = wp.partials;
    args.counters = wp.counters;

    args.flags = f | if plan.fused { flags::FUSED } else { 0 };
    let stats = kernel_name(Family::FwdStats, p, T::DTYPE, wide);
    launch(d, Family::FwdStats, &stats, plan.geo, &args)?;
    if !plan.fused {
        args.flags = f;
        let norm = kernel_name(Family::FwdNorm, p, T::DTYPE, wide);
        launch(d, Family::FwdNorm, &norm, launch::plan_elementwise(d.caps(), p, v), &args)?;
    }
    if let Some(t) = tracked {
        *t += 1;
    }
    Ok(())
}

// ---------------------------------------------------------------- forward, inference

pub(crate) fn forward_inference<T: Element>(
    d: &CudaDevice,
    shape: &Shape,
    cfg: &Config,
    a: ForwardInference<'_, T>,
) -> Result<()> {
    let s = &**d.stream();
    let ForwardInference { x, residual, mut y, weight, bias, running_mean, running_var } = a;
    let bx = input("x", &x, s)?;
    let bz = opt_input("residual", residual.as_ref(), s)?;
    let by = output("y", &mut y, s)?;
    let bw = opt_input("weight", weight.as_ref(), s)?;
    let bb = opt_input("bias", bias.as_ref(), s)?;
    let brm = input("running_mean", &running_mean, s)?;
    let brv = input("running_var", &running_var, s)?;
    check_aliasing(&[Some(&bx), bz.as_ref(), Some(&by), bw.as_ref(), bb.as_ref(), Some(&brm), Some(&brv)])?;

    let p = shape.pattern();
    let eb = size_of::<T>();
    let vec = launch::use_vectors(p, eb, &[bx.ptr, by.ptr, addr(&bz)]);
    let v = launch::step_elems(p, eb, vec);
    let mut args = base_args(shape, p, v, cfg.eps);
    args.x = bx.ptr;
    args.z = addr(&bz);
    args.y = by.ptr;
    args.weight = addr(&bw);
    args.bias = addr(&bb);
    args.running_mean = brm.ptr;
    args.running_var = brv.ptr;
    args.flags = fusion_flags(cfg, bz.is_some()) | flags::FROM_RUNNING | if vec { flags::VEC } else { 0 };
    let name = kernel_name(Family::FwdNorm, p, T::DTYPE, launch::wide_index(shape.numel()));
    launch(d, Family::FwdNorm, &name, launch::plan_elementwise(d.caps(), p, v), &args)
}

// ---------------------------------------------------------------- backward

pub(crate) fn backward<T: Element>(d: &CudaDevice, shape: &Shape, cfg: &Config, a: Backward<'_, T>) -> Result<()> {
    let s = &**d.stream();
    let Backward { x, y, dy, mut dx, mut dz, weight, stats, mut dweight, mut dbias } = a;
    let training = matches!(stats, BackwardStats::Saved { .. });
    let (bmean, bspread) = match &stats {
        BackwardStats::Saved { mean, invstd } => (input("saved_mean", mean, s)?, input("saved_invstd", invstd, s)?),
        BackwardStats::Running { mean, var } => (input("running_mean", mean, s)?, input("running_var", var, s)?),
    };
    let bx = input("x", &x, s)?;
    let by = opt_input("y", y.as_ref(), s)?;
    let bdy = input("dy", &dy, s)?;
    let bdx = output("dx", &mut dx, s)?;
    let bdz = opt_output("dz", dz.as_mut(), s)?;
    let bw = opt_input("weight", weight.as_ref(), s)?;
    let bdw = opt_output("dweight", dweight.as_mut(), s)?;
    let bdb = opt_output("dbias", dbias.as_mut(), s)?;
    check_aliasing(&[
        Some(&bmean),
        Some(&bspread),
        Some(&bx),
        by.as_ref(),
        Some(&bdy),
        Some(&bdx),
        bdz.as_ref(),
        bw.as_ref(),
        bdw.as_ref(),
        bdb.as_ref(),
    ])?;

    let p = shape.pattern();
    let eb = size_of::<T>();
    let vec = launch::use_vectors(p, eb, &[bx.ptr, bdy.ptr, bdx.ptr, addr(&by), addr(&bdz)]);
    let v = launch::step_elems(p, eb, vec);
    let wide = launch::wide_index(shape.numel());
    let relu = cfg.activation == Activation::Relu;

    let mut args = base_args(shape, p, v, cfg.eps);
    args.x = bx.ptr;
    args.y = addr(&by);
    args.dy = bdy.ptr;
    args.dx = bdx.ptr;
    args.dz = addr(&bdz);
    args.weight = addr(&bw);
    args.dweight = addr(&bdw);
    args.dbias = addr(&bdb);
    if training {
        args.saved_mean = bmean.ptr;
        args.saved_invstd = bspread.ptr;
    } else {
        args.running_mean = bmean.ptr;
        args.running_var = bspread.ptr;
    }
    let mut f = 0;
    if vec {
        f |= flags::VEC;
    }
    if relu {
        f |= flags::RELU;
    }
    if training {
        f |= flags::TRAINING;
    }
    let dx_kernel = kernel_name(Family::BwdDx, p, T::DTYPE, wide);
    let ew = launch::plan_elementwise(d.caps(), p, v);

    let need_sums = training || bdw.is_some() || bdb.is_some();
    if !need_sums {
        // Eval mode without parameter gradients: dx = g * w * invstd, one pass.
        args.flags = f | flags::FROM_RUNNING;
        return launch(d, Family::BwdDx, &dx_kernel, ew, &args);
    }
    args.flags = f;
    if try_persistent(d, Family::BwdPersist, p, T::DTYPE, v, &mut args)? {
        return Ok(());
    }
    let tensors = if relu { 3 } else { 2 };
    let plan = launch::plan_reduce(d.caps(), p, v, Reduction::GradSums, tensors * eb, true);
    let c = shape.c();
    let mut slot = d.workspace();
    let ws = Workspace::ensure(&mut slot, d.stream(), plan.counters, 4 * c + 2 * plan.partial_slots)?;
    let (wp, _ws_sync) = ws.ptrs(s, 4 * c);
    args.params = wp.params;
    args.partials = wp.partials;
    args.counters = wp.counters;
    args.flags = f | if plan.fused { flags::FUSED } else { 0 };
    let reduce = kernel_name(Family::BwdReduce, p, T::DTYPE, wide);
    launch(d, Family::BwdReduce, &reduce, plan.geo, &args)?;
    if !plan.fused {
        args.flags = f;
        launch(d, Family::BwdDx, &dx_kernel, ew, &args)?;
    }
    Ok(())
}
