//! Timing on the CUDA backend (`bnorm bench --device cuda`).
//!
//! - **Events**: a CUDA event pair around every call, median of `reps` calls after `warmup`
//!   untimed ones. The timed calls are queued behind a GPU spin kernel (it polls
//!   `%globaltimer`) long enough for the host to enqueue all of them, so each interval is
//!   the GPU's time for the call (its kernels and the gaps between them), not the host's
//!   launch latency. If the host took longer than the spin (the queue may have run dry),
//!   the measurement is repeated once with a spin four times as long; a second miss is
//!   counted (`queue_misses` in the report's meta).
//! - **Rotating buffers**: each call uses the next buffer set (its inputs and outputs), and
//!   the inputs of all sets together exceed 2x the L2 size read from the device, so a call
//!   never finds its inputs in L2 from an earlier one: the regime of a training step.
//!   Every set holds the same data (one random block, tiled), so every call computes the
//!   same thing.
//! - **Copy**: a device-to-device memcpy timed the same way and rotating too: 1 GiB for the
//!   run's reference figure, and at each case's size for `%copy`.
//! - **Peers**: `--peer cudnn` (feature `cudnn`) times cuDNN on the same buffer sets with the
//!   same timer and compares its outputs with ours ([`super::cudnn`]).

use super::suites::{BenchOp, Case};
use super::{PeerResults, Runner, Timing};
use bnorm::cuda::cudarc::driver::sys::CUevent_flags;
use bnorm::cuda::cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use bnorm::cuda::cudarc::nvrtc::Ptx;
use bnorm::cuda::CudaDevice;
use bnorm::ops::{self, Backward, ForwardInference, ForwardTraining};
use bnorm::{bf16, f16, Activation, Config, DType, Device, Element, Shape};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// An element type that also lives in cudarc buffers.
pub trait DevElem: Element + DeviceRepr + ValidAsZeroBits + Default {}
impl<T: Element + DeviceRepr + ValidAsZeroBits + Default> DevElem for T {}

/// The spin kernel: busy-waits `ns` nanoseconds of `%globaltimer` on one thread. PTX
/// (loaded with cuModuleLoadData: no NVRTC, no toolkit at run time).
pub(crate) const SPIN_PTX: &str = r#".version 7.5
.target sm_75
.address_size 64

.visible .entry bnorm_bench_spin(
    .param .u64 bnorm_bench_spin_param_0
)
{
    .reg .pred %p<2>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [bnorm_bench_spin_param_0];
    mov.u64 %rd2, %globaltimer;
$L__spin:
    mov.u64 %rd3, %globaltimer;
    sub.u64 %rd4, %rd3, %rd2;
    setp.lt.u64 %p1, %rd4, %rd1;
    @%p1 bra $L__spin;
    ret;
}
"#;

/// Longest spin (seconds): beyond this the host is too slow for the queue to matter.
const MAX_SPIN_S: f64 = 0.5;

/// CUDA-event timing of calls on one stream (shared by our ops and the peers).
pub struct GpuTimer {
    stream: Arc<CudaStream>,
    events: Vec<(CudaEvent, CudaEvent)>,
    spin: Option<CudaFunction>,
    spin_note: String,
    pub reps: usize,
    pub warmup: usize,
    /// The host's time to enqueue one call (the last measurement), seconds.
    host_per_call: f64,
    pub queue_misses: usize,
}

fn driver_err(what: &str) -> impl Fn(bnorm::cuda::cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl GpuTimer {
    pub fn new(stream: Arc<CudaStream>, reps: usize, warmup: usize) -> GpuTimer {
        let (spin, spin_note) = match stream.context().load_module(Ptx::from_src(SPIN_PTX)) {
            Ok(m) => match m.load_function("bnorm_bench_spin") {
                Ok(f) => (Some(f), "timed calls queued behind a GPU spin".to_string()),
                Err(e) => (None, format!("no GPU spin (function: {e}); events may include launch latency")),
            },
            Err(e) => (None, format!("no GPU spin (module: {e}); events may include launch latency")),
        };
        GpuTimer { stream, events: Vec::new(), spin, spin_note, reps, warmup, host_per_call: 20e-6, queue_misses: 0 }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn note(&self) -> &str {
        &self.spin_note
    }

    pub fn sync(&self) -> Result<(), String> {
        self.stream.synchronize().map_err(driver_err("stream synchronize"))
    }

    fn ensure_events(&mut self) -> Result<(), String> {
        let ctx = self.stream.context().clone();
        while self.events.len() < self.reps {
            let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("cuEventCreate"))?;
            let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("cuEventCreate"))?;
            self.events.push((a, b));
        }
        Ok(())
    }

    fn spin(&self, seconds: f64) -> Result<(), String> {
        let Some(f) = &self.spin else { return Ok(()) };
        let ns = (seconds * 1e9) as u64;
        let mut b = self.stream.launch_builder(f);
        b.arg(&ns);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: bnorm_bench_spin takes one u64 by value (pushed just above) and touches no
        // memory; it only reads the global timer until `ns` nanoseconds have passed.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err("launching the spin kernel"))
    }

    /// Median GPU time of `f(i)`, `i` cycling over `nbuf` buffer sets: `warmup` untimed
    /// calls, then `reps` calls each between two events, queued behind a spin.
    pub fn time(&mut self, nbuf: usize, f: &mut dyn FnMut(usize) -> Result<(), String>) -> Result<Timing, String> {
        let nbuf = nbuf.max(1);
        self.ensure_events()?;
        let mut k = 0usize;
        for _ in 0..self.warmup {
            f(k % nbuf)?;
            k += 1;
        }
        self.sync()?;
        let mut attempt = 0;
        loop {
            let spin = ((self.host_per_call * self.reps as f64 * 1.5 + 1e-3) * 4f64.powi(attempt)).min(MAX_SPIN_S);
            self.spin(spin)?;
            let t0 = Instant::now();
            for i in 0..self.reps {
                self.events[i].0.record(&self.stream).map_err(driver_err("cuEventRecord"))?;
                f(k % nbuf)?;
                k += 1;
                self.events[i].1.record(&self.stream).map_err(driver_err("cuEventRecord"))?;
            }
            let host = t0.elapsed().as_secs_f64();
            self.host_per_call = host / self.reps as f64;
            self.sync()?;
            let mut ms = Vec::with_capacity(self.reps);
            for (a, b) in &self.events[..self.reps] {
                ms.push(a.elapsed_ms(b).map_err(driver_err("cuEventElapsedTime"))? as f64);
            }
            let queued = self.spin.is_none() || host <= spin;
            if queued || attempt == 1 || spin >= MAX_SPIN_S {
                if !queued {
                    self.queue_misses += 1;
                }
                return Ok(Timing::from_samples(ms));
            }
            attempt += 1;
        }
    }
}

// ---------------------------------------------------------------- buffers of a case

/// Elements of the random block every buffer is tiled from.
const BLOCK: usize = 1 << 20;

/// Everything one case's calls use: `sets` rotating buffer sets (inputs and outputs) and
/// the per-channel vectors (shared by the sets).
pub struct CaseBuffers<T: DevElem> {
    pub case: Case,
    pub shape: Shape,
    pub sets: usize,
    /// Inputs.
    pub x: Vec<CudaSlice<T>>,
    /// Forward / inference output; in a backward case with `fused`, the forward output
    /// (the ReLU gate), computed by our fused forward.
    pub y: Vec<CudaSlice<T>>,
    /// Backward: gradient input and output.
    pub dy: Vec<CudaSlice<T>>,
    pub dx: Vec<CudaSlice<T>>,
    /// With `fused`: the residual (forward) and its gradient (backward).
    pub z: Vec<CudaSlice<T>>,
    pub dz: Vec<CudaSlice<T>>,
    pub fused: bool,
    pub weight: CudaSlice<f32>,
    pub bias: CudaSlice<f32>,
    pub running_mean: CudaSlice<f32>,
    pub running_var: CudaSlice<f32>,
    pub saved_mean: CudaSlice<f32>,
    pub saved_invstd: CudaSlice<f32>,
    pub dweight: CudaSlice<f32>,
    pub dbias: CudaSlice<f32>,
    pub tracked: u64,
}

fn block<T: DevElem>(seed: u64, mean: f64, sd: f64) -> Vec<T> {
    let mut r = bnorm::check::Rng::new(seed);
    (0..BLOCK).map(|_| T::from_f64_rounded(mean + sd * r.normal())).collect()
}

fn filled<T: DevElem>(s: &Arc<CudaStream>, src: &CudaSlice<T>, n: usize) -> Result<CudaSlice<T>, String> {
    let mut d = s.alloc_zeros::<T>(n).map_err(|e| format!("allocating {n} elements: {e}"))?;
    let mut off = 0;
    while off < n {
        let len = (n - off).min(src.len());
        s.memcpy_dtod(&src.slice(0..len), &mut d.slice_mut(off..off + len)).map_err(driver_err("cuMemcpyDtoD"))?;
        off += len;
    }
    Ok(d)
}

fn per_channel(s: &Arc<CudaStream>, c: usize, seed: u64, mean: f64, sd: f64) -> Result<CudaSlice<f32>, String> {
    let mut r = bnorm::check::Rng::new(seed);
    let h: Vec<f32> = (0..c).map(|_| (mean + sd * r.normal()) as f32).collect();
    s.clone_htod(&h).map_err(driver_err("upload"))
}

/// How many rotating sets: the inputs of all sets exceed 2x L2 (at least 2 sets), within
/// `budget` bytes of device memory for all sets.
pub(crate) fn rotating_sets(l2: usize, input_bytes: usize, set_bytes: usize, budget: usize) -> usize {
    let want = (2 * l2).div_ceil(input_bytes.max(1)).max(2);
    let fits = budget / set_bytes.max(1);
    want.min(fits).max(1)
}

impl<T: DevElem> CaseBuffers<T> {
    /// Allocate and fill the sets for `case`; `fused` adds the residual / ReLU buffers.
    fn new(s: &Arc<CudaStream>, case: &Case, l2: usize, budget: usize, fused: bool) -> Result<Self, String> {
        let shape = Shape::from_logical(&case.dims, case.layout).map_err(|e| e.to_string())?;
        let (n, c) = (shape.numel(), shape.c());
        let eb = std::mem::size_of::<T>();
        let (inputs, outputs) = match (case.op, fused) {
            (BenchOp::Backward, false) => (2, 1), // x, dy | dx
            (BenchOp::Backward, true) => (3, 2),  // x, dy, y | dx, dz
            (_, false) => (1, 1),                 // x | y
            (_, true) => (2, 1),                  // x, z | y
        };
        let sets = rotating_sets(l2, inputs * n * eb, (inputs + outputs) * n * eb, budget);
        let xb = s.clone_htod(&block::<T>(1, 0.5, 1.5)).map_err(driver_err("upload"))?;
        let gb = s.clone_htod(&block::<T>(2, 0.0, 1.0)).map_err(driver_err("upload"))?;
        let many = |src: &CudaSlice<T>, k: usize| -> Result<Vec<CudaSlice<T>>, String> {
            (0..k).map(|_| filled(s, src, n)).collect()
        };
        let backward = case.op == BenchOp::Backward;
        let zeros = |k: usize| -> Result<Vec<CudaSlice<T>>, String> {
            (0..k).map(|_| s.alloc_zeros::<T>(n).map_err(|e| format!("allocating {n} elements: {e}"))).collect()
        };
        let b = CaseBuffers {
            case: case.clone(),
            shape,
            sets,
            x: many(&xb, sets)?,
            y: zeros(if backward && !fused { 0 } else { sets })?,
            dy: if backward { many(&gb, sets)? } else { Vec::new() },
            dx: zeros(if backward { sets } else { 0 })?,
            z: if fused && !backward { many(&gb, sets)? } else { Vec::new() },
            dz: zeros(if fused && backward { sets } else { 0 })?,
            fused,
            weight: per_channel(s, c, 3, 1.0, 0.1)?,
            bias: per_channel(s, c, 4, 0.0, 0.1)?,
            running_mean: per_channel(s, c, 5, 0.0, 0.1)?,
            // 0.8 to 1.2, positive
            running_var: s
                .clone_htod(&(0..c).map(|i| 0.8 + 0.4 * ((i * 7919) % 101) as f32 / 100.0).collect::<Vec<f32>>())
                .map_err(driver_err("upload"))?,
            saved_mean: s.alloc_zeros::<f32>(c).map_err(driver_err("alloc"))?,
            saved_invstd: s.alloc_zeros::<f32>(c).map_err(driver_err("alloc"))?,
            dweight: s.alloc_zeros::<f32>(c).map_err(driver_err("alloc"))?,
            dbias: s.alloc_zeros::<f32>(c).map_err(driver_err("alloc"))?,
            tracked: 0,
        };
        Ok(b)
    }
}

/// The config of plain (`fused` false) or add + ReLU calls.
pub fn config(fused: bool) -> Config {
    let mut cfg = Config::default();
    if fused {
        cfg.activation = Activation::Relu;
    }
    cfg
}

/// Our op on set `i` (the `fused` flavour: residual + ReLU forward, ReLU-gated backward
/// with dz).
fn ours<T: DevElem>(dev: &Device, b: &mut CaseBuffers<T>, i: usize, fused: bool) -> bnorm::Result<()> {
    let cfg = config(fused);
    let shape = b.shape.clone();
    match b.case.op {
        BenchOp::ForwardTrain => {
            let mut a = ForwardTraining::new(&b.x[i], &mut b.y[i])
                .affine(&b.weight, &b.bias)
                .running(&mut b.running_mean, &mut b.running_var, &mut b.tracked)
                .saved(&mut b.saved_mean, &mut b.saved_invstd);
            if fused {
                a = a.residual(&b.z[i]);
            }
            ops::forward_training(dev, &shape, &cfg, a)
        }
        BenchOp::Inference => {
            let mut a =
                ForwardInference::new(&b.x[i], &mut b.y[i], &b.running_mean, &b.running_var).affine(&b.weight, &b.bias);
            if fused {
                a = a.residual(&b.z[i]);
            }
            ops::forward_inference(dev, &shape, &cfg, a)
        }
        BenchOp::Backward => {
            let mut a = Backward::from_saved(&b.x[i], &b.dy[i], &mut b.dx[i], &b.saved_mean, &b.saved_invstd)
                .weight(&b.weight)
                .param_grads(&mut b.dweight, &mut b.dbias);
            if fused {
                a = a.output(&b.y[i]).residual_grad(&mut b.dz[i]);
            }
            ops::backward(dev, &shape, &cfg, a)
        }
    }
}

/// Saved statistics (and, fused, the forward outputs for the ReLU gate) of a backward case:
/// our training forward (every set holds the same data, so set 0's statistics serve all);
/// fused, `y = relu(bn(x) + dy)` into every set stands in for the forward output.
fn prepare_backward<T: DevElem>(dev: &Device, b: &mut CaseBuffers<T>) -> bnorm::Result<()> {
    let shape = b.shape.clone();
    let cfg = config(b.fused);
    for i in 0..if b.fused { b.sets } else { 1 } {
        let a = if b.fused {
            ForwardTraining::new(&b.x[i], &mut b.y[i]).residual(&b.dy[i])
        } else {
            ForwardTraining::new(&b.x[i], &mut b.dx[i]) // dx is overwritten by every backward call
        };
        let a = a.affine(&b.weight, &b.bias).saved(&mut b.saved_mean, &mut b.saved_invstd);
        ops::forward_training(dev, &shape, &cfg, a)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- output comparison

/// Comparing a peer's outputs with ours (used by the cuDNN peer, feature `cudnn`).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub mod compare {
    use super::{driver_err, DevElem};
    use bnorm::cuda::cudarc::driver::CudaSlice;
    use bnorm::cuda::cudarc::driver::CudaStream;
    use serde_json::{json, Map, Value};
    use std::sync::Arc;

    /// Largest differences between two outputs over the compared elements.
    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    pub struct Diff {
        pub max_abs: f64,
        /// |a - b| / max(|b|, 1e-2 * rms(b)): relative where the reference is not tiny.
        pub max_rel: f64,
        pub compared: usize,
    }

    impl Diff {
        pub fn of(ours: &[f64], theirs: &[f64]) -> Diff {
            let n = theirs.len().min(ours.len());
            if n == 0 {
                return Diff::default();
            }
            let rms = (theirs[..n].iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
            let floor = (1e-2 * rms).max(f64::MIN_POSITIVE);
            let mut d = Diff { compared: n, ..Diff::default() };
            for (a, b) in ours.iter().zip(theirs) {
                let e = (a - b).abs();
                let e = if e.is_nan() && !(a.is_nan() && b.is_nan()) {
                    f64::INFINITY
                } else if e.is_nan() {
                    0.0
                } else {
                    e
                };
                d.max_abs = d.max_abs.max(e);
                d.max_rel = d.max_rel.max(e / b.abs().max(floor));
            }
            d
        }
    }

    /// Up to three windows of `SAMPLE` elements (start, middle, end) of a tensor: enough to
    /// see every channel of the resnet shapes and any stats error, without downloading GBs.
    pub const SAMPLE: usize = 1 << 20;

    pub fn sample_windows(n: usize) -> Vec<std::ops::Range<usize>> {
        if n <= 3 * SAMPLE {
            return std::iter::once(0..n).collect();
        }
        let mid = n / 2 - SAMPLE / 2;
        vec![0..SAMPLE, mid..mid + SAMPLE, n - SAMPLE..n]
    }

    /// The sampled elements of a device tensor, as f64.
    pub fn download_sample<T: DevElem>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Result<Vec<f64>, String> {
        let mut out = Vec::new();
        for w in sample_windows(d.len()) {
            let h: Vec<T> = s.clone_dtoh(&d.slice(w)).map_err(driver_err("download"))?;
            out.extend(h.iter().map(|v| v.to_f64()));
        }
        Ok(out)
    }

    pub fn download_f32(s: &Arc<CudaStream>, d: &CudaSlice<f32>) -> Result<Vec<f64>, String> {
        let h: Vec<f32> = s.clone_dtoh(d).map_err(driver_err("download"))?;
        Ok(h.iter().map(|&v| v as f64).collect())
    }

    /// Fields `<what>_max_abs`, `<what>_max_rel` of a check object.
    pub fn put_diff(check: &mut Map<String, Value>, what: &str, d: Diff) {
        check.insert(format!("{what}_max_abs"), json!(d.max_abs));
        check.insert(format!("{what}_max_rel"), json!(d.max_rel));
    }
}

// ---------------------------------------------------------------- the runner

pub struct CudaRunner {
    dev: Device,
    gpu: CudaDevice,
    timer: GpuTimer,
    l2: usize,
    #[cfg(feature = "cudnn")]
    cudnn: Option<Box<super::cudnn::CudnnPeer>>,
    /// `name: status` of every requested peer (the report's meta).
    peer_status: Map<String, Value>,
    results: PeerResults,
}

impl CudaRunner {
    pub fn new(dev: Device, reps: usize, warmup: usize) -> Result<CudaRunner, String> {
        let gpu = dev.as_cuda().ok_or("CudaRunner on a CPU device")?.clone();
        let timer = GpuTimer::new(gpu.stream().clone(), reps, warmup);
        let l2 = gpu.info().l2_bytes.max(1 << 20) as usize;
        Ok(CudaRunner {
            dev,
            gpu,
            timer,
            l2,
            #[cfg(feature = "cudnn")]
            cudnn: None,
            peer_status: Map::new(),
            results: PeerResults::default(),
        })
    }

    /// Add an in-process peer by name. A peer that cannot be loaded (no libcudnn) is
    /// reported (stderr and the report's meta) and left out: the run goes on without it.
    pub fn add_peer(&mut self, name: &str) -> Result<(), String> {
        match name {
            #[cfg(feature = "cudnn")]
            "cudnn" => match super::cudnn::CudnnPeer::load(self.timer.stream().clone()) {
                Ok(p) => {
                    eprintln!("peer cudnn: {}", p.describe());
                    self.peer_status.insert("cudnn".into(), json!(p.describe()));
                    self.cudnn = Some(Box::new(p));
                }
                Err(e) => {
                    eprintln!("peer cudnn: not available, going on without it: {e}");
                    self.peer_status.insert("cudnn".into(), json!(format!("unavailable: {e}")));
                }
            },
            #[cfg(not(feature = "cudnn"))]
            "cudnn" => {
                let e = "this bnorm was built without the `cudnn` feature (cargo build -p bnorm-cli --features cudnn)";
                eprintln!("peer cudnn: not available, going on without it: {e}");
                self.peer_status.insert("cudnn".into(), json!(format!("unavailable: {e}")));
            }
            other => return Err(format!("unknown --peer `{other}` (cudnn)")),
        }
        Ok(())
    }

    fn budget(&self) -> usize {
        let (free, _) = self.gpu.context().mem_get_info().unwrap_or((8 << 30, 0));
        (free as f64 * 0.6) as usize
    }

    /// Whether a peer compares a fused (residual + ReLU) flavour of this case.
    fn wants_fused(&self, _case: &Case) -> bool {
        #[cfg(feature = "cudnn")]
        if let Some(c) = &self.cudnn {
            return c.wants_add_relu(_case);
        }
        false
    }

    fn time_typed<T: DevElem>(&mut self, case: &Case) -> Result<Timing, String> {
        let fused = self.wants_fused(case);
        let budget = self.budget();
        let s = self.timer.stream().clone();
        let mut b = CaseBuffers::<T>::new(&s, case, self.l2, budget, fused)?;
        let dev = self.dev.clone();
        if case.op == BenchOp::Backward {
            prepare_backward(&dev, &mut b).map_err(|e| e.to_string())?;
        }
        let sets = b.sets;
        let t = self.timer.time(sets, &mut |i| ours(&dev, &mut b, i, false).map_err(|e| e.to_string()))?;
        let mut results = PeerResults::default();
        results.extra.insert("sets".into(), json!(sets));
        if fused {
            let tf = self.timer.time(sets, &mut |i| ours(&dev, &mut b, i, true).map_err(|e| e.to_string()))?;
            results.extra.insert("add_relu".into(), json!({ "ours": tf.median_ms }));
            // plain outputs again in set 0, for the peers' checks
            ours(&dev, &mut b, 0, false).map_err(|e| e.to_string())?;
        }
        self.timer.sync()?;
        #[cfg(feature = "cudnn")]
        if let Some(c) = &mut self.cudnn {
            c.measure(&mut self.timer, &mut b, &mut results)?;
        }
        self.results = results;
        Ok(t)
    }
}

impl Runner for CudaRunner {
    fn time(&mut self, case: &Case) -> Result<Timing, String> {
        match case.dtype {
            DType::F32 => self.time_typed::<f32>(case),
            DType::F16 => self.time_typed::<f16>(case),
            DType::BF16 => self.time_typed::<bf16>(case),
        }
    }

    /// Device-to-device copies of `bytes`, rotating over enough buffer pairs that the
    /// sources exceed 2x L2: `2 * bytes / time`.
    fn copy_gbps(&mut self, bytes: usize) -> Result<f64, String> {
        let n = bytes.max(256);
        let s = self.timer.stream().clone();
        let pairs = rotating_sets(self.l2, n, 2 * n, self.budget());
        let src: Vec<CudaSlice<u8>> =
            (0..pairs).map(|_| s.alloc_zeros::<u8>(n).map_err(driver_err("alloc"))).collect::<Result<_, _>>()?;
        let mut dst: Vec<CudaSlice<u8>> =
            (0..pairs).map(|_| s.alloc_zeros::<u8>(n).map_err(driver_err("alloc"))).collect::<Result<_, _>>()?;
        let t =
            self.timer.time(pairs, &mut |i| s.memcpy_dtod(&src[i], &mut dst[i]).map_err(driver_err("cuMemcpyDtoD")))?;
        Ok(2.0 * n as f64 / (t.median_ms * 1e-3) / 1e9)
    }

    fn big_copy_bytes(&self) -> usize {
        1 << 30
    }

    /// L2 when one call's tensors fit in L2 (the second pass of a fused kernel may hit it;
    /// the rotation still makes the first read come from DRAM), else DRAM.
    fn regime(&self, bytes: usize) -> &'static str {
        if bytes <= self.l2 {
            "L2"
        } else {
            "DRAM"
        }
    }

    fn take_peer_results(&mut self) -> PeerResults {
        std::mem::take(&mut self.results)
    }

    fn meta(&self) -> Map<String, Value> {
        let i = self.gpu.info();
        let mut m = Map::new();
        m.insert("gpu".into(), json!(i.name));
        m.insert("compute_capability".into(), json!(format!("{}.{}", i.compute_capability.0, i.compute_capability.1)));
        m.insert("multiprocessors".into(), json!(i.multiprocessors));
        m.insert("l2_bytes".into(), json!(i.l2_bytes));
        m.insert("memory_total".into(), json!(i.memory_total));
        m.insert(
            "driver_cuda_version".into(),
            json!(i.driver_version.map(|(a, b)| format!("{a}.{b}")).unwrap_or_default()),
        );
        m.insert("native_code".into(), json!(i.native_code));
        m.insert("persistent_kernels".into(), json!(self.gpu.persistent()));
        m.insert(
            "gpu_timing".into(),
            json!(format!(
                "CUDA event pair per call, median of {} after {} warm-up calls; {}; rotating buffer sets whose \
                 inputs exceed 2x L2 ({} MiB)",
                self.timer.reps,
                self.timer.warmup,
                self.timer.note(),
                self.l2 >> 20
            )),
        );
        m.insert("queue_misses".into(), json!(self.timer.queue_misses));
        m.insert(
            "check_method".into(),
            json!(format!(
                "our outputs vs the peer's on the same inputs: up to 3 windows of {SAMPLE} elements of y / dx \
                 (start, middle, end), every channel of the per-channel outputs; rel = |a - b| / max(|b|, 1e-2 rms(b))",
                SAMPLE = compare::SAMPLE
            )),
        );
        if !self.peer_status.is_empty() {
            m.insert("peers".into(), Value::Object(self.peer_status.clone()));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_exceeds_twice_l2_within_the_budget() {
        let l2 = 50 << 20;
        // small tensor: enough sets to pass 2 x L2
        let k = rotating_sets(l2, 1 << 20, 2 << 20, 8 << 30);
        assert!(k * (1 << 20) >= 2 * l2, "{k}");
        // huge tensor: two sets
        assert_eq!(rotating_sets(l2, 800 << 20, 1600 << 20, 64 << 30), 2);
        // memory-bound: as many as fit, at least one
        assert_eq!(rotating_sets(l2, 800 << 20, 1600 << 20, 2000 << 20), 1);
        assert_eq!(rotating_sets(l2, 800 << 20, 1600 << 20, 100), 1);
    }

    #[test]
    fn sample_windows_cover_start_middle_end() {
        use compare::{sample_windows, SAMPLE};
        assert_eq!(sample_windows(10), std::iter::once(0..10).collect::<Vec<_>>());
        let n = 10 * SAMPLE + 7;
        let w = sample_windows(n);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].start, 0);
        assert_eq!(w[2].end, n);
        assert!(w.iter().all(|r| r.len() == SAMPLE));
    }

    #[test]
    fn diff_is_relative_where_the_reference_is_not_tiny() {
        use compare::Diff;
        let d = Diff::of(&[1.0, 2.0, 0.0], &[1.0, 2.002, 1e-9]);
        assert!((d.max_abs - 0.002).abs() < 1e-12);
        assert!((d.max_rel - 0.002 / 2.002).abs() < 1e-9, "{d:?}");
        assert_eq!(d.compared, 3);
        let nan = Diff::of(&[f64::NAN], &[1.0]);
        assert!(nan.max_abs.is_infinite());
        assert_eq!(Diff::of(&[f64::NAN], &[f64::NAN]).max_abs, 0.0);
    }

    #[test]
    fn spin_ptx_is_one_entry_point() {
        assert!(SPIN_PTX.contains(".visible .entry bnorm_bench_spin("));
        assert!(SPIN_PTX.contains("%globaltimer"));
    }

    #[test]
    fn fused_configs() {
        assert_eq!(config(false).activation, Activation::Identity);
        assert_eq!(config(true).activation, Activation::Relu);
    }
}
