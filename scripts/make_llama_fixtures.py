#!/usr/bin/env python3
"""Makes the Llama parity fixtures under tests/fixtures/llama/ (run by hand; cargo test never
needs Python).

    pip install torch==2.11.0 "transformers>=5" "peft==0.21.*"
    python3 scripts/make_llama_fixtures.py

Two tiny random Llama checkpoints written by transformers' `save_pretrained`:
  gqa/      hidden 64, 2 layers, 4 heads / 2 kv heads (GQA), vocab 128, rope_theta 5000,
            untied lm_head, attention_bias: a single model.safetensors
  tied/     hidden 48, 3 layers, 3 heads / 3 kv heads, vocab 96, tied embeddings, rms_norm_eps
            1e-5, sharded into model-0000N-of-0000M.safetensors + model.safetensors.index.json
Each holds io.safetensors: `input_ids` [3, 7] (i64), `attention_mask` [3, 7] (left padding on
row 1, right padding on row 2), and transformers' f32 `logits` [3, 7, vocab] (eager attention).
gqa/ also holds a PEFT 0.21 LoRA adapter in gqa/adapter (r 4 on embed_tokens, q_proj, v_proj,
o_proj, down_proj; random B and random embedding factors; PEFT also saves the base embedding
table there) and its logits `logits_adapter` in io.safetensors.
"""
import json
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama")


def inputs(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ids[1, :2] = 0
    ids[2, 5:] = 0
    return ids, mask


def make(name, cfg, shard=None, adapter=False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # random norms so that their weights matter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            if n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, safe_serialization=True, **kwargs)
    gen = os.path.join(d, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    ids, mask = inputs(cfg.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()}
    if adapter:
        lcfg = LoraConfig(
            r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj", "o_proj", "down_proj"]
        )
        pm = get_peft_model(model, lcfg)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_embedding" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        pm.eval()
        with torch.no_grad():
            tensors["logits_adapter"] = pm(input_ids=ids, attention_mask=mask).logits.contiguous()
        ad = os.path.join(d, "adapter")
        pm.save_pretrained(ad)
        os.remove(os.path.join(ad, "README.md"))
    save_file(tensors, os.path.join(d, "io.safetensors"))
    with open(os.path.join(d, "versions.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "peft": peft.__version__,
                   "torch": torch.__version__}, f)
    print(name, "->", sorted(os.listdir(d)))


def main():
    make(
        "gqa",
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                    attention_bias=True, tie_word_embeddings=False, attn_implementation="eager"),
        adapter=True,
    )
    make(
        "tied",
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=3, num_key_value_heads=3, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, attn_implementation="eager"),
        shard="60KB",
    )


if __name__ == "__main__":
    main()
