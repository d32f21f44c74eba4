//! The persistent kernels (kernels/persistent.cu) on a GPU, selected as a user would, with
//! `BNORM_CUDA_PERSISTENT=1`: the standard suite's training-forward and backward cases, and
//! shapes that take the cooperative (split) path and the shared-memory storage, against the
//! float64 reference.
//!
//! All need an NVIDIA GPU and are ignored otherwise (`--include-ignored`, ci/gpu-run.sh).
//! The variable is set once, before this binary opens any device; the other test binaries
//! run in their own processes and keep the default path.
#![cfg(feature = "cuda")]

use bnorm::check::{failures, standard_suite, CaseSpec, Op};
use bnorm::{Activation, DType, Device, Layout};
use std::sync::Once;

fn persistent_gpu() -> Device {
    static SET: Once = Once::new();
    // Set before any device is opened in this process (every test goes through here).
    SET.call_once(|| std::env::set_var("BNORM_CUDA_PERSISTENT", "1"));
    let d = Device::cuda(0).expect("cuda:0 (these tests need an NVIDIA GPU and a build with the kernels)");
    assert!(d.as_cuda().unwrap().persistent(), "BNORM_CUDA_PERSISTENT=1 was not picked up");
    d
}

fn assert_pass(cases: &[CaseSpec]) {
    let dev = persistent_gpu();
    let f = failures(&dev, cases);
    assert!(f.is_empty(), "{} of {} cases fail on {dev}:\n{}", f.len(), cases.len(), f[..f.len().min(40)].join("\n"));
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn persistent_standard_suite_passes() {
    let cases: Vec<CaseSpec> = standard_suite()
        .into_iter()
        .filter(|c| matches!(c.op, Op::ForwardTraining | Op::Backward | Op::BackwardEval))
        .collect();
    assert_pass(&cases);
}

/// A few small cases over every path of the persistent kernels, for compute-sanitizer
/// (ci/gpu-run.sh): one block per channel with shared-memory storage, cooperative splits
/// channels-first and channels-last, forward and backward.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn persistent_smoke() {
    let mut cases = Vec::new();
    for (dims, layout, dtype) in [
        // more channels than resident blocks: one block per channel, 10 vectors per thread
        // (8 in registers, 2 in shared memory)
        (&[40usize, 270, 16, 16][..], Layout::ChannelsFirst, DType::F32),
        // few channels: cooperative splits, channels-last and channels-first (vector path)
        (&[32, 8, 8, 8][..], Layout::ChannelsLast, DType::F16),
        (&[2, 3, 96, 100][..], Layout::ChannelsFirst, DType::BF16),
    ] {
        for op in [Op::ForwardTraining, Op::Backward] {
            let mut c = CaseSpec::new(op, dims, layout, dtype);
            c.activation = Activation::Relu;
            cases.push(c);
        }
    }
    assert_pass(&cases);
}

/// Shapes for each path (H100-class GPU: 264 resident blocks): one block per channel with
/// shared-memory storage (300 channels of 7x7 planes at batch 256, scalar path), cooperative
/// splits of a few large channels (vector path), and channels-last tiles split over the
/// grid (BatchNorm1d, NHWC).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn persistent_paths_pass() {
    let shapes: [(&[usize], Layout); 5] = [
        (&[256, 300, 7, 7], Layout::ChannelsFirst),
        (&[64, 8, 28, 28], Layout::ChannelsFirst),
        (&[256, 64, 7, 7], Layout::ChannelsLast),
        (&[4096, 256], Layout::ChannelsFirst),
        (&[16, 24, 20, 20], Layout::ChannelsLast),
    ];
    let mut cases = Vec::new();
    let mut seed = 100;
    for (dims, layout) in shapes {
        for dtype in DType::ALL {
            for op in [Op::ForwardTraining, Op::Backward] {
                for (residual, activation) in [(false, Activation::Identity), (true, Activation::Relu)] {
                    let mut c = CaseSpec::new(op, dims, layout, dtype);
                    c.residual = residual;
                    c.activation = activation;
                    seed += 1;
                    c.seed = seed;
                    cases.push(c);
                }
            }
        }
    }
    assert_pass(&cases);
}
