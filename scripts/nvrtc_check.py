"""Compiles the crate's NVRTC kernel sources (csrc/cuda_kernels.cpp's kSource followed by
csrc/model_kernels_source.h's, as the crate does at run time) for an architecture, on a machine
without a GPU: NVRTC only needs the library that the PyPI wheels ship. Prints the log; exits 1
when the compile fails.

    scripts/with-torch python3 scripts/nvrtc_check.py [sm_90]
"""
import ctypes
import glob
import os
import re
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_string(path, name):
    text = open(os.path.join(root, path)).read()
    m = re.search(name + r'\s*=\s*R"\((.*?)\)";', text, re.S)
    if not m:
        sys.exit(f"no raw string {name} in {path}")
    return m.group(1)


source = raw_string("csrc/cuda_kernels.cpp", "kSource") + raw_string(
    "csrc/model_kernels_source.h", "kModelKernelsSource")
arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
import torch  # noqa: E402  (for the wheel's location)

libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib",
                              "libnvrtc.so.13"))
nvrtc = ctypes.CDLL(libs[0])
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None) == 0
opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
print(log.value.decode(errors="replace"))
print("compile", arch, "rc", rc)
sys.exit(0 if rc == 0 else 1)
