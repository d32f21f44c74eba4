//! Compiles the CUDA kernels (`kernels/*.cu`) when the `cuda` feature is on and `nvcc` is
//! available, and tells the crate so with `--cfg bnorm_kernels`.
//!
//! Per kernel file, in OUT_DIR:
//! - `NAME.ptx`: `nvcc -ptx` for compute_75 (runs on every GPU CUDA 13 supports, 7.5+);
//!   `ci/ptxas-check.sh` reads these.
//! - `NAME.fatbin`: that PTX plus SASS compiled from it for the architectures in
//!   `BNORM_CUDA_ARCHS` (default `80,90`: A100-class and H100), so those GPUs load the
//!   kernels without a JIT compile; others JIT the embedded PTX once (the driver caches it).
//! - `kernels.rs`: the list of embedded modules, `include!`d by `src/cuda/registry.rs`.
//!
//! nvcc is looked up as `$NVCC`, then `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then on
//! `PATH`. Without it the crate builds CPU-only and says so with a `cargo:warning`;
//! `BNORM_REQUIRE_CUDA=1` makes a missing nvcc, or a failing compile, a build error.
//! Extra nvcc flags can be given in `BNORM_NVCC_FLAGS` (whitespace-separated), e.g.
//! `-allow-unsupported-compiler` with a host compiler newer than nvcc knows.
//!
//! The kernels are compiled without `--use_fast_math`: the statistics need IEEE division
//! and square root and no flush-to-zero (see docs/cuda.md).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Virtual architecture of the PTX: the oldest CUDA 13 supports.
const PTX_ARCH: &str = "compute_75";
const DEFAULT_SASS_ARCHS: &str = "80,90";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(bnorm_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "BNORM_REQUIRE_CUDA", "BNORM_CUDA_ARCHS", "BNORM_NVCC_FLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return; // no GPU backend in this build: nothing to compile
    }
    let require = matches!(env::var("BNORM_REQUIRE_CUDA").as_deref(), Ok("1") | Ok("true") | Ok("yes"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));

    let nvcc = match find_nvcc() {
        Some(n) => n,
        None => {
            return give_up(
                require,
                "nvcc not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH): \
                 building bnorm without its CUDA kernels (CPU backend only). \
                 Install one with ci/install-nvcc.sh and set NVCC.",
            )
        }
    };
    match compile_all(&nvcc, &manifest.join("kernels"), &out) {
        Ok(()) => println!("cargo::rustc-cfg=bnorm_kernels"),
        Err(e) => give_up(
            require,
            &format!(
                "compiling the CUDA kernels with {} failed; building without them (CPU backend only): {e}",
                nvcc.display()
            ),
        ),
    }
}

fn give_up(require: bool, msg: &str) {
    if require {
        panic!("BNORM_REQUIRE_CUDA is set: {msg}");
    }
    // cargo shows one line per warning
    println!("cargo::warning={}", msg.replace('\n', " | "));
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        // A bare name is looked up on PATH below.
        if p.components().count() > 1 {
            return is_file(&p).then_some(p);
        }
        return search_path(&p.to_string_lossy());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join(exe("nvcc"));
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    search_path("nvcc")
}

fn exe(name: &str) -> String {
    if cfg!(windows) {
        format!("{name}.exe")
    } else {
        name.to_string()
    }
}

fn search_path(name: &str) -> Option<PathBuf> {
    // Only now does PATH matter for the result.
    println!("cargo::rerun-if-env-changed=PATH");
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join(exe(name))).find(|p| is_file(p))
}

fn compile_all(nvcc: &Path, src_dir: &Path, out: &Path) -> Result<(), String> {
    let mut sources: Vec<PathBuf> = fs::read_dir(src_dir)
        .map_err(|e| format!("reading {}: {e}", src_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no .cu files in {}", src_dir.display()));
    }
    let archs = sass_archs()?;
    let extra: Vec<String> =
        env::var("BNORM_NVCC_FLAGS").unwrap_or_default().split_whitespace().map(String::from).collect();
    // One thread per file: the compiles are independent and each is single-threaded.
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let (archs, extra) = (&archs, &extra);
                s.spawn(move || compile_one(nvcc, src_dir, src, out, archs, extra))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("compile thread panicked".into()))).collect()
    });
    let mut names = Vec::new();
    for r in results {
        names.push(r?);
    }
    let mut rs = String::from(
        "// Generated by build.rs: the kernel modules embedded in this build.\n\
         pub(crate) static MODULES: &[EmbeddedModule] = &[\n",
    );
    for n in &names {
        let fatbin = out.join(format!("{n}.fatbin"));
        rs.push_str(&format!(
            "    EmbeddedModule {{ name: {n:?}, fatbin: include_bytes!({:?}) }},\n",
            fatbin.display().to_string()
        ));
    }
    rs.push_str("];\n");
    rs.push_str(&format!(
        "/// Architectures with precompiled SASS in the fatbins.\npub(crate) const SASS_ARCHS: &[u32] = &{archs:?};\n"
    ));
    fs::write(out.join("kernels.rs"), rs).map_err(|e| format!("writing kernels.rs: {e}"))
}

fn sass_archs() -> Result<Vec<u32>, String> {
    let spec = env::var("BNORM_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_SASS_ARCHS.into());
    spec.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = s.trim_start_matches("sm_");
            s.parse::<u32>()
                .ok()
                .filter(|&a| a >= 75)
                .ok_or_else(|| format!("BNORM_CUDA_ARCHS: `{s}` is not an architecture >= 75 (e.g. 80,90)"))
        })
        .collect()
}

/// `.cu` -> `.ptx` -> `.fatbin` (PTX + SASS); returns the module name.
fn compile_one(
    nvcc: &Path,
    include: &Path,
    src: &Path,
    out: &Path,
    archs: &[u32],
    extra: &[String],
) -> Result<String, String> {
    let name = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("bad kernel file name {}", src.display()))?
        .to_string();
    let ptx = out.join(format!("{name}.ptx"));
    let fatbin = out.join(format!("{name}.fatbin"));
    let mut c = Command::new(nvcc);
    c.arg("-ptx")
        .arg(format!("-arch={PTX_ARCH}"))
        .args(["-O3", "-std=c++17"])
        // IEEE division and square root, no flush-to-zero: the opposite of --use_fast_math.
        .args(["-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true"])
        .arg("-I")
        .arg(include)
        .args(extra)
        .arg(src)
        .arg("-o")
        .arg(&ptx);
    run(c, &name)?;
    let mut f = Command::new(nvcc);
    f.arg("-fatbin");
    for a in archs {
        f.arg("-gencode").arg(format!("arch={PTX_ARCH},code=sm_{a}"));
    }
    f.arg("-gencode").arg(format!("arch={PTX_ARCH},code={PTX_ARCH}"));
    // Compressed images (the driver decompresses them at load): a third of the size.
    f.arg("-Xfatbin=-compress-all");
    f.args(extra).arg(&ptx).arg("-o").arg(&fatbin);
    run(f, &name)?;
    Ok(name)
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let shown = format!("{c:?}");
    let o = c.output().map_err(|e| format!("{what}: cannot run {shown}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{what}: {shown} exited with {}:\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}
