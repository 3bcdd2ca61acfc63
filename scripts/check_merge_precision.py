#!/usr/bin/env python3
"""How far the streamed merge's Multi-SLERP and Karcher, and mergekit 0.1.5's (f32), are from
mergekit's methods run in f64, on one tensor of the checkpoints of
scripts/bench_merge_vs_mergekit.py (run that first; its configs and checkpoints stay in --dir).

    target/release/examples/merge --config /tmp/merge-bench/multislerp.yml --out /tmp/merge-bench/out-multislerp
    target/release/examples/merge --config /tmp/merge-bench/karcher.yml --out /tmp/merge-bench/out-karcher
    ~/.cache/tch-peft/mk/bin/python scripts/check_merge_precision.py [--dir /tmp/merge-bench]
"""
import argparse

import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.karcher import karcher_merge_method
from mergekit.merge_methods.multislerp import multislerp
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/merge-bench")
    ap.add_argument("--tensor", default="lm_head.weight")
    a = ap.parse_args()
    t = {m: load_file(f"{a.dir}/{m}/model.safetensors")[a.tensor] for m in ("base", "m1", "m2", "m3")}
    ours = {k: load_file(f"{a.dir}/out-{k}/model.safetensors")[a.tensor] for k in ("multislerp", "karcher")}
    res = {}
    for dt in (torch.float32, torch.float64):
        g = TensorGroup.from_tensors([t[m].to(dt) for m in ("base", "m1", "m2", "m3")], base_index=0)
        (ms,) = multislerp((g,), parameters={"weight": {1: 0.5, 2: 0.3, 3: 0.2}})
        (k,) = karcher_merge_method((TensorGroup.from_tensors([t[m].to(dt) for m in ("m1", "m2", "m3")]),))
        res[dt] = {"multislerp": ms, "karcher": k}
    for name in ("multislerp", "karcher"):
        exact = res[torch.float64][name]
        mk = (res[torch.float32][name].double() - exact).abs().max().item()
        us = (ours[name].double() - exact).abs().max().item()
        print(f"{name} {a.tensor}: mergekit f32 off by {mk:.2e}, ours off by {us:.2e} (from mergekit in f64)")


if __name__ == "__main__":
    main()
