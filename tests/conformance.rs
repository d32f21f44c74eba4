//! The full conformance matrix (every op x dtype x layout x fusion x running-stats
//! convention over edge-case shapes) against the float64 reference, on the CPU, at every
//! SIMD level this CPU has.

use bnorm::check::{run_suite, standard_suite, CaseResult};
use bnorm::cpu::{CpuDevice, SimdLevel};
use bnorm::Device;

fn failures(dev: &Device) -> Vec<String> {
    let cases = standard_suite();
    assert!(cases.len() > 1000, "suite unexpectedly small: {}", cases.len());
    run_suite(dev, &cases, |_| {})
        .into_iter()
        .filter_map(|r| match r {
            Ok(r) if r.passed() => None,
            Ok(r) => Some(describe(&r)),
            Err((spec, e)) => Some(format!("{}: error {e}", spec.label())),
        })
        .collect()
}

fn describe(r: &CaseResult) -> String {
    let (name, c) = r.worst().unwrap();
    format!(
        "{}: {name} max_abs {:.3e} max_rel {:.3e} ratio {:.2} at {}",
        r.spec.label(),
        c.max_abs,
        c.max_rel,
        c.worst_ratio,
        c.worst_index
    )
}

fn check_level(level: SimdLevel) {
    if !level.is_supported() {
        eprintln!("{level} not supported on this CPU: not run");
        return;
    }
    let dev = Device::from_cpu(CpuDevice::new().with_simd(level).unwrap(), "test");
    let f = failures(&dev);
    assert!(f.is_empty(), "{} failing cases at {level}:\n{}", f.len(), f[..f.len().min(40)].join("\n"));
}

#[test]
fn every_case_passes_avx512() {
    check_level(SimdLevel::Avx512);
}

#[test]
fn every_case_passes_avx2() {
    check_level(SimdLevel::Avx2);
}

#[test]
fn every_case_passes_scalar() {
    check_level(SimdLevel::Scalar);
}
