#!/usr/bin/env python3
"""Shows that Python PEFT 0.21 loads the LoRA adapters `merge --extract-lora` writes, and that
they do what mergekit-extract-lora's do (run by hand; needs the example built and Python with
torch, transformers 5 and peft 0.21, e.g. the venv of scripts/bench_merge_vs_mergekit.py).

    scripts/with-torch cargo build --release --example merge
    ~/.cache/tch-peft/mk/bin/python scripts/check_extracted_lora_in_peft.py

On the tiny Llamas of tests/fixtures/merge (`m1` fine-tuned from `base`):
* rank 4: our adapter and mergekit 0.1.5's (`tests/fixtures/merge/extract_lora`), each loaded
  with `PeftModel.from_pretrained` on the base, give the same logits;
* full rank: base + our adapter in PEFT gives `m1`'s logits.
Prints one line per check and exits non-zero on a mismatch.
"""
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures", "merge")
TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
EXAMPLE = os.path.join(TARGET_DIR, "release", "examples", "merge")


def model(path):
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def main():
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 7))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (4, 64):
            out = os.path.join(tmp, f"r{rank}")
            subprocess.run([EXAMPLE, "--extract-lora", "--base", os.path.join(FIX, "base"), "--model",
                            os.path.join(FIX, "m1"), "--out", out, "--max-rank", str(rank)], check=True)
        ours4 = logits(PeftModel.from_pretrained(model(os.path.join(FIX, "base")), os.path.join(tmp, "r4")), ids)
        theirs4 = logits(PeftModel.from_pretrained(model(os.path.join(FIX, "base")), os.path.join(FIX, "extract_lora")), ids)
        d = (ours4 - theirs4).abs().max().item()
        ok = d < 1e-4
        failed |= not ok
        print(f"rank 4: ours vs mergekit's adapter in PEFT, max |logit diff| {d:.2e} {'ok' if ok else 'MISMATCH'}")
        full = logits(PeftModel.from_pretrained(model(os.path.join(FIX, "base")), os.path.join(tmp, "r64")), ids)
        d = (full - logits(model(os.path.join(FIX, "m1")), ids)).abs().max().item()
        ok = d < 1e-4
        failed |= not ok
        print(f"full rank: base + our adapter in PEFT vs the fine-tuned model, max |logit diff| {d:.2e} {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
