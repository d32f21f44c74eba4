fn main() {
    println!("cargo::rustc-check-cfg=cfg(bnorm_kernels)");
}
