#!/usr/bin/env python3
"""Where the LoRA Linear fine-tuning step spends its time beyond the frozen base layer.

The same ops as `LoraLinear::f_forward_t` (linear, x·Aᵀ, scale, in-place addmm of h·Bᵀ) in
Python eager torch, timed in alternation with the bare base layer, then profiled per op and
input shape. Used for the breakdown in docs/PERFORMANCE.md.

    python3 scripts/profile_lora_linear_cpu.py [--shape 4096x1024x1024] [--rank 8]
"""
import argparse
import statistics as st
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="4096x1024x1024")
ap.add_argument("--rank", type=int, default=8)
args = ap.parse_args()
N, I, O = (int(v) for v in args.shape.split("x"))
r = args.rank
torch.manual_seed(0)
W = torch.randn(O, I) * 0.03
b = torch.randn(O)
A = (torch.randn(r, I) * 0.03).requires_grad_()
B = (torch.randn(O, r) * 0.02).requires_grad_()
x = torch.randn(N, I).requires_grad_()
g = torch.randn(N, O)


def base():
    y = torch.nn.functional.linear(x, W, b)
    return torch.autograd.grad((y * g).sum(), [x])


def lora():
    y = torch.nn.functional.linear(x, W, b)
    h = x.mm(A.t()) * 2.0
    y.addmm_(h, B.t())
    return torch.autograd.grad((y * g).sum(), [x, A, B])


ts = {"base": [], "lora": []}
for i in range(45):
    for f in (base, lora):
        t = time.perf_counter()
        f()
        ts[f.__name__].append(time.perf_counter() - t)
mb, ml = st.median(ts["base"][5:]), st.median(ts["lora"][5:])
print(f"interleaved median fwd+bwd: base {mb*1e3:.2f} ms, lora {ml*1e3:.2f} ms, ratio {ml/mb:.3f}")
with torch.profiler.profile(record_shapes=True) as p:
    for _ in range(10):
        lora()
print("per call of lora() (10 calls profiled):")
print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14))
