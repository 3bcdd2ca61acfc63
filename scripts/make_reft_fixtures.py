#!/usr/bin/env python3
"""Makes the pyreft parity fixtures under tests/fixtures/reft/ (run by hand; cargo test never
needs Python).

    pip install torch==2.11.0 "transformers>=5"
    pip install --no-deps pyreft==0.1.0 pyvene==0.1.8 && pip install matplotlib datasets sentencepiece protobuf
    python3 scripts/make_reft_fixtures.py

One file per case, <case>.safetensors, with `h` [3, 5, 16] (f32 hidden states), pyreft's output
`out` = intervention(h) in eval mode, and the intervention's state dict under `sd.<name>` exactly
as pyreft's `state_dict()` returns it (LoReFT: `weight`, `bias`, `rotate_layer` = Rᵀ; the other
orthogonal kinds: torch's parametrisation tensors `rotate_layer.parametrizations.weight.original`
and `….0.base`; the linear kinds: `proj_layer.*`, `learned_source.*`; scalar buffers
`embed_dim`/`interchange_dim` included). Interventions are built with dtype=float32 (pyreft's
default bf16 linear layers would not accept f32 states), d = 16, r = 4, seeded; biases and the
constant sources are re-drawn so that no parameter is at its init.
"""
import json
import os

import pyreft
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reft")

CASES = {
    "loreft": (pyreft.LoreftIntervention, {}),
    "loreft_relu": (pyreft.LoreftIntervention, {"act_fn": "relu"}),
    "noreft": (pyreft.NoreftIntervention, {"add_bias": True}),
    "nodireft": (pyreft.NodireftIntervention, {"add_bias": True}),
    "nodireft_gelu": (pyreft.NodireftIntervention, {"add_bias": False, "act_fn": "gelu"}),
    "direft": (pyreft.DireftIntervention, {}),
    "consreft": (pyreft.ConsreftIntervention, {}),
    "lobireft": (pyreft.LobireftIntervention, {}),
}


def make_pyvene_dirs():
    """pyvene save directories of interventions on the tiny GQA Llama fixture (config.json +
    intkey_*.bin torch pickles, post-2025 key naming), with the intervened logits:
      pyvene_loreft/     LoReFT r 4 at layers 0 and 1 (tied), positions [0, 5] of each row
      pyvene_nodireft/   NodiReFT r 2 at layer 1, untied: two interventions, one on position 0,
                         one on position 5
      io.safetensors in each: `input_ids` [2, 6], `logits` (intervened), `locations`
      [interventions, batch, positions] as given to pyvene."""
    import shutil

    from transformers import LlamaForCausalLM

    model_dir = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama", "gqa")
    cases = {
        "pyvene_loreft": (pyreft.LoreftIntervention, [0, 1], 4, [[0, 5], [0, 5]]),
        "pyvene_nodireft": (pyreft.NodireftIntervention, [1, 1], 2, [[0], [5]]),
    }
    for k, (name, (cls, layers, r, pos)) in enumerate(cases.items()):
        torch.manual_seed(10 + k)
        model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
        reps = []
        for layer in layers:
            kw = {"add_bias": False} if cls is pyreft.NodireftIntervention else {}
            iv = cls(embed_dim=64, low_rank_dimension=r, dtype=torch.float32, **kw)
            with torch.no_grad():
                for n, p in iv.named_parameters():
                    if n.endswith("bias"):
                        p.copy_(torch.randn(p.shape) * 0.5)
            reps.append({"layer": layer, "component": "block_output", "low_rank_dimension": r, "intervention": iv})
        rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
        rm.eval()
        ids = torch.randint(0, 128, (2, 6))
        locations = [[p] * 2 for p in pos]  # [interventions, batch, positions]
        with torch.no_grad():
            _, out = rm({"input_ids": ids}, unit_locations={"sources->base": (None, locations)})
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        rm.save(d)
        save_file({"input_ids": ids, "logits": out.logits.contiguous(), "locations": torch.tensor(locations)},
                  os.path.join(d, "io.safetensors"))
        print(name, sorted(os.listdir(d)))


def main():
    os.makedirs(OUT, exist_ok=True)
    for i, (name, (cls, kw)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        iv = cls(embed_dim=16, low_rank_dimension=4, dtype=torch.float32, **kw).eval()
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in iv.named_parameters():
                if n.endswith("bias") or n == "learned_source":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        h = torch.randn(3, 5, 16, generator=g)
        with torch.no_grad():
            out = iv(h)
        t = {"h": h, "out": out}
        for k, v in iv.state_dict().items():
            t[f"sd.{k}"] = v.detach().clone().contiguous()
        if hasattr(iv, "rotate_layer"):
            t["rotate_layer_materialised"] = iv.rotate_layer.weight.detach().clone().contiguous()
        save_file(t, os.path.join(OUT, f"{name}.safetensors"))
        print(name, sorted(k for k in t if k.startswith("sd.")))
    make_pyvene_dirs()
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump({"pyreft": "0.1.0", "torch": torch.__version__}, f)


if __name__ == "__main__":
    main()
