//! # bnorm: batch normalization for Rust services
//!
//! Batch-norm operators with PyTorch's semantics (`BatchNorm1d/2d/3d`, cuDNN's SPATIAL
//! mode) on `f32`, `f16` and `bf16` activations, channels-first and channels-last, with an
//! optional fused residual add and ReLU. Two backends behind one API: CUDA kernels (with the
//! `cuda` feature, when a GPU is usable) and a multi-threaded SIMD CPU implementation that
//! is picked at run time otherwise.
//!
//! Two levels of API:
//! - [`ops`]: functional calls on buffers you own, like cuDNN's
//!   (`forward_training`, `forward_inference`, `backward`);
//! - [`BatchNorm`]: a layer owning weight, bias and running statistics, with train/eval
//!   modes and PyTorch's state-dict names.
//!
//! ```
//! use bnorm::{BatchNorm, Device, Shape};
//! let mut bn = BatchNorm::builder(64).device(Device::cpu()).build()?;
//! let shape = Shape::channels_first(&[8, 64, 14, 14])?; // NCHW
//! let x: Vec<f32> = (0..shape.numel()).map(|i| (i as f32 * 0.01).sin()).collect();
//! let mut y = vec![0f32; x.len()];
//! bn.forward(&shape, &x, &mut y)?;
//! # Ok::<(), bnorm::Error>(())
//! ```
//!
//! Numerics: statistics accumulate in f32 with Welford's update inside cache-sized chunks
//! and merge with Chan's formula in f64; the [`reference`](mod@crate::reference) module is the float64 oracle
//! every backend is tested against.

pub mod buffer;
pub mod check;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod layer;
pub mod ops;
pub mod reference;
pub mod shape;
pub mod stats;
pub mod suites;
mod validate;

pub use buffer::{Buf, BufMut, Location};
pub use config::{Activation, Config, RunningStats};
pub use device::{Device, DeviceSpec};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layer::{BatchNorm, BatchNormBuilder, StateDict, StateValue};
pub use shape::{Layout, Shape};

/// The README's examples, run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
