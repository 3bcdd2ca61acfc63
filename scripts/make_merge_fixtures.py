#!/usr/bin/env python3
"""Makes the mergekit parity fixtures under tests/fixtures/merge/ (run by hand; cargo test never
needs Python).

    pip install torch==2.11.0 "transformers>=5" && pip install --no-deps mergekit==0.1.5 \
        && pip install immutables click pydantic pyyaml tqdm accelerate
    python3 scripts/make_merge_fixtures.py

Four tiny random Llama checkpoints (hidden 8, 3 layers, vocab 16, f32; `base`, and `m1`..`m3` =
base + seeded perturbations) saved with `save_pretrained`, and for each case a mergekit 0.1.5
YAML config (model paths relative to this folder) and mergekit's output
`<case>/model.safetensors`. The deterministic methods are compared tensor by tensor in
tests/merge.rs; DARE is random (its masks are not reproducible across frameworks), so it is
not here.
"""
import os
import shutil

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "merge")

CASES = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "m1", "parameters": {"weight": 0.6}}, {"model": "m2", "parameters": {"weight": 0.4}}]},
    "linear_gradient_filters": {"merge_method": "linear", "models": [
        {"model": "m1", "parameters": {"weight": [1.0, 0.2]}},
        {"model": "m2", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]}}],
        "parameters": {"normalize": True}},
    "slerp": {"merge_method": "slerp", "base_model": "base", "models": [{"model": "m1"}],
              "parameters": {"t": [0.0, 0.3, 0.7, 1.0]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.7}}, {"model": "m2", "parameters": {"weight": -0.3}},
        {"model": "m3", "parameters": {"weight": 0.5}}], "parameters": {"lambda": 0.8}},
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.7}},
        {"model": "m3", "parameters": {"weight": 0.8, "density": 0.3}}]},
    "ties_unnormalized": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"normalize": False, "lambda": 1.5}},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.1}},
        {"model": "m2", "parameters": {"weight": 0.7, "density": 0.8, "gamma": 0.1}}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": [
        {"model": "m1"}, {"model": "m2"}, {"model": "m3"}]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "base", "models": [
        {"model": "m1"}, {"model": "m2"}, {"model": "m3"}], "parameters": {"filter_wise": True}},
}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(os.path.join(OUT, "base"))
    g = torch.Generator().manual_seed(1)
    for i in (1, 2, 3):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * i)
        m.save_pretrained(os.path.join(OUT, f"m{i}"))
    cwd = os.getcwd()
    os.chdir(OUT)
    try:
        for name, c in CASES.items():
            with open(f"{name}.yml", "w") as f:
                yaml.safe_dump(c, f, sort_keys=False)
            config = MergeConfiguration.model_validate(c)
            run_merge(config, out_path=name, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, write_model_card=False))
            for extra in os.listdir(name):
                if extra not in ("model.safetensors",):
                    p = os.path.join(name, extra)
                    (shutil.rmtree if os.path.isdir(p) else os.remove)(p)
            print(name, os.listdir(name))
    finally:
        os.chdir(cwd)
    for d in ("base", "m1", "m2", "m3"):
        for extra in os.listdir(os.path.join(OUT, d)):
            if extra not in ("model.safetensors", "config.json"):
                os.remove(os.path.join(OUT, d, extra))


if __name__ == "__main__":
    main()
