#!/usr/bin/env python3
"""Shows that Python PEFT 0.21 loads the LoRA adapters tch-peft writes and computes the same
logits (run by hand; needs the crate built and Python with torch, transformers 5 and peft 0.21).

    scripts/with-torch cargo build --release --example llama_logits
    ~/.cache/tch-peft/torch-2.11.0/bin/python scripts/check_rust_adapters_in_peft.py

For each config below, the Rust example `llama_logits` builds the tiny GQA Llama of
tests/fixtures/llama/gqa with a new adapter (initialised from the loaded weights, then moved by
seeded noise as a stand-in for training), saves it with `save_pretrained` and writes its logits,
unmerged and merged. Python then loads the checkpoint with transformers, the adapter directory
with `PeftModel.from_pretrained`, and compares logits (eager attention, f32). Prints one line
per config and exits non-zero on a mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "tests", "fixtures", "llama", "gqa")
TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
EXAMPLE = os.path.join(TARGET_DIR, "release", "examples", "llama_logits")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "attention": {"r": 4, "lora_alpha": 8, "target_modules": ATTN},
    "all_linear_rslora_patterns": {
        "r": 4,
        "lora_alpha": 6,
        "use_rslora": True,
        "target_modules": ATTN + MLP,
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"model.layers.1.self_attn.q_proj": 3},
    },
    "layers_to_transform": {"r": 2, "lora_alpha": 4, "target_modules": MLP, "layers_to_transform": [1], "layers_pattern": "layers"},
    "regex_targets": {"r": 2, "lora_alpha": 2, "target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ATTN + MLP, "use_dora": True},
    "lora_bias": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True},
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
    "dora_embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "v_proj"], "use_dora": True},
    "modules_to_save_lm_head": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


def main():
    if not os.path.exists(EXAMPLE):
        sys.exit(f"build the example first: scripts/with-torch cargo build --release --example llama_logits ({EXAMPLE} missing)")
    io = load_file(os.path.join(MODEL, "io.safetensors"))
    ids, mask = io["input_ids"], io["attention_mask"]
    base = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager").eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "input.json")
        with open(inp, "w") as f:
            json.dump({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}, f)
        for seed, (name, cfg) in enumerate(CONFIGS.items()):
            cfg_file = os.path.join(tmp, f"{name}.json")
            with open(cfg_file, "w") as f:
                json.dump({"peft_type": "LORA", **cfg}, f)
            out_dir = os.path.join(tmp, name)
            logits = {}
            for merge in (False, True):
                out = os.path.join(tmp, f"{name}-{merge}.safetensors")
                cmd = [EXAMPLE, "--model", MODEL, "--new-adapter", cfg_file, "--save-adapter", out_dir,
                       "--seed", str(seed), "--input", inp, "--output", out] + (["--merge"] if merge else [])
                subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
                logits[merge] = load_file(out)["logits"]
            model = PeftModel.from_pretrained(base, out_dir).eval()
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask).logits
            valid = mask.bool()
            d = (logits[False] - ref)[valid].abs().max().item()
            dm = (logits[True] - ref)[valid].abs().max().item()
            moved = (ref - base_logits)[valid].abs().max().item()
            ok = d < 1e-4 and dm < 1e-4 and moved > 1e-3
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:28s} |rust - peft| = {d:.2e} (merged {dm:.2e}); adapter moves logits by {moved:.2e}")
            base = model.unload()  # the base model without the adapter, for the next config
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
