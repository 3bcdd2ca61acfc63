#!/usr/bin/env python3
"""The GPU side-by-side harness, Python half (issue 7): the workloads of bench/benches/gpu/main.rs with
Hugging Face PEFT 0.21, pyreft 0.1.0 and transformers (torch eager, sdpa attention).

    python3 bench/benches/gpu/peft_side.py [--only linear,train,infer] [--variants none,lora,...]
        [--steps 20] [--warmup 5] [--layers 16] [--batch 8] [--seq 1024] [--json FILE]
        [--stack eager|compile|liger]

`--stack` picks the Python stack a user would run instead of eager PEFT:
- `compile`: the loss function (`model(input_ids, labels).loss`, or the inference forward)
  wrapped in `torch.compile` (default mode, inductor); the warm-up steps include compiling.
- `liger`: Liger kernels (`liger_kernel.transformers.apply_liger_kernel_to_llama()`: RMSNorm,
  RoPE, SwiGLU and the fused linear cross-entropy) patched into transformers' Llama before the
  model is built. It patches classes process-wide, so run it in its own process.

Same shapes, dtypes (bf16 base; adapters f32 as PEFT's default `autocast_adapter_dtype=True`,
plus the `*_bf16` variants with `autocast_adapter_dtype=False`), seeds, step counts and timing
(median of CUDA-synchronised steps after warm-up; host time = until the step's last kernel is
queued; peak = torch.cuda.max_memory_allocated from the variant's construction on). pyreft's
interventions run in bf16 (`dtype=torch.bfloat16`): with f32 interventions its forward fails on a
bf16 model. Needs a CUDA device; pyreft and pyvene importable for `loreft`.

QLoRA (`qlora`, `qlora-ckpt`; bitsandbytes importable): every linear layer of the blocks a
bitsandbytes `Linear4bit` (NF4, double quantization, bf16 compute) quantized on the GPU from the
model's random bf16 weights, PEFT LoRA r 16 on all of them (f32 adapters), without and with
transformers' gradient checkpointing (`use_reentrant=False`); `lm_head` and the embeddings
bf16, as transformers leaves them. Their peak counts from after the construction (the bf16
model the 4-bit layers are made from is not part of it). `--model 8b`: the Llama-3.1-8B shape.
`--only gemv`: decode-sized forwards (1 token, no grad) of single layers, `Linear4bit` (its
inference GEMV) and bf16.
"""
import argparse
import os
import gc
import json
import statistics
import time

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the CPU only for trying the script out at tiny sizes (no memory figures there)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_steps(f, warmup, steps):
    for _ in range(warmup):
        f()
    sync()
    total, host = [], []
    for _ in range(steps):
        t = time.perf_counter()
        f()
        host.append((time.perf_counter() - t) * 1e3)
        sync()
        total.append((time.perf_counter() - t) * 1e3)
    return statistics.median(total), statistics.median(host)


def fresh():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else float("nan")


def linear_rows(args, rows):
    from peft import LoraConfig, get_peft_model

    tokens, d = 8192, 4096

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d, d)

        def forward(self, x):
            return self.proj(x)

    for variant in ["base", "lora", "lora_bf16", "dora", "dora_bf16"]:
        fresh()
        torch.manual_seed(0)
        base = One().to(device=DEV, dtype=torch.bfloat16)
        base.requires_grad_(False)
        x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
        if variant == "base":
            model, inputs = base, [x]
        else:
            cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0,
                             use_dora=variant.startswith("dora"))
            model = get_peft_model(base, cfg, autocast_adapter_dtype=not variant.endswith("bf16"))
            inputs = [x] + [p for p in model.parameters() if p.requires_grad]

        def step():
            y = model(x)
            torch.autograd.grad((y * g).sum(), inputs)

        s, h = time_steps(step, args.warmup, args.steps)
        trainable = sum(p.numel() for p in inputs[1:])
        rows.append(dict(workload="linear 8192x4096->4096 r16 fwd+bwd", variant=variant,
                         step_ms=s, host_ms=h, peak_gb=peak_gb(), trainable=trainable))
        del model, base, x, g, inputs


def llama(args, quantized=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.stack == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()

    d, mlp, tied = {"1b": (2048, 8192, True), "8b": (4096, 14336, False)}[args.model]
    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=d, intermediate_size=mlp,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tied,
        max_position_embeddings=max(2048, args.seq),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    # (a model to quantize is made in bf16 directly: an 8B model's f32 copy need not exist)
    default = torch.get_default_dtype()
    if quantized:
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.to(torch.bfloat16)
    model.config.use_cache = False
    if quantized:
        quantize_linears(model)
    return model


def quantize_linears(model):
    """Every linear layer of the blocks as bitsandbytes' Linear4bit (NF4, double quantization,
    bf16 compute), quantized on the GPU from its bf16 weight (what from_pretrained with a
    BitsAndBytesConfig does); the bf16 weights freed."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to(DEV)
                setattr(parent, name, q)
    gc.collect()
    torch.cuda.empty_cache()


def labelled(variant, args):
    return variant if args.stack == "eager" else f"{variant} [{args.stack}]"


def batch(args):
    torch.manual_seed(1)
    return torch.randint(0, 128256, (args.batch, args.seq), device=DEV)


def ddp_init():
    """The NCCL group: torchrun's, else a group of one on this GPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))


# `lora+ddp` and the like (bench/benches/gpu/dist.rs names the same forms): PyTorch DDP over the
# PEFT model, bucket cap in MB
DDP_CAPS = {"ddp": 25, "ddp-b1": 1, "ddp-b5": 5, "ddp-b100": 100, "ddp-bf16": 25, "ddp-nosync": 25}


def train_rows(args, rows):
    from peft import LoraConfig, get_peft_model

    ids = batch(args)
    for label in args.variants:
        variant, _, dp = label.partition("+")
        fresh()
        model = llama(args, quantized=variant.startswith("qlora"))
        model.train()
        run = None
        if variant.startswith("qlora"):
            # the construction's bf16 weights are gone: the peak counts from here
            fresh()
        if variant == "none":
            model.requires_grad_(False)
            model.enable_input_require_grads()
            params = []
        elif variant in ("qlora", "qlora-ckpt"):
            cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0)
            if variant.endswith("ckpt"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model = get_peft_model(model, cfg)
            params = [p for p in model.parameters() if p.requires_grad]
        elif variant in ("lora", "lora_bf16", "dora", "dora_bf16"):
            cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0,
                             use_dora=variant.startswith("dora"))
            model = get_peft_model(model, cfg, autocast_adapter_dtype=not variant.endswith("bf16"))
            params = [p for p in model.parameters() if p.requires_grad]
        elif variant == "loreft":
            import pyreft

            reps = [{
                "layer": l, "component": "block_output", "low_rank_dimension": 8,
                "intervention": pyreft.LoreftIntervention(
                    embed_dim=2048, low_rank_dimension=8, dtype=torch.bfloat16),
            } for l in range(args.layers)]
            model.requires_grad_(False)
            rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
            rm.set_device(DEV)
            s = args.seq
            positions = list(range(7)) + list(range(s - 7, s))
            locations = [[positions] * args.batch] * args.layers
            params = [p for p in rm.parameters() if p.requires_grad]

            def run():
                _, out = rm({"input_ids": ids, "labels": ids},
                            unit_locations={"sources->base": (None, locations)})
                return out.loss
        elif variant == "full":
            model.requires_grad_(True)
            params = list(model.parameters())
        else:
            raise SystemExit(f"unknown variant {variant}")
        opt = torch.optim.AdamW(params, lr=1e-5) if params else None
        if dp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if dp not in DDP_CAPS or run is not None:
                raise SystemExit(f"unknown data-parallel form {label}")
            ddp_init()
            model = DDP(model, device_ids=[torch.cuda.current_device()], bucket_cap_mb=DDP_CAPS[dp])
            if dp == "ddp-bf16":
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

                model.register_comm_hook(None, bf16_compress_hook)
        if run is None:
            def run():
                return model(input_ids=ids, labels=ids).loss
        if dp == "ddp-nosync":
            synced = run

            def run():
                with model.no_sync():
                    return synced()
        if args.stack == "compile":
            run = torch.compile(run)

        def step(phase=lambda p: None):
            loss = run()
            phase(0)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            phase(1)
            if opt is not None:
                opt.step()
            phase(2)

        s, h = time_steps(step, args.warmup, args.steps)
        if args.phases:
            t = [[], [], []]
            for _ in range(min(args.steps, 10)):
                sync()
                last = [time.perf_counter()]

                def phase(p):
                    sync()
                    now = time.perf_counter()
                    t[p].append((now - last[0]) * 1e3)
                    last[0] = now

                step(phase)
            m = [statistics.median(x) for x in t]
            print(f"phases {variant}: forward+loss {m[0]:.2f} ms, backward {m[1]:.2f} ms, "
                  f"optimizer {m[2]:.2f} ms (synchronised)")
        rows.append(dict(workload=f"train llama-{args.model.upper()} b{args.batch} s{args.seq} L{args.layers}",
                         variant=labelled(label, args), step_ms=s, host_ms=h,
                         peak_gb=peak_gb(), trainable=sum(p.numel() for p in params)))
        del model, opt, params, run, step
        if variant == "loreft":
            del rm


def infer_rows(args, rows):
    from peft import LoraConfig, get_peft_model

    ids = batch(args)
    for variant in args.infer_variants:
        fresh()
        model = llama(args)
        model.eval()
        if variant != "base":
            cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0)
            model = get_peft_model(model, cfg, autocast_adapter_dtype=not variant.endswith("bf16"))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.normal_(0.0, 0.01)
            if variant == "lora merged":
                model.merge_adapter()
            model.eval()

        def forward():
            return model(input_ids=ids).logits

        if args.stack == "compile":
            forward = torch.compile(forward)

        def step():
            with torch.no_grad():
                forward()

        s, h = time_steps(step, args.warmup, args.steps)
        rows.append(dict(workload=f"infer llama-{args.model.upper()} b{args.batch} s{args.seq} L{args.layers}",
                         variant=labelled(variant, args), step_ms=s, host_ms=h, peak_gb=peak_gb(),
                         trainable=0))
        del model


def gemv_rows(args, rows):
    import bitsandbytes as bnb

    shapes = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096), (4096, 14336), (14336, 4096)]
    for i, o in shapes:
        torch.manual_seed(0)
        w = torch.randn(o, i, device=DEV, dtype=torch.bfloat16) * 0.02
        q = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4").to(DEV)
        x = torch.randn(1, i, device=DEV, dtype=torch.bfloat16)
        for variant, f in [("4-bit gemv", lambda: q(x)),
                           ("bf16", lambda: torch.nn.functional.linear(x, w))]:
            def step():
                with torch.no_grad():
                    f()
            s, h = time_steps(step, args.warmup, args.steps * 10)
            rows.append(dict(workload=f"decode linear 1x{i}->{o}", variant=variant, step_ms=s,
                             host_ms=h, peak_gb=float("nan"), trainable=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="linear,train,infer")
    ap.add_argument("--variants", default="none,lora,lora_bf16,dora,dora_bf16,loreft,full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--json")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--stack", choices=["eager", "compile", "liger"], default="eager")
    ap.add_argument("--infer-variants", default="base,lora unmerged,lora merged,lora unmerged bf16")
    ap.add_argument("--model", choices=["1b", "8b"], default="1b")
    args = ap.parse_args()
    if "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    args.variants = [v.strip() for v in args.variants.split(",")]
    args.infer_variants = [v.strip() for v in args.infer_variants.split(",")]
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, {torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU'}, "
          f"stack {args.stack}")
    rows = []
    for w in args.only.split(","):
        {"linear": linear_rows, "train": train_rows, "infer": infer_rows,
         "gemv": gemv_rows}[w.strip()](args, rows)
    if not rank0:
        return
    print(f"{'workload':<40} {'variant':<20} {'step ms':>10} {'host ms':>10} {'peak GB':>9} {'trainable':>12}")
    for r in rows:
        print(f"{r['workload']:<40} {r['variant']:<20} {r['step_ms']:>10.2f} {r['host_ms']:>10.2f} "
              f"{r['peak_gb']:>9.2f} {r['trainable']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"library": "peft", "stack": args.stack, "torch": torch.__version__,
                       "steps": args.steps,
                       "warmup": args.warmup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
