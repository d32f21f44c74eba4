//! The full conformance matrix (every op x dtype x layout x fusion x running-stats
//! convention over edge-case shapes) against the float64 reference, on the CPU, at every
//! SIMD level this CPU has, with outputs written through the caches and streamed, and the
//! vector loops with and without software prefetching, and with the small ops run on the
//! thread pool as well as on the calling thread.

use bnorm::check::{failures, standard_suite};
use bnorm::cpu::{CpuDevice, SimdLevel, Stores, INLINE_BELOW};
use bnorm::Device;

fn check_level(level: SimdLevel) {
    check(level, Stores::Cached, false);
}

fn check(level: SimdLevel, stores: Stores, prefetch: bool) {
    check_on(level, stores, prefetch, INLINE_BELOW);
}

fn check_on(level: SimdLevel, stores: Stores, prefetch: bool, inline_below: usize) {
    if !level.is_supported() {
        eprintln!("{level} not supported on this CPU: not run");
        return;
    }
    let cpu = CpuDevice::new().with_simd(level).unwrap().with_stores(stores).with_prefetch(Some(prefetch));
    let dev = Device::from_cpu(cpu.with_inline_below(inline_below), "test");
    let cases = standard_suite();
    assert!(cases.len() > 1000, "suite unexpectedly small: {}", cases.len());
    let f = failures(&dev, &cases);
    assert!(
        f.is_empty(),
        "{} failing cases at {level}, {stores} stores, prefetch {prefetch}, inline below {inline_below}:\n{}",
        f.len(),
        f[..f.len().min(40)].join("\n")
    );
}

#[test]
fn every_case_passes_avx512() {
    check_level(SimdLevel::Avx512);
}

/// Streaming forced: the vector loops start on their width's boundary, so every op's
/// vectors stream (heads and tails shorter than a vector stay cached). Prefetching forced
/// too (on these small inputs it is off by default): the prefetch indices run past the
/// ends of the buffers and must be dropped there.
#[test]
fn every_case_passes_avx512_streaming() {
    check(SimdLevel::Avx512, Stores::Streaming, true);
}

/// Most of the suite's shapes are small enough to run on the calling thread by default:
/// here every op goes to the pool.
#[test]
fn every_case_passes_avx512_on_the_pool() {
    check_on(SimdLevel::Avx512, Stores::Cached, false, 0);
}

#[test]
fn every_case_passes_avx2() {
    check_level(SimdLevel::Avx2);
}

#[test]
fn every_case_passes_avx2_streaming() {
    check(SimdLevel::Avx2, Stores::Streaming, true);
}

#[test]
fn every_case_passes_scalar() {
    check_level(SimdLevel::Scalar);
}
