//! `bnorm check`: the conformance harness on a device, as a pass/fail table.

use crate::DeviceArgs;
use bnorm::check::{adversarial_suite, run_suite, standard_suite, CaseResult, CaseSpec};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Values per channel of the adversarial cases (x = 1e4 + N(0, 1), f32).
    #[arg(long, default_value_t = 10_000_000)]
    adversarial_m: usize,
    /// Print every case, not only the summary per op / dtype / layout.
    #[arg(long)]
    verbose: bool,
}

pub fn run(a: &CheckArgs) -> Result<ExitCode, String> {
    let dev = a.device.device()?;
    println!("device: {dev} ({})", dev.reason());
    let mut cases = standard_suite();
    let adversarial = adversarial_suite(a.adversarial_m);
    let n_std = cases.len();
    cases.extend(adversarial);
    let bar = ProgressBar::new(cases.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} cases {elapsed}").unwrap());
    let results = run_suite(&dev, &cases, |i| bar.set_position(i as u64));
    bar.finish_and_clear();

    // group: op, dtype, layout
    #[derive(Default)]
    struct Row {
        cases: usize,
        failed: usize,
        worst: f64,
        worst_label: String,
        max_abs: f64,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let (spec, ok, worst, max_abs, what) = match r {
            Ok(r) => {
                let (name, c) = r.worst().map(|(n, c)| (*n, *c)).unwrap_or_default();
                (&r.spec, r.passed(), c.worst_ratio, c.max_abs, name.to_string())
            }
            Err((spec, e)) => (spec, false, f64::INFINITY, f64::NAN, format!("error: {e}")),
        };
        let group = if i >= n_std { "adversarial 1e4+N(0,1)".to_string() } else { String::new() };
        let key = format!("{:<14} {:<5} {:<3} {group}", spec.op.name(), spec.dtype, spec.layout.short());
        let row = rows.entry(key).or_default();
        row.cases += 1;
        if !ok {
            row.failed += 1;
            failures.push(describe(spec, r));
        }
        if worst > row.worst || row.worst_label.is_empty() {
            row.worst = worst;
            row.max_abs = max_abs;
            row.worst_label = format!("{what} in {}", spec.label());
        }
        if a.verbose {
            println!("{} {}", if ok { "pass" } else { "FAIL" }, describe(spec, r));
        }
    }
    println!(
        "{:<28} {:>6} {:>6}  {:>9} {:>10}  worst case",
        "op / dtype / layout", "cases", "failed", "err/bound", "max |err|"
    );
    for (k, r) in &rows {
        println!("{:<28} {:>6} {:>6}  {:>9.3} {:>10.2e}  {}", k, r.cases, r.failed, r.worst, r.max_abs, r.worst_label);
    }
    let total = results.len();
    let failed = failures.len();
    println!(
        "{} of {total} cases passed (err/bound <= 1 passes; bounds per DESIGN.md's numerical contract)",
        total - failed
    );
    if failed > 0 {
        println!("failures:");
        for f in failures.iter().take(50) {
            println!("  {f}");
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(spec: &CaseSpec, r: &Result<CaseResult, (CaseSpec, String)>) -> String {
    match r {
        Ok(r) => {
            let parts: Vec<String> =
                r.outputs.iter().map(|(n, c)| format!("{n} {:.2e} ({:.2})", c.max_abs, c.worst_ratio)).collect();
            format!("{}: {}", spec.label(), parts.join(", "))
        }
        Err((_, e)) => format!("{}: error: {e}", spec.label()),
    }
}
