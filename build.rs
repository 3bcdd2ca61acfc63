//! Build script: make the crate's own tests, examples and benches find libtorch at run time.
//!
//! torch-sys (links = "tch") exports the libtorch library directory as `DEP_TCH_LIBTORCH_LIB`.
//! We add an rpath to it so binaries run without `LD_LIBRARY_PATH`, and force-link
//! `libtorch_cuda.so` when present: it is only reached through static initialisers, so
//! `--as-needed` linkers drop it and CUDA silently disappears (`Cuda::is_available() == false`).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = env::var_os("DEP_TCH_LIBTORCH_LIB")
        .or_else(|| env::var_os("DEP_TORCH_SYS_LIBTORCH_LIB"))
        .map(PathBuf::from);
    let Some(lib_dir) = lib_dir else {
        // doc-only builds and non-unix targets: nothing to link.
        return;
    };
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" || target_os == "macos" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    }
    if target_os == "linux" && lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
