#!/usr/bin/env python3
"""Makes the mergekit parity fixtures under tests/fixtures/merge/ (run by hand; cargo test never
needs Python).

    pip install torch==2.11.0 "transformers>=5" && pip install --no-deps mergekit==0.1.5 \
        && pip install immutables click pydantic pyyaml tqdm accelerate scipy protobuf sentencepiece
    python3 scripts/make_merge_fixtures.py

Four tiny random Llama checkpoints (hidden 8, 3 layers, vocab 16, f32; `base`, and `m1`..`m3` =
base + seeded perturbations) saved with `save_pretrained` (kept when they exist, so that
adding a case leaves the others' fixtures alone), and for each case a mergekit 0.1.5 YAML
config (model paths relative to this folder) and mergekit's output `<case>/model.safetensors`
(and `<case>/config.json` where the case changes it). The deterministic methods are compared
tensor by tensor in tests/merge.rs.

The random methods (DARE, DELLA) draw their masks from libtorch's CPU generator, which tch
shares: `random.safetensors` holds inputs and mergekit's outputs per case of `RANDOM` with the
generator seeded before each tensor, and `random.json` the cases, so that tests/merge.rs can
seed the same way and expect the same masks.

`extract_lora/` is `mergekit-extract-lora --max-rank 4` of `m1` over `base`.
"""
import json
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
    # the base listed among the models (mergekit's own SLERP example form)
    "slerp_base_listed": {"merge_method": "slerp", "base_model": "base", "models": [
        {"model": "base"}, {"model": "m1"}], "parameters": {"t": [0.1, 0.9]}},
    "ties_base_listed": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "base", "parameters": {"weight": 0.3, "density": 0.2}},
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.7}}]},
    "linear_base_listed": {"merge_method": "linear", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.6}}, {"model": "base", "parameters": {"weight": 0.4}}]},
    # mergekit's README example: SLERP of two models' layer ranges, filtered gradients
    "slices_slerp": {"slices": [{"sources": [
        {"model": "base", "layer_range": [0, 3]}, {"model": "m1", "layer_range": [0, 3]}]}],
        "merge_method": "slerp", "base_model": "base", "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float16"},
    # two slices: gradients over each slice's depth (a one-layer slice has t = 1)
    "slices_two": {"slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "m1", "layer_range": [0, 2]}]},
        {"sources": [{"model": "base", "layer_range": [2, 3]}, {"model": "m1", "layer_range": [2, 3]}],
         "parameters": {"t": 0.25}}],
        "merge_method": "slerp", "base_model": "base", "parameters": {"t": [0.2, 0.8]}},
    # per-source and per-slice parameters
    "slices_task_arithmetic": {"slices": [{"sources": [
        {"model": "base", "layer_range": [0, 3]},
        {"model": "m1", "layer_range": [0, 3], "parameters": {"weight": [0.2, 1.0]}},
        {"model": "m2", "layer_range": [0, 3], "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.9}}],
        "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"weight": 0.1}},
    # a frankenmerge: m1's layers 0-1, then m2's 1-2 (the last scaled in o_proj): four layers
    "passthrough": {"slices": [
        {"sources": [{"model": "m1", "layer_range": [0, 2]}]},
        {"sources": [{"model": "m2", "layer_range": [1, 3], "parameters": {
            "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}],
        "merge_method": "passthrough", "dtype": "bfloat16"},
    "nuslerp": {"merge_method": "nuslerp", "models": [
        {"model": "m1", "parameters": {"weight": 0.3}}, {"model": "m2", "parameters": {"weight": 0.7}}]},
    "nuslerp_base_rows": {"merge_method": "nuslerp", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 0.5}}],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "nuslerp_base_columns": {"merge_method": "nuslerp", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m3", "parameters": {"weight": 2.0}}],
        "parameters": {"nuslerp_flatten": False}},
    "multislerp": {"merge_method": "multislerp", "models": [
        {"model": "m1", "parameters": {"weight": 0.5}}, {"model": "m2", "parameters": {"weight": 0.3}},
        {"model": "m3", "parameters": {"weight": 0.2}}]},
    "multislerp_base": {"merge_method": "multislerp", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": [1.0, 3.0]}},
        {"model": "m3", "parameters": {"weight": 2.0}}], "parameters": {"normalize_weights": True}},
    "karcher": {"merge_method": "karcher", "models": [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}]},
    "karcher_base": {"merge_method": "karcher", "base_model": "base", "models": [
        {"model": "m1"}, {"model": "m2"}], "parameters": {"max_iter": 3, "tol": 1e-7}},
    "sce": {"merge_method": "sce", "base_model": "base", "models": [
        {"model": "m1"}, {"model": "m2"}, {"model": "m3"}]},
    "sce_topk": {"merge_method": "sce", "base_model": "base", "models": [
        {"model": "base"}, {"model": "m1"}, {"model": "m2"}, {"model": "m3"}],
        "parameters": {"select_topk": 0.4}},
}

# tensor-level cases of the random methods: (method, per-model parameters, shared parameters)
RANDOM = {
    "della": ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                        {"weight": 0.5, "density": 0.4, "epsilon": 0.2}], {}),
    "della_linear": ("della_linear", [{"weight": 0.7, "density": 0.6, "epsilon": 0.15},
                                      {"weight": 0.4, "density": 0.3, "epsilon": 0.1}], {"lambda": 1.2}),
    "della_unrescaled": ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.3},
                                   {"weight": 1.0, "density": 0.5, "epsilon": 0.3}], {"rescale": False}),
    "dare_ties": ("dare_ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.8}], {}),
    "dare_linear": ("dare_linear", [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
                    {"normalize": True}),
}
SHAPES = {"matrix": (6, 10), "vector": (10,), "conv": (4, 3, 5)}


def random_cases():
    from safetensors.torch import save_file
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup
    g = torch.Generator().manual_seed(7)
    tensors, cases = {}, {}
    for shape_name, shape in SHAPES.items():
        for who in ("base", "m1", "m2"):
            scale = 1.0 if who == "base" else 0.1
            tensors[f"{shape_name}.{who}"] = torch.randn(shape, generator=g) * scale
    for seed, (case, (method, per_model, shared)) in enumerate(RANDOM.items()):
        cases[case] = {"method": method, "models": per_model, "parameters": shared, "seed": 100 + seed}
        for shape_name in SHAPES:
            ins = [tensors[f"{shape_name}.{w}"] for w in ("base", "m1", "m2")]
            group = TensorGroup.from_tensors(ins, base_index=0)
            params = dict(shared)
            for key in per_model[0]:
                params[key] = {i + 1: m[key] for i, m in enumerate(per_model)}
            torch.manual_seed(100 + seed)
            (out,) = merge_methods.get(method)((group,), parameters=params)
            tensors[f"{case}.{shape_name}"] = out.contiguous()
    save_file(tensors, os.path.join(OUT, "random.safetensors"))
    with open(os.path.join(OUT, "random.json"), "w") as f:
        json.dump(cases, f, indent=1)


def extract_lora():
    import subprocess, sys
    out = os.path.join(OUT, "extract_lora")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", os.path.abspath("m1"),
                    "--base-model", os.path.abspath("base"), "--out-path", out, "--max-rank", "4"], cwd=OUT, check=True)
    for extra in os.listdir(out):
        if extra not in ("adapter_model.safetensors", "adapter_config.json"):
            os.remove(os.path.join(out, extra))


def main():
    os.makedirs(OUT, exist_ok=True)
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    if not os.path.exists(os.path.join(OUT, "base", "model.safetensors")):
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
            shutil.rmtree(name, ignore_errors=True)
            run_merge(config, out_path=name, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, write_model_card=False))
            keep = ("model.safetensors", "config.json") if "slices" in c else ("model.safetensors",)
            for extra in os.listdir(name):
                if extra not in keep:
                    p = os.path.join(name, extra)
                    (shutil.rmtree if os.path.isdir(p) else os.remove)(p)
            print(name, os.listdir(name))
        extract_lora()
    finally:
        os.chdir(cwd)
    random_cases()
    for d in ("base", "m1", "m2", "m3"):
        for extra in os.listdir(os.path.join(OUT, d)):
            if extra not in ("model.safetensors", "config.json"):
                os.remove(os.path.join(OUT, d, extra))


if __name__ == "__main__":
    main()
