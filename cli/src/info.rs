//! `bnorm info`: what this machine and this build offer.

use bnorm::cpu::{CpuDevice, SimdLevel};
use std::process::ExitCode;

pub fn run() -> Result<ExitCode, String> {
    let cpu = CpuDevice::new();
    println!("bnorm {}", env!("CARGO_PKG_VERSION"));
    println!("cpu:      {} ({} threads)", cpu_model(), cpu.threads());
    println!(
        "  simd:   {} in use (best supported: {}; lanes: {})",
        cpu.simd(),
        SimdLevel::detect(),
        cpu.simd().lanes()
    );
    match std::env::var(bnorm::device::DEVICE_ENV) {
        Ok(v) => println!("  {}={v}", bnorm::device::DEVICE_ENV),
        Err(_) => println!("  {} not set", bnorm::device::DEVICE_ENV),
    }
    cuda_info();
    match bnorm::Device::auto() {
        Ok(d) => println!("auto:     {d} ({})", d.reason()),
        Err(e) => println!("auto:     error: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(feature = "cuda")]
fn cuda_info() {
    println!("cuda:     kernels embedded in this build: {}", bnorm::cuda::KERNELS_EMBEDDED);
    match bnorm::Device::cuda(0) {
        Ok(d) => println!("  {d}"),
        Err(e) => println!("  not usable: {e}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_info() {
    println!("cuda:     this build has no CUDA backend (bnorm-cli built without the `cuda` feature)");
}
