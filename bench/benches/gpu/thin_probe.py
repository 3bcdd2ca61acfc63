"""The thin product of an unmerged LoRA layer, s·(x Aᵀ) Bᵀ (+ bias) written to a [rows, out]
bf16 output, measured in isolation on a CUDA GPU against the card's write bandwidth.

It compares, for the output widths of a Llama-3.2-1B block at 8192 tokens, r 16:
  fill      torch's `fill_` of the same output (a pure write: what the card sustains)
  cublas    `torch.mm(h, Bᵀ, out=…)` (what the fused node ran before `lora_up`), and with the bias
            epilogue (`torch.addmm(bias, h, Bᵀ, alpha=s)`)
  lora_up   tch-peft's NVRTC kernel, compiled from the source string in csrc/cuda_kernels.cpp and
            launched through the driver API with the same parameter struct the crate passes
  triton    a 64×128-tile Triton kernel, where Triton is installed (a reference point only)
Times: best of 5 replays of a CUDA graph holding 40 launches (no host gaps), per launch.

    python3 bench/benches/gpu/thin_probe.py [--rows 8192] [--r 16]
"""

import argparse
import ctypes
import pathlib
import re

import torch


def kernel_source():
    text = (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda_kernels.cpp").read_text()
    return re.search(r'R"\((.*?)\)";', text, re.S).group(1)


class UpMember(ctypes.Structure):
    _fields_ = [("b", ctypes.c_void_p), ("out", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("cols", ctypes.c_int), ("r", ctypes.c_int), ("h_off", ctypes.c_int),
                ("tiles_end", ctypes.c_int), ("s", ctypes.c_float)]


class UpParams(ctypes.Structure):
    _fields_ = [("h", ctypes.c_void_p), ("ldh", ctypes.c_int), ("rows", ctypes.c_int),
                ("n", ctypes.c_int), ("rows_per_block", ctypes.c_int), ("m", UpMember * 8)]


def lora_up_launcher():
    from torch.cuda._utils import _cuda_load_module, _get_gpu_runtime_library, _nvrtc_compile

    ptx, name = _nvrtc_compile(kernel_source(), "lora_up_16",
                               nvcc_options=["--std=c++17", "-default-device"])
    fn = _cuda_load_module(ptx, [name])[name].func
    libcuda = _get_gpu_runtime_library()
    sms = torch.cuda.get_device_properties().multi_processor_count

    def launch(h, members):
        """members: [(B [out, r], out [rows, out], bias or None, h offset, scaling)]"""
        rows = h.shape[0]
        tiles = sum((b.shape[0] + 127) // 128 for b, *_ in members)
        rpb = 256  # as csrc/cuda_kernels.cpp chooses it
        while rpb > 64 and tiles * ((rows + rpb - 1) // rpb) < 2 * sms:
            rpb //= 2
        p = UpParams(h=h.data_ptr(), ldh=h.shape[1], rows=rows, n=len(members),
                     rows_per_block=rpb)
        end = 0
        for i, (b, out, bias, off, s) in enumerate(members):
            end += (b.shape[0] + 127) // 128
            p.m[i] = UpMember(b.data_ptr(), out.data_ptr(), bias.data_ptr() if bias is not None
                              else None, b.shape[0], b.shape[1], off, end, s)
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(p), ctypes.c_void_p))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = libcuda.cuLaunchKernel(fn, end, (rows + rpb - 1) // rpb, 1, 128, 1, 1, 0, stream,
                                    args, None)
        assert rc == 0, f"cuLaunchKernel: {rc}"

    return launch


def per_launch_us(f, n=40):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(n):
            f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / n * 1e3)
    return best


def triton_thin():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def thin(h_ptr, ldh, b_ptr, o_ptr, cols, s, R: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, R)
        hh = tl.load(h_ptr + rm[:, None] * ldh + rk[None, :])
        bb = tl.load(b_ptr + rn[:, None] * R + rk[None, :])
        acc = tl.dot(hh, tl.trans(bb)) * s
        tl.store(o_ptr + rm[:, None] * cols + rn[None, :], acc.to(tl.bfloat16))

    def run(h, b, out, s):
        grid = (h.shape[0] // 64, b.shape[0] // 128)
        thin[grid](h, h.shape[1], b, out, b.shape[0], s, R=b.shape[1], BM=64, BN=128,
                   num_warps=4)

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, bf16, rows, r, s = "cuda", torch.bfloat16, args.rows, args.r, 2.0
    launch = lora_up_launcher()
    tri = triton_thin()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, rows {rows}, r {r}; "
          "µs per launch (TB/s of output written)")
    print(f"{'outputs':<24}{'fill':>16}{'cublas':>16}{'cublas+bias':>16}{'lora_up':>16}"
          f"{'lora_up+bias':>16}{'triton':>16}")
    # q | k | v as one group (2048 + 512 + 512), o/down (2048), gate | up (8192 + 8192), k alone
    for widths in [(512,), (2048,), (2048, 512, 512), (8192,), (8192, 8192)]:
        h = torch.randn(rows, r * len(widths), dtype=bf16, device=dev)
        bs = [torch.randn(w, r, dtype=bf16, device=dev) * 0.1 for w in widths]
        biases = [torch.randn(w, dtype=bf16, device=dev) for w in widths]
        outs = [torch.empty(rows, w, dtype=bf16, device=dev) for w in widths]
        hs = [h[:, i * r:(i + 1) * r] for i in range(len(widths))]
        nbytes = sum(rows * w * 2 for w in widths)
        cell = lambda us: f"{us:7.1f} ({nbytes / us / 1e6:4.2f})"
        members = lambda with_bias: [(b, o, bb if with_bias else None, i * r, s)
                                     for i, (b, o, bb) in enumerate(zip(bs, outs, biases))]
        # lora_up against cuBLAS (bias epilogue, alpha = s) before timing anything
        launch(h, members(True))
        for hi, b, o, bb in zip(hs, bs, outs, biases):
            ref = torch.addmm(bb, hi, b.t(), beta=1, alpha=s)
            err = (o.float() - ref.float()).abs().max().item()
            scale = ref.float().abs().max().item()
            assert err <= scale * 2 ** -7, f"lora_up differs from cuBLAS: {err} (of {scale})"
        fill = per_launch_us(lambda: [o.fill_(1.0) for o in outs])
        mm = per_launch_us(lambda: [torch.mm(hi, b.t(), out=o) for hi, b, o in zip(hs, bs, outs)])
        mm_bias = per_launch_us(lambda: [torch.addmm(bb, hi, b.t(), beta=1, alpha=s, out=o)
                                         for hi, b, o, bb in zip(hs, bs, outs, biases)])
        up = per_launch_us(lambda: launch(h, members(False)))
        up_bias = per_launch_us(lambda: launch(h, members(True)))
        tri_us = "–"
        if tri is not None and all(w % 128 == 0 for w in widths) and rows % 64 == 0:
            tri_us = cell(per_launch_us(lambda: [tri(hi, b, o, s)
                                                 for hi, b, o in zip(hs, bs, outs)]))
        name = " + ".join(str(w) for w in widths)
        print(f"{name:<24}{cell(fill):>16}{cell(mm):>16}{cell(mm_bias):>16}{cell(up):>16}"
              f"{cell(up_bias):>16}{tri_us:>16}")


if __name__ == "__main__":
    main()
