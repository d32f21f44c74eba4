//! Ops small enough to run on the calling thread (`CpuDevice::with_inline_below`) cut
//! their work into the same tasks as with the pool's helpers: both give the same bits, for every op,
//! dtype and memory pattern (planes with few and many channels, the fused channels-first
//! path, rows), with ReLU, residual and parameter gradients. (Both run on the same input
//! buffers: the rows kernels' summation order depends on where `x` starts in memory.)
//! Ops called from several threads at once, or from inside the pool, give the same bits
//! too.

use bnorm::cpu::CpuDevice;
use bnorm::shape::Layout;
use bnorm::{bf16, f16, ops, Activation, Config, Device, Element, Shape};

/// Every output of forward-train, inference and backward on `dev` from `x`, `z` and `dy`,
/// as f32 bits.
fn outputs<T: Element>(dev: &Device, shape: &Shape, (x, z, dy): (&[T], &[T], &[T])) -> Vec<Vec<u32>> {
    let (n, c) = (shape.numel(), shape.c());
    let w: Vec<f32> = (0..c).map(|j| 0.5 + j as f32 / c as f32).collect();
    let b: Vec<f32> = (0..c).map(|j| j as f32 * 0.01 - 0.2).collect();
    let cfg = Config { activation: Activation::Relu, ..Config::default() };
    let (mut y, mut yi, mut dx, mut dz) =
        (vec![T::default(); n], vec![T::default(); n], vec![T::default(); n], vec![T::default(); n]);
    let (mut sm, mut si, mut rm, mut rv) = (vec![0f32; c], vec![0f32; c], vec![0.1f32; c], vec![2f32; c]);
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    let mut tracked = 0u64;
    let f = ops::ForwardTraining::new(x, &mut y)
        .affine(&w, &b)
        .residual(z)
        .running(&mut rm, &mut rv, &mut tracked)
        .saved(&mut sm, &mut si);
    ops::forward_training(dev, shape, &cfg, f).unwrap();
    let inf = ops::ForwardInference::new(x, &mut yi, &rm, &rv).affine(&w, &b).residual(z);
    ops::forward_inference(dev, shape, &cfg, inf).unwrap();
    let bw = ops::Backward::from_saved(x, dy, &mut dx, &sm, &si)
        .weight(&w)
        .output(&y)
        .residual_grad(&mut dz)
        .param_grads(&mut dw, &mut db);
    ops::backward(dev, shape, &cfg, bw).unwrap();
    let bits = |v: &[T]| v.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
    let fbits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    vec![
        bits(&y),
        bits(&yi),
        bits(&dx),
        bits(&dz),
        fbits(&sm),
        fbits(&si),
        fbits(&rm),
        fbits(&rv),
        fbits(&dw),
        fbits(&db),
    ]
}

/// `x`, `z` and `dy` for `shape`.
fn inputs<T: Element>(shape: &Shape) -> [Vec<T>; 3] {
    let val = |i: usize, k: usize| T::from_f32_rounded(((i * k % 1013) as f32) * 0.01 - 4.0 + (i % 7) as f32 * 1e-3);
    [7919, 31, 104_729].map(|k| (0..shape.numel()).map(|i| val(i, k)).collect())
}

fn same_bits<T: Element>(dims: &[usize], layout: Layout) {
    let shape = Shape::from_logical(dims, layout).unwrap();
    let cpu = CpuDevice::new().with_threads(2).unwrap();
    let pooled = Device::from_cpu(cpu.clone().with_inline_below(0), "pooled");
    let inline = Device::from_cpu(cpu.with_inline_below(usize::MAX), "inline");
    let [x, z, dy] = inputs::<T>(&shape);
    let inputs = (&x[..], &z[..], &dy[..]);
    let (a, b) = (outputs::<T>(&pooled, &shape, inputs), outputs::<T>(&inline, &shape, inputs));
    assert_same::<T>(&a, &b, dims, layout);
}

/// `a` and `b` (as [`outputs`] returns them) are the same bits.
fn assert_same<T: Element>(a: &[Vec<u32>], b: &[Vec<u32>], dims: &[usize], layout: Layout) {
    let names = [
        "y",
        "y (inference)",
        "dx",
        "dz",
        "saved_mean",
        "saved_invstd",
        "running_mean",
        "running_var",
        "dweight",
        "dbias",
    ];
    for (k, name) in names.iter().enumerate() {
        let first = a[k].iter().zip(&b[k]).position(|(p, q)| p != q);
        assert!(
            first.is_none(),
            "{dims:?} {layout:?} {}: {name} differs at {first:?}: {:?}",
            T::DTYPE,
            first.map(|i| (f32::from_bits(a[k][i]), f32::from_bits(b[k][i])))
        );
    }
}

#[test]
fn inline_ops_give_the_pools_bits() {
    let cases: [(&[usize], Layout); 6] = [
        (&[64, 3, 40, 40], Layout::ChannelsFirst), // few channels: each split over the batch
        (&[8, 64, 14, 14], Layout::ChannelsFirst), // fused, cache-blocked groups
        (&[4, 48, 7, 7], Layout::ChannelsFirst),   // runs shorter than a vector
        (&[16, 64, 28, 28], Layout::ChannelsLast), // rows, register tiles
        (&[3000, 37], Layout::ChannelsFirst),      // rows with a scalar tail
        (&[2, 5, 3, 20, 20], Layout::ChannelsLast),
    ];
    for (dims, layout) in cases {
        same_bits::<f32>(dims, layout);
        same_bits::<f16>(dims, layout);
        same_bits::<bf16>(dims, layout);
    }
}

/// Four threads calling ops on one device at once (each running its own op with helpers
/// from the same pool), and ops called from inside the device's pool, give the bits of the
/// same ops run one at a time on the calling thread alone.
#[test]
fn concurrent_and_nested_calls_give_the_same_bits() {
    let cpu = CpuDevice::new().with_threads(2).unwrap();
    let pooled = Device::from_cpu(cpu.clone().with_inline_below(0), "pooled");
    let inline = Device::from_cpu(cpu.clone().with_inline_below(usize::MAX), "inline");
    let cases: [(&[usize], Layout); 3] = [
        (&[16, 64, 28, 28], Layout::ChannelsLast),
        (&[8, 64, 14, 14], Layout::ChannelsFirst),
        (&[3000, 37], Layout::ChannelsFirst),
    ];
    for (dims, layout) in cases {
        let shape = Shape::from_logical(dims, layout).unwrap();
        let [x, z, dy] = inputs::<f32>(&shape);
        let inputs = (&x[..], &z[..], &dy[..]);
        let alone = outputs::<f32>(&inline, &shape, inputs);
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..3).map(|_| outputs::<f32>(&pooled, &shape, inputs)).collect::<Vec<_>>()))
                .collect();
            for run in runs {
                run.join().unwrap().iter().for_each(|got| assert_same::<f32>(got, &alone, dims, layout));
            }
        });
        let nested = cpu.install(|| outputs::<f32>(&pooled, &shape, inputs));
        assert_same::<f32>(&nested, &alone, dims, layout);
    }
}
