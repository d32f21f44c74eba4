//! Benchmark suites (DESIGN.md's `resnet50` and `smoke`).

use bnorm::suites::{RESNET50_CHW, RESNET50_EXTRA, SMOKE};
use bnorm::{DType, Layout};

/// The op a benchmark case times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BenchOp {
    ForwardTrain,
    Inference,
    Backward,
}

impl BenchOp {
    pub const ALL: [BenchOp; 3] = [BenchOp::ForwardTrain, BenchOp::Inference, BenchOp::Backward];

    pub fn name(self) -> &'static str {
        match self {
            BenchOp::ForwardTrain => "forward_train",
            BenchOp::Inference => "inference",
            BenchOp::Backward => "backward",
        }
    }

    /// Passes over the tensor a streaming implementation needs (the pass-count roofline):
    /// forward-train reads x twice and writes y; backward reads x, dy twice and writes dx;
    /// inference reads x and writes y.
    pub fn passes(self) -> usize {
        match self {
            BenchOp::ForwardTrain => 3,
            BenchOp::Inference => 2,
            BenchOp::Backward => 5,
        }
    }

    /// Tensors read once plus written once (the effective-bandwidth numerator).
    pub fn tensors_moved(self) -> usize {
        match self {
            BenchOp::ForwardTrain | BenchOp::Inference => 2,
            BenchOp::Backward => 3,
        }
    }
}

impl std::str::FromStr for BenchOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "forward_train" | "train" | "fwd" => Ok(BenchOp::ForwardTrain),
            "inference" | "infer" | "eval" => Ok(BenchOp::Inference),
            "backward" | "bwd" => Ok(BenchOp::Backward),
            _ => Err(format!("unknown op `{s}` (forward_train, inference, backward)")),
        }
    }
}

/// One timed case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub op: BenchOp,
    pub dtype: DType,
    pub layout: Layout,
    /// `(N, C, *spatial)`.
    pub dims: Vec<usize>,
}

impl Case {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn dims_str(&self) -> String {
        self.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
    }
    /// Bytes of the effective-bandwidth formula.
    pub fn bytes(&self) -> usize {
        self.op.tensors_moved() * self.numel() * self.dtype.size()
    }
}

/// Logical shapes of a suite at the given batch sizes.
pub fn shapes(suite: &str, batches: &[usize]) -> Result<Vec<Vec<usize>>, String> {
    match suite {
        "smoke" => Ok(SMOKE.iter().map(|d| d.to_vec()).collect()),
        "resnet50" => {
            let mut v = Vec::new();
            for &n in batches {
                v.extend(RESNET50_CHW.iter().map(|&(c, h, w)| vec![n, c, h, w]));
            }
            v.extend(RESNET50_EXTRA.iter().map(|d| d.to_vec()));
            Ok(v)
        }
        _ => Err(format!("unknown suite `{suite}` (smoke, resnet50)")),
    }
}

/// Cases: every shape x op x (dtype, layout) combination; 2-D shapes only channels-first
/// (the layouts are the same memory there).
pub fn cases(shapes: &[Vec<usize>], ops: &[BenchOp], combos: &[(DType, Layout)]) -> Vec<Case> {
    let mut out = Vec::new();
    for dims in shapes {
        for &(dtype, layout) in combos {
            if dims.len() == 2 && layout == Layout::ChannelsLast && combos.contains(&(dtype, Layout::ChannelsFirst)) {
                continue;
            }
            let layout = if dims.len() == 2 { Layout::ChannelsFirst } else { layout };
            for &op in ops {
                let c = Case { op, dtype, layout, dims: dims.clone() };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}
