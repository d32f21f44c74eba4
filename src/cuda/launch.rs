//! Launch geometry and the kernels' argument block: pure functions of the shape, the
//! buffer addresses and the device's properties, unit-tested without a GPU.
//!
//! The constants here mirror `kernels/common.cuh`; a test reads that file and checks them.

use crate::shape::Pattern;

/// Threads per block, every kernel (1-D channels-first, `bdx * bdy` channels-last).
pub(crate) const THREADS: u32 = 256;
/// Accumulator lanes per thread in the reduction kernels (vector paths).
pub(crate) const REDUCE_LANES: usize = 16;
/// Unroll of the scalar path of the reduction kernels.
pub(crate) const REDUCE_UNROLL_SCALAR: usize = 8;
/// Elements per tensor a thread of an elementwise kernel loads before using them.
pub(crate) const EW_ELEMS: usize = 8;
/// Unroll of the scalar path of the elementwise kernels.
pub(crate) const EW_UNROLL_SCALAR: usize = 4;
/// Vector width (elements) of the channels-last kernels, every dtype.
pub(crate) const VEC_CL: usize = 4;
/// `__launch_bounds__(256, N)`: blocks per SM the compiler must allow (register budget).
pub(crate) const REDUCE_MIN_BLOCKS: u32 = 2;
pub(crate) const EW_MIN_BLOCKS: u32 = 4;
/// Group steps one accumulator lane may take: the split count is raised until every lane
/// stays under it, so the f32 rounding error of a lane does not grow with M (the CPU
/// backend folds its f32 lanes into f64 after as many steps).
pub(crate) const MAX_LANE_STEPS: usize = 256;
/// CUDA's limit on `gridDim.y` (the split count lives there).
pub(crate) const MAX_GRID_Y: usize = 65_535;
/// Our cap on `gridDim.x` (kernels loop over channels / tiles / vectors beyond it).
pub(crate) const MAX_GRID_X: usize = i32::MAX as usize;

/// `BnArgs::flags` bits (`BN_F_*` in kernels/common.cuh).
pub(crate) mod flags {
    pub(crate) const VEC: u32 = 1;
    pub(crate) const RELU: u32 = 2;
    pub(crate) const ADD: u32 = 4;
    pub(crate) const FUSED: u32 = 8;
    pub(crate) const UNBIASED: u32 = 16;
    pub(crate) const TRAINING: u32 = 32;
    pub(crate) const FROM_RUNNING: u32 = 64;
}

// ---------------------------------------------------------------- division by a constant

/// Division by a runtime constant `d` as the kernels do it: `q = (mulhi(n, magic) + n) >> shift`
/// with `shift = ceil(log2 d)` and `magic = floor(2^W * (2^shift - d) / d) + 1` for the word
/// width W (32 or 64). Exact for every `n < 2^(W-1)` (the sum cannot overflow there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DivMod {
    pub d: u64,
    pub magic64: u64,
    /// 0 when `d >= 2^31` (the 32-bit kernels never divide by such a `d`).
    pub magic32: u32,
    pub shift: u32,
}

impl DivMod {
    pub(crate) fn new(d: u64) -> DivMod {
        assert!((1..1 << 63).contains(&d), "DivMod: divisor {d} out of range");
        let shift = 64 - (d - 1).leading_zeros(); // ceil(log2 d); 0 for d == 1
        let d128 = d as u128;
        let magic64 = ((1u128 << 64) * ((1u128 << shift) - d128)) / d128 + 1;
        debug_assert!(magic64 <= u64::MAX as u128);
        let magic32 = if d < 1 << 31 { ((1u64 << 32) * ((1u64 << shift) - d) / d + 1) as u32 } else { 0 };
        DivMod { d, magic64: magic64 as u64, magic32, shift }
    }

    /// The kernels' 32-bit formula (for tests), valid for `n < 2^31`.
    #[cfg(test)]
    pub(crate) fn div32(&self, n: u32) -> u32 {
        let t = ((n as u64 * self.magic32 as u64) >> 32) as u32;
        (t + n) >> self.shift
    }

    /// The kernels' 64-bit formula (for tests), valid for `n < 2^63`.
    #[cfg(test)]
    pub(crate) fn div64(&self, n: u64) -> u64 {
        let t = ((n as u128 * self.magic64 as u128) >> 64) as u64;
        (t + n) >> self.shift
    }
}

// ---------------------------------------------------------------- the argument block

/// Mirror of `struct BnArgs` in kernels/common.cuh: device pointers as `u64` (0 = absent),
/// passed to every kernel by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BnArgs {
    pub x: u64,
    pub z: u64,
    pub y: u64,
    pub dy: u64,
    pub dx: u64,
    pub dz: u64,
    pub weight: u64,
    pub bias: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub saved_mean: u64,
    pub saved_invstd: u64,
    pub dweight: u64,
    pub dbias: u64,
    pub params: u64,
    pub partials: u64,
    pub counters: u64,
    pub n: u64,
    pub c: u64,
    pub s: u64,
    pub numel: u64,
    pub div_inner: DivMod,
    pub div_c: DivMod,
    pub m: f64,
    pub factor: f64,
    pub eps: f32,
    pub flags: u32,
    /// Persistent kernels: storage slots per thread in dynamic shared memory.
    pub slots: u32,
    pub pad1: u32,
}

// SAFETY: `BnArgs` is `repr(C)` plain data (integers and floats, no padding: see the layout
// test), laid out exactly as the kernels' `struct BnArgs`, so the driver may copy its bytes
// into the kernel parameter space.
unsafe impl cudarc::driver::DeviceRepr for BnArgs {}

// ---------------------------------------------------------------- device properties

/// What the launch heuristics need to know about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    pub sms: u32,
    pub l2_bytes: u64,
    /// Shared memory per multiprocessor, bytes (the persistent kernels' storage).
    pub smem_per_sm: u64,
    /// Largest dynamic shared memory one block may opt in to, bytes.
    pub smem_per_block: u64,
    /// Cooperative launches supported (every block of the grid resident, grid-wide barrier).
    pub cooperative: bool,
}

impl Caps {
    /// Blocks of a reduction kernel resident at once (the launch bounds guarantee this many).
    fn reduce_resident(&self) -> usize {
        (self.sms * REDUCE_MIN_BLOCKS) as usize
    }
    fn ew_resident(&self) -> usize {
        (self.sms * EW_MIN_BLOCKS) as usize
    }
}

// ---------------------------------------------------------------- vectors and indices

/// Elements per vector on the vector path: 16 bytes channels-first, 4 elements
/// channels-last (see kernels/common.cuh).
pub(crate) fn vector_elems(p: Pattern, elem_bytes: usize) -> usize {
    match p {
        Pattern::Planes { .. } => 16 / elem_bytes,
        Pattern::Rows { .. } => VEC_CL,
    }
}

/// Whether the vector path applies: the contiguous run (a plane of S, or a row of C) is a
/// whole number of vectors, and every activation buffer of the op starts on a vector
/// boundary (views of a larger allocation may not).
pub(crate) fn use_vectors(p: Pattern, elem_bytes: usize, ptrs: &[u64]) -> bool {
    let v = vector_elems(p, elem_bytes);
    let inner = match p {
        Pattern::Planes { s, .. } => s,
        Pattern::Rows { c, .. } => c,
    };
    let align = (v * elem_bytes) as u64;
    inner % v == 0 && ptrs.iter().all(|&a| a % align == 0)
}

/// Elements per step: the vector width, or 1 on the scalar path.
pub(crate) fn step_elems(p: Pattern, elem_bytes: usize, vectors: bool) -> usize {
    if vectors {
        vector_elems(p, elem_bytes)
    } else {
        1
    }
}

/// The 64-bit index kernels (`_i64`) serve tensors of 2^31 elements or more; below, every
/// index, offset and stride of a launch fits the 32-bit kernels' unsigned arithmetic.
pub(crate) fn wide_index(numel: usize) -> bool {
    numel > i32::MAX as usize
}

pub(crate) fn reduce_unroll(v: usize) -> usize {
    if v == 1 {
        REDUCE_UNROLL_SCALAR
    } else {
        REDUCE_LANES / v
    }
}

pub(crate) fn ew_unroll(v: usize) -> usize {
    if v == 1 {
        EW_UNROLL_SCALAR
    } else {
        (EW_ELEMS / v).max(1)
    }
}

// ---------------------------------------------------------------- plans

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

impl Geometry {
    pub(crate) fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig { grid_dim: self.grid, block_dim: self.block, shared_mem_bytes: self.smem }
    }
}

/// What a reduction (forward statistics, backward sums) computes per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reduction {
    /// (count, mean, m2); 3 per-channel values handed to the normalize pass.
    Moments,
    /// (sum g, sum g * x); 4 per-channel values handed to the dx pass.
    GradSums,
}

impl Reduction {
    fn fields(self) -> usize {
        match self {
            Reduction::Moments => 3,
            Reduction::GradSums => 2,
        }
    }
    fn params(self) -> usize {
        match self {
            Reduction::Moments => 3,
            Reduction::GradSums => 4,
        }
    }
}

/// Launch plan of a reduction kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReducePlan {
    pub geo: Geometry,
    /// Blocks per channel (channels-first) or per channel tile (channels-last): `gridDim.y`.
    pub splits: usize,
    /// One block per channel / tile goes on to run the elementwise pass (one launch).
    pub fused: bool,
    /// Last-block counters the launch uses (one per channel or tile).
    pub counters: usize,
    /// Partial-result slots (`C * splits` when split, else 0), each `fields` floats.
    pub partial_slots: usize,
}

/// Channels-last block shape for `v`-element vectors: `bdx` threads across channel
/// vectors (up to a warp, so a warp reads whole rows), `bdy = 256 / bdx` across rows.
pub(crate) fn rows_block(c: usize, v: usize) -> (u32, u32) {
    let cv = c.div_ceil(v);
    let bdx = cv.next_power_of_two().min(32) as u32;
    (bdx, THREADS / bdx)
}

fn split_count(target_blocks: usize, groups: usize, per_group_step: usize, work: usize) -> usize {
    // `work` vectors (or rows) per channel (tile), consumed `per_group_step` per block and
    // group step. More splits than steps would leave blocks idle; fewer than the accuracy
    // bound would let a lane take more than MAX_LANE_STEPS steps.
    let useful = work.div_ceil(per_group_step).max(1);
    let accuracy = work.div_ceil(per_group_step * MAX_LANE_STEPS).max(1);
    let want = target_blocks.div_ceil(groups).max(1);
    want.max(accuracy).min(useful).clamp(1, MAX_GRID_Y)
}

/// Whether one block per channel (tile) may re-read its slice for the elementwise pass
/// and find it in L2: the slices of all blocks resident at once must fit in half of L2.
pub(crate) fn fits_l2(caps: &Caps, concurrent_blocks: usize, slice_bytes: usize) -> bool {
    (concurrent_blocks as u128) * (slice_bytes as u128) <= (caps.l2_bytes / 2) as u128
}

/// Plan a reduction over `p` with `v`-element steps; `tensor_bytes` is the bytes per
/// element of all tensors the reduction reads (what a fused pass re-reads); `fusable`
/// says whether the op has an elementwise pass that may be fused.
pub(crate) fn plan_reduce(
    caps: &Caps,
    p: Pattern,
    v: usize,
    kind: Reduction,
    tensor_bytes: usize,
    fusable: bool,
) -> ReducePlan {
    let u = reduce_unroll(v);
    let resident = caps.reduce_resident();
    let target = 2 * resident;
    match p {
        Pattern::Planes { n, c, s } => {
            let mv = n * (s / v);
            let splits = split_count(target, c, THREADS as usize * u, mv);
            let slice = n * s * tensor_bytes;
            let fused = fusable && splits == 1 && fits_l2(caps, c.min(resident), slice);
            ReducePlan {
                geo: Geometry { grid: (c.min(MAX_GRID_X) as u32, splits as u32, 1), block: (THREADS, 1, 1), smem: 0 },
                splits,
                fused,
                counters: c,
                partial_slots: if splits > 1 { c * splits } else { 0 },
            }
        }
        Pattern::Rows { rows, c } => {
            let (bdx, bdy) = rows_block(c, v);
            let lanes = bdx as usize * v;
            let tiles = c.div_ceil(lanes);
            let splits = split_count(target, tiles, bdy as usize * u, rows);
            let slice = rows * lanes.min(c) * tensor_bytes;
            let fused = fusable && splits == 1 && fits_l2(caps, tiles.min(resident), slice);
            let smem = (kind.fields() * v * THREADS as usize + kind.params() * lanes) * 4;
            ReducePlan {
                geo: Geometry {
                    grid: (tiles.min(MAX_GRID_X) as u32, splits as u32, 1),
                    block: (bdx, bdy, 1),
                    smem: smem as u32,
                },
                splits,
                fused,
                counters: tiles,
                partial_slots: if splits > 1 { c * splits } else { 0 },
            }
        }
    }
}

// ---------------------------------------------------------------- persistent kernels

/// Floats per stored tensor a thread keeps in registers (`BN_PERSIST_REG_*`,
/// kernels/persistent.cu): forward channels-first, forward channels-last, backward.
pub(crate) const PERSIST_REG_FWD: usize = 32;
pub(crate) const PERSIST_REG_FWD_CL: usize = 16;
pub(crate) const PERSIST_REG_BWD: usize = 16;
/// Floats of dynamic shared memory before the storage, channels-first kernels.
pub(crate) const PERSIST_SCRATCH_CF: usize = 64;
/// `__launch_bounds__(256, 2)`: the plan counts on two resident blocks per SM.
pub(crate) const PERSIST_MIN_BLOCKS: u32 = 2;
/// Shared memory the driver reserves per block (bytes, sm_80 / sm_90).
const SMEM_RESERVED_PER_BLOCK: u64 = 1024;

/// Launch plan of a persistent kernel (`bn_{fwd,bwd}_persist_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PersistPlan {
    pub geo: Geometry,
    /// Blocks per channel (tile); > 1 means a cooperative launch with a grid-wide barrier.
    pub splits: usize,
    /// Storage slots per thread in shared memory (`BnArgs::slots`).
    pub slots: u32,
    /// Partial-result slots in the workspace (`C * splits` when split, else 0).
    pub partial_slots: usize,
}

impl PersistPlan {
    pub(crate) fn cooperative(&self) -> bool {
        self.splits > 1
    }
    /// Blocks of the grid (what must be resident at once when cooperative).
    pub(crate) fn blocks(&self) -> usize {
        self.geo.grid.0 as usize * self.geo.grid.1 as usize
    }
}

/// Plan the persistent path for `p` with `v`-element steps and `tensors` stored tensors
/// (1: forward, x; 2: backward, x and g), or `None` when a channel's (tile's) share does not
/// fit on chip. Splits == 1: one block per channel (tile) at a time, an ordinary launch
/// (the kernel loops over channels). Otherwise a block per (channel or tile, split), every
/// block resident (two per SM), launched cooperatively; chosen when there are fewer
/// channels (tiles) than resident blocks, so small-C tensors still use the whole GPU.
pub(crate) fn plan_persistent(caps: &Caps, p: Pattern, v: usize, tensors: usize) -> Option<PersistPlan> {
    let (items, work, per_step, block, scratch, reg) = match p {
        Pattern::Planes { n, c, s } => {
            let reg = if tensors == 2 { PERSIST_REG_BWD } else { PERSIST_REG_FWD };
            (c, n * (s / v), THREADS as usize, (THREADS, 1, 1), PERSIST_SCRATCH_CF, reg)
        }
        Pattern::Rows { rows, c } => {
            let (bdx, bdy) = rows_block(c, v);
            let reg = if tensors == 2 { PERSIST_REG_BWD } else { PERSIST_REG_FWD_CL };
            let scratch = 3 * v * THREADS as usize + 4 * bdx as usize * v;
            (c.div_ceil(bdx as usize * v), rows, bdy as usize, (bdx, bdy, 1), scratch, reg)
        }
    };
    let rs = (reg / v).max(1);
    // shared memory of one block when two share an SM
    let budget = (caps.smem_per_sm / PERSIST_MIN_BLOCKS as u64).saturating_sub(SMEM_RESERVED_PER_BLOCK);
    let budget = budget.min(caps.smem_per_block) as usize / 4;
    let slot_floats = tensors * v * THREADS as usize;
    let max_slots = budget.checked_sub(scratch)? / slot_floats;
    let capacity = rs + max_slots; // vectors (rows) per thread
    let resident = caps.sms as usize * PERSIST_MIN_BLOCKS as usize;
    let need = |splits: usize| work.div_ceil(splits * per_step);
    let min_splits = work.div_ceil(capacity * per_step).max(1);
    let splits = if items >= resident || !caps.cooperative {
        1
    } else {
        // as many blocks as can be resident, but at least what the storage needs
        (resident / items).min(work.div_ceil(per_step)).max(min_splits)
    };
    if need(splits) > capacity || (splits > 1 && (items * splits > resident || splits > MAX_GRID_Y)) {
        return None;
    }
    let slots = need(splits).saturating_sub(rs);
    let smem = (scratch + slots * slot_floats) * 4;
    let grid_x = if splits > 1 { items } else { items.min(MAX_GRID_X) };
    Some(PersistPlan {
        geo: Geometry { grid: (grid_x as u32, splits as u32, 1), block, smem: smem as u32 },
        splits,
        slots: slots as u32,
        partial_slots: if splits > 1 { items_channels(p) * splits } else { 0 },
    })
}

fn items_channels(p: Pattern) -> usize {
    match p {
        Pattern::Planes { c, .. } | Pattern::Rows { c, .. } => c,
    }
}

/// Plan an elementwise kernel (normalize, dx) over `p` with `v`-element steps.
pub(crate) fn plan_elementwise(caps: &Caps, p: Pattern, v: usize) -> Geometry {
    let u = ew_unroll(v);
    // Enough blocks for several waves; beyond that the kernels loop (grid-stride).
    let cap = caps.ew_resident() * 8;
    match p {
        Pattern::Planes { n, c, s } => {
            let nv = n * c * s / v;
            let blocks = nv.div_ceil(THREADS as usize * u).clamp(1, cap);
            Geometry { grid: (blocks as u32, 1, 1), block: (THREADS, 1, 1), smem: 0 }
        }
        Pattern::Rows { rows, c } => {
            let (bdx, bdy) = rows_block(c, v);
            let tiles = c.div_ceil(bdx as usize * v);
            let row_blocks = rows.div_ceil(bdy as usize * u).min((cap / tiles).max(1)).clamp(1, MAX_GRID_Y);
            Geometry { grid: (tiles.min(MAX_GRID_X) as u32, row_blocks as u32, 1), block: (bdx, bdy, 1), smem: 0 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    const H100: Caps =
        Caps { sms: 132, l2_bytes: 50 << 20, smem_per_sm: 228 << 10, smem_per_block: 227 << 10, cooperative: true };
    const SMALL: Caps =
        Caps { sms: 4, l2_bytes: 4 << 20, smem_per_sm: 100 << 10, smem_per_block: 99 << 10, cooperative: false };

    fn planes(n: usize, c: usize, s: usize) -> Pattern {
        Pattern::Planes { n, c, s }
    }
    fn rows(rows: usize, c: usize) -> Pattern {
        Pattern::Rows { rows, c }
    }

    #[test]
    fn divmod_matches_division() {
        let mut rng = crate::check::Rng::new(11);
        let mut ds: Vec<u64> = (1..=300).collect();
        ds.extend([
            49,
            196,
            784,
            3136,
            12544,
            65535,
            65536,
            65537,
            1 << 20,
            (1 << 31) - 1,
            (1 << 31) + 1,
            1 << 40,
            (1 << 62) + 12345,
        ]);
        ds.extend((0..300).map(|_| 1 + rng.next_u64() % (1 << 31)));
        for &d in &ds {
            let dm = DivMod::new(d);
            let mut ns: Vec<u64> = vec![0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d];
            ns.extend((0..200).map(|_| rng.next_u64() >> 1));
            for &n in &ns {
                let n = n % (1 << 63);
                assert_eq!(dm.div64(n), n / d, "64-bit: {n} / {d}");
                if d < 1 << 31 {
                    let n32 = (n % (1 << 31)) as u32;
                    assert_eq!(dm.div32(n32) as u64, n32 as u64 / d, "32-bit: {n32} / {d}");
                }
            }
            if d < 1 << 31 {
                for n in [(1u32 << 31) - 1, (1u32 << 31) - 2, (1u32 << 30) + 7] {
                    assert_eq!(dm.div32(n) as u64, n as u64 / d, "32-bit edge {n} / {d}");
                }
            }
        }
    }

    #[test]
    fn args_layout_matches_the_kernels() {
        // kernels/common.cuh static_asserts the same numbers.
        assert_eq!(size_of::<DivMod>(), 24);
        assert_eq!(size_of::<BnArgs>(), 248);
        assert_eq!(offset_of!(BnArgs, counters), 128);
        assert_eq!(offset_of!(BnArgs, div_inner), 168);
        assert_eq!(offset_of!(BnArgs, m), 216);
        assert_eq!(offset_of!(BnArgs, eps), 232);
        assert_eq!(offset_of!(BnArgs, flags), 236);
        let cuh = include_str!("../../kernels/common.cuh");
        for (what, want) in [
            ("sizeof(BnArgs) == ", "248"),
            ("offsetof(BnArgs, counters) == ", "128"),
            ("offsetof(BnArgs, div_inner) == ", "168"),
            ("offsetof(BnArgs, m) == ", "216"),
            ("offsetof(BnArgs, eps) == ", "232"),
            ("offsetof(BnArgs, flags) == ", "236"),
        ] {
            assert!(cuh.contains(&format!("{what}{want}")), "common.cuh lacks `{what}{want}`");
        }
    }

    #[test]
    fn constants_match_the_kernels() {
        let cuh = include_str!("../../kernels/common.cuh");
        let define = |name: &str| -> String {
            let line = cuh
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("common.cuh has no #define {name}"));
            line.split_whitespace().nth(2).unwrap().to_string()
        };
        assert_eq!(define("BN_THREADS"), THREADS.to_string());
        assert_eq!(define("BN_REDUCE_LANES"), REDUCE_LANES.to_string());
        assert_eq!(define("BN_REDUCE_UNROLL_SCALAR"), REDUCE_UNROLL_SCALAR.to_string());
        assert_eq!(define("BN_EW_ELEMS"), EW_ELEMS.to_string());
        assert_eq!(define("BN_EW_UNROLL_SCALAR"), EW_UNROLL_SCALAR.to_string());
        assert_eq!(define("BN_VEC_CL"), VEC_CL.to_string());
        for (name, bit) in [
            ("BN_F_VEC", flags::VEC),
            ("BN_F_RELU", flags::RELU),
            ("BN_F_ADD", flags::ADD),
            ("BN_F_FUSED", flags::FUSED),
            ("BN_F_UNBIASED", flags::UNBIASED),
            ("BN_F_TRAINING", flags::TRAINING),
            ("BN_F_FROM_RUNNING", flags::FROM_RUNNING),
        ] {
            assert_eq!(define(name), format!("{bit}u"), "{name}");
        }
        assert!(cuh.contains(&format!("__launch_bounds__(BN_THREADS, {REDUCE_MIN_BLOCKS})")));
        assert!(cuh.contains(&format!("__launch_bounds__(BN_THREADS, {EW_MIN_BLOCKS})")));
    }

    #[test]
    fn vector_path_needs_divisibility_and_alignment() {
        // f32 channels-first: 4 per vector, 16-byte aligned
        assert_eq!(vector_elems(planes(2, 3, 8), 4), 4);
        assert_eq!(vector_elems(planes(2, 3, 8), 2), 8);
        assert_eq!(vector_elems(rows(10, 8), 2), 4);
        assert!(use_vectors(planes(2, 3, 8), 4, &[0x1000, 0x2010]));
        assert!(!use_vectors(planes(2, 3, 8), 4, &[0x1000, 0x2004]), "misaligned view");
        assert!(!use_vectors(planes(2, 3, 7), 4, &[0x1000]), "odd plane");
        assert!(!use_vectors(planes(2, 3, 12), 2, &[0x1000]), "12 halves: not 8-divisible");
        assert!(use_vectors(planes(2, 3, 16), 2, &[0x1000]));
        // channels-last 16-bit: 4 elements = 8 bytes
        assert!(use_vectors(rows(5, 12), 2, &[0x1008]));
        assert!(!use_vectors(rows(5, 12), 2, &[0x1002]));
        assert!(!use_vectors(rows(5, 6), 4, &[0x1000]));
        assert_eq!(step_elems(rows(5, 12), 2, false), 1);
    }

    #[test]
    fn index_width() {
        assert!(!wide_index(0));
        assert!(!wide_index(i32::MAX as usize));
        assert!(wide_index(1 << 31));
        assert!(wide_index(5 << 30));
    }

    #[test]
    fn unrolls() {
        assert_eq!(reduce_unroll(4), 4);
        assert_eq!(reduce_unroll(8), 2);
        assert_eq!(reduce_unroll(1), 8);
        assert_eq!(ew_unroll(4), 2);
        assert_eq!(ew_unroll(8), 1);
        assert_eq!(ew_unroll(1), 4);
    }

    #[test]
    fn rows_blocks_cover_a_warp_of_channel_vectors() {
        assert_eq!(rows_block(1, 1), (1, 256));
        assert_eq!(rows_block(3, 1), (4, 64));
        assert_eq!(rows_block(64, 4), (16, 16));
        assert_eq!(rows_block(256, 4), (32, 8));
        assert_eq!(rows_block(2048, 4), (32, 8));
        for c in 1..300 {
            for v in [1, 4] {
                let (x, y) = rows_block(c, v);
                assert_eq!(x * y, THREADS);
                assert!(x.is_power_of_two() && x <= 32);
            }
        }
    }

    #[test]
    fn small_c_large_m_splits_over_many_blocks() {
        // adversarial: C = 2, M = 1e7, f32 channels-first
        let p = plan_reduce(&H100, planes(4, 2, 2_500_000), 4, Reduction::Moments, 4, true);
        assert!(p.splits >= 132, "{p:?}");
        assert!(!p.fused);
        assert_eq!(p.geo.grid, (2, p.splits as u32, 1));
        assert_eq!(p.partial_slots, 2 * p.splits);
        assert_eq!(p.counters, 2);
        // every lane stays under the accuracy bound
        let steps = (4 * 2_500_000 / 4usize).div_ceil(p.splits * 256 * 4);
        assert!(steps <= MAX_LANE_STEPS, "{steps}");
    }

    #[test]
    fn many_channels_small_slices_fuse() {
        // resnet 2048x7x7, batch 32, f16 channels-first: one block per channel, fused
        let p = plan_reduce(&H100, planes(32, 2048, 49), 1, Reduction::Moments, 2, true);
        assert_eq!(p.splits, 1);
        assert!(p.fused, "{p:?}");
        assert_eq!(p.partial_slots, 0);
        // the same without an elementwise pass to fuse
        let q = plan_reduce(&H100, planes(32, 2048, 49), 1, Reduction::Moments, 2, false);
        assert!(!q.fused);
        // large slices do not fuse: 256 x 56 x 56 f32 per channel is 3.2 MB
        let r = plan_reduce(&H100, planes(256, 256, 3136), 4, Reduction::Moments, 4, true);
        assert!(!r.fused);
    }

    #[test]
    fn split_count_respects_limits() {
        // nothing to split: one block per channel
        let p = plan_reduce(&H100, planes(2, 4, 3), 1, Reduction::GradSums, 8, true);
        assert_eq!(p.splits, 1);
        // huge M, C = 1: capped at the grid limit
        let p = plan_reduce(&H100, planes(1, 1, 1 << 40), 4, Reduction::Moments, 4, false);
        assert_eq!(p.splits, MAX_GRID_Y);
        // rows: C = 1024 f32 (8 tiles of 128 channels), 4096 rows
        let p = plan_reduce(&H100, rows(4096, 1024), 4, Reduction::Moments, 4, true);
        assert_eq!(p.geo.block, (32, 8, 1));
        assert_eq!(p.geo.grid.0, 8);
        assert!(p.splits > 1 && p.splits <= 4096usize.div_ceil(8 * 4));
        assert_eq!(p.counters, 8);
        assert_eq!(p.partial_slots, 1024 * p.splits);
        assert_eq!(p.geo.smem, ((3 * 4 * 256 + 3 * 128) * 4) as u32);
    }

    #[test]
    fn small_device_fuses_less() {
        let p = plan_reduce(&SMALL, planes(8, 64, 4096), 4, Reduction::Moments, 4, true);
        // 8 resident blocks x 128 KiB = 1 MiB <= 2 MiB: fused
        assert_eq!(p.splits, 1);
        assert!(p.fused);
        assert!(fits_l2(&SMALL, 8, 256 << 10));
        assert!(!fits_l2(&SMALL, 9, 256 << 10));
    }

    #[test]
    fn persistent_plans_keep_a_channel_on_chip() {
        // resnet 2048x7x7 at batch 256, f32 channels-first: 12544 values per channel, one
        // block per channel at a time (49 scalar values per thread: 32 in registers)
        let p = plan_persistent(&H100, planes(256, 2048, 49), 1, 1).unwrap();
        assert_eq!(p.splits, 1);
        assert!(!p.cooperative());
        assert_eq!(p.geo.grid, (2048, 1, 1));
        assert_eq!(p.slots, 49 - 32);
        assert_eq!(p.geo.smem as usize, (PERSIST_SCRATCH_CF + 17 * 256) * 4);
        assert_eq!(p.partial_slots, 0);
        // backward stores x and g: 16 registers each, the rest in shared memory
        let b = plan_persistent(&H100, planes(256, 2048, 49), 1, 2).unwrap();
        assert_eq!((b.splits, b.slots), (1, 49 - 16));
        assert_eq!(b.geo.smem as usize, (PERSIST_SCRATCH_CF + 2 * 33 * 256) * 4);
        // a 56x56 channel at batch 256 (802816 values) fits nowhere
        assert!(plan_persistent(&H100, planes(256, 256, 3136), 4, 1).is_none());
        // every plan stays within the shared memory of two blocks per SM
        for (pat, v, t) in [
            (planes(256, 512, 196), 4, 1),
            (planes(256, 512, 196), 4, 2),
            (rows(4096, 1024), 4, 1),
            (rows(4096, 1024), 4, 2),
            (rows(256, 4096), 4, 2),
            (planes(64, 4, 1024), 4, 1),
        ] {
            if let Some(p) = plan_persistent(&H100, pat, v, t) {
                assert!(p.geo.smem as u64 <= H100.smem_per_sm / 2 - 1024, "{pat:?}: {p:?}");
                if p.cooperative() {
                    assert!(p.blocks() <= 2 * 132, "{pat:?}: {p:?}");
                }
            }
        }
    }

    #[test]
    fn persistent_plans_split_small_c_cooperatively() {
        // BatchNorm1d (4096, 1024) f32: 8 tiles of 128 channels, 4096 rows each
        let p = plan_persistent(&H100, rows(4096, 1024), 4, 1).unwrap();
        assert!(p.cooperative(), "{p:?}");
        assert_eq!(p.geo.grid.0, 8);
        assert!(p.blocks() <= 264);
        assert_eq!(p.geo.block, (32, 8, 1));
        assert_eq!(p.partial_slots, 1024 * p.splits);
        let per_thread = 4096usize.div_ceil(p.splits * 8);
        assert_eq!(p.slots as usize, per_thread.saturating_sub(PERSIST_REG_FWD_CL / 4));
        // C = 4, M = 65536: 64 splits per channel (one vector per thread), 256 blocks
        let q = plan_persistent(&H100, planes(64, 4, 1024), 4, 1).unwrap();
        assert_eq!(q.geo.grid, (4, 64, 1));
        assert_eq!(q.slots, 0, "{q:?}");
        // without cooperative launches: one block per channel, if that fits
        assert_eq!(plan_persistent(&SMALL, planes(8, 4, 1024), 4, 1).unwrap().splits, 1);
        assert!(plan_persistent(&SMALL, planes(64, 4, 1024), 4, 1).is_none());
        // too large for the whole chip even when split
        assert!(plan_persistent(&H100, planes(8, 64, 16 * 56 * 56), 4, 1).is_none());
    }

    /// tests/gpu_persistent.rs picks its shapes for these paths (on an H100).
    #[test]
    fn persistent_gpu_tests_take_the_paths_they_mean_to() {
        let a = plan_persistent(&H100, planes(40, 270, 256), 4, 1).unwrap();
        assert_eq!((a.splits, a.slots), (1, 10 - 8), "{a:?}");
        let b = plan_persistent(&H100, planes(256, 300, 49), 1, 1).unwrap();
        assert_eq!((b.splits, b.slots), (1, 49 - 32), "{b:?}");
        let b2 = plan_persistent(&H100, planes(256, 300, 49), 1, 2).unwrap();
        assert_eq!((b2.splits, b2.slots), (1, 49 - 16), "{b2:?}");
        assert!(plan_persistent(&H100, rows(32 * 64, 8), 4, 1).unwrap().cooperative());
        assert!(plan_persistent(&H100, rows(32 * 64, 8), 4, 2).unwrap().cooperative());
        assert!(plan_persistent(&H100, planes(2, 3, 9600), 8, 1).unwrap().cooperative());
        assert!(plan_persistent(&H100, planes(64, 8, 784), 4, 2).unwrap().cooperative());
        assert!(plan_persistent(&H100, rows(4096, 256), 4, 1).unwrap().cooperative());
    }

    #[test]
    fn persistent_constants_match_the_kernels() {
        let cu = include_str!("../../kernels/persistent.cu");
        for (name, want) in [
            ("BN_PERSIST_REG_FWD", PERSIST_REG_FWD),
            ("BN_PERSIST_REG_FWD_CL", PERSIST_REG_FWD_CL),
            ("BN_PERSIST_REG_BWD", PERSIST_REG_BWD),
            ("BN_PERSIST_SCRATCH_CF", PERSIST_SCRATCH_CF),
        ] {
            assert!(cu.contains(&format!("#define {name} {want}\n")), "persistent.cu: #define {name} {want}");
        }
        assert!(cu.contains(&format!("__launch_bounds__(BN_THREADS, {PERSIST_MIN_BLOCKS})")));
    }

    /// The launch plans of the resnet50 batch-256 shapes on an H100 (docs/perf-notes.md):
    /// `cargo test --release -p bnorm --lib resnet_plans -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints the plans of docs/perf-notes.md"]
    fn resnet_plans() {
        println!("| shape | dtype layout | V | fwd: grid, splits, fused | bwd: grid, splits, fused | persistent fwd | persistent bwd |");
        for (c, h, w) in crate::suites::RESNET50_CHW {
            for (eb, rows) in [(4usize, false), (2, true)] {
                let p = if rows { Pattern::Rows { rows: 256 * h * w, c } } else { planes(256, c, h * w) };
                let v = if use_vectors(p, eb, &[0]) { vector_elems(p, eb) } else { 1 };
                let f = plan_reduce(&H100, p, v, Reduction::Moments, eb, true);
                let b = plan_reduce(&H100, p, v, Reduction::GradSums, 2 * eb, true);
                let pp = |t| match plan_persistent(&H100, p, v, t) {
                    Some(q) => {
                        format!("{:?} slots {}{}", q.geo.grid, q.slots, if q.cooperative() { " coop" } else { "" })
                    }
                    None => "-".into(),
                };
                println!(
                    "| 256x{c}x{h}x{w} | {} | {v} | {:?} {} {} | {:?} {} {} | {} | {} |",
                    if rows { "f16 cl" } else { "f32 cf" },
                    f.geo.grid,
                    f.splits,
                    f.fused,
                    b.geo.grid,
                    b.splits,
                    b.fused,
                    pp(1),
                    pp(2)
                );
            }
        }
    }

    #[test]
    fn elementwise_grids() {
        let g = plan_elementwise(&H100, planes(256, 64, 12544), 4);
        assert_eq!(g.block, (256, 1, 1));
        assert_eq!(g.grid.0 as usize, H100.ew_resident() * 8);
        let g = plan_elementwise(&H100, planes(1, 3, 5), 1);
        assert_eq!(g.grid, (1, 1, 1));
        let g = plan_elementwise(&H100, rows(802_816, 256), 4);
        assert_eq!(g.block, (32, 8, 1));
        assert_eq!(g.grid.0, 2);
        assert!(g.grid.1 as usize <= MAX_GRID_Y);
        let g = plan_elementwise(&H100, rows(3, 2), 1);
        assert_eq!((g.grid, g.block), ((1, 1, 1), (2, 128, 1)));
    }
}
