//! candle-bench: times candle-nn's `BatchNorm` on the CPU over bnorm's benchmark shapes and
//! writes JSON records that `bnorm bench --peer-json candle=FILE` merges by
//! (op, dtype, layout, dims).
//!
//! Ops: `forward_train` (`forward_t(x, true)`: batch statistics + running-stat update),
//! `inference` (`forward_t(x, false)`), `backward` (`GradStore` from `loss.backward()` where
//! `loss = sum(bn(x) * dy)`, the forward graph built once outside the timed region).

use bnorm::suites::{RESNET50_CHW, SMOKE};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

#[derive(Parser, Debug)]
#[command(about = "Benchmark candle-nn's BatchNorm on the CPU (peer numbers for bnorm bench)")]
struct Args {
    /// `resnet50` (12 NCHW shapes at --batch) or `smoke` (two small shapes).
    #[arg(long, default_value = "resnet50")]
    suite: String,
    /// Batch size substituted into the resnet50 shapes.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Threads for candle's CPU backend (sets RAYON_NUM_THREADS and CANDLE_NUM_THREADS).
    /// Default: the number of available CPUs.
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Untimed warm-up calls per case.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Write the JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the records already in the --json file and replace only those this run measures
    /// (same op, dtype, layout, dims); e.g. rerun `--dtypes f32` at a quieter moment.
    #[arg(long)]
    merge: bool,
    /// Comma-separated dtypes: f32, bf16, f16.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16")]
    dtypes: Vec<String>,
    /// Comma-separated ops: forward_train, inference, backward.
    #[arg(long, value_delimiter = ',', default_value = "forward_train,inference,backward")]
    ops: Vec<String>,
    /// RNG seed of the input data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    ForwardTrain,
    Inference,
    Backward,
}

impl Op {
    fn parse(s: &str) -> Result<Op, String> {
        match s {
            "forward_train" => Ok(Op::ForwardTrain),
            "inference" => Ok(Op::Inference),
            "backward" => Ok(Op::Backward),
            _ => Err(format!("unknown op `{s}` (forward_train, inference, backward)")),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Op::ForwardTrain => "forward_train",
            Op::Inference => "inference",
            Op::Backward => "backward",
        }
    }
    /// Tensors read once plus written once: the same numerator as bnorm's bench
    /// (x, y for the forwards; x, dy, dx for backward).
    fn tensors_moved(self) -> usize {
        match self {
            Op::ForwardTrain | Op::Inference => 2,
            Op::Backward => 3,
        }
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(format!("unknown dtype `{s}` (f32, bf16, f16)")),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

struct Timing {
    median_ms: f64,
    min_ms: f64,
    reps: usize,
}

/// Calls `f` up to `warmup` times untimed (stopping after the first once warm-up has taken a
/// second: large cases need no more), then `reps` times, each timed alone; the result of a
/// call is dropped outside its timed window.
fn time_it<R>(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<R>,
) -> candle_core::Result<Timing> {
    let w0 = Instant::now();
    for i in 0..warmup {
        if i > 0 && w0.elapsed().as_secs_f64() > 1.0 {
            break;
        }
        drop(f()?);
    }
    let mut ms = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let r = f()?;
        let dt = t0.elapsed();
        drop(r);
        ms.push(dt.as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let n = ms.len();
    let median_ms = if n % 2 == 1 { ms[n / 2] } else { 0.5 * (ms[n / 2 - 1] + ms[n / 2]) };
    Ok(Timing { median_ms, min_ms: ms[0], reps: n })
}

/// Repetitions of the auxiliary timings (`candle_contiguous_ms`, `candle_head_ms`).
fn aux_reps(reps: usize) -> usize {
    (reps / 4).max(5)
}

fn normal_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// Per-channel parameters and running statistics, in f32 (cast per case).
struct Params {
    c: usize,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl Params {
    fn random(rng: &mut StdRng, c: usize, dev: &Device) -> candle_core::Result<Params> {
        let w: Vec<f32> = normal_vec(rng, c).into_iter().map(|z| 1.0 + 0.1 * z).collect();
        let b: Vec<f32> = normal_vec(rng, c).into_iter().map(|z| 0.1 * z).collect();
        let rm: Vec<f32> = normal_vec(rng, c).into_iter().map(|z| 0.1 * z).collect();
        let rv: Vec<f32> = normal_vec(rng, c).into_iter().map(|z| 1.0 + 0.1 * z.abs()).collect();
        Ok(Params {
            c,
            weight: Tensor::from_vec(w, c, dev)?,
            bias: Tensor::from_vec(b, c, dev)?,
            running_mean: Tensor::from_vec(rm, c, dev)?,
            running_var: Tensor::from_vec(rv, c, dev)?,
        })
    }

    /// A BatchNorm with running statistics in `stats_dt` and weight/bias in `param_dt`
    /// (plain tensors: no autograd graph is recorded for the forward timings).
    fn module(&self, stats_dt: DType, param_dt: DType) -> candle_core::Result<BatchNorm> {
        BatchNorm::new_with_momentum(
            self.c,
            self.running_mean.to_dtype(stats_dt)?,
            self.running_var.to_dtype(stats_dt)?,
            self.weight.to_dtype(param_dt)?,
            self.bias.to_dtype(param_dt)?,
            EPS,
            MOMENTUM,
        )
    }
}

/// What one (op, dtype, dims) case produced.
struct CaseOut {
    timing: Result<Timing, String>,
    stats_dtype: Option<DType>,
    extra: Map<String, Value>,
}

/// Running-statistic dtypes to try: the input's first (what `candle_nn::batch_norm` with a
/// VarBuilder of that dtype gives), then f32 (candle's train path computes in f32 for
/// half inputs and adds the batch mean to the running mean without a cast).
fn stats_candidates(dt: DType) -> Vec<DType> {
    if dt == DType::F32 {
        vec![DType::F32]
    } else {
        vec![dt, DType::F32]
    }
}

fn run_forward(op: Op, x: &Tensor, p: &Params, dt: DType, warmup: usize, reps: usize) -> CaseOut {
    let train = op == Op::ForwardTrain;
    let mut errors = Vec::new();
    for sd in stats_candidates(dt) {
        let attempt = (|| -> candle_core::Result<(Timing, Map<String, Value>)> {
            let bn = p.module(sd, dt)?;
            // First call outside time_it surfaces dtype errors before any timing.
            drop(bn.forward_t(x, train)?);
            let t = time_it(warmup, reps, || bn.forward_t(x, train))?;
            let mut extra = Map::new();
            if train {
                // candle's train output is a transposed view over a (C, N*H*W) buffer; the
                // first consumer that needs NCHW-contiguous data pays a strided copy.
                let tc = time_it(warmup, aux_reps(reps), || bn.forward_t(x, true)?.contiguous())?;
                extra.insert("candle_contiguous_ms".into(), json!(tc.median_ms));
            }
            Ok((t, extra))
        })();
        match attempt {
            Ok((t, mut extra)) => {
                if !errors.is_empty() {
                    extra.insert("stats_fallback_reason".into(), json!(errors.join("; ")));
                }
                return CaseOut { timing: Ok(t), stats_dtype: Some(sd), extra };
            }
            Err(e) => errors.push(format!("running stats {}: {}", dtype_name(sd), first_line(&e))),
        }
    }
    CaseOut { timing: Err(errors.join("; ")), stats_dtype: None, extra: Map::new() }
}

fn run_backward(x: &Tensor, dy: &Tensor, p: &Params, dt: DType, warmup: usize, reps: usize) -> CaseOut {
    let mut errors = Vec::new();
    for sd in stats_candidates(dt) {
        let attempt = (|| -> candle_core::Result<(Timing, Map<String, Value>)> {
            let xv = Var::from_tensor(x)?;
            let wv = Var::from_tensor(&p.weight.to_dtype(dt)?)?;
            let bv = Var::from_tensor(&p.bias.to_dtype(dt)?)?;
            let bn = BatchNorm::new_with_momentum(
                p.c,
                p.running_mean.to_dtype(sd)?,
                p.running_var.to_dtype(sd)?,
                wv.as_tensor().clone(),
                bv.as_tensor().clone(),
                EPS,
                MOMENTUM,
            )?;
            // Forward graph built once, outside the timed region; backward() can be called
            // again on the same graph.
            let y = bn.forward_t(xv.as_tensor(), true)?;
            let loss = y.mul(dy)?.sum_all()?;
            let g = loss.backward()?;
            for (name, t) in [("x", xv.as_tensor()), ("weight", wv.as_tensor()), ("bias", bv.as_tensor())] {
                if g.get(t).is_none() {
                    candle_core::bail!("backward produced no gradient for {name}");
                }
            }
            drop(g);
            let t = time_it(warmup, reps, || loss.backward())?;

            // The loss head's own share of that backward: d/dz sum(z * dy) for a Var z laid
            // out like candle's train output (a transposed view), including the gradient
            // candle also computes for the non-variable dy.
            let dims = x.dims().to_vec();
            let mut tdims = dims.clone();
            tdims.swap(0, 1);
            let zv = Var::zeros(tdims, dt, x.device())?;
            let z = zv.as_tensor().transpose(0, 1)?;
            let head = z.mul(dy)?.sum_all()?;
            let th = time_it(warmup, aux_reps(reps), || head.backward())?;
            let mut extra = Map::new();
            extra.insert("candle_head_ms".into(), json!(th.median_ms));
            extra.insert("candle_net_ms".into(), json!((t.median_ms - th.median_ms).max(0.0)));
            Ok((t, extra))
        })();
        match attempt {
            Ok((t, mut extra)) => {
                if !errors.is_empty() {
                    extra.insert("stats_fallback_reason".into(), json!(errors.join("; ")));
                }
                return CaseOut { timing: Ok(t), stats_dtype: Some(sd), extra };
            }
            Err(e) => errors.push(format!("running stats {}: {}", dtype_name(sd), first_line(&e))),
        }
    }
    CaseOut { timing: Err(errors.join("; ")), stats_dtype: None, extra: Map::new() }
}

fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// Max |a - b| over two equal-length slices.
fn max_err(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn to_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.contiguous()?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// candle's BatchNorm on a small f32 case against an f64 computation: train-mode output
/// (weight 1, bias 0), its per-channel mean/variance, the running-stat update, eval-mode
/// output from the updated statistics, and the gradients of sum(bn(x) * dy).
fn sanity(dev: &Device) -> candle_core::Result<Value> {
    let (n, c, h, w) = (8usize, 4usize, 5usize, 7usize);
    let hw = h * w;
    let m = (n * hw) as f64;
    let mut rng = StdRng::seed_from_u64(7);
    // Channel c: mean 2c - 3, standard deviation c + 1.
    let xs: Vec<f32> = (0..n * c * hw)
        .map(|i| {
            let ch = (i / hw) % c;
            let z: f32 = rng.sample(StandardNormal);
            (ch as f32 + 1.0) * z + 2.0 * ch as f32 - 3.0
        })
        .collect();
    let dys = normal_vec(&mut rng, n * c * hw);
    let gammas: Vec<f32> = normal_vec(&mut rng, c).into_iter().map(|z| 1.0 + 0.5 * z).collect();
    let x = Tensor::from_vec(xs.clone(), (n, c, h, w), dev)?;
    let dy = Tensor::from_vec(dys.clone(), (n, c, h, w), dev)?;
    let idx = |ni: usize, ci: usize, s: usize| (ni * c + ci) * hw + s;

    // f64 reference statistics.
    let mut mean = vec![0f64; c];
    let mut var = vec![0f64; c];
    for ci in 0..c {
        let vals: Vec<f64> =
            (0..n).flat_map(|ni| (0..hw).map(move |s| (ni, s))).map(|(ni, s)| xs[idx(ni, ci, s)] as f64).collect();
        mean[ci] = vals.iter().sum::<f64>() / m;
        var[ci] = vals.iter().map(|v| (v - mean[ci]).powi(2)).sum::<f64>() / m;
    }
    let xhat = |ni: usize, ci: usize, s: usize| (xs[idx(ni, ci, s)] as f64 - mean[ci]) / (var[ci] + EPS).sqrt();

    // Train mode, weight 1 bias 0, running stats 0 / 1.
    let bn = BatchNorm::new_with_momentum(
        c,
        Tensor::zeros(c, DType::F32, dev)?,
        Tensor::ones(c, DType::F32, dev)?,
        Tensor::ones(c, DType::F32, dev)?,
        Tensor::zeros(c, DType::F32, dev)?,
        EPS,
        MOMENTUM,
    )?;
    let y = to_f64(&bn.forward_t(&x, true)?)?;
    let mut yref = vec![0f64; y.len()];
    for ni in 0..n {
        for ci in 0..c {
            for s in 0..hw {
                yref[idx(ni, ci, s)] = xhat(ni, ci, s);
            }
        }
    }
    let train_err = max_err(&y, &yref);
    let (mut max_abs_mean, mut max_var_dev) = (0f64, 0f64);
    for ci in 0..c {
        let vals: Vec<f64> =
            (0..n).flat_map(|ni| (0..hw).map(move |s| (ni, s))).map(|(ni, s)| y[idx(ni, ci, s)]).collect();
        let mu = vals.iter().sum::<f64>() / m;
        let v = vals.iter().map(|t| (t - mu).powi(2)).sum::<f64>() / m;
        max_abs_mean = max_abs_mean.max(mu.abs());
        max_var_dev = max_var_dev.max((v - 1.0).abs());
    }

    // Running statistics: (1 - momentum) * old + momentum * batch (unbiased variance).
    let rm = to_f64(bn.running_mean())?;
    let rv = to_f64(bn.running_var())?;
    let rm_ref: Vec<f64> = mean.iter().map(|mu| MOMENTUM * mu).collect();
    let rv_ref: Vec<f64> = var.iter().map(|v| (1.0 - MOMENTUM) + MOMENTUM * v * m / (m - 1.0)).collect();
    let running_err = max_err(&rm, &rm_ref).max(max_err(&rv, &rv_ref));

    // Eval mode with the updated running statistics.
    let ye = to_f64(&bn.forward_t(&x, false)?)?;
    let mut yeref = vec![0f64; ye.len()];
    for ni in 0..n {
        for ci in 0..c {
            for s in 0..hw {
                yeref[idx(ni, ci, s)] = (xs[idx(ni, ci, s)] as f64 - rm_ref[ci]) / (rv_ref[ci] + EPS).sqrt();
            }
        }
    }
    let eval_err = max_err(&ye, &yeref);

    // Backward of sum(bn(x) * dy) with a non-trivial weight.
    let xv = Var::from_tensor(&x)?;
    let wv = Var::from_tensor(&Tensor::from_vec(gammas.clone(), c, dev)?)?;
    let bv = Var::from_tensor(&Tensor::zeros(c, DType::F32, dev)?)?;
    let bn2 = BatchNorm::new_with_momentum(
        c,
        Tensor::zeros(c, DType::F32, dev)?,
        Tensor::ones(c, DType::F32, dev)?,
        wv.as_tensor().clone(),
        bv.as_tensor().clone(),
        EPS,
        MOMENTUM,
    )?;
    let loss = bn2.forward_t(xv.as_tensor(), true)?.mul(&dy)?.sum_all()?;
    let g = loss.backward()?;
    let missing = || candle_core::Error::Msg("missing gradient".into());
    let dx = to_f64(g.get(xv.as_tensor()).ok_or_else(missing)?)?;
    let dw = to_f64(g.get(wv.as_tensor()).ok_or_else(missing)?)?;
    let db = to_f64(g.get(bv.as_tensor()).ok_or_else(missing)?)?;
    let mut dxref = vec![0f64; dx.len()];
    let mut dwref = vec![0f64; c];
    let mut dbref = vec![0f64; c];
    for ci in 0..c {
        let (mut sdy, mut sdyx) = (0f64, 0f64);
        for ni in 0..n {
            for s in 0..hw {
                let d = dys[idx(ni, ci, s)] as f64;
                sdy += d;
                sdyx += d * xhat(ni, ci, s);
            }
        }
        dbref[ci] = sdy;
        dwref[ci] = sdyx;
        let k = gammas[ci] as f64 / (var[ci] + EPS).sqrt();
        for ni in 0..n {
            for s in 0..hw {
                let d = dys[idx(ni, ci, s)] as f64;
                dxref[idx(ni, ci, s)] = k * (d - sdy / m - xhat(ni, ci, s) * sdyx / m);
            }
        }
    }
    let dx_err = max_err(&dx, &dxref);
    let dwb_err = max_err(&dw, &dwref).max(max_err(&db, &dbref));
    // dweight/dbias are sums over N*H*W = 280 terms; judge them relative to their size.
    let dwb_scale = dwref.iter().chain(&dbref).fold(1f64, |a, v| a.max(v.abs()));

    let ok = train_err < 1e-4 && running_err < 1e-4 && eval_err < 1e-4 && dx_err < 1e-4 && dwb_err / dwb_scale < 1e-5;
    Ok(json!({
        "dims": [n, c, h, w],
        "dtype": "f32",
        "train_y_max_abs_err": train_err,
        "train_y_channel_max_abs_mean": max_abs_mean,
        "train_y_channel_max_abs_var_minus_1": max_var_dev,
        "running_stats_max_abs_err": running_err,
        "eval_y_max_abs_err": eval_err,
        "backward_dx_max_abs_err": dx_err,
        "backward_dweight_dbias_max_abs_err": dwb_err,
        "ok": ok,
    }))
}

/// UTC date and time from the system clock (days-to-civil, proleptic Gregorian).
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn shapes(suite: &str, batch: usize) -> Result<Vec<Vec<usize>>, String> {
    match suite {
        "resnet50" => Ok(RESNET50_CHW.iter().map(|&(c, h, w)| vec![batch, c, h, w]).collect()),
        // the 4-D (BatchNorm2d) shapes of bnorm's smoke suite
        "smoke" => Ok(SMOKE.iter().filter(|d| d.len() == 4).map(|d| d.to_vec()).collect()),
        _ => Err(format!("unknown suite `{suite}` (resnet50, smoke)")),
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("candle-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args = Args::parse();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    // candle reads these when it first builds its CPU thread pools (rayon and its own barrier
    // pool for element-wise ops), so they must be set before the first tensor op.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    let ops = args.ops.iter().map(|s| Op::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let dtypes = args.dtypes.iter().map(|s| parse_dtype(s)).collect::<Result<Vec<_>, _>>()?;
    let shapes = shapes(&args.suite, args.batch)?;
    let dev = Device::Cpu;
    let load_start = loadavg();

    let sanity = sanity(&dev).map_err(|e| format!("sanity check failed to run: {e}"))?;
    println!("sanity (f32 {:?}): {sanity}", sanity["dims"]);
    if sanity["ok"] != json!(true) {
        eprintln!("WARNING: candle's BatchNorm disagrees with the f64 reference beyond tolerance");
    }
    let candle_threads = candle_core::utils::get_num_threads();
    let pool_workers = candle_core::utils::barrier_pool().n_workers();

    let mut records: Vec<Value> = Vec::new();
    let meta = |complete: bool| {
        let mut notes = vec![
            format!(
                "threads: RAYON_NUM_THREADS=CANDLE_NUM_THREADS={threads} set before the first candle op; candle \
                 reports get_num_threads()={candle_threads}, barrier-pool workers={pool_workers} (+ the calling \
                 thread). candle parallelizes element-wise ops over that pool; its reductions (mean) and strided \
                 copies run on one thread."
            ),
            "forward_train: candle_nn::BatchNorm::forward_t(x, true): casts half inputs to f32, transposes x to \
             (C, N*H*W) and copies it contiguous, mean, subtract, square, mean, running_mean/running_var update \
             (momentum 0.1, unbiased variance), divide by sqrt(var + eps), cast back, weight multiply, bias add; \
             returns a transposed (non-NCHW-contiguous) view. candle_ms times that call; candle_contiguous_ms adds \
             .contiguous() to get an NCHW-contiguous y like bnorm's."
                .to_string(),
            "inference: forward_t(x, false) = broadcast (x - running_mean) / sqrt(running_var + eps) * weight + bias; \
             NCHW-contiguous output."
                .to_string(),
            "backward: x, weight, bias are candle Vars; the forward graph loss = sum(bn_train(x) * dy) is built once \
             untimed, then candle_ms times loss.backward() alone (producing dx, dweight, dbias). candle_head_ms times \
             backward() of sum(z * dy) for a Var z laid out like bn's output (the loss head's share: seeding ones, \
             the multiply by dy and the unused gradient for dy); candle_net_ms = candle_ms - candle_head_ms, an \
             estimate of the BatchNorm part alone."
                .to_string(),
            "half dtypes: running statistics are tried in the input dtype first, then f32; stats_dtype records which \
             one ran. candle's train path accumulates in f32 and needs f32 running stats; its eval path needs running \
             stats in the input dtype."
                .to_string(),
            "layout: candle has no channels-last memory format, so only channels-first (cf) records exist.".to_string(),
            format!(
                "timing: median of {} timed calls after up to {} warm-up calls (warm-up stops after one call once it \
                 has taken 1 s), std::time::Instant, the same input buffers throughout; auxiliary timings \
                 (candle_contiguous_ms, candle_head_ms) use {} calls; inputs standard normal, StdRng seeded with \
                 seed + shape index ({}).",
                args.reps.max(1),
                args.warmup,
                aux_reps(args.reps),
                args.seed
            ),
            "bytes = (tensors read once + written once) * numel * dtype size: 2 tensors for forward_train/inference, \
             3 for backward (bnorm bench's effective-bandwidth numerator)."
                .to_string(),
            format!("load average (1/5/15 min) at start: {load_start}; when written: {}", loadavg()),
        ];
        if !complete {
            notes.push("PARTIAL: the run had not finished when this file was written.".into());
        }
        json!({
            "peer": "candle",
            "candle_version": env!("CANDLE_CORE_VERSION"),
            "candle_nn_version": env!("CANDLE_NN_VERSION"),
            "threads": threads,
            "date": utc_now(),
            "cpu": cpu_model(),
            "suite": args.suite,
            "batch": args.batch,
            "reps": args.reps.max(1),
            "warmup": args.warmup,
            "seed": args.seed,
            "complete": complete,
            "sanity": sanity,
            "notes": notes,
        })
    };
    // With --merge: the records and meta of the existing file, kept where this run has no record.
    let (old_records, old_meta): (Vec<Value>, Value) = match (&args.json, args.merge) {
        (Some(path), true) if path.exists() => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let recs = doc["records"].as_array().cloned().unwrap_or_default();
            (recs, doc["meta"].clone())
        }
        _ => (Vec::new(), Value::Null),
    };
    let key = |r: &Value| (r["op"].clone(), r["dtype"].clone(), r["layout"].clone(), r["dims"].clone());
    let write = |records: &[Value], complete: bool| -> Result<(), String> {
        if let Some(path) = &args.json {
            let mut all: Vec<Value> =
                old_records.iter().map(|o| records.iter().find(|r| key(r) == key(o)).unwrap_or(o).clone()).collect();
            all.extend(records.iter().filter(|r| !old_records.iter().any(|o| key(o) == key(r))).cloned());
            let mut meta = meta(complete);
            if !old_meta.is_null() {
                meta["merged_into"] = json!(format!(
                    "this run's {} records replaced or were added to those of an earlier run (its meta under \
                     meta.earlier); records not measured here keep the earlier run's timings",
                    records.len()
                ));
                meta["earlier"] = old_meta.clone();
            }
            let records = all;
            let doc = json!({ "meta": meta, "records": records });
            let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
            std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    };

    println!("{:<14} {:<5} {:<18} {:>10} {:>10}  extra", "op", "dtype", "dims", "median_ms", "GB/s");
    // dtype outermost, so the f32 records are complete first; the JSON is rewritten after every
    // record, so an interrupted run leaves what it measured.
    for &dt in &dtypes {
        for (si, dims) in shapes.iter().enumerate() {
            let numel: usize = dims.iter().product();
            // Same data for every dtype: the generator is seeded per shape.
            let mut rng = StdRng::seed_from_u64(args.seed.wrapping_add(si as u64));
            let x32 =
                Tensor::from_vec(normal_vec(&mut rng, numel), dims.as_slice(), &dev).map_err(|e| e.to_string())?;
            let dy32 =
                Tensor::from_vec(normal_vec(&mut rng, numel), dims.as_slice(), &dev).map_err(|e| e.to_string())?;
            let params = Params::random(&mut rng, dims[1], &dev).map_err(|e| e.to_string())?;
            let cast = x32.to_dtype(dt).and_then(|x| Ok((x, dy32.to_dtype(dt)?)));
            drop((x32, dy32));
            for &op in &ops {
                let out = match &cast {
                    Err(e) => CaseOut {
                        timing: Err(format!("cast to {}: {}", dtype_name(dt), first_line(e))),
                        stats_dtype: None,
                        extra: Map::new(),
                    },
                    Ok((x, dy)) => match op {
                        Op::ForwardTrain | Op::Inference => run_forward(op, x, &params, dt, args.warmup, args.reps),
                        Op::Backward => run_backward(x, dy, &params, dt, args.warmup, args.reps),
                    },
                };
                let bytes = op.tensors_moved() * numel * dt.size_in_bytes();
                let mut r = Map::new();
                r.insert("op".into(), json!(op.name()));
                r.insert("dtype".into(), json!(dtype_name(dt)));
                r.insert("layout".into(), json!("cf"));
                r.insert("dims".into(), json!(dims));
                r.insert("bytes".into(), json!(bytes));
                r.insert("loadavg".into(), json!(loadavg()));
                let dims_s = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
                match &out.timing {
                    Ok(t) => {
                        let gbps = bytes as f64 / (t.median_ms * 1e-3) / 1e9;
                        r.insert("candle_ms".into(), json!(t.median_ms));
                        r.insert("candle_min_ms".into(), json!(t.min_ms));
                        r.insert("reps".into(), json!(t.reps));
                        r.insert("candle_gbps".into(), json!(gbps));
                        r.insert("stats_dtype".into(), json!(out.stats_dtype.map(dtype_name)));
                        let extra = out
                            .extra
                            .iter()
                            .map(|(k, v)| format!("{k}={:.3}", v.as_f64().unwrap_or(f64::NAN)))
                            .collect::<Vec<_>>()
                            .join(" ");
                        println!(
                            "{:<14} {:<5} {:<18} {:>10.3} {:>10.2}  {extra}  [load {}]",
                            op.name(),
                            dtype_name(dt),
                            dims_s,
                            t.median_ms,
                            gbps,
                            loadavg()
                        );
                    }
                    Err(e) => {
                        r.insert("candle_ms".into(), Value::Null);
                        r.insert("error".into(), json!(e));
                        println!(
                            "{:<14} {:<5} {:<18} {:>10} {:>10}  error: {e}",
                            op.name(),
                            dtype_name(dt),
                            dims_s,
                            "-",
                            "-"
                        );
                    }
                }
                r.extend(out.extra);
                records.push(Value::Object(r));
                write(&records, false)?;
            }
        }
    }
    write(&records, true)?;
    if let Some(path) = &args.json {
        println!("wrote {}", path.display());
    }
    Ok(())
}
