//! Build script: compile the crate's C++ (`csrc/`) against the libtorch that torch-sys found, and
//! link what it needs so that the crate's own binaries and every dependent's find CUDA.
//!
//! torch-sys (links = "tch") exports the libtorch library directory as `DEP_TCH_LIBTORCH_LIB`.
//! * `csrc/lora_linear.cpp` (the fused LoRA/DoRA autograd node), `csrc/linear_cross_entropy.cpp`
//!   (the chunked linear cross-entropy node), `csrc/quant_linear.cpp` (the frozen 4-bit
//!   linear node), `csrc/model_ops.cpp` (RMSNorm, SwiGLU and RoPE
//!   nodes), `csrc/cuda_kernels.cpp` (their
//!   NVRTC-compiled CUDA kernels, where the CUDA headers are found), `csrc/memory.cpp` (the
//!   device allocator's peaks), `csrc/optim.cpp` (multi-tensor AdamW) and `csrc/profiler.cpp`
//!   (Kineto device-kernel times), whose ABI `csrc/tch_peft.h` declares, are compiled against the
//!   same headers; `cfg(tch_peft_csrc)` is set when they were (not in a `doc-only` build).
//! * `csrc/dist_gloo.cpp` (c10d's process group with gloo, against the stand-in gloo headers of
//!   `csrc/gloo_stub/`, on its include path alone) and `csrc/dist_reducer.cpp` (DDP's Reducer)
//!   where libtorch has c10d's headers: `cfg(tch_peft_dist)`; `csrc/dist_nccl.cpp` (the NCCL
//!   backend) where a CUDA libtorch also has NCCL's, CUDA's and CCCL's headers:
//!   `cfg(tch_peft_nccl)`.
//! * With a CUDA libtorch, `libc10_cuda` (the CUDA kernels' objects reference it) is linked with
//!   `cargo:rustc-link-lib`, which, unlike `rustc-link-arg`, reaches every dependent's final
//!   binary; torch-sys names `libtorch_cuda` the same way. libtorch_cuda is only reached through
//!   static initialisers, so an `--as-needed` linker would drop it (CUDA then silently reports
//!   unavailable): `csrc/cuda_link.cpp`, linked whole into every final binary, references it.
//! * The library directory goes to dependents' build scripts as `DEP_TCH_PEFT_LIBTORCH_LIB` (the
//!   `links` key), for an rpath; this crate's own tests, examples and benches get one here.
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

/// Headers for c10d's NCCL process group: CUDA's runtime (with `crt/` and CCCL's `nv/target`,
/// from `nvidia-cuda-crt` and `nvidia-cuda-cccl`) and NCCL's `nccl.h` (`nvidia/nccl/include`),
/// beside `torch/` in site-packages, else under `$CUDA_HOME/include`.
fn nccl_include_dirs(lib_dir: &Path) -> Option<Vec<PathBuf>> {
    let site = lib_dir.parent()?.parent()?;
    let mut cuda = vec![site.join("nvidia/cu13/include"), site.join("nvidia/cuda_runtime/include")];
    let mut nccl = vec![site.join("nvidia/nccl/include")];
    if let Some(home) = env::var_os("CUDA_HOME") {
        cuda.push(PathBuf::from(&home).join("include"));
        nccl.push(PathBuf::from(home).join("include"));
    }
    let runtime = cuda.into_iter().find(|d| {
        ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"].iter().all(|h| d.join(h).exists())
    })?;
    let nccl = nccl.into_iter().find(|d| d.join("nccl.h").exists())?;
    Some(vec![runtime, nccl])
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo::rustc-check-cfg=cfg(tch_peft_csrc)");
    println!("cargo::rustc-check-cfg=cfg(tch_peft_dist)");
    println!("cargo::rustc-check-cfg=cfg(tch_peft_nccl)");
    let lib_dir = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from);
    let Some(lib_dir) = lib_dir else {
        // doc-only builds and non-unix targets: nothing to compile or link.
        return;
    };
    println!("cargo:libtorch_lib={}", lib_dir.display());
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let cuda_libtorch = target_os == "linux"
        && lib_dir.join("libtorch_cuda.so").exists()
        && lib_dir.join("libc10_cuda.so").exists();
    if let Some(includes) = include_dirs(&lib_dir) {
        let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
        // a C++17 build against libtorch's headers and ABI
        let cxx = || {
            let mut b = cc::Build::new();
            b.cpp(true)
                .pic(true)
                .warnings(false)
                .flag("-std=c++17")
                .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
                .flag("-DGLOG_USE_GLOG_EXPORT");
            b
        };
        let mut build = cxx();
        // the NVRTC kernels (LoRA and DoRA), where libtorch has CUDA and the CUDA headers are at
        // hand (only symbols of libtorch_cuda and libc10_cuda are linked; libcuda and libnvrtc
        // are opened at run time)
        if let Some(inc) = cuda_libtorch.then(|| cuda_include_dirs(&lib_dir)).flatten() {
            build.includes(inc).define("TCH_PEFT_CUDA", None);
        }
        build
            .includes(&includes)
            .file("csrc/lora_linear.cpp")
            .file("csrc/linear_cross_entropy.cpp")
            .file("csrc/quant_linear.cpp")
            .file("csrc/model_ops.cpp")
            .file("csrc/cuda_kernels.cpp")
            .file("csrc/memory.cpp")
            .file("csrc/optim.cpp")
            .file("csrc/profiler.cpp")
            .compile("tch_peft_csrc");
        println!("cargo:rustc-cfg=tch_peft_csrc");
        // csrc/dist_gloo.cpp: c10d's gloo process group (libtorch_cpu has gloo; the wheel lacks
        // gloo's headers, so this one file gets the stand-ins of csrc/gloo_stub/)
        let gloo_header = includes[0].join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
        if target_os == "linux" && gloo_header.exists() {
            cxx()
                .include("csrc/gloo_stub")
                .includes(&includes)
                .define("USE_C10D_GLOO", None)
                .file("csrc/dist_gloo.cpp")
                .compile("tch_peft_dist");
            // csrc/dist_reducer.cpp: DDP's Reducer (no gloo header: its own build)
            cxx()
                .includes(&includes)
                .file("csrc/dist_reducer.cpp")
                .compile("tch_peft_dist_reducer");
            println!("cargo:rustc-cfg=tch_peft_dist");
            // csrc/dist_nccl.cpp: the NCCL backend, where a CUDA libtorch has NCCL's, CUDA's
            // and CCCL's headers beside it (the PyPI wheels; `nvidia-cuda-cccl` for `nv/target`)
            if let Some(nccl) = cuda_libtorch.then(|| nccl_include_dirs(&lib_dir)).flatten() {
                cxx()
                    .includes(&nccl)
                    .includes(&includes)
                    .define("USE_C10D_NCCL", None)
                    .define("USE_CUDA", None)
                    .file("csrc/dist_nccl.cpp")
                    .compile("tch_peft_dist_nccl");
                println!("cargo:rustc-cfg=tch_peft_nccl");
            }
        }
    }
    // after the static library of csrc/, whose objects reference c10_cuda
    if cuda_libtorch {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        // torch-sys links torch_cuda itself; c10_cuda it does not
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        // csrc/cuda_link.cpp: an object every final binary links whole, whose reference to
        // libtorch_cuda keeps that library (see the file); not bundled into the rlib, so the
        // dependent's link line names it (from OUT_DIR, a propagated search path)
        cc::Build::new()
            .cpp(true)
            .pic(true)
            .flag("-std=c++17")
            .file("csrc/cuda_link.cpp")
            .cargo_metadata(false)
            .compile("tch_peft_cuda_link");
        let out = env::var("OUT_DIR").expect("cargo sets OUT_DIR");
        println!("cargo:rustc-link-search=native={out}");
        println!("cargo:rustc-link-lib=static:+whole-archive,-bundle=tch_peft_cuda_link");
    }
    if target_os == "linux" || target_os == "macos" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    }
}
