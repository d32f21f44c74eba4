//! Timing on the CPU backend: wall clock around each call, median after warm-up.

use super::suites::{BenchOp, Case};
use super::{Runner, Timing};
use bnorm::check::{generate, Data, Rng};
use bnorm::cpu::CpuDevice;
use bnorm::ops::{self, Backward, ForwardInference, ForwardTraining};
use bnorm::{bf16, f16, Config, DType, Device, Element, Shape};
use rayon::prelude::*;
use std::time::{Duration, Instant};

pub struct CpuRunner {
    dev: Device,
    cpu: CpuDevice,
    pub min_reps: usize,
    pub min_time: Duration,
    pub warmup: usize,
}

impl CpuRunner {
    pub fn new(dev: Device, min_reps: usize) -> Self {
        let cpu = dev.as_cpu().expect("CpuRunner on a CPU device").clone();
        CpuRunner { dev, cpu, min_reps, min_time: Duration::from_millis(150), warmup: 3 }
    }
}

/// Median of at least `min_reps` timed calls (and at least `min_time` in all), after
/// `warmup` untimed calls.
pub fn median_time(
    warmup: usize,
    min_reps: usize,
    min_time: Duration,
    mut f: impl FnMut() -> bnorm::Result<()>,
) -> Result<Timing, String> {
    for _ in 0..warmup {
        f().map_err(|e| e.to_string())?;
    }
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < min_reps || (start.elapsed() < min_time && t.len() < 10_000) {
        let s = Instant::now();
        f().map_err(|e| e.to_string())?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing::from_samples(t))
}

impl Runner for CpuRunner {
    fn time(&mut self, case: &Case) -> Result<Timing, String> {
        match case.dtype {
            DType::F32 => self.time_typed::<f32>(case),
            DType::F16 => self.time_typed::<f16>(case),
            DType::BF16 => self.time_typed::<bf16>(case),
        }
    }

    /// A parallel memcpy over the same threads: `2 * bytes / time`.
    fn copy_gbps(&mut self, bytes: usize) -> Result<f64, String> {
        let n = bytes.div_ceil(4).max(1024);
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut dst = vec![0f32; n];
        let threads = self.cpu.threads();
        let chunk = n.div_ceil(threads * 4).max(4096);
        let t = median_time(self.warmup, self.min_reps, self.min_time, || {
            self.cpu.install(|| {
                dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s))
            });
            Ok(())
        })?;
        std::hint::black_box(&dst);
        Ok(2.0 * (n * 4) as f64 / (t.median_ms * 1e-3) / 1e9)
    }
}

impl CpuRunner {
    fn time_typed<T: Element>(&mut self, case: &Case) -> Result<Timing, String> {
        let shape = Shape::from_logical(&case.dims, case.layout).map_err(|e| e.to_string())?;
        let (numel, c) = (shape.numel(), shape.c());
        let mut rng = Rng::new(42);
        let x: Vec<T> = generate(&mut rng, &shape, Data::Normal);
        let w = vec![1.0f32; c];
        let b = vec![0.0f32; c];
        let cfg = Config::default();
        let mut y = vec![T::default(); numel];
        let (mut rm, mut rv, mut tracked) = (vec![0f32; c], vec![1f32; c], 0u64);
        let (mut sm, mut si) = (vec![0f32; c], vec![0f32; c]);
        let dev = &self.dev;
        let (warmup, reps, min_time) = (self.warmup, self.min_reps, self.min_time);
        match case.op {
            BenchOp::ForwardTrain => median_time(warmup, reps, min_time, || {
                let a = ForwardTraining::new(&x, &mut y)
                    .affine(&w, &b)
                    .running(&mut rm, &mut rv, &mut tracked)
                    .saved(&mut sm, &mut si);
                ops::forward_training(dev, &shape, &cfg, a)
            }),
            BenchOp::Inference => median_time(warmup, reps, min_time, || {
                let a = ForwardInference::new(&x, &mut y, &rm, &rv).affine(&w, &b);
                ops::forward_inference(dev, &shape, &cfg, a)
            }),
            BenchOp::Backward => {
                let a = ForwardTraining::new(&x, &mut y).affine(&w, &b).saved(&mut sm, &mut si);
                ops::forward_training(dev, &shape, &cfg, a).map_err(|e| e.to_string())?;
                let dy: Vec<T> = generate(&mut rng, &shape, Data::Normal);
                let mut dx = vec![T::default(); numel];
                let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                median_time(warmup, reps, min_time, || {
                    let a = Backward::from_saved(&x, &dy, &mut dx, &sm, &si).weight(&w).param_grads(&mut dw, &mut db);
                    ops::backward(dev, &shape, &cfg, a)
                })
            }
        }
    }
}
