#!/usr/bin/env python3
"""Makes the PEFT parity fixtures under tests/fixtures/peft/ (run by hand; cargo test never
needs Python).

    pip install torch==2.11.0 "peft==0.21.*" "transformers>=5"
    python3 scripts/make_peft_fixtures.py

For each case, a PEFT 0.21 LoRA adapter on a tiny model whose module names follow a Llama
(`model.layers.0.self_attn.q_proj`, ...), saved with `save_pretrained` (adapter_config.json +
adapter_model.safetensors), plus:
  base.safetensors   the base model's state dict (f32)
  io.safetensors     `x` [3, 5, 16], PEFT's output `y` (adapter active, eval), `y_base` (adapter
                     disabled), and the merged weights `merged.<module>.weight` from
                     `merge_and_unload` (float32).
B is set to random values (seeded) so that the adapter changes the output.
"""
import json
import os
import shutil

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "peft")


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)
        self.v_proj = torch.nn.Linear(16, 8, bias=False)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(8, 12)


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn()
        self.mlp = Mlp()


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(), Layer()])


class Tiny(torch.nn.Module):
    """out = sum over layers of up_proj(v_proj(gelu(q_proj(x))))"""

    def __init__(self):
        super().__init__()
        self.model = Inner()

    def forward(self, x):
        out = 0
        for layer in self.model.layers:
            h = layer.self_attn.v_proj(torch.nn.functional.gelu(layer.self_attn.q_proj(x)))
            out = out + layer.mlp.up_proj(h)
        return out


CASES = {
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_bias=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "rslora_patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
        layers_to_transform=[1],
    ),
}


class Gpt2Block(torch.nn.Module):
    """GPT-2 style Conv1D layers (weight stored [in, out]): out = c_proj(gelu(c_attn(x)))"""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(24, 16)  # nf=out 24, nx=in 16
        self.c_proj = Conv1D(16, 24)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_attn(x)))


class ConvNet(torch.nn.Module):
    """out = conv2(relu(conv1(x))): conv1 3→8 k3 p1, conv2 8→4 k3 s2 p1"""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class EmbedNet(torch.nn.Module):
    """out = proj(embed_tokens(ids)): a table 20 x 8 and a linear 8 -> 6"""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(20, 8)
        self.proj = torch.nn.Linear(8, 6)

    def forward(self, ids):
        return self.proj(self.embed_tokens(ids))


def make_case(name, model_cls, cfg, x_shape, randomize_b=True, base_output=False, residual=False):
    """tests/fixtures/peft/<name>: `cfg` applied by PEFT to `model_cls()` (seeded), saved with
    `save_pretrained`, plus base.safetensors (the original base), io.safetensors (`x`, PEFT's `y`,
    `y_base` with the adapter disabled when asked, and `merged.<name>` from `merge_and_unload`,
    or `residual.<module>.weight` for inits that rewrite the base) and versions.json."""
    torch.manual_seed(0)
    base = model_cls().eval()
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    if randomize_b:
        with torch.no_grad():
            for n, p in model.named_parameters():
                # embeddings start with A = 0 (B random): randomise A there
                if "lora_B" in n or "lora_embedding_A" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                # the trainable copies of modules_to_save start as the base module: move them
                if "modules_to_save" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    if model_cls is EmbedNet:
        x = torch.randint(0, 20, x_shape, generator=g)
    else:
        x = torch.randn(*x_shape, generator=g)
    tensors = {"x": x}
    with torch.no_grad():
        tensors["y"] = model(x)
        if base_output:
            with model.disable_adapter():
                tensors["y_base"] = model(x)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    os.remove(os.path.join(d, "README.md"))
    if residual:
        for n, p in model.named_parameters():
            if n.endswith("base_layer.weight"):
                key = n.replace("base_model.model.", "").replace(".base_layer", "")
                tensors[f"residual.{key}"] = p.detach().clone().contiguous()
    else:
        for k, v in model.merge_and_unload().state_dict().items():
            tensors[f"merged.{k}"] = v.detach().clone().contiguous()
    save_file(tensors, os.path.join(d, "io.safetensors"))
    save_file(base_sd, os.path.join(d, "base.safetensors"))
    with open(os.path.join(d, "versions.json"), "w") as f:
        json.dump({"peft": peft.__version__, "torch": torch.__version__}, f)
    print(name, "->", d)


COMBINATIONS = {
    # name: (combination_type, kwargs)
    "cat": ("cat", {}),
    "svd": ("svd", {}),
    "svd_r2": ("svd", {"svd_rank": 2}),
    "linear": ("linear", {}),
    "ties": ("ties", {"density": 0.5}),
    "ties_frequency": ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    "ties_svd": ("ties_svd", {"density": 0.5}),
    "dare_linear_full": ("dare_linear", {"density": 1.0}),
    "magnitude_prune": ("magnitude_prune", {"density": 0.5}),
}


def make_multi():
    """tests/fixtures/peft/multi: two adapters on Tiny, "default" (r 4, alpha 8, q_proj+v_proj)
    and "other" (r 4, alpha 6, q_proj+up_proj), saved with save_pretrained ("other" in other/);
    io.safetensors: `x`, `y_default`, `y_other`, `y_both` (both active, summed), and for each
    add_weighted_adapter combination of (default 0.7, other -0.4): `y.<comb>` (only the new
    adapter active) and `BA.<comb>.<module>` (its B @ A, unscaled; PEFT's scaling is 1 here)."""
    torch.manual_seed(0)
    base = Tiny().eval()
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    x = torch.randn(3, 5, 16, generator=g)
    t = {"x": x}
    lora_model = model.base_model
    with torch.no_grad():
        for name, active in [("y_default", "default"), ("y_other", "other"), ("y_both", ["default", "other"])]:
            lora_model.set_adapter(active)
            t[name] = model(x)
        for comb, (ctype, kw) in COMBINATIONS.items():
            new = f"mix_{comb}"
            lora_model.add_weighted_adapter(["default", "other"], [0.7, -0.4], new, combination_type=ctype, **kw)
            lora_model.set_adapter(new)
            t[f"y.{comb}"] = model(x)
            for mod_name, mod in model.named_modules():
                if hasattr(mod, "lora_A") and new in mod.lora_A:
                    key = mod_name.replace("base_model.model.", "")
                    ba = mod.lora_B[new].weight @ mod.lora_A[new].weight
                    assert abs(mod.scaling[new] - 1.0) < 1e-12
                    t[f"BA.{comb}.{key}"] = ba.detach().clone().contiguous()
            lora_model.delete_adapter(new)
    d = os.path.join(OUT, "multi")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, selected_adapters=["default", "other"])
    for root, _, files in os.walk(d):
        if "README.md" in files:
            os.remove(os.path.join(root, "README.md"))
    save_file(t, os.path.join(d, "io.safetensors"))
    save_file(base_sd, os.path.join(d, "base.safetensors"))
    with open(os.path.join(d, "versions.json"), "w") as f:
        json.dump({"peft": peft.__version__, "torch": torch.__version__}, f)
    print("multi ->", d)


def main():
    tiny_x = (3, 5, 16)
    for name, kwargs in CASES.items():
        make_case(name, Tiny, LoraConfig(**kwargs), tiny_x, base_output=True)
    # PiSSA / OLoRA (no training): the base layers hold the residual W - s·BA
    for init in ("pissa", "olora"):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
        make_case(init, Tiny, cfg, tiny_x, randomize_b=False, residual=True)
    # PEFT cannot do dilated convolutions (its issue #3697)
    make_case("conv2d", ConvNet, LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2"]), (2, 3, 9, 9))
    # GPT-2 Conv1D weights are stored [in, out]; PEFT forces fan_in_fan_out
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    make_case("conv1d", Gpt2Block, cfg, tiny_x)
    # DoRA on an embedding (magnitude over the vocabulary, per coordinate) and a linear layer
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "proj"], use_dora=True)
    make_case("dora_embedding", EmbedNet, cfg, (3, 5), base_output=True)
    # modules_to_save: a trainable copy of a linear layer (Tiny) and of an embedding table
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["up_proj"])
    make_case("modules_to_save", Tiny, cfg, tiny_x, base_output=True)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["embed_tokens"])
    make_case("modules_to_save_embedding", EmbedNet, cfg, (3, 5), base_output=True)
    make_multi()


if __name__ == "__main__":
    main()
