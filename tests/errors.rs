//! One test per bad-input error variant: the op returns that variant, and no output,
//! running statistic or counter is written.

use bnorm::ops::{self, Backward, ForwardInference, ForwardTraining};
use bnorm::{
    Activation, BatchNorm, Config, Device, DeviceSpec, Error, Layout, RunningStats, Shape, StateDict, StateValue,
};

const SENTINEL: f32 = 7.25;

/// All buffers of one op call, pre-filled with a sentinel.
struct Bufs {
    shape: Shape,
    x: Vec<f32>,
    y: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    tracked: u64,
    sm: Vec<f32>,
    si: Vec<f32>,
}

impl Bufs {
    fn new(dims: &[usize]) -> Bufs {
        let shape = Shape::channels_first(dims).unwrap();
        let (n, c) = (shape.numel(), shape.c());
        Bufs {
            x: (0..n).map(|i| (i as f32 * 0.7).sin()).collect(),
            y: vec![SENTINEL; n],
            w: vec![1.5; c],
            b: vec![0.5; c],
            rm: vec![SENTINEL; c],
            rv: vec![SENTINEL; c],
            tracked: 5,
            sm: vec![SENTINEL; c],
            si: vec![SENTINEL; c],
            shape,
        }
    }

    fn train(&mut self, cfg: &Config) -> Result<(), Error> {
        ops::forward_training(
            &Device::cpu(),
            &self.shape,
            cfg,
            ForwardTraining::new(&self.x, &mut self.y)
                .affine(&self.w, &self.b)
                .running(&mut self.rm, &mut self.rv, &mut self.tracked)
                .saved(&mut self.sm, &mut self.si),
        )
    }

    fn assert_untouched(&self) {
        assert!(self.y.iter().all(|&v| v == SENTINEL), "y was written");
        assert!(self.sm.iter().chain(&self.si).all(|&v| v == SENTINEL), "saved stats were written");
        assert!(self.rm.iter().all(|&v| v == SENTINEL || v.is_nan()), "running_mean was written");
        assert_eq!(self.tracked, 5, "num_batches_tracked changed");
    }
}

#[test]
fn invalid_rank() {
    assert!(matches!(Shape::channels_first(&[4]), Err(Error::InvalidRank { dims }) if dims == vec![4]));
    assert!(matches!(Shape::channels_last(&[1, 2, 3, 4, 5, 6]), Err(Error::InvalidRank { .. })));
}

#[test]
fn zero_channels() {
    assert!(matches!(Shape::channels_first(&[4, 0, 2]), Err(Error::ZeroChannels { .. })));
    assert!(matches!(Shape::channels_last(&[4, 2, 0]), Err(Error::ZeroChannels { .. })));
    assert!(matches!(BatchNorm::builder(0).device(Device::cpu()).build(), Err(Error::ZeroChannels { .. })));
}

#[test]
fn empty_reduction() {
    assert!(matches!(Shape::channels_first(&[0, 3]), Err(Error::EmptyReduction { .. })));
    assert!(matches!(Shape::channels_first(&[2, 3, 0, 4]), Err(Error::EmptyReduction { .. })));
}

#[test]
fn shape_overflow() {
    assert!(matches!(Shape::channels_first(&[usize::MAX / 2, 3, 2]), Err(Error::ShapeOverflow { .. })));
}

#[test]
fn single_value_per_channel_in_training() {
    let mut b = Bufs::new(&[1, 3]);
    let e = b.train(&Config::default()).unwrap_err();
    assert_eq!(e, Error::SingleValuePerChannel { dims: vec![1, 3], m: 1 });
    b.assert_untouched();
    // the same shape is fine for inference
    let mut y = vec![SENTINEL; 3];
    ops::forward_inference(
        &Device::cpu(),
        &b.shape,
        &Config::default(),
        ForwardInference::new(&b.x, &mut y, &[0.0; 3], &[1.0; 3]),
    )
    .unwrap();
    let k = 1.0 / (1.0f64 + 1e-5).sqrt();
    assert!(y.iter().zip(&b.x).all(|(a, x)| ((*a as f64) - *x as f64 * k).abs() < 1e-6));
}

#[test]
fn length_mismatch_names_the_argument() {
    let mut b = Bufs::new(&[2, 3, 4]);
    b.x.pop();
    assert_eq!(b.train(&Config::default()).unwrap_err(), Error::LengthMismatch { arg: "x", expected: 24, actual: 23 });
    b.assert_untouched();

    let mut b = Bufs::new(&[2, 3, 4]);
    b.rv.push(1.0);
    assert_eq!(
        b.train(&Config::default()).unwrap_err(),
        Error::LengthMismatch { arg: "running_var", expected: 3, actual: 4 }
    );
    assert!(b.rv.iter().take(3).all(|&v| v == SENTINEL));
    b.assert_untouched();

    let mut b = Bufs::new(&[2, 3, 4]);
    b.w.pop();
    assert!(matches!(b.train(&Config::default()), Err(Error::LengthMismatch { arg: "weight", .. })));
    b.assert_untouched();
}

#[test]
fn invalid_eps() {
    for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
        let mut b = Bufs::new(&[2, 3, 4]);
        let e = b.train(&Config::default().with_eps(eps)).unwrap_err();
        assert!(matches!(e, Error::InvalidEps { .. }), "{e}");
        b.assert_untouched();
    }
}

#[test]
fn invalid_momentum() {
    for r in [RunningStats::Momentum(1.5), RunningStats::Momentum(f32::NAN), RunningStats::Retention(-0.1)] {
        let mut b = Bufs::new(&[2, 3, 4]);
        let e = b.train(&Config::default().with_running_stats(r)).unwrap_err();
        assert!(matches!(e, Error::InvalidMomentum { .. }), "{e}");
        b.assert_untouched();
    }
}

#[test]
fn non_finite_running_stats() {
    let mut b = Bufs::new(&[2, 3, 4]);
    b.rm[1] = f32::NAN;
    let e = b.train(&Config::default()).unwrap_err();
    assert!(matches!(e, Error::NonFiniteStatistic { arg: "running_mean", channel: 1, .. }), "{e}");
    b.assert_untouched();
    assert!(b.rm[0] == SENTINEL && b.rm[2] == SENTINEL);

    let b = Bufs::new(&[2, 3, 4]);
    let mut y = vec![SENTINEL; 24];
    let e = ops::forward_inference(
        &Device::cpu(),
        &b.shape,
        &Config::default(),
        ForwardInference::new(&b.x, &mut y, &[0.0; 3], &[1.0, f32::INFINITY, 1.0]),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NonFiniteStatistic { arg: "running_var", channel: 1, .. }), "{e}");
    assert!(y.iter().all(|&v| v == SENTINEL));

    let mut dx = vec![SENTINEL; 24];
    let e = ops::backward(
        &Device::cpu(),
        &b.shape,
        &Config::default(),
        Backward::from_saved(&b.x, &b.x, &mut dx, &[0.0; 3], &[1.0, 1.0, f32::NAN]),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NonFiniteStatistic { arg: "saved_invstd", channel: 2, .. }), "{e}");
    assert!(dx.iter().all(|&v| v == SENTINEL));
}

#[test]
fn negative_running_variance() {
    let mut b = Bufs::new(&[2, 3, 4]);
    b.rv[2] = -0.5;
    let e = b.train(&Config::default()).unwrap_err();
    assert_eq!(e, Error::NegativeVariance { arg: "running_var", channel: 2, value: -0.5 });
    b.assert_untouched();
}

#[test]
fn missing_and_unexpected_y_in_backward() {
    let b = Bufs::new(&[2, 3, 4]);
    let (mut dx, mut dw, mut db) = (vec![SENTINEL; 24], vec![SENTINEL; 3], vec![SENTINEL; 3]);
    let relu = Config::default().with_activation(Activation::Relu);
    let e = ops::backward(
        &Device::cpu(),
        &b.shape,
        &relu,
        Backward::from_saved(&b.x, &b.x, &mut dx, &[0.0; 3], &[1.0; 3]).param_grads(&mut dw, &mut db),
    )
    .unwrap_err();
    assert!(matches!(e, Error::MissingArgument { arg: "y", .. }), "{e}");
    let e = ops::backward(
        &Device::cpu(),
        &b.shape,
        &Config::default(),
        Backward::from_saved(&b.x, &b.x, &mut dx, &[0.0; 3], &[1.0; 3]).output(&b.x).param_grads(&mut dw, &mut db),
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnexpectedArgument { arg: "y", .. }), "{e}");
    assert!(dx.iter().chain(&dw).chain(&db).all(|&v| v == SENTINEL));
}

#[test]
fn num_features_mismatch_and_no_saved_statistics() {
    let mut bn = BatchNorm::builder(4).device(Device::cpu()).build().unwrap();
    let shape = Shape::channels_first(&[2, 3, 5]).unwrap();
    let x = vec![1.0f32; 30];
    let mut y = vec![SENTINEL; 30];
    assert_eq!(bn.forward(&shape, &x, &mut y).unwrap_err(), Error::NumFeaturesMismatch { expected: 4, actual: 3 });
    assert!(y.iter().all(|&v| v == SENTINEL));
    assert_eq!(bn.num_batches_tracked(), 0);

    let shape = Shape::channels_first(&[2, 4, 5]).unwrap();
    let x: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let mut dx = vec![SENTINEL; 40];
    let e = bn.backward(&shape, &x, None, &x, &mut dx, None).unwrap_err();
    assert!(matches!(e, Error::NoSavedStatistics { .. }), "{e}");
    assert!(dx.iter().all(|&v| v == SENTINEL));
    // after a forward on one shape, backward on another is refused too
    let mut y = vec![0f32; 40];
    bn.forward(&shape, &x, &mut y).unwrap();
    let other = Shape::channels_last(&[2, 5, 4]).unwrap();
    let e = bn.backward(&other, &x, None, &x, &mut dx, None).unwrap_err();
    assert!(matches!(e, Error::NoSavedStatistics { .. }), "{e}");
    assert!(dx.iter().all(|&v| v == SENTINEL));
    assert!(bn.grad_weight().iter().all(|&v| v == 0.0));
}

fn loaded_layer() -> BatchNorm {
    let mut bn = BatchNorm::builder(2).device(Device::cpu()).build().unwrap();
    let mut sd = bn.state_dict();
    sd.insert("weight".into(), StateValue::Tensor(vec![2.0, 3.0]));
    sd.insert("running_var".into(), StateValue::Tensor(vec![4.0, 5.0]));
    sd.insert("num_batches_tracked".into(), StateValue::Count(9));
    bn.load_state_dict(&sd).unwrap();
    bn
}

fn assert_state_unchanged(bn: &BatchNorm) {
    assert_eq!(bn.weight(), &[2.0, 3.0]);
    assert_eq!(bn.running_var(), &[4.0, 5.0]);
    assert_eq!(bn.num_batches_tracked(), 9);
}

#[test]
fn missing_state_key() {
    let mut bn = loaded_layer();
    let mut sd = bn.state_dict();
    sd.insert("weight".into(), StateValue::Tensor(vec![0.0, 0.0]));
    sd.remove("running_mean");
    assert_eq!(bn.load_state_dict(&sd).unwrap_err(), Error::MissingStateKey { key: "running_mean".into() });
    assert_state_unchanged(&bn);
}

#[test]
fn unexpected_state_key() {
    let mut bn = loaded_layer();
    let mut sd: StateDict = bn.state_dict();
    sd.insert("weight".into(), StateValue::Tensor(vec![0.0, 0.0]));
    sd.insert("running_std".into(), StateValue::Tensor(vec![1.0, 1.0]));
    assert_eq!(bn.load_state_dict(&sd).unwrap_err(), Error::UnexpectedStateKey { key: "running_std".into() });
    assert_state_unchanged(&bn);
}

#[test]
fn state_mismatch() {
    let mut bn = loaded_layer();
    let mut sd = bn.state_dict();
    sd.insert("weight".into(), StateValue::Tensor(vec![0.0, 0.0]));
    sd.insert("bias".into(), StateValue::Tensor(vec![0.0, 0.0, 0.0]));
    assert!(matches!(bn.load_state_dict(&sd), Err(Error::StateMismatch { key, .. }) if key == "bias"));
    let mut sd = bn.state_dict();
    sd.insert("num_batches_tracked".into(), StateValue::Tensor(vec![1.0]));
    assert!(matches!(bn.load_state_dict(&sd), Err(Error::StateMismatch { .. })));
    let mut sd = bn.state_dict();
    sd.insert("running_var".into(), StateValue::Tensor(vec![1.0, -1.0]));
    assert!(matches!(bn.load_state_dict(&sd), Err(Error::NegativeVariance { .. })));
    assert_state_unchanged(&bn);
}

#[test]
fn invalid_device_spec() {
    for s in ["tpu", "cuda:", "cuda:-1", "cpu:0"] {
        assert!(matches!(s.parse::<DeviceSpec>(), Err(Error::InvalidDeviceSpec { .. })), "{s}");
    }
}

#[test]
fn device_unavailable_never_panics() {
    // cuda:999 exists nowhere; on a machine without a GPU even cuda:0 is unavailable.
    assert!(matches!(Device::cuda(999), Err(Error::DeviceUnavailable { .. })));
}

#[test]
fn simd_unsupported() {
    use bnorm::cpu::{CpuDevice, SimdLevel};
    match [SimdLevel::Avx512, SimdLevel::Avx2].into_iter().find(|l| !l.is_supported()) {
        Some(level) => assert!(matches!(CpuDevice::new().with_simd(level), Err(Error::SimdUnsupported { .. }))),
        None => {
            // every level is there: the best one is accepted (the refusal itself is covered
            // by the unit test cpu::tests::simd_above_the_best_level_is_refused)
            let dev = CpuDevice::new().with_simd(SimdLevel::Avx512).unwrap();
            assert_eq!(dev.simd(), SimdLevel::Avx512);
        }
    }
}

#[test]
fn layouts_do_not_change_validation() {
    // channels-last shapes with a wrong buffer length are refused the same way
    let shape = Shape::new(&[2, 4, 4, 3], Layout::ChannelsLast).unwrap();
    let x = vec![0f32; shape.numel() - 3];
    let mut y = vec![SENTINEL; shape.numel()];
    let e = ops::forward_training(&Device::cpu(), &shape, &Config::default(), ForwardTraining::new(&x, &mut y))
        .unwrap_err();
    assert_eq!(e, Error::LengthMismatch { arg: "x", expected: 96, actual: 93 });
    assert!(y.iter().all(|&v| v == SENTINEL));
}

/// An eval-mode backward whose running mean lies beyond f16's range still gives finite
/// gradients (the backward sums' mean split must not overflow).
#[test]
fn f16_backward_with_a_running_mean_beyond_f16_range() {
    use bnorm::f16;
    let shape = Shape::channels_first(&[2, 2, 3]).unwrap();
    let x: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32)).collect();
    let dy: Vec<f16> = (0..12).map(|i| f16::from_f32(1.0 + i as f32 * 0.1)).collect();
    let (mut dx, mut dw, mut db) = (vec![f16::ZERO; 12], vec![0f32; 2], vec![0f32; 2]);
    ops::backward(
        &Device::cpu(),
        &shape,
        &Config::default(),
        Backward::from_running(&x, &dy, &mut dx, &[1e6, 0.0], &[1e10, 1.0]).param_grads(&mut dw, &mut db),
    )
    .unwrap();
    assert!(dw.iter().chain(&db).all(|v| v.is_finite()), "{dw:?} {db:?}");
    // dweight of channel 0: sum dy * (x - 1e6) / sqrt(1e10 + eps)
    let want: f64 = [0usize, 1, 2, 6, 7, 8].iter().map(|&i| dy[i].to_f64() * (x[i].to_f64() - 1e6)).sum::<f64>() / 1e5;
    assert!((dw[0] as f64 - want).abs() <= 1e-5 * want.abs(), "{} vs {want}", dw[0]);
}
