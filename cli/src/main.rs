//! `bnorm`: inspect the backends (`info`), check every op against the float64 reference
//! (`check`), and measure them (`bench`).

mod bench;
mod chart;
mod check;
mod info;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "bnorm", version, about = "Batch normalization: backend info, conformance check, benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Device selection shared by every subcommand.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// `auto` (BNORM_DEVICE, else a usable GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads (default: all cores, rayon's global pool).
    #[arg(long)]
    threads: Option<usize>,
    /// Force the CPU SIMD level: scalar, avx2 or avx512 (default: the best available).
    #[arg(long)]
    simd: Option<String>,
}

impl DeviceArgs {
    /// The device these arguments ask for, with the reason it was chosen.
    pub fn device(&self) -> Result<bnorm::Device, String> {
        let spec: bnorm::DeviceSpec = self.device.parse().map_err(|e: bnorm::Error| e.to_string())?;
        let mut dev = match spec {
            bnorm::DeviceSpec::Auto => bnorm::Device::auto(),
            s => bnorm::Device::from_spec(s),
        }
        .map_err(|e| e.to_string())?;
        if let Some(cpu) = dev.as_cpu() {
            let mut cpu = cpu.clone();
            if let Some(t) = self.threads {
                cpu = cpu.with_threads(t).map_err(|e| e.to_string())?;
            }
            if let Some(s) = &self.simd {
                let level: bnorm::cpu::SimdLevel = s.parse()?;
                cpu = cpu.with_simd(level).map_err(|e| e.to_string())?;
            }
            dev = bnorm::Device::from_cpu(cpu, dev.reason().to_string());
        }
        Ok(dev)
    }
}

// Parsed once per process: the size of the bench variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Backends found, CPU SIMD level, thread count, GPU details.
    Info,
    /// Run every op, dtype and layout on random and adversarial data against the float64
    /// reference and print a pass/fail table with the largest errors.
    Check(check::CheckArgs),
    /// Time the ops on a benchmark suite: median time, effective GB/s, % of a plain copy.
    Bench(bench::BenchArgs),
    /// Render a bench JSON (with peers) as an SVG chart of speedups per shape.
    Chart(chart::ChartArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Info => info::run(),
        Command::Check(a) => check::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Chart(a) => chart::run(&a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bnorm: {e}");
            ExitCode::from(2)
        }
    }
}
