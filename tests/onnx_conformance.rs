//! External conformance: ONNX's reference BatchNormalization cases (node tests "example",
//! "epsilon" and their training_mode forms, and the PyTorch-converted eval cases), written
//! to tests/data/onnx/ by ci/gen_onnx_cases.py from the onnx package.

use bnorm::ops::{self, ForwardInference, ForwardTraining};
use bnorm::{Config, Device, RunningStats, Shape};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    mode: String,
    dims: Vec<usize>,
    epsilon: f32,
    momentum: f32,
    x: Vec<f32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
    input_mean: Vec<f32>,
    input_var: Vec<f32>,
    y: Vec<f32>,
    running_mean: Option<Vec<f32>>,
    running_var: Option<Vec<f32>>,
}

/// The case files, embedded at compile time (so the test binary also runs where the
/// source tree is not, e.g. from the GPU bundle).
const FILES: [&str; 9] = [
    include_str!("data/onnx/node_test_batchnorm_epsilon.json"),
    include_str!("data/onnx/node_test_batchnorm_epsilon_training_mode.json"),
    include_str!("data/onnx/node_test_batchnorm_example.json"),
    include_str!("data/onnx/node_test_batchnorm_example_training_mode.json"),
    include_str!("data/onnx/pytorch-converted_test_BatchNorm1d_3d_input_eval.json"),
    include_str!("data/onnx/pytorch-converted_test_BatchNorm2d_eval.json"),
    include_str!("data/onnx/pytorch-converted_test_BatchNorm2d_momentum_eval.json"),
    include_str!("data/onnx/pytorch-converted_test_BatchNorm3d_eval.json"),
    include_str!("data/onnx/pytorch-converted_test_BatchNorm3d_momentum_eval.json"),
];

fn cases() -> Vec<Case> {
    FILES.iter().map(|t| serde_json::from_str(t).unwrap()).collect()
}

/// Every JSON file in tests/data/onnx is in `FILES` (run where the tree is).
#[test]
fn every_case_file_is_embedded() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/onnx");
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!("{dir} not present (bundle run): not checked");
        return;
    };
    let on_disk =
        entries.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))).count();
    assert_eq!(on_disk, FILES.len());
}

/// ONNX's expected values were computed in float32 by numpy; both sides carry f32 rounding.
fn assert_close(name: &str, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs() + 2e-6;
        assert!((g - w).abs() <= tol, "{name} {what}[{i}]: got {g}, ONNX {w}");
    }
}

#[test]
fn all_onnx_cases_pass() {
    let cases = cases();
    assert!(cases.len() >= 9, "expected the 9 ONNX cases, found {}", cases.len());
    let mut training = 0;
    for c in &cases {
        let shape = Shape::channels_first(&c.dims).unwrap();
        let mut y = vec![0f32; c.x.len()];
        match c.mode.as_str() {
            "inference" => {
                let cfg = Config::default().with_eps(c.epsilon);
                let a = ForwardInference::new(&c.x, &mut y, &c.input_mean, &c.input_var).affine(&c.scale, &c.bias);
                ops::forward_inference(&Device::cpu(), &shape, &cfg, a).unwrap();
            }
            "training" => {
                training += 1;
                // ONNX's momentum is a retention factor and its running_var takes the
                // biased batch variance: the Keras/ONNX convention.
                let cfg = Config::default().with_eps(c.epsilon).with_running_stats(RunningStats::Retention(c.momentum));
                let (mut rm, mut rv, mut t) = (c.input_mean.clone(), c.input_var.clone(), 0u64);
                let a = ForwardTraining::new(&c.x, &mut y).affine(&c.scale, &c.bias).running(&mut rm, &mut rv, &mut t);
                ops::forward_training(&Device::cpu(), &shape, &cfg, a).unwrap();
                assert_close(&c.name, "running_mean", &rm, c.running_mean.as_ref().unwrap());
                assert_close(&c.name, "running_var", &rv, c.running_var.as_ref().unwrap());
                assert_eq!(t, 1);
            }
            m => panic!("{}: unknown mode {m}", c.name),
        }
        assert_close(&c.name, "y", &y, &c.y);
    }
    assert_eq!(training, 2, "expected the two training_mode cases");
}
