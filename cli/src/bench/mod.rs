//! `bnorm bench`: median time, effective bandwidth and % of a plain copy measured in the
//! same run, per case; a table on stdout, `--json FILE` for machines, progress on stderr.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cudnn")]
mod cudnn;
mod report;
pub mod suites;

use crate::DeviceArgs;
use bnorm::{DType, Layout};
use indicatif::{ProgressBar, ProgressStyle};
use report::Record;
use std::path::PathBuf;
use std::process::ExitCode;
use suites::{BenchOp, Case};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// `smoke` or `resnet50`. Without it: resnet50 at batch 32, f32 channels-first and bf16
    /// channels-last, all three ops (the headline columns; about a minute on 2 cores).
    #[arg(long)]
    suite: Option<String>,
    /// Batch sizes of the resnet50 shapes (repeatable; default 32).
    #[arg(long)]
    batch: Vec<usize>,
    /// Batch sizes of the resnet50 shapes for the inference op (repeatable; default: --batch).
    #[arg(long = "infer-batch")]
    infer_batch: Vec<usize>,
    /// Element types, comma-separated (default for a named suite: f32,f16,bf16).
    #[arg(long, value_delimiter = ',')]
    dtypes: Vec<DType>,
    /// Layouts, comma-separated: cf, cl (default for a named suite: both).
    #[arg(long, value_delimiter = ',')]
    layouts: Vec<Layout>,
    /// (dtype, layout) pairs instead of the --dtypes x --layouts product, comma-separated
    /// `DTYPE:LAYOUT`, e.g. `f32:cf,f16:cl,bf16:cl` (the headline columns).
    #[arg(long, value_delimiter = ',', value_parser = parse_combo)]
    combos: Vec<(DType, Layout)>,
    /// Ops, comma-separated: forward_train, inference, backward (default: all).
    #[arg(long, value_delimiter = ',')]
    ops: Vec<BenchOp>,
    /// Only cases whose dims string (e.g. `32x64x56x56`) contains this (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Minimum timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Untimed calls before the timed ones.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// A peer measured in this run, on this device: `cudnn` (GPU; needs the `cudnn` feature
    /// and libcudnn at run time). Repeatable.
    #[arg(long)]
    peer: Vec<String>,
    /// Write the records as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A peer's timings to put beside ours: `NAME=FILE`, FILE's records carrying
    /// `NAME_ms` (e.g. `torch=torch.json` from ci/torch_bench.py). Repeatable.
    #[arg(long = "peer-json")]
    peer_json: Vec<String>,
}

/// Median and spread of one case's timings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub reps: usize,
}

impl Timing {
    pub fn from_samples(mut t: Vec<f64>) -> Timing {
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let median = if n % 2 == 1 { t[n / 2] } else { 0.5 * (t[n / 2 - 1] + t[n / 2]) };
        Timing { median_ms: median, min_ms: t[0], reps: n }
    }
}

/// What a runner's in-process peers measured on the last case: `NAME` -> ms (becomes
/// `NAME_ms`), and extra record fields (per-mode times, output checks).
#[derive(Debug, Default)]
pub struct PeerResults {
    pub times: Vec<(String, f64)>,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Something that can time cases and a plain copy on one device.
pub trait Runner {
    fn time(&mut self, case: &Case) -> Result<Timing, String>;
    /// Effective bandwidth (bytes read + written per second / 1e9) of a plain copy of `bytes`.
    fn copy_gbps(&mut self, bytes: usize) -> Result<f64, String>;
    /// The size of the big reference copy.
    fn big_copy_bytes(&self) -> usize {
        256 << 20
    }
    /// Where a working set of `bytes` lives on this device (L2, L3, DRAM).
    fn regime(&self, bytes: usize) -> &'static str {
        report::cpu_regime(bytes)
    }
    /// What in-process peers measured with the last `time` call (taken: the next call
    /// returns nothing until `time` runs again).
    fn take_peer_results(&mut self) -> PeerResults {
        PeerResults::default()
    }
    /// Run-wide facts for the report (device details, versions, method).
    fn meta(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
}

/// `f16:cl` -> (F16, ChannelsLast).
fn parse_combo(s: &str) -> Result<(DType, Layout), String> {
    let (d, l) = s.split_once(':').ok_or_else(|| format!("`{s}`: expected DTYPE:LAYOUT, e.g. f16:cl"))?;
    let d: DType = d.parse().map_err(|e| format!("`{s}`: {e}"))?;
    let l: Layout = l.parse().map_err(|e| format!("`{s}`: {e}"))?;
    Ok((d, l))
}

/// The runner for `dev`, with the in-process peers `--peer` asks for.
fn make_runner(dev: &bnorm::Device, a: &BenchArgs) -> Result<Box<dyn Runner>, String> {
    if dev.as_cpu().is_some() {
        if let Some(p) = a.peer.first() {
            return Err(format!("--peer {p}: no in-process peer on the CPU (use --peer-json)"));
        }
        let mut r = cpu::CpuRunner::new(dev.clone(), a.reps);
        r.warmup = a.warmup;
        return Ok(Box::new(r));
    }
    #[cfg(feature = "cuda")]
    if dev.as_cuda().is_some() {
        let mut r = cuda::CudaRunner::new(dev.clone(), a.reps.max(1), a.warmup)?;
        for p in &a.peer {
            r.add_peer(p)?;
        }
        return Ok(Box::new(r));
    }
    Err(format!("bench on {} is not available in this build", dev.name()))
}

pub fn run(a: &BenchArgs) -> Result<ExitCode, String> {
    let dev = a.device.device()?;
    let batches = if a.batch.is_empty() { vec![32] } else { a.batch.clone() };
    let (suite, combos): (&str, Vec<(DType, Layout)>) = match &a.suite {
        None => {
            eprintln!(
                "suite: resnet50 at batch {batches:?}, f32 channels-first and bf16 channels-last \
                 (the headline columns); --suite resnet50 for every dtype and layout, --suite smoke for a quick run"
            );
            ("resnet50", vec![(DType::F32, Layout::ChannelsFirst), (DType::BF16, Layout::ChannelsLast)])
        }
        Some(s) => {
            let dts = if a.dtypes.is_empty() { DType::ALL.to_vec() } else { a.dtypes.clone() };
            let lys = if a.layouts.is_empty() {
                vec![Layout::ChannelsFirst, Layout::ChannelsLast]
            } else {
                a.layouts.clone()
            };
            (s.as_str(), dts.iter().flat_map(|&d| lys.iter().map(move |&l| (d, l))).collect())
        }
    };
    let combos: Vec<(DType, Layout)> = if a.combos.is_empty() {
        combos
            .into_iter()
            .filter(|(d, l)| {
                (a.dtypes.is_empty() || a.dtypes.contains(d)) && (a.layouts.is_empty() || a.layouts.contains(l))
            })
            .collect()
    } else {
        a.combos.clone()
    };
    let ops = if a.ops.is_empty() { BenchOp::ALL.to_vec() } else { a.ops.clone() };
    let mut cases = if a.infer_batch.is_empty() {
        suites::cases(&suites::shapes(suite, &batches)?, &ops, &combos)
    } else {
        // training ops at --batch, inference at --infer-batch (shapes without a batch once)
        let train: Vec<BenchOp> = ops.iter().copied().filter(|&o| o != BenchOp::Inference).collect();
        let mut v = suites::cases(&suites::shapes(suite, &batches)?, &train, &combos);
        if ops.contains(&BenchOp::Inference) {
            for c in suites::cases(&suites::shapes(suite, &a.infer_batch)?, &[BenchOp::Inference], &combos) {
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
        v
    };
    if !a.only.is_empty() {
        cases.retain(|c| a.only.iter().any(|o| c.dims_str().contains(o.as_str())));
    }
    if cases.is_empty() {
        return Err("no cases selected".into());
    }
    eprintln!("device: {dev} ({})", dev.reason());
    let mut runner = make_runner(&dev, a)?;
    let peers = report::load_peers(&a.peer_json)?;

    let big = runner.big_copy_bytes();
    let copy_big = runner.copy_gbps(big)?;
    eprintln!("plain copy of {} MiB: {copy_big:.1} GB/s (read + write)", big >> 20);
    let bar = ProgressBar::new(cases.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").unwrap());
    let mut records = Vec::new();
    let mut copy_cache = std::collections::HashMap::new();
    for case in &cases {
        bar.set_message(format!("{} {} {} {}", case.op.name(), case.dtype, case.layout.short(), case.dims_str()));
        let t = runner.time(case)?;
        let found = runner.take_peer_results();
        let x_bytes = case.numel() * case.dtype.size();
        let copy = match copy_cache.get(&x_bytes) {
            Some(&c) => c,
            None => {
                let c = runner.copy_gbps(x_bytes)?;
                copy_cache.insert(x_bytes, c);
                c
            }
        };
        let regime = runner.regime(case.op.tensors_moved() * x_bytes);
        let mut r = Record::new(case, t, copy, regime, &peers);
        for (name, ms) in found.times {
            r.peers.insert(format!("{name}_ms"), ms);
        }
        r.extra = found.extra;
        records.push(r);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut meta = report::Meta::collect(&dev, copy_big, big, suite, &batches);
    meta.extra = runner.meta();
    report::print_table(&meta, &records);
    report::print_checks(&records);
    if let Some(p) = &a.json {
        report::write_json(p, &meta, &records)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
