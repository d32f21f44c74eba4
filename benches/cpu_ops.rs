//! Criterion benches of the CPU ops on the resnet50 suite at batch 32 (DESIGN.md), in the
//! headline columns: f32 channels-first and bf16 channels-last.
//!
//! `cargo bench --bench cpu_ops` (filter with a substring, e.g. `-- forward_train/f32`).

use bnorm::check::{generate, Data, Rng};
use bnorm::ops::{self, Backward, ForwardInference, ForwardTraining};
use bnorm::suites::RESNET50_CHW;
use bnorm::{bf16, Config, Device, Element, Layout, Shape};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn bench_type<T: Element>(c: &mut Criterion, name: &str, layout: Layout) {
    let dev = Device::cpu();
    let cfg = Config::default();
    for (ch, h, w) in RESNET50_CHW {
        let shape = Shape::from_logical(&[32, ch, h, w], layout).unwrap();
        let n = shape.numel();
        let mut rng = Rng::new(1);
        let x: Vec<T> = generate(&mut rng, &shape, Data::Normal);
        let dy: Vec<T> = generate(&mut rng, &shape, Data::Normal);
        let (wt, bs) = (vec![1f32; ch], vec![0f32; ch]);
        let (mut y, mut dx) = (vec![T::default(); n], vec![T::default(); n]);
        let (mut rm, mut rv, mut t) = (vec![0f32; ch], vec![1f32; ch], 0u64);
        let (mut sm, mut si, mut dw, mut db) = (vec![0f32; ch], vec![0f32; ch], vec![0f32; ch], vec![0f32; ch]);
        let id = format!("32x{ch}x{h}x{w}");
        let bytes = (n * std::mem::size_of::<T>()) as u64;

        let mut g = c.benchmark_group(format!("forward_train/{name}"));
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter(|| {
                let a = ForwardTraining::new(&x, &mut y)
                    .affine(&wt, &bs)
                    .running(&mut rm, &mut rv, &mut t)
                    .saved(&mut sm, &mut si);
                ops::forward_training(&dev, &shape, &cfg, a).unwrap()
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("inference/{name}"));
        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter(|| {
                let a = ForwardInference::new(&x, &mut y, &rm, &rv).affine(&wt, &bs);
                ops::forward_inference(&dev, &shape, &cfg, a).unwrap()
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("backward/{name}"));
        g.throughput(Throughput::Bytes(3 * bytes));
        g.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.iter(|| {
                let a = Backward::from_saved(&x, &dy, &mut dx, &sm, &si).weight(&wt).param_grads(&mut dw, &mut db);
                ops::backward(&dev, &shape, &cfg, a).unwrap()
            })
        });
        g.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_type::<f32>(c, "f32_cf", Layout::ChannelsFirst);
    bench_type::<bf16>(c, "bf16_cl", Layout::ChannelsLast);
}

criterion_group! {
    name = cpu;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(cpu);
