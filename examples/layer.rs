//! The BatchNorm layer: train, eval, PyTorch state dict, bf16 activations.
//!
//! `cargo run --release --example layer`

use bnorm::{bf16, Activation, BatchNorm, RunningStats, Shape, StateValue};

fn main() -> bnorm::Result<()> {
    // nn.BatchNorm2d(64, momentum=None) followed by a fused ReLU
    let mut bn =
        BatchNorm::builder(64).running_stats(RunningStats::CumulativeAverage).activation(Activation::Relu).build()?;
    println!("layer on {}", bn.device());
    let shape = Shape::channels_first(&[8, 64, 28, 28])?;
    let x: Vec<bf16> = (0..shape.numel()).map(|i| bf16::from_f32((i % 97) as f32 * 0.1)).collect();
    let mut y = vec![bf16::ZERO; x.len()];
    for _ in 0..3 {
        bn.forward(&shape, &x, &mut y)?;
    }
    bn.eval();
    bn.forward(&shape, &x, &mut y)?;

    let sd = bn.state_dict_with_prefix("layer1.0.bn1.");
    for (k, v) in &sd {
        match v {
            StateValue::Tensor(t) => println!("{k}: [{}] first {}", t.len(), t[0]),
            StateValue::Count(n) => println!("{k}: {n}"),
        }
    }
    Ok(())
}
