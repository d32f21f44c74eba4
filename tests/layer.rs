//! The BatchNorm layer through the public API, against the float64 reference over
//! several training steps, in eval mode, and through its state dict.

use bnorm::check::{generate, Data, Rng};
use bnorm::reference::{self, compare_activations, compare_channels, StatsRef};
use bnorm::{Activation, BatchNorm, Config, Device, Element, Layout, RunningStats, Shape, StateValue};
use half::{bf16, f16};

fn layer(c: usize, conv: RunningStats) -> BatchNorm {
    BatchNorm::builder(c).running_stats(conv).device(Device::cpu()).build().unwrap()
}

/// Three training steps, each checked against the reference chained from the previous
/// step's (f32) running statistics; then eval.
fn train_then_eval<T: Element>(conv: RunningStats, layout: Layout) {
    let shape = Shape::from_logical(&[4, 6, 5, 3], layout).unwrap();
    let mut bn = layer(6, conv);
    let mut rng = Rng::new(11);
    bn.weight_mut().iter_mut().enumerate().for_each(|(i, w)| *w = 0.5 + i as f32 * 0.25);
    bn.bias_mut().iter_mut().enumerate().for_each(|(i, b)| *b = i as f32 * 0.1 - 0.2);
    let cfg = Config::default().with_running_stats(conv);
    let (w, b) = (bn.weight().to_vec(), bn.bias().to_vec());
    for step in 0..3u64 {
        let x: Vec<T> = generate(&mut rng, &shape, Data::Normal);
        let before = (bn.running_mean().to_vec(), bn.running_var().to_vec());
        let r =
            reference::forward_training(&shape, &cfg, &x, None, Some(&w), Some(&b), Some((&before.0, &before.1, step)));
        let mut y = vec![T::default(); x.len()];
        bn.forward(&shape, &x, &mut y).unwrap();
        assert!(compare_activations(&y, &r.y, |_| 0.0).passed(), "{conv} step {step} y");
        assert!(compare_channels(bn.running_mean(), &r.running_mean, Some(&[3.0; 6])).passed(), "{conv} step {step}");
        assert!(compare_channels(bn.running_var(), &r.running_var, None).passed(), "{conv} step {step}");
        assert_eq!(bn.num_batches_tracked(), step + 1);
    }
    bn.eval();
    let x: Vec<T> = generate(&mut rng, &shape, Data::Normal);
    let want =
        reference::forward_inference(&shape, &cfg, &x, None, Some(&w), Some(&b), bn.running_mean(), bn.running_var());
    let mut y = vec![T::default(); x.len()];
    let before = bn.running_mean().to_vec();
    bn.forward(&shape, &x, &mut y).unwrap();
    assert!(compare_activations(&y, &want, |_| 0.0).passed());
    assert_eq!(bn.running_mean(), &before[..], "eval must not update running stats");
    assert_eq!(bn.num_batches_tracked(), 3);
}

#[test]
fn training_steps_match_reference_for_every_convention() {
    for conv in [RunningStats::Momentum(0.1), RunningStats::CumulativeAverage, RunningStats::Retention(0.99)] {
        train_then_eval::<f32>(conv, Layout::ChannelsFirst);
        train_then_eval::<bf16>(conv, Layout::ChannelsLast);
        train_then_eval::<f16>(conv, Layout::ChannelsFirst);
    }
}

#[test]
fn cumulative_average_is_the_mean_of_batch_means() {
    let shape = Shape::channels_first(&[8, 2]).unwrap();
    let mut bn = layer(2, RunningStats::CumulativeAverage);
    let mut means = [0.0f64; 2];
    for k in 0..4 {
        let x: Vec<f32> = (0..16).map(|i| (i * (k + 1)) as f32 * 0.5).collect();
        let mut y = vec![0f32; 16];
        bn.forward(&shape, &x, &mut y).unwrap();
        for (ch, m) in means.iter_mut().enumerate() {
            *m += (0..8).map(|n| x[n * 2 + ch] as f64).sum::<f64>() / 8.0 / 4.0;
        }
    }
    for (got, want) in bn.running_mean().iter().zip(means) {
        approx::assert_relative_eq!(*got as f64, want, max_relative = 1e-6);
    }
}

#[test]
fn backward_accumulates_gradients_and_matches_reference() {
    let shape = Shape::channels_last(&[3, 4, 4, 5]).unwrap();
    let mut bn = BatchNorm::builder(5).activation(Activation::Relu).device(Device::cpu()).build().unwrap();
    let mut rng = Rng::new(3);
    let x: Vec<f32> = generate(&mut rng, &shape, Data::Normal);
    let z: Vec<f32> = generate(&mut rng, &shape, Data::Normal);
    let dy: Vec<f32> = generate(&mut rng, &shape, Data::Normal);
    let mut y = vec![0f32; x.len()];
    bn.forward_add(&shape, &x, &z, &mut y).unwrap();
    let cfg = Config::default().with_activation(Activation::Relu);
    let fwd = reference::forward_training(&shape, &cfg, &x, Some(&z), Some(bn.weight()), Some(bn.bias()), None);
    let (sm, si): (Vec<f32>, Vec<f32>) =
        (fwd.mean.iter().map(|&v| v as f32).collect(), fwd.invstd.iter().map(|&v| v as f32).collect());
    let r = reference::backward(
        &shape,
        &cfg,
        &x,
        Some(&y),
        &dy,
        Some(bn.weight()),
        StatsRef::Saved { mean: &sm, invstd: &si },
    );
    let mut dx = vec![0f32; x.len()];
    let mut dz = vec![0f32; x.len()];
    for _ in 0..2 {
        bn.backward(&shape, &x, Some((&y).into()), &dy, &mut dx, Some((&mut dz).into())).unwrap();
    }
    assert!(compare_activations(&dx, &r.dx, |i| r.dx_allowance[i % 5]).passed());
    assert!(compare_activations(&dz, &r.dz, |_| 0.0).passed());
    let twice = |v: &[f64]| v.iter().map(|g| 2.0 * g).collect::<Vec<_>>();
    let scale2 = |v: &[f64]| v.iter().map(|g| 2.0 * g).collect::<Vec<_>>();
    assert!(compare_channels(bn.grad_weight(), &twice(&r.dweight), Some(&scale2(&r.dweight_scale))).passed());
    assert!(compare_channels(bn.grad_bias(), &twice(&r.dbias), Some(&scale2(&r.dbias_scale))).passed());
    bn.zero_grad();
    assert!(bn.grad_bias().iter().all(|&g| g == 0.0));
}

#[test]
fn eval_without_running_stats_uses_batch_statistics() {
    let shape = Shape::channels_first(&[4, 3, 7]).unwrap();
    let mut bn = BatchNorm::builder(3).track_running_stats(false).device(Device::cpu()).build().unwrap();
    bn.eval();
    let x: Vec<f32> = (0..84).map(|i| (i as f32 * 0.3).cos() * 5.0 + 2.0).collect();
    let mut y = vec![0f32; 84];
    bn.forward(&shape, &x, &mut y).unwrap();
    let r = reference::forward_training(&shape, &Config::default(), &x, None, Some(bn.weight()), Some(bn.bias()), None);
    assert!(compare_activations(&y, &r.y, |_| 0.0).passed());
    assert_eq!(bn.num_batches_tracked(), 0);
    assert!(!bn.state_dict().contains_key("running_mean"));
}

#[test]
fn state_dict_uses_pytorch_names_and_round_trips() {
    let mut a = layer(3, RunningStats::default());
    let shape = Shape::channels_first(&[5, 3]).unwrap();
    let x: Vec<f32> = (0..15).map(|i| i as f32).collect();
    let mut y = vec![0f32; 15];
    a.forward(&shape, &x, &mut y).unwrap();
    let sd = a.state_dict_with_prefix("layer1.0.bn1.");
    let keys: Vec<&str> = sd.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "layer1.0.bn1.bias",
            "layer1.0.bn1.num_batches_tracked",
            "layer1.0.bn1.running_mean",
            "layer1.0.bn1.running_var",
            "layer1.0.bn1.weight"
        ]
    );
    assert_eq!(sd["layer1.0.bn1.num_batches_tracked"], StateValue::Count(1));
    let mut b = layer(3, RunningStats::default());
    b.load_state_dict_with_prefix(&sd, "layer1.0.bn1.").unwrap();
    assert_eq!(a.running_mean(), b.running_mean());
    assert_eq!(a.running_var(), b.running_var());
    assert_eq!(b.num_batches_tracked(), 1);
    let no_affine = BatchNorm::builder(3).affine(false).device(Device::cpu()).build().unwrap();
    assert!(!no_affine.state_dict().contains_key("weight"));
}
