//! Build script: make the crate's own tests, examples and benches find libtorch at run time.
//!
//! torch-sys (links = "tch") exports the libtorch library directory as `DEP_TCH_LIBTORCH_LIB`.
//! We add an rpath to it so binaries run without `LD_LIBRARY_PATH`, and force-link
//! `libtorch_cuda.so` when present: it is only reached through static initialisers, so
//! `--as-needed` linkers drop it and CUDA silently disappears (`Cuda::is_available() == false`).
//!
//! It also compiles `csrc/lora_linear.cpp` (the fused LoRA Linear autograd node),
//! `csrc/cuda_kernels.cpp` (the NVRTC-compiled CUDA kernels of the LoRA and DoRA nodes),
//! `csrc/memory.cpp` (the device allocator's peak statistics), `csrc/optim.cpp` (the fused
//! multi-tensor AdamW) and `csrc/profiler.cpp` (device-kernel times from libtorch's profiler)
//! against the same libtorch headers, and sets `cfg(tch_peft_fused)` when it did.
use std::env;
use std::path::{Path, PathBuf};

/// The libtorch include directories beside a `lib` directory (PyPI wheel or libtorch zip).
fn include_dirs(lib_dir: &Path) -> Option<Vec<PathBuf>> {
    let root = lib_dir.parent()?;
    let inc = root.join("include");
    let api = inc.join("torch/csrc/api/include");
    (inc.join("torch/csrc/autograd/custom_function.h").exists()).then(|| vec![inc, api])
}

/// CUDA headers for DoRA's run-time compiled kernels (`cuda.h`, `nvrtc.h`, and the runtime headers
/// libtorch's CUDA headers include): the PyPI wheels' `nvidia/cu13/include` (with `crt/` from
/// `nvidia-cuda-crt`, which `scripts/torch-env.sh` adds), cu12's `nvidia/cuda_runtime/include`
/// and `nvidia/cuda_nvrtc/include` beside `torch/`, else `$CUDA_HOME/include`.
fn cuda_include_dirs(lib_dir: &Path) -> Option<Vec<PathBuf>> {
    let site = lib_dir.parent()?.parent()?;
    let mut candidates = vec![
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cuda_runtime/include"),
        site.join("nvidia/cuda_nvrtc/include"),
    ];
    if let Some(home) = env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    let find = |header: &str| candidates.iter().find(|d| d.join(header).exists()).cloned();
    let runtime = candidates
        .iter()
        .find(|d| {
            ["cuda_runtime_api.h", "crt/host_config.h", "cuda.h"].iter().all(|h| d.join(h).exists())
        })
        .cloned()?;
    let nvrtc = find("nvrtc.h")?;
    Some(if nvrtc == runtime { vec![runtime] } else { vec![runtime, nvrtc] })
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/lora_linear.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_kernels.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_kernels.h");
    println!("cargo:rerun-if-changed=csrc/memory.cpp");
    println!("cargo:rerun-if-changed=csrc/optim.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rustc-check-cfg=cfg(tch_peft_fused)");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = env::var_os("DEP_TCH_LIBTORCH_LIB")
        .or_else(|| env::var_os("DEP_TORCH_SYS_LIBTORCH_LIB"))
        .map(PathBuf::from);
    let Some(lib_dir) = lib_dir else {
        // doc-only builds and non-unix targets: nothing to link.
        return;
    };
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if let Some(includes) = include_dirs(&lib_dir) {
        let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
        let mut build = cc::Build::new();
        // the NVRTC kernels (LoRA and DoRA), where libtorch has CUDA and the CUDA headers are at
        // hand (only symbols of libtorch_cuda and libc10_cuda are linked; libcuda and libnvrtc
        // are opened at run time)
        let cuda_kernels = target_os == "linux"
            && lib_dir.join("libtorch_cuda.so").exists()
            && lib_dir.join("libc10_cuda.so").exists();
        if let Some(inc) = cuda_kernels.then(|| cuda_include_dirs(&lib_dir)).flatten() {
            build.includes(inc).define("TCH_PEFT_CUDA", None);
            println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-lc10_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        build
            .cpp(true)
            .pic(true)
            .warnings(false)
            .includes(&includes)
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .file("csrc/lora_linear.cpp")
            .file("csrc/cuda_kernels.cpp")
            .file("csrc/memory.cpp")
            .file("csrc/optim.cpp")
            .file("csrc/profiler.cpp")
            .compile("tch_peft_csrc");
        println!("cargo:rustc-cfg=tch_peft_fused");
    }
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
