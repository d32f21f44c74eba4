//! The functional API on buffers you own: training forward, backward, inference.
//!
//! `cargo run --release --example functional`

use bnorm::ops::{self, Backward, ForwardInference, ForwardTraining};
use bnorm::{Config, Device, Shape};

fn main() -> bnorm::Result<()> {
    let dev = Device::auto()?; // BNORM_DEVICE, else a usable GPU, else the CPU
    println!("device: {dev} ({})", dev.reason());

    let shape = Shape::channels_last(&[16, 32, 32, 64])?; // NHWC, C = 64
    let c = shape.c();
    let x: Vec<f32> = (0..shape.numel()).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
    let (weight, bias) = (vec![1.0f32; c], vec![0.0f32; c]);
    let (mut running_mean, mut running_var, mut batches) = (vec![0.0f32; c], vec![1.0f32; c], 0u64);
    let (mut saved_mean, mut saved_invstd) = (vec![0.0f32; c], vec![0.0f32; c]);
    let cfg = Config::default(); // eps 1e-5, PyTorch momentum 0.1

    let mut y = vec![0.0f32; x.len()];
    ops::forward_training(
        &dev,
        &shape,
        &cfg,
        ForwardTraining::new(&x, &mut y)
            .affine(&weight, &bias)
            .running(&mut running_mean, &mut running_var, &mut batches)
            .saved(&mut saved_mean, &mut saved_invstd),
    )?;

    let dy = vec![1.0f32; x.len()];
    let (mut dx, mut dweight, mut dbias) = (vec![0.0f32; x.len()], vec![0.0f32; c], vec![0.0f32; c]);
    ops::backward(
        &dev,
        &shape,
        &cfg,
        Backward::from_saved(&x, &dy, &mut dx, &saved_mean, &saved_invstd)
            .weight(&weight)
            .param_grads(&mut dweight, &mut dbias),
    )?;
    println!("dbias[0] = {} (= M = {})", dbias[0], shape.m());

    ops::forward_inference(
        &dev,
        &shape,
        &cfg,
        ForwardInference::new(&x, &mut y, &running_mean, &running_var).affine(&weight, &bias),
    )?;
    println!("running_mean[0] after one batch: {}", running_mean[0]);
    Ok(())
}
