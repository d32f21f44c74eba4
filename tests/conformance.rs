//! The full conformance matrix (every op x dtype x layout x fusion x running-stats
//! convention over edge-case shapes) against the float64 reference, on the CPU, at every
//! SIMD level this CPU has, with outputs written through the caches and streamed.

use bnorm::check::{failures, standard_suite};
use bnorm::cpu::{CpuDevice, SimdLevel, Stores};
use bnorm::Device;

fn check_level(level: SimdLevel) {
    check(level, Stores::Cached);
}

fn check(level: SimdLevel, stores: Stores) {
    if !level.is_supported() {
        eprintln!("{level} not supported on this CPU: not run");
        return;
    }
    let dev = Device::from_cpu(CpuDevice::new().with_simd(level).unwrap().with_stores(stores), "test");
    let cases = standard_suite();
    assert!(cases.len() > 1000, "suite unexpectedly small: {}", cases.len());
    let f = failures(&dev, &cases);
    assert!(
        f.is_empty(),
        "{} failing cases at {level}, {stores} stores:\n{}",
        f.len(),
        f[..f.len().min(40)].join("\n")
    );
}

#[test]
fn every_case_passes_avx512() {
    check_level(SimdLevel::Avx512);
}

/// Streaming forced: the vector loops start on their width's boundary, so every op's
/// vectors stream (heads and tails shorter than a vector stay cached).
#[test]
fn every_case_passes_avx512_streaming() {
    check(SimdLevel::Avx512, Stores::Streaming);
}

#[test]
fn every_case_passes_avx2() {
    check_level(SimdLevel::Avx2);
}

#[test]
fn every_case_passes_avx2_streaming() {
    check(SimdLevel::Avx2, Stores::Streaming);
}

#[test]
fn every_case_passes_scalar() {
    check_level(SimdLevel::Scalar);
}
