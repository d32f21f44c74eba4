//! The benchmark shapes of DESIGN.md: one table for `bnorm bench`, the criterion benches,
//! the candle peer (`peers/candle-bench`) and the GPU launch-plan printout. The PyTorch
//! script `ci/torch_bench.py` keeps a Python copy, checked against this one by
//! `tests/suites.rs`.

/// Per-image `(C, H, W)` of ResNet-50's BatchNorm2d layers, in network order; a benchmark
/// prepends its batch size.
///
/// ```
/// use bnorm::suites::RESNET50_CHW;
/// let batch32: Vec<[usize; 4]> = RESNET50_CHW.iter().map(|&(c, h, w)| [32, c, h, w]).collect();
/// assert_eq!(batch32[0], [32, 64, 112, 112]);
/// assert_eq!(batch32.len(), 12);
/// ```
pub const RESNET50_CHW: [(usize, usize, usize); 12] = [
    (64, 112, 112),
    (64, 56, 56),
    (256, 56, 56),
    (128, 56, 56),
    (128, 28, 28),
    (512, 28, 28),
    (256, 28, 28),
    (256, 14, 14),
    (1024, 14, 14),
    (512, 14, 14),
    (512, 7, 7),
    (2048, 7, 7),
];

/// Fixed extra shapes of the resnet50 suite, whole (no batch substituted): BatchNorm1d at
/// two aspect ratios and a BatchNorm3d input.
pub const RESNET50_EXTRA: [&[usize]; 3] = [&[4096, 1024], &[256, 4096], &[8, 64, 16, 56, 56]];

/// The smoke suite: a few small shapes (2-D to 5-D) that run in seconds.
pub const SMOKE: [&[usize]; 4] = [&[4, 64, 28, 28], &[4, 32, 7, 7], &[64, 128], &[2, 8, 4, 8, 8]];
