#!/usr/bin/env python3
"""Shows that Python PEFT 0.21 on a bitsandbytes 4-bit base loads the QLoRA adapters tch-peft
trains on that base, computes the same logits, and merges them into the same 4-bit weights
(run by hand; needs the crate built and Python with torch, transformers 5, peft 0.21 and
bitsandbytes 0.50.2).

    scripts/with-torch cargo build --release --example llama_logits
    ~/.cache/tch-peft/mk/bin/python scripts/check_rust_qlora_in_peft.py

For each config below, the Rust example `llama_logits` loads tests/fixtures/bnb/llama-nf4 (NF4
with double quantization, kept 4-bit) with a new adapter on it (moved by seeded noise as a
stand-in for training), saves the adapter and writes its logits, unmerged and merged (the merge
quantizes W + s·BA again into NF4). Python loads the same directory with transformers and
bitsandbytes on the CPU, the adapter with `PeftModel.from_pretrained`, and compares: unmerged
logits, and merged logits after PEFT's `merge_and_unload` (bitsandbytes' re-quantization). As in
scripts/make_bnb_fixtures.py the 4-bit layers compute x·deq(W)ᵀ in f32 (bitsandbytes' CPU
forward rounds through bf16). Last, tests/fixtures/bnb/llama-src quantized on load here and
saved (`--4bit --save-model`) is read by transformers, which computes the same logits. Prints
one line per check; exits non-zero on a mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "tests", "fixtures", "bnb", "llama-nf4")
TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
EXAMPLE = os.path.join(TARGET_DIR, "release", "examples", "llama_logits")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora_all_linear": {"r": 4, "lora_alpha": 8, "target_modules": ALL},
    "rslora_attention": {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ALL[:4]},
    "dora_all_linear": {"r": 4, "lora_alpha": 8, "target_modules": ALL, "use_dora": True},
}


def reference_forward(self, x):
    st = self.weight.quant_state
    absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
    w = _dequantize_4bit_compute(self.weight.data.reshape(-1), absmax.float(), st.code,
                                 st.blocksize, st.shape, x.dtype)
    return torch.nn.functional.linear(x, w, self.bias)


def load_base():
    return LlamaForCausalLM.from_pretrained(MODEL, device_map="cpu", dtype=torch.float32,
                                            attn_implementation="eager").eval()


def main():
    if not os.path.exists(EXAMPLE):
        sys.exit(f"build the example first ({EXAMPLE} missing)")
    bnb.nn.Linear4bit.forward = reference_forward
    io = load_file(os.path.join(MODEL, "io.safetensors"))
    ids = io["input_ids"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "input.json")
        with open(inp, "w") as f:
            json.dump({"input_ids": ids.tolist()}, f)
        for seed, (name, cfg) in enumerate(CONFIGS.items()):
            cfg_file = os.path.join(tmp, f"{name}.json")
            with open(cfg_file, "w") as f:
                json.dump({"peft_type": "LORA", **cfg}, f)
            out_dir = os.path.join(tmp, name)
            logits = {}
            for merge in (False, True):
                out = os.path.join(tmp, f"{name}-{merge}.safetensors")
                cmd = [EXAMPLE, "--model", MODEL, "--new-adapter", cfg_file, "--save-adapter", out_dir,
                       "--seed", str(seed + 1), "--input", inp, "--output", out] + (["--merge"] if merge else [])
                subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
                logits[merge] = load_file(out)["logits"]
            base = load_base()
            model = PeftModel.from_pretrained(base, out_dir).eval()
            with torch.no_grad():
                ref = model(input_ids=ids).logits
                merged = model.merge_and_unload()
                ref_merged = merged(input_ids=ids).logits
            d = (logits[False] - ref).abs().max().item()
            dm = (logits[True] - ref_merged).abs().max().item()
            moved = (ref - io["logits"]).abs().max().item()
            ok = d < 1e-4 and dm < 1e-4 and moved > 1e-3
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:18s} |rust - peft| = {d:.2e}; merged into 4 bits "
                  f"{dm:.2e}; adapter moves logits by {moved:.2e}")
        # quantized on load here and saved in bitsandbytes' layout: transformers reads the saved
        # directory (the 4-bit weights as they are) and computes the same logits
        saved, out = os.path.join(tmp, "saved-nf4"), os.path.join(tmp, "saved.safetensors")
        src = os.path.join(ROOT, "tests", "fixtures", "bnb", "llama-src")
        subprocess.run([EXAMPLE, "--model", src, "--4bit", "--save-model", saved, "--input", inp,
                        "--output", out], check=True, capture_output=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        m = LlamaForCausalLM.from_pretrained(saved, device_map="cpu", dtype=torch.float32,
                                             attn_implementation="eager").eval()
        assert isinstance(m.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
        with torch.no_grad():
            ref = m(input_ids=ids).logits
        d = (load_file(out)["logits"] - ref).abs().max().item()
        d_theirs = (ref - io["logits"]).abs().max().item()
        ok = d < 1e-4 and d_theirs < 1e-4
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} saved 4-bit model    |rust - transformers| = {d:.2e}; "
              f"against transformers' own 4-bit model {d_theirs:.2e}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
