# shellcheck shell=bash
# Source this file to build tch-peft against libtorch 2.11.0 (what tch 0.24 needs):
#
#     source scripts/torch-env.sh && cargo test
#
# * If LIBTORCH is already set (your own libtorch unpacked somewhere), it is used as is.
# * Otherwise a Python virtualenv with PyPI `torch==2.11.0` is used, created on first use at
#   $TCH_PEFT_TORCH_VENV (default ~/.cache/tch-peft/torch-2.11.0; ~4.6 GB, 1-2 minutes).
#
# It exports LIBTORCH_USE_PYTORCH=1, VIRTUAL_ENV and PATH for torch-sys's build script, and
# LD_LIBRARY_PATH so that any binary built in this shell finds libtorch (this crate's tests,
# examples and benches do without it: build.rs gives them an rpath).

tch_peft_torch_version="2.11.0"

if [ -n "${LIBTORCH:-}" ]; then
    export LD_LIBRARY_PATH="${LIBTORCH}/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    TCH_PEFT_TORCH_VENV="${TCH_PEFT_TORCH_VENV:-$HOME/.cache/tch-peft/torch-$tch_peft_torch_version}"
    export TCH_PEFT_TORCH_VENV
    # importlib.metadata/find_spec read the installed package without importing torch (faster,
    # and no "Failed to initialize NumPy" warning from the NumPy-less venv)
    if ! "$TCH_PEFT_TORCH_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$tch_peft_torch_version')" 2>/dev/null; then
        echo "tch-peft: installing torch==$tch_peft_torch_version into $TCH_PEFT_TORCH_VENV (once, ~4.6 GB)" >&2
        python_bin="$(command -v python3 || command -v python)"
        mkdir -p "$(dirname "$TCH_PEFT_TORCH_VENV")"
        "$python_bin" -m venv "$TCH_PEFT_TORCH_VENV" &&
            "$TCH_PEFT_TORCH_VENV/bin/pip" install --quiet --progress-bar off "torch==$tch_peft_torch_version" ||
            { echo "tch-peft: could not install torch==$tch_peft_torch_version" >&2; return 1 2>/dev/null || exit 1; }
    fi
    # The CUDA wheels ship the runtime headers without `crt/`, which libtorch's CUDA headers
    # need: build.rs compiles DoRA's CUDA kernels only when it is there (a 170 kB wheel).
    tch_peft_site="$("$TCH_PEFT_TORCH_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [ -e "$tch_peft_site/nvidia/cu13/include/cuda_runtime.h" ] &&
        [ ! -e "$tch_peft_site/nvidia/cu13/include/crt/host_config.h" ]; then
        "$TCH_PEFT_TORCH_VENV/bin/pip" install --quiet --progress-bar off "nvidia-cuda-crt==13.0.*" ||
            echo "tch-peft: nvidia-cuda-crt not installed (no CUDA kernels for DoRA)" >&2
    fi
    # c10d's NCCL header includes CCCL's <nv/target>, which no wheel of torch's pulls in: build.rs
    # compiles the NCCL process group only when it is there (an 18 MB wheel)
    if [ -e "$tch_peft_site/nvidia/nccl/include/nccl.h" ] &&
        [ ! -e "$tch_peft_site/nvidia/cu13/include/nv/target" ]; then
        "$TCH_PEFT_TORCH_VENV/bin/pip" install --quiet --progress-bar off "nvidia-cuda-cccl==13.0.85" ||
            echo "tch-peft: nvidia-cuda-cccl not installed (no NCCL process group)" >&2
    fi
    export VIRTUAL_ENV="$TCH_PEFT_TORCH_VENV"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
    tch_peft_torch_lib="$("$VIRTUAL_ENV/bin/python" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib"))')"
    export LD_LIBRARY_PATH="${tch_peft_torch_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
