#!/usr/bin/env python3
"""Python PEFT counterpart of `benches/lora_linear.rs`: the same workloads, shapes and dtypes.

Times a frozen base `nn.Linear`, the same layer wrapped by PEFT LoRA, and PEFT LoRA merged:
forward + backward of a dense upstream gradient to the input (and to A, B for LoRA), and the
inference forward. Prints one line per case: median milliseconds over the timed steps (after
warm-up, CUDA-synchronised) and the ratio to the base layer.

    python3 scripts/bench_peft_lora_linear.py --device cuda --kind bf16 --shapes 4096x1024x1024 --rank 8

Run by hand (needs torch and peft); `cargo test` never calls it.
"""
import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model


class One(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def timed(fn, device, warmup, steps):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kind", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--shapes", default="4096x1024x1024,4096x2048x2048")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.kind]
    print(f"torch {torch.__version__}, device {device}, base dtype {dtype}, rank {args.rank}")
    for shape in args.shapes.split(","):
        tokens, d_in, d_out = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        base = One(d_in, d_out).to(device=device, dtype=dtype)
        base.requires_grad_(False)
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, d_out, device=device, dtype=dtype)

        def fwd_bwd(model, inputs):
            # the same gradient injection as the Rust bench: sum(y * g)
            y = model(x)
            return torch.autograd.grad((y * g).sum(), inputs)

        with torch.no_grad():
            xi = x.detach()
        results = {}
        results["fwd_bwd/base"] = timed(lambda: fwd_bwd(base, [x]), device, args.warmup, args.steps)
        results["fwd/base"] = timed(lambda: torch.no_grad()(base)(xi), device, args.warmup, args.steps)
        for autocast, dora in ((True, False), (False, False), (True, True)):
            tag = "peft_dora" if dora else ("peft" if autocast else "peft_bf16_adapters")
            if not autocast and dtype == torch.float32:
                continue
            cfg = LoraConfig(
                r=args.rank, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0, use_dora=dora
            )
            model = One(d_in, d_out).to(device=device, dtype=dtype)
            model.load_state_dict(base.state_dict())
            peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=autocast)
            layer = peft_model.base_model.model.proj
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
            ab = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            if dora:
                ab.append(layer.lora_magnitude_vector["default"].weight)
            results[f"fwd_bwd/{tag}"] = timed(
                lambda: fwd_bwd(peft_model, [x] + ab), device, args.warmup, args.steps
            )
            results[f"fwd/{tag}"] = timed(
                lambda: torch.no_grad()(peft_model)(xi), device, args.warmup, args.steps
            )
            if autocast and not dora:
                peft_model.merge_adapter()
                results["fwd_bwd/peft_merged"] = timed(
                    lambda: fwd_bwd(peft_model, [x]), device, args.warmup, args.steps
                )
                results["fwd/peft_merged"] = timed(
                    lambda: torch.no_grad()(peft_model)(xi), device, args.warmup, args.steps
                )
        for k, v in results.items():
            group = k.split("/")[0]
            ratio = v / results[f"{group}/base"]
            print(f"{shape} r{args.rank} {args.kind} {k:28s} {v:9.3f} ms  {ratio:5.2f}x base")


if __name__ == "__main__":
    main()
