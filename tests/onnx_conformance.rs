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

fn cases() -> Vec<Case> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/onnx");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files.iter().map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()).collect()
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
