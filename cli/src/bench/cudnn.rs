//! cuDNN as a peer of `bnorm bench --device cuda --peer cudnn` (cli feature `cudnn`).
//!
//! libcudnn is loaded at run time (cudarc's dynamic loading tries `libcudnn.so.9` among
//! other names, through the dynamic loader's search path; ci/gpu-bench.sh points
//! LD_LIBRARY_PATH at the PyTorch wheel's site-packages/nvidia/cudnn/lib). Only the legacy
//! batch-norm API is used, through `cudarc::cudnn::sys` (cudarc's safe cudnn module has no
//! batch norm). Every symbol is looked up when the peer loads, so a library without one is
//! refused then (cudarc would panic at the first call).
//!
//! Per case, every mode that applies ([`modes`]), on the runner's rotating buffer sets and
//! with its timer:
//! - forward_train: cudnnBatchNormalizationForwardTraining, CUDNN_BATCHNORM_SPATIAL and
//!   SPATIAL_PERSISTENT; channels-last also cudnnBatchNormalizationForwardTrainingEx
//!   (SPATIAL_PERSISTENT, OPS_BN) and for f16/bf16 the Ex call with BN_ADD_ACTIVATION
//!   (residual + ReLU), timed against our fused forward (`add_relu` in the record);
//! - backward: cudnnBatchNormalizationBackward in both modes, with the saved statistics of a
//!   cuDNN forward in the same mode; channels-last the BackwardEx call likewise (OPS_BN, and
//!   BN_ADD_ACTIVATION with dz for f16/bf16 against our fused backward);
//! - inference: cudnnBatchNormalizationForwardInference, SPATIAL.
//!
//! A mode cuDNN refuses (e.g. CUDNN_STATUS_NOT_SUPPORTED) is recorded with its status in
//! `cudnn_refused` and left out. `cudnn_ms` is the fastest mode that computes what ours
//! does (not the fused one); `cudnn_modes` holds every mode's time, `cudnn_best_mode` the
//! winner. `cudnn_check`: each plain mode's outputs on set 0 against ours (sampled y / dx
//! windows, every channel of the per-channel outputs; see `super::cuda::Diff`).

use super::cuda::compare::{download_f32, download_sample, put_diff, Diff};
use super::cuda::{CaseBuffers, DevElem, GpuTimer};
use super::suites::{BenchOp, Case};
use super::PeerResults;
use bnorm::{DType, Layout};
use cudarc::cudnn::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use serde_json::{json, Map, Value};
use std::ffi::c_void;
use std::sync::Arc;

/// PyTorch's defaults, as our bench's config.
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// The symbols this peer calls, checked when it loads.
const SYMBOLS: &[&str] = &[
    "cudnnGetVersion",
    "cudnnCreate",
    "cudnnDestroy",
    "cudnnSetStream",
    "cudnnCreateTensorDescriptor",
    "cudnnDestroyTensorDescriptor",
    "cudnnSetTensorNdDescriptorEx",
    "cudnnDeriveBNTensorDescriptor",
    "cudnnCreateActivationDescriptor",
    "cudnnDestroyActivationDescriptor",
    "cudnnSetActivationDescriptor",
    "cudnnBatchNormalizationForwardTraining",
    "cudnnBatchNormalizationForwardInference",
    "cudnnBatchNormalizationBackward",
    "cudnnBatchNormalizationForwardTrainingEx",
    "cudnnBatchNormalizationBackwardEx",
    "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize",
    "cudnnGetBatchNormalizationBackwardExWorkspaceSize",
    "cudnnGetBatchNormalizationTrainingExReserveSpaceSize",
];

// ---------------------------------------------------------------- modes (pure)

/// One way of calling cuDNN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// The plain call, CUDNN_BATCHNORM_SPATIAL.
    Spatial,
    /// The plain call, CUDNN_BATCHNORM_SPATIAL_PERSISTENT.
    SpatialPersistent,
    /// The Ex call, SPATIAL_PERSISTENT, CUDNN_BATCHNORM_OPS_BN.
    Ex,
    /// The Ex call, SPATIAL_PERSISTENT, CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION (ReLU).
    ExAddRelu,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Spatial => "spatial",
            Mode::SpatialPersistent => "spatial_persistent",
            Mode::Ex => "ex",
            Mode::ExAddRelu => "ex_add_relu",
        }
    }
    /// Computes residual + ReLU besides (compared with our fused op, not with our plain one).
    pub fn fused(self) -> bool {
        self == Mode::ExAddRelu
    }
    fn bn_mode(self) -> sys::cudnnBatchNormMode_t {
        match self {
            Mode::Spatial => sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
            _ => sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL_PERSISTENT,
        }
    }
    fn ops(self) -> sys::cudnnBatchNormOps_t {
        match self {
            Mode::ExAddRelu => sys::cudnnBatchNormOps_t::CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION,
            _ => sys::cudnnBatchNormOps_t::CUDNN_BATCHNORM_OPS_BN,
        }
    }
    fn is_ex(self) -> bool {
        matches!(self, Mode::Ex | Mode::ExAddRelu)
    }
}

/// The modes that apply to a case: inference has one call and one mode; training forward
/// and backward both plain modes, and channels-last (NHWC, what the Ex call is for) the Ex
/// call, with the add + ReLU fusion for the half types.
pub fn modes(op: BenchOp, layout: Layout, dtype: DType, ndims: usize) -> Vec<Mode> {
    match op {
        BenchOp::Inference => vec![Mode::Spatial],
        BenchOp::ForwardTrain | BenchOp::Backward => {
            let mut v = vec![Mode::Spatial, Mode::SpatialPersistent];
            if layout == Layout::ChannelsLast && ndims >= 4 {
                v.push(Mode::Ex);
                if dtype != DType::F32 {
                    v.push(Mode::ExAddRelu);
                }
            }
            v
        }
    }
}

/// Descriptor of an activation tensor: format, data type and dims (N, C, then the spatial
/// dims, padded with 1 to at least 4 as cuDNN wants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub format: sys::cudnnTensorFormat_t,
    pub dtype: sys::cudnnDataType_t,
    pub dims: Vec<i32>,
}

pub fn data_type(d: DType) -> sys::cudnnDataType_t {
    match d {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
    }
}

/// `dims` are logical `(N, C, *spatial)`; channels-last memory is NHWC / NDHWC (for 3-D
/// `(N, C, L)` channels-last is `(N, L, C)`: NHWC of `(N, C, L, 1)`). 2-D tensors are the
/// same memory either way and use NCHW.
pub fn tensor_spec(dims: &[usize], layout: Layout, dtype: DType) -> Result<TensorSpec, String> {
    if dims.len() < 2 || dims.len() > 8 {
        return Err(format!("cuDNN batch norm takes 2 to 8 dims, got {dims:?}"));
    }
    let mut d: Vec<i32> = dims
        .iter()
        .map(|&v| i32::try_from(v).map_err(|_| format!("dim {v} exceeds cuDNN's int")))
        .collect::<Result<_, _>>()?;
    while d.len() < 4 {
        d.push(1);
    }
    let format = if layout == Layout::ChannelsLast && dims.len() > 2 {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
    } else {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
    };
    Ok(TensorSpec { format, dtype: data_type(dtype), dims: d })
}

/// The record fields of one case's measurements: `cudnn_ms` (fastest plain mode, if any
/// ran), `cudnn_modes`, `cudnn_best_mode`, `cudnn_refused`. No key ends in `_ms` but the
/// returned time's (`bnorm chart` reads those as peers).
pub fn summarize(times: &[(Mode, Result<f64, String>)]) -> (Option<f64>, Map<String, Value>) {
    let mut modes = Map::new();
    let mut refused = Map::new();
    let mut best: Option<(Mode, f64)> = None;
    for (m, t) in times {
        match t {
            Ok(ms) => {
                modes.insert(m.name().into(), json!(ms));
                if !m.fused() && best.is_none_or(|(_, b)| *ms < b) {
                    best = Some((*m, *ms));
                }
            }
            Err(e) => {
                refused.insert(m.name().into(), json!(e));
            }
        }
    }
    let mut extra = Map::new();
    extra.insert("cudnn_modes".into(), Value::Object(modes));
    if let Some((m, _)) = best {
        extra.insert("cudnn_best_mode".into(), json!(m.name()));
    }
    if !refused.is_empty() {
        extra.insert("cudnn_refused".into(), Value::Object(refused));
    }
    (best.map(|(_, ms)| ms), extra)
}

// ---------------------------------------------------------------- the library

fn status(st: sys::cudnnStatus_t, what: &str) -> Result<(), String> {
    if st == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {st:?}"))
    }
}

struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from cudnnCreate and is destroyed once, here; the stream's
        // work that used it was synchronized by the runner after each case.
        let _ = unsafe { sys::cudnnDestroy(self.0) };
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn create() -> Result<TensorDesc, String> {
        let mut d: sys::cudnnTensorDescriptor_t = std::ptr::null_mut();
        // SAFETY: cudnnCreateTensorDescriptor writes one descriptor handle through the pointer.
        status(unsafe { sys::cudnnCreateTensorDescriptor(&mut d) }, "cudnnCreateTensorDescriptor")?;
        Ok(TensorDesc(d))
    }

    fn activation(spec: &TensorSpec) -> Result<TensorDesc, String> {
        let d = TensorDesc::create()?;
        status(
            // SAFETY: `d` is a live descriptor; dimA points at `dims.len()` ints (4 to 8).
            unsafe {
                sys::cudnnSetTensorNdDescriptorEx(
                    d.0,
                    spec.format,
                    spec.dtype,
                    spec.dims.len() as i32,
                    spec.dims.as_ptr(),
                )
            },
            "cudnnSetTensorNdDescriptorEx",
        )?;
        Ok(d)
    }

    /// The per-channel (scale, bias, mean, variance) descriptor cuDNN derives from x's.
    fn derived(x: &TensorDesc) -> Result<TensorDesc, String> {
        let d = TensorDesc::create()?;
        status(
            // SAFETY: both descriptors are live; x's was set above.
            unsafe { sys::cudnnDeriveBNTensorDescriptor(d.0, x.0, sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL) },
            "cudnnDeriveBNTensorDescriptor",
        )?;
        Ok(d)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        let _ = unsafe { sys::cudnnDestroyTensorDescriptor(self.0) };
    }
}

struct ActDesc(sys::cudnnActivationDescriptor_t);

impl ActDesc {
    fn relu() -> Result<ActDesc, String> {
        let mut d: sys::cudnnActivationDescriptor_t = std::ptr::null_mut();
        // SAFETY: writes one descriptor handle through the pointer.
        status(unsafe { sys::cudnnCreateActivationDescriptor(&mut d) }, "cudnnCreateActivationDescriptor")?;
        let a = ActDesc(d);
        status(
            // SAFETY: `a.0` is live; ReLU takes no coefficient.
            unsafe {
                sys::cudnnSetActivationDescriptor(
                    a.0,
                    sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    0.0,
                )
            },
            "cudnnSetActivationDescriptor",
        )?;
        Ok(a)
    }
}

impl Drop for ActDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateActivationDescriptor, destroyed once.
        let _ = unsafe { sys::cudnnDestroyActivationDescriptor(self.0) };
    }
}

/// Descriptors of one case.
struct Descs {
    x: TensorDesc,
    bn: TensorDesc,
    relu: ActDesc,
}

/// Device addresses as cuDNN takes them.
fn rd<T>(s: &CudaSlice<T>, st: &CudaStream) -> *const c_void {
    s.device_ptr(st).0 as *const c_void
}
fn wr<T>(s: &mut CudaSlice<T>, st: &CudaStream) -> *mut c_void {
    s.device_ptr_mut(st).0 as *mut c_void
}

/// cuDNN, loaded, with a handle on the bench's stream.
pub struct CudnnPeer {
    handle: Handle,
    stream: Arc<CudaStream>,
    version: usize,
}

impl CudnnPeer {
    /// Load libcudnn, check every symbol used, create a handle on `stream`.
    pub fn load(stream: Arc<CudaStream>) -> Result<CudnnPeer, String> {
        std::panic::catch_unwind(move || CudnnPeer::load_inner(stream))
            .unwrap_or_else(|_| Err("loading libcudnn panicked".into()))
    }

    fn load_inner(stream: Arc<CudaStream>) -> Result<CudnnPeer, String> {
        let version = probe_library()?;
        stream.context().bind_to_thread().map_err(|e| format!("binding the CUDA context: {e}"))?;
        let mut h: sys::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: writes one handle through the pointer; the context is current on this thread.
        status(unsafe { sys::cudnnCreate(&mut h) }, "cudnnCreate")?;
        let handle = Handle(h);
        // SAFETY: the handle is live and the stream belongs to the current context; cudarc's
        // CUstream and cuDNN's cudaStream_t are the same driver object.
        status(unsafe { sys::cudnnSetStream(handle.0, stream.cu_stream() as sys::cudaStream_t) }, "cudnnSetStream")?;
        Ok(CudnnPeer { handle, stream, version })
    }

    /// `cuDNN 9.1.0` (as the library reports its version).
    pub fn describe(&self) -> String {
        let v = self.version;
        format!("cuDNN {}.{}.{} (libcudnn loaded at run time)", v / 10000, (v % 10000) / 100, v % 100)
    }

    /// Whether the case has a fused (add + ReLU) mode to compare with our fused op.
    pub fn wants_add_relu(&self, case: &Case) -> bool {
        modes(case.op, case.layout, case.dtype, case.dims.len()).contains(&Mode::ExAddRelu)
    }

    fn descs(&self, case: &Case) -> Result<Descs, String> {
        let spec = tensor_spec(&case.dims, case.layout, case.dtype)?;
        let x = TensorDesc::activation(&spec)?;
        let bn = TensorDesc::derived(&x)?;
        Ok(Descs { x, bn, relu: ActDesc::relu()? })
    }

    /// Time every mode of the case, check outputs, and add the record fields to `out`.
    pub fn measure<T: DevElem>(
        &mut self,
        timer: &mut GpuTimer,
        b: &mut CaseBuffers<T>,
        out: &mut PeerResults,
    ) -> Result<(), String> {
        let case = b.case.clone();
        let d = self.descs(&case)?;
        let mut scratch = Scratch::new(&self.stream, b)?;
        let mut times = Vec::new();
        let mut check = Map::new();
        for m in modes(case.op, case.layout, case.dtype, case.dims.len()) {
            let r = self.mode(timer, &d, m, b, &mut scratch, &mut check);
            // a refused mode may leave an error on the stream's last call: nothing to undo
            timer.sync()?;
            times.push((m, r));
        }
        let (best, extra) = summarize(&times);
        if let Some(ms) = best {
            out.times.push(("cudnn".into(), ms));
        }
        if let Some((_, Ok(ms))) = times.iter().find(|(m, _)| m.fused()) {
            if let Some(Value::Object(a)) = out.extra.get_mut("add_relu") {
                a.insert("cudnn_ex".into(), json!(ms));
            }
        }
        out.extra.extend(extra);
        if !check.is_empty() {
            out.extra.insert("cudnn_check".into(), Value::Object(check));
        }
        Ok(())
    }

    /// One mode: set up (workspace, reserve, saved statistics), check (plain modes), time.
    fn mode<T: DevElem>(
        &self,
        timer: &mut GpuTimer,
        d: &Descs,
        m: Mode,
        b: &mut CaseBuffers<T>,
        sc: &mut Scratch<T>,
        check: &mut Map<String, Value>,
    ) -> Result<f64, String> {
        let st = self.stream.clone();
        let s = &*st;
        let op = b.case.op;
        sc.prepare_ex(self, d, m)?;
        match op {
            BenchOp::Inference => {
                let call = |b: &mut CaseBuffers<T>, y: *mut c_void, i: usize| -> Result<(), String> {
                    status(
                        // SAFETY: live device allocations of this context sized for the case
                        // (CaseBuffers, Scratch); x and y share the activation descriptor, the
                        // per-channel buffers (C floats) the derived one.
                        unsafe {
                            sys::cudnnBatchNormalizationForwardInference(
                                self.handle.0,
                                m.bn_mode(),
                                one(),
                                zero(),
                                d.x.0,
                                rd(&b.x[i], s),
                                d.x.0,
                                y,
                                d.bn.0,
                                rd(&b.weight, s),
                                rd(&b.bias, s),
                                rd(&b.running_mean, s),
                                rd(&b.running_var, s),
                                EPS,
                            )
                        },
                        "cudnnBatchNormalizationForwardInference",
                    )
                };
                let y0 = wr(&mut sc.out, s);
                call(b, y0, 0)?;
                timer.sync()?;
                put_diff(check, &format!("{}_y", m.name()), sample_diff(&st, &sc.ours, &sc.out)?);
                let t = timer.time(b.sets, &mut |i| {
                    let y = wr(&mut b.y[i], s);
                    call(b, y, i)
                })?;
                Ok(t.median_ms)
            }
            BenchOp::ForwardTrain => {
                // set 0 into the scratch outputs: the check
                self.fwd_train(d, m, b, sc, 0, true)?;
                timer.sync()?;
                if !m.fused() {
                    self.check_forward(m, b, sc, check)?;
                }
                let t = timer.time(b.sets, &mut |i| self.fwd_train(d, m, b, sc, i, false))?;
                Ok(t.median_ms)
            }
            BenchOp::Backward => {
                // saved statistics (and, Ex, the reserve; fused, y) from a cuDNN forward of this mode
                self.fwd_train(d, m, b, sc, 0, true)?;
                self.bwd(d, m, b, sc, 0, true)?;
                timer.sync()?;
                if !m.fused() {
                    put_diff(check, &format!("{}_dx", m.name()), sample_diff(&st, &sc.ours, &sc.out2)?);
                    let dw = Diff::of(&download_f32(&st, &sc.dweight)?, &download_f32(&st, &b.dweight)?);
                    let db = Diff::of(&download_f32(&st, &sc.dbias)?, &download_f32(&st, &b.dbias)?);
                    put_diff(check, &format!("{}_dweight", m.name()), dw);
                    put_diff(check, &format!("{}_dbias", m.name()), db);
                }
                let t = timer.time(b.sets, &mut |i| self.bwd(d, m, b, sc, i, false))?;
                Ok(t.median_ms)
            }
        }
    }

    /// Training forward of mode `m` on set `i`: into the scratch outputs (`own`: y, saved
    /// and running statistics of cuDNN's own) or into the set's output.
    fn fwd_train<T: DevElem>(
        &self,
        d: &Descs,
        m: Mode,
        b: &mut CaseBuffers<T>,
        sc: &mut Scratch<T>,
        i: usize,
        own: bool,
    ) -> Result<(), String> {
        let s = &*self.stream;
        let x = rd(&b.x[i], s);
        let y = if own { wr(&mut sc.out, s) } else { wr(b.y.get_mut(i).unwrap_or(&mut sc.out), s) };
        let (rm, rv, sm, si) = (
            wr(&mut sc.running_mean, s),
            wr(&mut sc.running_var, s),
            wr(&mut sc.saved_mean, s),
            wr(&mut sc.saved_invstd, s),
        );
        let (w, bias) = (rd(&b.weight, s), rd(&b.bias, s));
        if !m.is_ex() {
            // SAFETY: live allocations sized for the case; x, y share the activation descriptor,
            // the per-channel buffers the derived one (C floats each).
            return status(
                unsafe {
                    sys::cudnnBatchNormalizationForwardTraining(
                        self.handle.0,
                        m.bn_mode(),
                        one(),
                        zero(),
                        d.x.0,
                        x,
                        d.x.0,
                        y,
                        d.bn.0,
                        w,
                        bias,
                        MOMENTUM,
                        rm,
                        rv,
                        EPS,
                        sm,
                        si,
                    )
                },
                "cudnnBatchNormalizationForwardTraining",
            );
        }
        // the residual: a forward case's z, or in a backward case dy (as our fused forward)
        let (zd, z) = if m.fused() {
            let z = if b.case.op == BenchOp::Backward { rd(&b.dy[i], s) } else { rd(&b.z[i], s) };
            (d.x.0, z)
        } else {
            (std::ptr::null_mut(), std::ptr::null())
        };
        let act = if m.fused() { d.relu.0 } else { std::ptr::null_mut() };
        let (ws, wsn) = (wr(&mut sc.workspace, s), sc.workspace.len());
        let (rs, rsn) = (wr(&mut sc.reserve, s), sc.reserve.len());
        // SAFETY: as above; z (when given) has x's shape; workspace and reserve were sized by
        // cuDNN's own queries for this mode and these descriptors (Scratch::prepare_ex).
        status(
            unsafe {
                sys::cudnnBatchNormalizationForwardTrainingEx(
                    self.handle.0,
                    m.bn_mode(),
                    m.ops(),
                    one(),
                    zero(),
                    d.x.0,
                    x,
                    zd,
                    z,
                    d.x.0,
                    y,
                    d.bn.0,
                    w,
                    bias,
                    MOMENTUM,
                    rm,
                    rv,
                    EPS,
                    sm,
                    si,
                    act,
                    ws,
                    wsn,
                    rs,
                    rsn,
                )
            },
            "cudnnBatchNormalizationForwardTrainingEx",
        )
    }

    /// Backward of mode `m` on set `i` with cuDNN's saved statistics (scratch): into the
    /// scratch outputs (`own`) or the set's.
    fn bwd<T: DevElem>(
        &self,
        d: &Descs,
        m: Mode,
        b: &mut CaseBuffers<T>,
        sc: &mut Scratch<T>,
        i: usize,
        own: bool,
    ) -> Result<(), String> {
        let s = &*self.stream;
        let (x, dy) = (rd(&b.x[i], s), rd(&b.dy[i], s));
        let dx = if own { wr(&mut sc.out2, s) } else { wr(&mut b.dx[i], s) };
        let (dw, db) = (wr(&mut sc.dweight, s), wr(&mut sc.dbias, s));
        let (sm, si) = (rd(&sc.saved_mean, s), rd(&sc.saved_invstd, s));
        let w = rd(&b.weight, s);
        if !m.is_ex() {
            // SAFETY: live allocations sized for the case; saved statistics from cuDNN's
            // forward in the same mode (C floats each).
            return status(
                unsafe {
                    sys::cudnnBatchNormalizationBackward(
                        self.handle.0,
                        m.bn_mode(),
                        one(),
                        zero(),
                        one(),
                        zero(),
                        d.x.0,
                        x,
                        d.x.0,
                        dy,
                        d.x.0,
                        dx,
                        d.bn.0,
                        w,
                        dw,
                        db,
                        EPS,
                        sm,
                        si,
                    )
                },
                "cudnnBatchNormalizationBackward",
            );
        }
        // fused: y is cuDNN's forward output (scratch), dz the set's
        let (yd, y, dzd, dz, act) = if m.fused() {
            let dz = if own { wr(&mut sc.out3, s) } else { wr(&mut b.dz[i], s) };
            (d.x.0, rd(&sc.out, s), d.x.0, dz, d.relu.0)
        } else {
            (std::ptr::null_mut(), std::ptr::null(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut())
        };
        let (ws, wsn) = (wr(&mut sc.workspace, s), sc.workspace.len());
        let (rs, rsn) = (wr(&mut sc.reserve, s), sc.reserve.len());
        let bias = rd(&b.bias, s);
        // SAFETY: as above; the reserve holds what the forward Ex call of this mode left there.
        status(
            unsafe {
                sys::cudnnBatchNormalizationBackwardEx(
                    self.handle.0,
                    m.bn_mode(),
                    m.ops(),
                    one(),
                    zero(),
                    one(),
                    zero(),
                    d.x.0,
                    x,
                    yd,
                    y,
                    d.x.0,
                    dy,
                    dzd,
                    dz,
                    d.x.0,
                    dx,
                    d.bn.0,
                    w,
                    bias,
                    dw,
                    db,
                    EPS,
                    sm,
                    si,
                    act,
                    ws,
                    wsn,
                    rs,
                    rsn,
                )
            },
            "cudnnBatchNormalizationBackwardEx",
        )
    }

    fn check_forward<T: DevElem>(
        &self,
        m: Mode,
        b: &CaseBuffers<T>,
        sc: &Scratch<T>,
        check: &mut Map<String, Value>,
    ) -> Result<(), String> {
        let st = &self.stream;
        put_diff(check, &format!("{}_y", m.name()), sample_diff(st, &sc.ours, &sc.out)?);
        let (om, oi) = (download_f32(st, &b.saved_mean)?, download_f32(st, &b.saved_invstd)?);
        let (tm, ti) = (download_f32(st, &sc.saved_mean)?, download_f32(st, &sc.saved_invstd)?);
        // the mean in units of the channel's standard deviation (the contract's scale)
        let mean_sd = om.iter().zip(&tm).zip(&oi).map(|((a, b), inv)| (a - b).abs() * inv).fold(0.0, f64::max);
        check.insert(format!("{}_saved_mean_max_sd", m.name()), json!(mean_sd));
        put_diff(check, &format!("{}_saved_invstd", m.name()), Diff::of(&oi, &ti));
        Ok(())
    }
}

const CUDNN_NOT_FOUND: &str = "libcudnn not found by the dynamic loader (LD_LIBRARY_PATH should include the \
                               folder of libcudnn.so.9, e.g. python's site-packages/nvidia/cudnn/lib)";

/// Whether libcudnn loads and has every symbol this peer calls; its version if so. Needs
/// no GPU.
fn probe_library() -> Result<usize, String> {
    // SAFETY: only tries to dlopen the library under the names cudarc knows.
    if !unsafe { sys::is_culib_present() } {
        return Err(CUDNN_NOT_FOUND.into());
    }
    // SAFETY: the library is present (checked above); culib() opens it once.
    let lib = unsafe { sys::culib() };
    for name in SYMBOLS {
        // SAFETY: a lookup only; the symbol is not called through this type.
        unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }
            .map_err(|e| format!("libcudnn lacks {name}: {e}"))?;
    }
    // SAFETY: cudnnGetVersion takes no arguments; its symbol was found above.
    Ok(unsafe { sys::cudnnGetVersion() })
}

fn one() -> *const c_void {
    static ONE: f32 = 1.0;
    &ONE as *const f32 as *const c_void
}
fn zero() -> *const c_void {
    static ZERO: f32 = 0.0;
    &ZERO as *const f32 as *const c_void
}

fn sample_diff<T: DevElem>(s: &Arc<CudaStream>, ours: &CudaSlice<T>, theirs: &CudaSlice<T>) -> Result<Diff, String> {
    Ok(Diff::of(&download_sample(s, ours)?, &download_sample(s, theirs)?))
}

/// cuDNN's own outputs (for the checks and as its saved statistics), Ex scratch, and a copy
/// of our output on set 0 (the timed calls of every mode overwrite the sets' outputs).
struct Scratch<T: DevElem> {
    ours: CudaSlice<T>,
    out: CudaSlice<T>,
    out2: CudaSlice<T>,
    out3: CudaSlice<T>,
    saved_mean: CudaSlice<f32>,
    saved_invstd: CudaSlice<f32>,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    dweight: CudaSlice<f32>,
    dbias: CudaSlice<f32>,
    workspace: CudaSlice<u8>,
    reserve: CudaSlice<u8>,
}

impl<T: DevElem> Scratch<T> {
    fn new(s: &Arc<CudaStream>, b: &CaseBuffers<T>) -> Result<Scratch<T>, String> {
        let n = b.shape.numel();
        let c = b.shape.c();
        let e = |e: cudarc::driver::DriverError| format!("allocating cuDNN's outputs: {e}");
        let backward = b.case.op == BenchOp::Backward;
        let ours = if backward { &b.dx[0] } else { &b.y[0] };
        Ok(Scratch {
            ours: s.clone_dtod(ours).map_err(|e| format!("copying our output: {e}"))?,
            out: s.alloc_zeros::<T>(n).map_err(e)?,
            out2: s.alloc_zeros::<T>(if backward { n } else { 1 }).map_err(e)?,
            out3: s.alloc_zeros::<T>(if backward && b.fused { n } else { 1 }).map_err(e)?,
            saved_mean: s.alloc_zeros::<f32>(c).map_err(e)?,
            saved_invstd: s.alloc_zeros::<f32>(c).map_err(e)?,
            running_mean: s.alloc_zeros::<f32>(c).map_err(e)?,
            running_var: s.clone_htod(&vec![1.0f32; c]).map_err(e)?,
            dweight: s.alloc_zeros::<f32>(c).map_err(e)?,
            dbias: s.alloc_zeros::<f32>(c).map_err(e)?,
            workspace: s.alloc_zeros::<u8>(1).map_err(e)?,
            reserve: s.alloc_zeros::<u8>(1).map_err(e)?,
        })
    }

    /// Size workspace and reserve for an Ex mode by cuDNN's queries.
    fn prepare_ex(&mut self, p: &CudnnPeer, d: &Descs, m: Mode) -> Result<(), String> {
        if !m.is_ex() {
            return Ok(());
        }
        let (zd, act) = if m.fused() { (d.x.0, d.relu.0) } else { (std::ptr::null_mut(), std::ptr::null_mut()) };
        let (mut fw, mut bw, mut rs) = (0usize, 0usize, 0usize);
        // SAFETY: the queries read the descriptors (live) and write one size each.
        unsafe {
            status(
                sys::cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(
                    p.handle.0,
                    m.bn_mode(),
                    m.ops(),
                    d.x.0,
                    zd,
                    d.x.0,
                    d.bn.0,
                    act,
                    &mut fw,
                ),
                "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize",
            )?;
            status(
                sys::cudnnGetBatchNormalizationBackwardExWorkspaceSize(
                    p.handle.0,
                    m.bn_mode(),
                    m.ops(),
                    d.x.0,
                    if m.fused() { d.x.0 } else { std::ptr::null_mut() },
                    d.x.0,
                    zd,
                    d.x.0,
                    d.bn.0,
                    act,
                    &mut bw,
                ),
                "cudnnGetBatchNormalizationBackwardExWorkspaceSize",
            )?;
            status(
                sys::cudnnGetBatchNormalizationTrainingExReserveSpaceSize(
                    p.handle.0,
                    m.bn_mode(),
                    m.ops(),
                    act,
                    d.x.0,
                    &mut rs,
                ),
                "cudnnGetBatchNormalizationTrainingExReserveSpaceSize",
            )?;
        }
        let s = &p.stream;
        let e = |e: cudarc::driver::DriverError| format!("allocating cuDNN's workspace: {e}");
        if self.workspace.len() < fw.max(bw) {
            self.workspace = s.alloc_zeros::<u8>(fw.max(bw)).map_err(e)?;
        }
        if self.reserve.len() < rs {
            self.reserve = s.alloc_zeros::<u8>(rs).map_err(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_the_op_layout_and_type() {
        use Mode::*;
        assert_eq!(modes(BenchOp::Inference, Layout::ChannelsLast, DType::F16, 4), vec![Spatial]);
        assert_eq!(
            modes(BenchOp::ForwardTrain, Layout::ChannelsFirst, DType::F32, 4),
            vec![Spatial, SpatialPersistent]
        );
        assert_eq!(
            modes(BenchOp::ForwardTrain, Layout::ChannelsLast, DType::F32, 4),
            vec![Spatial, SpatialPersistent, Ex]
        );
        assert_eq!(
            modes(BenchOp::Backward, Layout::ChannelsLast, DType::BF16, 4),
            vec![Spatial, SpatialPersistent, Ex, ExAddRelu]
        );
        assert_eq!(
            modes(BenchOp::Backward, Layout::ChannelsLast, DType::F16, 5),
            vec![Spatial, SpatialPersistent, Ex, ExAddRelu]
        );
        // BatchNorm1d: no NHWC, no Ex
        assert_eq!(modes(BenchOp::Backward, Layout::ChannelsFirst, DType::F16, 2), vec![Spatial, SpatialPersistent]);
        assert!(ExAddRelu.fused() && !Ex.fused());
        assert_eq!(Ex.bn_mode(), sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL_PERSISTENT);
        assert_eq!(Spatial.bn_mode(), sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL);
        assert_eq!(ExAddRelu.ops(), sys::cudnnBatchNormOps_t::CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION);
    }

    #[test]
    fn descriptors_pad_to_four_dims_and_pick_the_format() {
        let s = tensor_spec(&[256, 64, 56, 56], Layout::ChannelsLast, DType::BF16).unwrap();
        assert_eq!(s.format, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC);
        assert_eq!(s.dtype, sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16);
        assert_eq!(s.dims, vec![256, 64, 56, 56]);
        let s = tensor_spec(&[4096, 1024], Layout::ChannelsFirst, DType::F32).unwrap();
        assert_eq!((s.format, s.dims.clone()), (sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, vec![4096, 1024, 1, 1]));
        // 2-D is the same memory in both layouts: NCHW
        assert_eq!(tensor_spec(&[8, 3], Layout::ChannelsLast, DType::F16).unwrap().format, s.format);
        let s = tensor_spec(&[8, 64, 16, 56, 56], Layout::ChannelsLast, DType::F16).unwrap();
        assert_eq!((s.dims.len(), s.dtype), (5, sys::cudnnDataType_t::CUDNN_DATA_HALF));
        let s = tensor_spec(&[8, 3, 10], Layout::ChannelsLast, DType::F32).unwrap();
        assert_eq!((s.format, s.dims), (sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC, vec![8, 3, 10, 1]));
        assert!(tensor_spec(&[5], Layout::ChannelsFirst, DType::F32).is_err());
        assert!(tensor_spec(&[1 << 31, 2], Layout::ChannelsFirst, DType::F32).is_err());
    }

    #[test]
    fn best_mode_ignores_fused_and_refused_modes() {
        let (best, extra) = summarize(&[
            (Mode::Spatial, Ok(1.0)),
            (Mode::SpatialPersistent, Ok(0.8)),
            (Mode::Ex, Err("cudnnBatchNormalizationForwardTrainingEx: CUDNN_STATUS_NOT_SUPPORTED".into())),
            (Mode::ExAddRelu, Ok(0.5)),
        ]);
        assert_eq!(best, Some(0.8));
        assert_eq!(extra["cudnn_best_mode"], json!("spatial_persistent"));
        assert_eq!(extra["cudnn_modes"]["ex_add_relu"], json!(0.5));
        assert!(extra["cudnn_refused"]["ex"].as_str().unwrap().contains("NOT_SUPPORTED"));
        // nothing ran: no time, no best mode
        let (none, extra) = summarize(&[(Mode::Spatial, Err("x".into()))]);
        assert!(none.is_none() && !extra.contains_key("cudnn_best_mode"));
    }

    /// The record fields merge beside ours without confusing `bnorm chart`: the only key
    /// ending in `_ms` is the peer's time.
    #[test]
    fn record_fields_leave_ms_keys_to_peer_times() {
        let (best, extra) = summarize(&[(Mode::Spatial, Ok(1.0)), (Mode::ExAddRelu, Ok(0.5))]);
        let mut r = PeerResults::default();
        r.times.push(("cudnn".into(), best.unwrap()));
        r.extra.insert("add_relu".into(), json!({"ours": 0.4, "cudnn_ex": 0.5}));
        r.extra.extend(extra);
        assert!(r.extra.keys().all(|k| !k.ends_with("_ms")), "{:?}", r.extra.keys());
        assert_eq!(r.times, vec![("cudnn".to_string(), 1.0)]);
    }

    #[test]
    fn status_names_the_call_and_the_code() {
        assert!(status(sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS, "x").is_ok());
        let e = status(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED, "cudnnBatchNormalizationBackward").unwrap_err();
        assert!(e.contains("cudnnBatchNormalizationBackward") && e.contains("NOT_SUPPORTED"), "{e}");
    }

    /// Without libcudnn loading fails with a message, never a panic; with it, every symbol
    /// is there and the version is cuDNN 8 or 9.
    #[test]
    fn probing_the_library_never_panics() {
        match std::panic::catch_unwind(probe_library).expect("probe_library panicked") {
            Ok(v) => assert!((8000..100_000).contains(&v), "version {v}"),
            Err(e) => assert!(e.contains("libcudnn"), "{e}"),
        }
    }
}
