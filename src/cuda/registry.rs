//! The kernels embedded by build.rs and their lazy loading: a module (one per
//! `kernels/*.cu`) is loaded into the context the first time one of its kernels is needed,
//! once; functions are looked up once and cached.
//!
//! Each module is a fatbin holding compute_75 PTX plus SASS for the architectures of
//! [`SASS_ARCHS`] (build.rs, `BNORM_CUDA_ARCHS`, default sm_80 and sm_90): the driver
//! picks the SASS when it matches the GPU and JIT-compiles the PTX otherwise (cached by
//! the driver across runs).

use super::cuda_err;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::Pattern;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One compiled `kernels/*.cu`.
pub(crate) struct EmbeddedModule {
    pub name: &'static str,
    pub fatbin: &'static [u8],
}

#[cfg(bnorm_kernels)]
mod embedded {
    use super::EmbeddedModule;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

#[cfg(not(bnorm_kernels))]
mod embedded {
    use super::EmbeddedModule;
    pub(crate) static MODULES: &[EmbeddedModule] = &[];
    pub(crate) const SASS_ARCHS: &[u32] = &[];
}

pub(crate) use embedded::MODULES;

/// Compute capabilities (as `major * 10 + minor`) with precompiled SASS in this build;
/// other GPUs JIT-compile the embedded PTX on first use.
pub const SASS_ARCHS: &[u32] = embedded::SASS_ARCHS;

/// The kernel families: one entry-point template each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    /// `bn_fwd_stats_*`: statistics + finalize (+ fused normalize).
    FwdStats,
    /// `bn_fwd_norm_*`: normalize (training and inference).
    FwdNorm,
    /// `bn_bwd_reduce_*`: gradient sums + finalize (+ fused dx).
    BwdReduce,
    /// `bn_bwd_dx_*`: dx and dz.
    BwdDx,
    /// `bn_fwd_persist_*`: the whole training forward with x kept on chip (32-bit only).
    FwdPersist,
    /// `bn_bwd_persist_*`: the whole backward with x and g kept on chip (32-bit only).
    BwdPersist,
}

impl Family {
    /// The `kernels/*.cu` file (module) defining the family.
    pub(crate) fn module(self) -> &'static str {
        match self {
            Family::FwdStats => "fwd_stats",
            Family::FwdNorm => "normalize",
            Family::BwdReduce | Family::BwdDx => "backward",
            Family::FwdPersist | Family::BwdPersist => "persistent",
        }
    }
    fn stem(self) -> &'static str {
        match self {
            Family::FwdStats => "bn_fwd_stats",
            Family::FwdNorm => "bn_fwd_norm",
            Family::BwdReduce => "bn_bwd_reduce",
            Family::BwdDx => "bn_bwd_dx",
            Family::FwdPersist => "bn_fwd_persist",
            Family::BwdPersist => "bn_bwd_persist",
        }
    }
    /// Whether the family has 64-bit index (`_i64`) entry points.
    #[cfg(test)]
    pub(crate) fn has_wide(self) -> bool {
        !matches!(self, Family::FwdPersist | Family::BwdPersist)
    }
}

/// Entry-point name: `bn_fwd_stats_nhwc_bf16`, `bn_bwd_dx_nchw_f32_i64`, ...
/// `nhwc` kernels serve every rows-of-C pattern (channels-last, and channels-first with one
/// spatial position).
pub(crate) fn kernel_name(family: Family, p: Pattern, dtype: DType, wide: bool) -> String {
    let layout = match p {
        Pattern::Planes { .. } => "nchw",
        Pattern::Rows { .. } => "nhwc",
    };
    format!("{}_{layout}_{}{}", family.stem(), dtype.name(), if wide { "_i64" } else { "" })
}

/// Every entry point the Rust side can ask for.
#[cfg(test)]
pub(crate) fn all_kernel_names() -> Vec<(Family, String)> {
    let mut v = Vec::new();
    for f in
        [Family::FwdStats, Family::FwdNorm, Family::BwdReduce, Family::BwdDx, Family::FwdPersist, Family::BwdPersist]
    {
        for p in [Pattern::Planes { n: 1, c: 1, s: 2 }, Pattern::Rows { rows: 2, c: 1 }] {
            for d in DType::ALL {
                for wide in [false, true] {
                    if wide && !f.has_wide() {
                        continue;
                    }
                    v.push((f, kernel_name(f, p, d, wide)));
                }
            }
        }
    }
    v
}

/// Loaded modules and functions of one context.
pub(crate) struct Registry {
    ctx: Arc<CudaContext>,
    modules: Vec<OnceLock<Result<Arc<CudaModule>>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Registry {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Registry {
        Registry {
            ctx,
            modules: MODULES.iter().map(|_| OnceLock::new()).collect(),
            functions: Mutex::new(HashMap::new()),
        }
    }

    fn module(&self, name: &str) -> Result<Arc<CudaModule>> {
        let i = MODULES.iter().position(|m| m.name == name).ok_or_else(|| Error::Cuda {
            context: "loading kernels",
            message: format!("module `{name}` is not embedded in this build"),
        })?;
        self.modules[i]
            .get_or_init(|| {
                let image = cudarc::nvrtc::Ptx::from_binary(MODULES[i].fatbin.to_vec());
                self.ctx.load_module(image).map_err(|e| cuda_err("cuModuleLoadData", format!("module `{name}`: {e} (no SASS for this GPU in the build and the driver could not JIT the compute_75 PTX?)")))
            })
            .clone()
    }

    /// The function `name` of `family`'s module (loading the module on first use).
    pub(crate) fn function(&self, family: Family, name: &str) -> Result<CudaFunction> {
        let mut map = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module(family.module())?
            .load_function(name)
            .map_err(|e| cuda_err("cuModuleGetFunction", format!("`{name}`: {e}")))?;
        map.insert(name.to_string(), f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_what_they_compute() {
        let cf = Pattern::Planes { n: 2, c: 3, s: 4 };
        let cl = Pattern::Rows { rows: 8, c: 3 };
        assert_eq!(kernel_name(Family::FwdStats, cf, DType::F16, false), "bn_fwd_stats_nchw_f16");
        assert_eq!(kernel_name(Family::FwdStats, cl, DType::BF16, false), "bn_fwd_stats_nhwc_bf16");
        assert_eq!(kernel_name(Family::BwdReduce, cl, DType::F32, true), "bn_bwd_reduce_nhwc_f32_i64");
        assert_eq!(kernel_name(Family::BwdDx, cf, DType::F32, false), "bn_bwd_dx_nchw_f32");
        assert_eq!(kernel_name(Family::BwdPersist, cl, DType::F16, false), "bn_bwd_persist_nhwc_f16");
        assert_eq!(all_kernel_names().len(), 60);
    }

    /// Every name the Rust side asks for is an entry point of the module it looks in.
    #[test]
    fn every_kernel_is_defined_where_it_is_looked_up() {
        let source = |module: &str| match module {
            "fwd_stats" => include_str!("../../kernels/fwd_stats.cu"),
            "normalize" => include_str!("../../kernels/normalize.cu"),
            "backward" => include_str!("../../kernels/backward.cu"),
            "persistent" => include_str!("../../kernels/persistent.cu"),
            other => panic!("unknown module {other}"),
        };
        for (family, name) in all_kernel_names() {
            let src = source(family.module());
            // Entry points come from a macro: `BN_..._KERNEL <stem>_<layout>_##tag[##_i64]`.
            let stem = name.trim_end_matches("_i64").rsplit_once('_').map(|(s, _)| s).unwrap().to_string();
            let suffix = if name.ends_with("_i64") { "##tag##_i64(" } else { "##tag(" };
            assert!(src.contains(&format!("{stem}_{suffix}")), "{name} not defined in {}.cu", family.module());
        }
    }

    #[cfg(bnorm_kernels)]
    #[test]
    fn every_module_is_embedded() {
        for (family, _) in all_kernel_names() {
            assert!(
                MODULES.iter().any(|m| m.name == family.module() && !m.fatbin.is_empty()),
                "{} not embedded",
                family.module()
            );
        }
        assert!(!SASS_ARCHS.is_empty());
    }
}
