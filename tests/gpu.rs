//! GPU tests: the conformance suites on `cuda:0`, misaligned views, GPU == CPU on ResNet
//! shapes, the public API with the caller's own stream and `CudaSlice` buffers, aliasing
//! detection, and one tensor of more than 2^31 elements.
//!
//! All need an NVIDIA GPU and are ignored otherwise; run them with
//! `cargo test --release --test gpu -- --include-ignored` (or `ci/gpu-run.sh`). A test that
//! cannot run for lack of device memory prints a line starting with `NOT RUN:` and returns;
//! it has then verified nothing (ci/gpu-run.sh reports such lines).
#![cfg(feature = "cuda")]

use bnorm::check::{adversarial_suite, channel_of, failures, residual_allowance, standard_suite, CaseSpec};
use bnorm::cuda::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use bnorm::cuda::CudaDevice;
use bnorm::ops::{self, Backward, ForwardInference, ForwardTraining};
use bnorm::reference::{self, compare_activations, compare_channels, Comparison, StatsRef};
use bnorm::{bf16, f16};
use bnorm::{Activation, Buf, BufMut, Config, Device, Element, Error, Layout, RunningStats, Shape};
use std::sync::Arc;

/// An element type that also lives in cudarc buffers.
trait DevElem: Element + DeviceRepr + ValidAsZeroBits + Default {}
impl<T: Element + DeviceRepr + ValidAsZeroBits + Default> DevElem for T {}

fn gpu() -> Device {
    Device::cuda(0).expect("cuda:0 (these tests need an NVIDIA GPU and a build with the kernels)")
}

fn assert_suite(cases: Vec<CaseSpec>) {
    let dev = gpu();
    let f = failures(&dev, &cases);
    assert!(f.is_empty(), "{} of {} cases fail on {dev}:\n{}", f.len(), cases.len(), f[..f.len().min(40)].join("\n"));
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn standard_suite_passes() {
    assert_suite(standard_suite());
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn adversarial_suite_passes() {
    assert_suite(adversarial_suite(10_000_000));
}

// ---------------------------------------------------------------- helpers for device buffers

fn rng_vec<T: Element>(n: usize, seed: u64, mean: f64, sd: f64) -> Vec<T> {
    let mut r = bnorm::check::Rng::new(seed);
    (0..n).map(|_| T::from_f64_rounded(mean + sd * r.normal())).collect()
}

fn up<T: DevElem>(s: &Arc<CudaStream>, h: &[T]) -> CudaSlice<T> {
    s.clone_htod(h).expect("upload")
}

fn down<T: DevElem>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    s.clone_dtoh(d).expect("download")
}

/// `|a - b| <= rel * |b| + abs` elementwise, reporting the worst element.
fn assert_close<T: Element>(what: &str, got: &[T], want: &[T], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len());
    let mut worst = (0.0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        let r = if g == w { 0.0 } else { (g - w).abs() / (rel * w.abs() + abs) };
        let r = if r.is_nan() { f64::INFINITY } else { r };
        if r > worst.0 {
            worst = (r, i);
        }
    }
    assert!(
        worst.0 <= 1.0,
        "{what}: worst ratio {:.3} at {} (got {:?}, want {:?})",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

fn tol<T: Element>() -> (f64, f64) {
    // two units in the last place of the output type, relative and near zero
    let u = T::ulp(1.0);
    (2.0 * u, 2.0 * u)
}

/// Training forward + backward on the GPU (device buffers on `dev`'s stream, optionally
/// offset by one element inside larger allocations) and on the CPU; each backend within
/// the contract of the f64 reference.
fn gpu_vs_cpu<T: DevElem>(dev: &Device, shape: &Shape, cfg: &Config, misalign: bool) {
    let s = dev.as_cuda().unwrap().stream().clone();
    let (n, c) = (shape.numel(), shape.c());
    let off = usize::from(misalign);
    let x: Vec<T> = rng_vec(n + off, 1, 0.5, 1.5);
    let z: Vec<T> = rng_vec(n + off, 2, 0.0, 1.0);
    let dy: Vec<T> = rng_vec(n + off, 3, 0.0, 1.0);
    let w: Vec<f32> = rng_vec(c, 4, 1.0, 0.3);
    let b: Vec<f32> = rng_vec(c, 5, 0.0, 0.5);
    let relu = cfg.activation == Activation::Relu;

    // CPU
    let cpu = Device::cpu();
    let mut y_cpu = vec![T::default(); n];
    let (mut rm_cpu, mut rv_cpu, mut t_cpu) = (vec![0f32; c], vec![1f32; c], 0u64);
    let (mut sm_cpu, mut si_cpu) = (vec![0f32; c], vec![0f32; c]);
    ops::forward_training(
        &cpu,
        shape,
        cfg,
        ForwardTraining::new(&x[off..], &mut y_cpu)
            .residual(&z[off..])
            .affine(&w, &b)
            .running(&mut rm_cpu, &mut rv_cpu, &mut t_cpu)
            .saved(&mut sm_cpu, &mut si_cpu),
    )
    .unwrap();
    let mut dx_cpu = vec![T::default(); n];
    let mut dz_cpu = vec![T::default(); n];
    let (mut dw_cpu, mut db_cpu) = (vec![0f32; c], vec![0f32; c]);
    let mut bw = Backward::from_saved(&x[off..], &dy[off..], &mut dx_cpu, &sm_cpu, &si_cpu)
        .weight(&w)
        .residual_grad(&mut dz_cpu)
        .param_grads(&mut dw_cpu, &mut db_cpu);
    if relu {
        bw = bw.output(&y_cpu);
    }
    ops::backward(&cpu, shape, cfg, bw).unwrap();

    // GPU
    let dx_ = up(&s, &x);
    let dz_ = up(&s, &z);
    let ddy = up(&s, &dy);
    let dw = up(&s, &w);
    let db = up(&s, &b);
    let mut dyv = s.alloc_zeros::<T>(n + off).unwrap();
    let mut drm = up(&s, &vec![0f32; c]);
    let mut drv = up(&s, &vec![1f32; c]);
    let mut dsm = s.alloc_zeros::<f32>(c).unwrap();
    let mut dsi = s.alloc_zeros::<f32>(c).unwrap();
    let mut t_gpu = 0u64;
    ops::forward_training(
        dev,
        shape,
        cfg,
        ForwardTraining::new(Buf::Cuda(dx_.slice(off..)), BufMut::Cuda(dyv.slice_mut(off..)))
            .residual(Buf::Cuda(dz_.slice(off..)))
            .affine(Buf::Cuda(dw.as_view()), Buf::Cuda(db.as_view()))
            .running(BufMut::Cuda(drm.as_view_mut()), BufMut::Cuda(drv.as_view_mut()), &mut t_gpu)
            .saved(BufMut::Cuda(dsm.as_view_mut()), BufMut::Cuda(dsi.as_view_mut())),
    )
    .unwrap();
    assert_eq!(t_gpu, 1);
    let mut ddx = s.alloc_zeros::<T>(n + off).unwrap();
    let mut ddz = s.alloc_zeros::<T>(n + off).unwrap();
    let mut ddw = s.alloc_zeros::<f32>(c).unwrap();
    let mut ddb = s.alloc_zeros::<f32>(c).unwrap();
    {
        let mut bw = Backward::from_saved(
            Buf::Cuda(dx_.slice(off..)),
            Buf::Cuda(ddy.slice(off..)),
            BufMut::Cuda(ddx.slice_mut(off..)),
            Buf::Cuda(dsm.as_view()),
            Buf::Cuda(dsi.as_view()),
        )
        .weight(Buf::Cuda(dw.as_view()))
        .residual_grad(BufMut::Cuda(ddz.slice_mut(off..)))
        .param_grads(BufMut::Cuda(ddw.as_view_mut()), BufMut::Cuda(ddb.as_view_mut()));
        if relu {
            bw = bw.output(Buf::Cuda(dyv.slice(off..)));
        }
        ops::backward(dev, shape, cfg, bw).unwrap();
    }
    let label = format!("{shape} {} misalign={misalign} {:?}", T::DTYPE, cfg.activation);
    let (xs, zs, dys) = (&x[off..], &z[off..], &dy[off..]);
    let ch = |i: usize| channel_of(shape, i);
    let z_allowance = residual_allowance(Some(zs));
    let gpu_out = Outputs {
        y: down(&s, &dyv)[off..].to_vec(),
        saved: (down(&s, &dsm), down(&s, &dsi)),
        running: (down(&s, &drm), down(&s, &drv)),
        dx: down(&s, &ddx)[off..].to_vec(),
        dz: down(&s, &ddz)[off..].to_vec(),
        grads: (down(&s, &ddw), down(&s, &ddb)),
    };
    let cpu_out = Outputs {
        y: y_cpu,
        saved: (sm_cpu, si_cpu),
        running: (rm_cpu, rv_cpu),
        dx: dx_cpu,
        dz: dz_cpu,
        grads: (dw_cpu, db_cpu),
    };

    // Each backend against the f64 reference under DESIGN.md's contract (never one backend
    // against the other: each rounds once, so their difference can be twice the bound).
    // Training forward: from PyTorch's initial running statistics, as both ran.
    let r = reference::forward_training(shape, cfg, xs, Some(zs), Some(&w), Some(&b), None);
    let sd: Vec<f64> = r.var.iter().map(|v| v.sqrt()).collect();
    for (who, o) in [("gpu", &gpu_out), ("cpu", &cpu_out)] {
        let l = format!("{label} {who}");
        contract(&l, "y", compare_activations(&o.y, &r.y, |i| r.offset_allowance[ch(i)] + z_allowance(i)));
        contract(&l, "saved_mean", compare_channels(&o.saved.0, &r.mean, Some(&sd)));
        contract(&l, "saved_invstd", compare_channels(&o.saved.1, &r.invstd, None));
        contract(&l, "running_mean", compare_channels(&o.running.0, &r.running_mean, Some(&sd)));
        contract(&l, "running_var", compare_channels(&o.running.1, &r.running_var, None));
        // backward: from this backend's own saved statistics and (ReLU) its own output
        let stats = StatsRef::Saved { mean: &o.saved.0, invstd: &o.saved.1 };
        let rb = reference::backward(shape, cfg, xs, relu.then_some(&o.y[..]), dys, Some(&w), stats);
        contract(&l, "dx", compare_activations(&o.dx, &rb.dx, |i| rb.dx_allowance[ch(i)]));
        contract(&l, "dz", compare_activations(&o.dz, &rb.dz, |_| 0.0));
        contract(&l, "dweight", compare_channels(&o.grads.0, &rb.dweight, Some(&rb.dweight_scale)));
        contract(&l, "dbias", compare_channels(&o.grads.1, &rb.dbias, Some(&rb.dbias_scale)));
    }

    // inference from each backend's updated running statistics
    let mut yi_cpu = vec![T::default(); n];
    ops::forward_inference(
        &cpu,
        shape,
        cfg,
        ForwardInference::new(xs, &mut yi_cpu, &cpu_out.running.0, &cpu_out.running.1).affine(&w, &b).residual(zs),
    )
    .unwrap();
    let mut dyi = s.alloc_zeros::<T>(n + off).unwrap();
    ops::forward_inference(
        dev,
        shape,
        cfg,
        ForwardInference::new(
            Buf::Cuda(dx_.slice(off..)),
            BufMut::Cuda(dyi.slice_mut(off..)),
            Buf::Cuda(drm.as_view()),
            Buf::Cuda(drv.as_view()),
        )
        .affine(Buf::Cuda(dw.as_view()), Buf::Cuda(db.as_view()))
        .residual(Buf::Cuda(dz_.slice(off..))),
    )
    .unwrap();
    let yi_gpu = down(&s, &dyi)[off..].to_vec();
    for (who, o, yi) in [("gpu", &gpu_out, &yi_gpu), ("cpu", &cpu_out, &yi_cpu)] {
        let want =
            reference::forward_inference(shape, cfg, xs, Some(zs), Some(&w), Some(&b), &o.running.0, &o.running.1);
        contract(&format!("{label} {who}"), "inference y", compare_activations(yi, &want, &z_allowance));
    }
}

/// One backend's outputs of a training forward and its backward, downloaded.
struct Outputs<T> {
    y: Vec<T>,
    saved: (Vec<f32>, Vec<f32>),
    running: (Vec<f32>, Vec<f32>),
    dx: Vec<T>,
    dz: Vec<T>,
    grads: (Vec<f32>, Vec<f32>),
}

/// Assert a comparison with the f64 reference passed (error within its contract bound).
fn contract(label: &str, what: &str, c: Comparison) {
    assert!(
        c.passed(),
        "{label} {what}: error {:.3} x its bound at {} (max abs {:.3e}, max rel {:.3e}, {} values)",
        c.worst_ratio,
        c.worst_index,
        c.max_abs,
        c.max_rel,
        c.count
    );
}

fn layouts_and_types(dev: &Device, logical: &[usize], cfg: &Config, misalign: bool) {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let shape = Shape::from_logical(logical, layout).unwrap();
        gpu_vs_cpu::<f32>(dev, &shape, cfg, misalign);
        gpu_vs_cpu::<f16>(dev, &shape, cfg, misalign);
        gpu_vs_cpu::<bf16>(dev, &shape, cfg, misalign);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn misaligned_views_match_the_cpu() {
    let dev = gpu();
    let relu = Config::default().with_activation(Activation::Relu);
    for dims in [&[4usize, 8, 16, 16][..], &[3, 16, 7, 5], &[64, 32], &[2, 64, 8, 8]] {
        layouts_and_types(&dev, dims, &Config::default(), true);
        layouts_and_types(&dev, dims, &relu, true);
    }
}

/// Few channels, many values: each channel is split over many blocks whose partials the
/// last block merges (the sanitizer runs of ci/gpu-run.sh use this test for that path).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn split_reductions_match_the_cpu() {
    let dev = gpu();
    let relu = Config::default().with_activation(Activation::Relu);
    for dims in [&[8usize, 2, 128, 128][..], &[4, 3, 100, 101], &[65536, 4]] {
        layouts_and_types(&dev, dims, &Config::default(), false);
        layouts_and_types(&dev, dims, &relu, false);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn resnet_shapes_match_the_cpu() {
    let dev = gpu();
    let cfg = Config::default();
    for dims in [
        &[8usize, 64, 56, 56][..],
        &[8, 256, 14, 14],
        &[8, 2048, 7, 7],
        &[32, 512, 7, 7],
        &[256, 1024],
        &[2, 8, 4, 28, 28],
    ] {
        layouts_and_types(&dev, dims, &cfg, false);
    }
}

// ---------------------------------------------------------------- the caller's stream

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn ops_run_on_the_callers_stream() {
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let dev = Device::from_cuda(CudaDevice::from_stream(stream.clone()).unwrap(), "test: caller's stream");
    assert!(Arc::ptr_eq(dev.as_cuda().unwrap().stream(), &stream));
    // ops on the caller's stream, buffers from `stream` (same code path as the other tests)
    let cfg = Config::default().with_running_stats(RunningStats::CumulativeAverage);
    gpu_vs_cpu::<f32>(&dev, &Shape::channels_first(&[4, 24, 9, 9]).unwrap(), &cfg, false);
    gpu_vs_cpu::<bf16>(&dev, &Shape::channels_last(&[4, 9, 9, 24]).unwrap(), &cfg, false);
    // buffers allocated on another stream of the same context are ordered by cudarc's events
    let other = ctx.new_stream().unwrap();
    let shape = Shape::channels_first(&[2, 3, 10]).unwrap();
    let x = other.clone_htod(&rng_vec::<f32>(60, 9, 0.0, 1.0)).unwrap();
    let mut y = other.alloc_zeros::<f32>(60).unwrap();
    let (rm, rv) = (other.clone_htod(&[0f32; 3]).unwrap(), other.clone_htod(&[1f32; 3]).unwrap());
    ops::forward_inference(
        &dev,
        &shape,
        &cfg,
        ForwardInference::new(
            Buf::Cuda(x.as_view()),
            BufMut::Cuda(y.as_view_mut()),
            Buf::Cuda(rm.as_view()),
            Buf::Cuda(rv.as_view()),
        ),
    )
    .unwrap();
    let got = other.clone_dtoh(&y).unwrap();
    let want: Vec<f32> = other.clone_dtoh(&x).unwrap().iter().map(|v| v / (1.0f32 + 1e-5).sqrt()).collect();
    assert_close("inference across streams", &got, &want, 1e-6, 1e-7);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn overlapping_device_buffers_are_rejected_before_any_write() {
    let dev = gpu();
    let s = dev.as_cuda().unwrap().stream().clone();
    let shape = Shape::channels_first(&[2, 3, 10]).unwrap();
    let x = s.clone_htod(&rng_vec::<f32>(80, 9, 0.0, 1.0)).unwrap();
    let (rm, rv) = (s.clone_htod(&[0f32; 3]).unwrap(), s.clone_htod(&[1f32; 3]).unwrap());
    // A second handle on x's memory, shifted by 20 elements: y overlaps x.
    let ptr = {
        use bnorm::cuda::cudarc::driver::DevicePtr;
        let (p, _sync) = x.device_ptr(&s);
        p
    };
    // SAFETY: the range [ptr + 80 B, ptr + 320 B) lies inside x's allocation of 320 bytes,
    // and `leak` below keeps the alias from freeing it.
    let mut alias: CudaSlice<f32> = unsafe { s.upgrade_device_ptr(ptr + 80, 60) };
    let r = ops::forward_inference(
        &dev,
        &shape,
        &Config::default(),
        ForwardInference::new(
            Buf::Cuda(x.slice(..60)),
            BufMut::Cuda(alias.as_view_mut()),
            Buf::Cuda(rm.as_view()),
            Buf::Cuda(rv.as_view()),
        ),
    );
    let _ = alias.leak();
    assert!(matches!(r, Err(Error::Aliasing { .. })), "{r:?}");
    // nothing was written
    assert_eq!(s.clone_dtoh(&x).unwrap(), rng_vec::<f32>(80, 9, 0.0, 1.0));
}

// ---------------------------------------------------------------- more than 2^31 elements

/// How often each element of a block of `block_len` values occurs in `[start, start + len)`
/// of the sequence that repeats the block.
fn periodic_weights(block_len: usize, start: usize, len: usize) -> Vec<f64> {
    let full = (len / block_len) as f64;
    let rem = len % block_len;
    let first = start % block_len;
    (0..block_len)
        .map(|i| {
            let inside = (i + block_len - first) % block_len < rem;
            full + if inside { 1.0 } else { 0.0 }
        })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn more_than_2_31_elements_f16() {
    let dev = gpu();
    let g = dev.as_cuda().unwrap();
    let s = g.stream().clone();
    // channels-first, 2 channels of 2^30 + 8 values: 2^31 + 16 elements, 4 GiB per tensor
    let per_channel = (1usize << 30) + 8;
    let numel = 2 * per_channel;
    let tensor = numel * 2;
    let need = 4 * tensor + (512 << 20); // x, y, dy, dx + slack
    let (free, _) = g.context().mem_get_info().unwrap();
    if free < need {
        let msg = format!(
            "NOT RUN: more_than_2_31_elements_f16 needs {:.1} GiB of free device memory, {} has {:.1} GiB free",
            need as f64 / (1u64 << 30) as f64,
            dev,
            free as f64 / (1u64 << 30) as f64
        );
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    // x and dy: a random block of L values repeated over the tensor (device-to-device copies)
    const L: usize = 1 << 20;
    let xb: Vec<f16> = rng_vec(L, 21, 3.0, 2.0);
    let gb: Vec<f16> = rng_vec(L, 22, 0.0, 1.0);
    let fill = |block: &[f16]| -> CudaSlice<f16> {
        let mut d = s.alloc_zeros::<f16>(numel).unwrap();
        let b = s.clone_htod(block).unwrap();
        let mut at = 0;
        while at < numel {
            let k = L.min(numel - at);
            s.memcpy_dtod(&b.slice(..k), &mut d.slice_mut(at..at + k)).unwrap();
            at += k;
        }
        d
    };
    let x = fill(&xb);
    let dyv = fill(&gb);
    let mut y = s.alloc_zeros::<f16>(numel).unwrap();
    let mut dx = s.alloc_zeros::<f16>(numel).unwrap();
    let shape = Shape::channels_first(&[1, 2, per_channel]).unwrap();
    let cfg = Config::default();
    let (mut sm, mut si) = (s.alloc_zeros::<f32>(2).unwrap(), s.alloc_zeros::<f32>(2).unwrap());
    let (mut dw, mut db) = (s.alloc_zeros::<f32>(2).unwrap(), s.alloc_zeros::<f32>(2).unwrap());
    ops::forward_training(
        &dev,
        &shape,
        &cfg,
        ForwardTraining::new(Buf::Cuda(x.as_view()), BufMut::Cuda(y.as_view_mut()))
            .saved(BufMut::Cuda(sm.as_view_mut()), BufMut::Cuda(si.as_view_mut())),
    )
    .unwrap();
    ops::backward(
        &dev,
        &shape,
        &cfg,
        Backward::from_saved(
            Buf::Cuda(x.as_view()),
            Buf::Cuda(dyv.as_view()),
            BufMut::Cuda(dx.as_view_mut()),
            Buf::Cuda(sm.as_view()),
            Buf::Cuda(si.as_view()),
        )
        .param_grads(BufMut::Cuda(dw.as_view_mut()), BufMut::Cuda(db.as_view_mut())),
    )
    .unwrap();
    let (sm, si, dw, db) = (down(&s, &sm), down(&s, &si), down(&s, &dw), down(&s, &db));

    // expected per-channel statistics and gradients from the block's multiplicities
    let xf: Vec<f64> = xb.iter().map(|v| v.to_f64()).collect();
    let gf: Vec<f64> = gb.iter().map(|v| v.to_f64()).collect();
    let m = per_channel as f64;
    let mut sums = Vec::new(); // (sum g, sum g * (x - saved mean)) per channel
    for ch in 0..2 {
        let wts = periodic_weights(L, ch * per_channel, per_channel);
        let mean = wts.iter().zip(&xf).map(|(w, v)| w * v).sum::<f64>() / m;
        let var = wts.iter().zip(&xf).map(|(w, v)| w * (v - mean) * (v - mean)).sum::<f64>() / m;
        let inv = 1.0 / (var + 1e-5).sqrt();
        assert!(((sm[ch] as f64 - mean) / var.sqrt()).abs() < 1e-5, "channel {ch} mean {} vs {mean}", sm[ch]);
        assert!(((si[ch] as f64 - inv) / inv).abs() < 1e-5, "channel {ch} invstd {} vs {inv}", si[ch]);
        let (smf, sif) = (sm[ch] as f64, si[ch] as f64);
        let sg: f64 = wts.iter().zip(&gf).map(|(w, g)| w * g).sum();
        let sgx: f64 = wts.iter().zip(gf.iter().zip(&xf)).map(|(w, (g, x))| w * g * (x - smf)).sum();
        let dw_want = sgx * sif;
        let scale = m.sqrt() * 2.0;
        assert!(
            (dw[ch] as f64 - dw_want).abs() <= 1e-5 * dw_want.abs() + 1e-6 * scale,
            "dweight {ch}: {} vs {dw_want}",
            dw[ch]
        );
        assert!((db[ch] as f64 - sg).abs() <= 1e-5 * sg.abs() + 1e-6 * scale, "dbias {ch}: {} vs {sg}", db[ch]);
        sums.push((sg, sgx));
    }
    // y and dx in windows at the start, across 2^31 and at the end
    let (rel, abs) = tol::<f16>();
    for start in [0usize, per_channel - 8, (1 << 31) - 64, numel - 64] {
        let yw = s.clone_dtoh(&y.slice(start..start + 64)).unwrap();
        let dxw = s.clone_dtoh(&dx.slice(start..start + 64)).unwrap();
        let mut y_want = Vec::new();
        let mut dx_want = Vec::new();
        for i in start..start + 64 {
            let ch = i / per_channel;
            let (smf, sif) = (sm[ch] as f64, si[ch] as f64);
            let (sg, sgx) = sums[ch];
            let (xv, gv) = (xf[i % L], gf[i % L]);
            y_want.push(f16::from_f64_rounded((xv - smf) * sif));
            dx_want.push(f16::from_f64_rounded(sif * (gv - sg / m - (xv - smf) * sif * sif * sgx / m)));
        }
        assert_close(&format!("y at {start}"), &yw, &y_want, rel, abs);
        assert_close(&format!("dx at {start}"), &dxw, &dx_want, 2.0 * rel, 2.0 * abs);
    }
}
