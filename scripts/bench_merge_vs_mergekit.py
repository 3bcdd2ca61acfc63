#!/usr/bin/env python3
"""The streamed merge side by side with mergekit 0.1.5, every method, on the same Llama-shaped
checkpoints, machine and page cache (run by hand; the figures in docs/PERFORMANCE.md).

    scripts/with-torch cargo build --release --example merge
    python3 -m venv ~/.cache/tch-peft/mk    # with torch 2.11, transformers 5, mergekit 0.1.5:
    ~/.cache/tch-peft/mk/bin/pip install --no-deps mergekit==0.1.5 && ~/.cache/tch-peft/mk/bin/pip \
        install "transformers>=5,<6" immutables click pydantic pyyaml tqdm accelerate safetensors \
        scipy protobuf sentencepiece
    ~/.cache/tch-peft/mk/bin/python scripts/bench_merge_vs_mergekit.py [--dir /tmp/merge-bench] \
        [--methods ties,task_arithmetic] [--layers 8]

Writes a base and three fine-tuned checkpoints (f32, hidden 1024, intermediate 2816, vocab
32000, `--layers` layers: 673 MB each at 8), then for each method one config, merged by
`mergekit-yaml --lazy-unpickle --low-cpu-memory` and by `examples/merge`, each in a fresh
process after reading every input once (page cache warm); ours `--repeat` times (the median).
Reports wall time (process start to exit), peak RSS (`/usr/bin/time`'s), ours' input read rate, the speed-up, and the largest difference between
the two outputs (0 expected to rounding; the random methods draw other masks, TIES/Breadcrumbs
differ only where magnitudes tie). Prints a markdown table; `--raw FILE` keeps every command's
output.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OURS = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                    "release", "examples", "merge")


def checkpoints(d, layers):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                      tie_word_embeddings=False, torch_dtype="float32",
                      architectures=["LlamaForCausalLM"])
    g = torch.Generator().manual_seed(0)
    h, i, v = 1024, 2816, 32000
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for l in range(layers):
        p = f"model.layers.{l}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    for name in ("base", "m1", "m2", "m3"):
        out = os.path.join(d, name)
        if os.path.exists(os.path.join(out, "model.safetensors")):
            continue
        os.makedirs(out, exist_ok=True)
        t = base if name == "base" else {k: b + torch.randn(b.shape, generator=g) * 0.002
                                         for k, b in base.items()}
        save_file(t, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(out)
        del t
    return sum(os.path.getsize(os.path.join(d, n, "model.safetensors")) for n in ("base", "m1", "m2", "m3"))


def configs(layers):
    w = lambda *ws: [{"model": f"m{i + 1}", "parameters": {"weight": x}} for i, x in enumerate(ws)]
    wd = lambda *ps: [{"model": f"m{i + 1}", "parameters": {"weight": x, "density": d}}
                      for i, (x, d) in enumerate(ps)]
    three = [(0.5, 0.5), (0.3, 0.5), (0.2, 0.5)]
    half = layers // 2
    return {
        "linear": {"merge_method": "linear", "models": w(0.5, 0.3, 0.2)},
        "slerp": {"merge_method": "slerp", "base_model": "base",
                  "models": [{"model": "base"}, {"model": "m1"}], "parameters": {"t": [0, 0.5, 1]}},
        "slices_slerp": {"merge_method": "slerp", "base_model": "base", "slices": [{"sources": [
            {"model": "base", "layer_range": [0, layers]}, {"model": "m1", "layer_range": [0, layers]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": "base", "models": w(0.6, 0.4)},
        "multislerp": {"merge_method": "multislerp", "base_model": "base", "models": w(0.5, 0.3, 0.2)},
        "karcher": {"merge_method": "karcher", "models": [{"model": m} for m in ("m1", "m2", "m3")]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": w(0.5, 0.3, 0.2)},
        "ties": {"merge_method": "ties", "base_model": "base", "models": wd(*three)},
        "dare_linear": {"merge_method": "dare_linear", "base_model": "base", "models": wd(*three)},
        "dare_ties": {"merge_method": "dare_ties", "base_model": "base", "models": wd(*three)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "models": wd(*three)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "models": wd(*three)},
        "della": {"merge_method": "della", "base_model": "base", "models": wd(*three)},
        "della_linear": {"merge_method": "della_linear", "base_model": "base", "models": wd(*three)},
        "sce": {"merge_method": "sce", "base_model": "base", "models": [{"model": m} for m in ("m1", "m2", "m3")],
                "parameters": {"select_topk": 0.5}},
        "model_stock": {"merge_method": "model_stock", "base_model": "base",
                        "models": [{"model": m} for m in ("m1", "m2", "m3")]},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "m1", "layer_range": [0, half]}]},
            {"sources": [{"model": "m2", "layer_range": [half // 2, layers]}]}]},
    }


def absolute(c, d):
    """The config with its model names as absolute paths (mergekit resolves them against the
    working directory)."""
    if isinstance(c, dict):
        return {k: (os.path.join(d, v) if k in ("model", "base_model") else absolute(v, d))
                for k, v in c.items()}
    if isinstance(c, list):
        return [absolute(x, d) for x in c]
    return c


def warm(d):
    for f in glob.glob(os.path.join(d, "*", "*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def timed(cmd, raw):
    """Wall seconds and peak RSS (MiB) of `cmd` in a fresh process (`/usr/bin/time` forks it
    from a small process: the child of this one would count this one's memory)."""
    start = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M"] + cmd, capture_output=True)
    wall = time.perf_counter() - start
    err = p.stderr.decode(errors="replace")
    peak = [float(l.split()[1]) for l in err.splitlines() if l.startswith("PEAK_KB")][-1] / 1024
    out = p.stdout.decode(errors="replace") + "\n".join(l for l in err.splitlines()[-5:] if "[" not in l)
    raw.write(f"$ {' '.join(cmd)}\n{out}\n[{wall:.2f} s, {peak:.0f} MiB, status {p.returncode}]\n\n")
    raw.flush()
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(p.stdout + p.stderr).decode(errors='replace')[-2000:]}")
    return wall, peak


def tensors(d):
    t = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        t.update(load_file(f))
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/merge-bench")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default="")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours per method (median)")
    ap.add_argument("--raw", default=os.path.join(ROOT, "docs", "bench", "merge-vs-mergekit-raw.txt"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    total = checkpoints(args.dir, args.layers)
    mergekit_yaml = [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    chosen = configs(args.layers)
    if args.methods:
        chosen = {k: v for k, v in chosen.items() if k in args.methods.split(",")}
    rows = []
    with open(args.raw, "w") as raw:
        raw.write(f"inputs: 4 checkpoints, {total / 1e9:.2f} GB; {os.cpu_count()} CPUs; torch {torch.__version__}\n\n")
        for name, c in chosen.items():
            cfg = os.path.join(args.dir, f"{name}.yml")
            with open(cfg, "w") as f:
                yaml.safe_dump(absolute(c, args.dir), f, sort_keys=False)
            mk_out, our_out = os.path.join(args.dir, f"out-mk-{name}"), os.path.join(args.dir, f"out-ours-{name}")
            for o in (mk_out, our_out):
                shutil.rmtree(o, ignore_errors=True)
            used = {s["model"] for s in c.get("models", [])} | {c.get("base_model")} | {
                src["model"] for s in c.get("slices", []) for src in s["sources"]}
            read = sum(os.path.getsize(os.path.join(args.dir, m, "model.safetensors")) for m in used if m)
            warm(args.dir)
            mk = timed(mergekit_yaml + [cfg, mk_out, "--lazy-unpickle", "--low-cpu-memory",
                                         "--no-copy-tokenizer", "--quiet"], raw)
            runs = []
            for _ in range(args.repeat):
                warm(args.dir)
                runs.append(timed([OURS, "--config", cfg, "--out", our_out], raw))
            runs.sort()
            ours = (runs[len(runs) // 2][0], max(r[1] for r in runs))  # median time, worst peak
            a, b = tensors(mk_out), tensors(our_out)
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if set(a) == set(b) else float("nan")
            rows.append((name, mk, ours, read, diff))
            print(f"{name}: mergekit {mk[0]:.1f} s / {mk[1]:.0f} MiB, ours {ours[0]:.2f} s / {ours[1]:.0f} MiB, "
                  f"{mk[0] / ours[0]:.1f}x, {read / 1e9 / ours[0]:.2f} GB/s, max |diff| {diff:.2e}", flush=True)
            for o in (mk_out, our_out):
                shutil.rmtree(o, ignore_errors=True)
    print("\n| method | read | mergekit | peak | ours | peak | speed-up | ours' read rate | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mk, ours, read, diff in rows:
        print(f"| {name} | {read / 1e9:.2f} GB | {mk[0]:.1f} s | {mk[1]:,.0f} MiB | {ours[0]:.2f} s | {ours[1]:,.0f} MiB "
              f"| **{mk[0] / ours[0]:.1f}×** | {read / 1e9 / ours[0]:.2f} GB/s | {diff:.1e} |")


if __name__ == "__main__":
    main()
