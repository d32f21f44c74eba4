//! `bnorm bench`: median time, effective bandwidth and % of a plain copy measured in the
//! same run, per case; a table on stdout, `--json FILE` for machines, progress on stderr.

mod cpu;
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
    /// Element types, comma-separated (default for a named suite: f32,f16,bf16).
    #[arg(long, value_delimiter = ',')]
    dtypes: Vec<DType>,
    /// Layouts, comma-separated: cf, cl (default for a named suite: both).
    #[arg(long, value_delimiter = ',')]
    layouts: Vec<Layout>,
    /// Ops, comma-separated: forward_train, inference, backward (default: all).
    #[arg(long, value_delimiter = ',')]
    ops: Vec<BenchOp>,
    /// Only cases whose dims string (e.g. `32x64x56x56`) contains this (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Minimum timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
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

/// Something that can time cases and a plain copy on one device.
pub trait Runner {
    fn time(&mut self, case: &Case) -> Result<Timing, String>;
    /// Effective bandwidth (bytes read + written per second / 1e9) of a plain copy of `bytes`.
    fn copy_gbps(&mut self, bytes: usize) -> Result<f64, String>;
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
    let combos: Vec<(DType, Layout)> = combos
        .into_iter()
        .filter(|(d, l)| {
            (a.dtypes.is_empty() || a.dtypes.contains(d)) && (a.layouts.is_empty() || a.layouts.contains(l))
        })
        .collect();
    let ops = if a.ops.is_empty() { BenchOp::ALL.to_vec() } else { a.ops.clone() };
    let shapes = suites::shapes(suite, &batches)?;
    let mut cases = suites::cases(&shapes, &ops, &combos);
    if !a.only.is_empty() {
        cases.retain(|c| a.only.iter().any(|o| c.dims_str().contains(o.as_str())));
    }
    if cases.is_empty() {
        return Err("no cases selected".into());
    }
    eprintln!("device: {dev} ({})", dev.reason());
    let mut runner: Box<dyn Runner> = match dev.as_cpu() {
        Some(_) => Box::new(cpu::CpuRunner::new(dev.clone(), a.reps)),
        None => return Err(format!("bench on {} is not available in this build", dev.name())),
    };
    let peers = report::load_peers(&a.peer_json)?;

    let big = 256 << 20;
    let copy_big = runner.copy_gbps(big)?;
    eprintln!("plain copy of 256 MiB: {copy_big:.1} GB/s (read + write)");
    let bar = ProgressBar::new(cases.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").unwrap());
    let mut records = Vec::new();
    let mut copy_cache = std::collections::HashMap::new();
    for case in &cases {
        bar.set_message(format!("{} {} {} {}", case.op.name(), case.dtype, case.layout.short(), case.dims_str()));
        let t = runner.time(case)?;
        let x_bytes = case.numel() * case.dtype.size();
        let copy = match copy_cache.get(&x_bytes) {
            Some(&c) => c,
            None => {
                let c = runner.copy_gbps(x_bytes)?;
                copy_cache.insert(x_bytes, c);
                c
            }
        };
        records.push(Record::new(case, t, copy, &peers));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let meta = report::Meta::collect(&dev, copy_big, suite, &batches);
    report::print_table(&meta, &records);
    if let Some(p) = &a.json {
        report::write_json(p, &meta, &records)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
