#!/usr/bin/env python3
"""pyreft's LoReFT intervention cost on the shapes of benches/reft.rs (run by hand):

    python3 scripts/bench_pyreft_intervention.py [--device cuda] [--d 1024] [--r 4] [--n 14]

Prints the median time of (a) materialising `rotate_layer.weight` (torch's orthogonal
parametrisation, Householder) forward and backward, and (b) the whole intervention's forward
and backward on `n` gathered positions, like the Rust bench's `interleaved intervention` line.
Needs pyreft 0.1.0 importable (see scripts/make_reft_fixtures.py).
"""
import argparse
import time

import pyreft
import torch


def median_time(f, rounds, device):
    for _ in range(5):
        f()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--n", type=int, default=14)
    ap.add_argument("--rounds", type=int, default=300)
    a = ap.parse_args()
    torch.manual_seed(0)
    iv = pyreft.LoreftIntervention(embed_dim=a.d, low_rank_dimension=a.r, dtype=torch.float32).to(a.device)
    h = torch.randn(a.n, a.d, device=a.device)

    def ortho():
        iv.rotate_layer.weight.sum().backward()

    def whole():
        iv(h).sum().backward()

    t_o = median_time(ortho, a.rounds, a.device)
    t_w = median_time(whole, a.rounds, a.device)
    print(f"pyreft intervention d{a.d} r{a.r} {a.n} positions on {a.device}: R = orthogonal(V) (Householder) "
          f"fwd+bwd {t_o * 1e6:.1f} us, whole LoReFT fwd+bwd {t_w * 1e6:.1f} us ({100 * t_o / t_w:.0f}% of it) "
          f"[median of {a.rounds}], torch {torch.__version__}")


if __name__ == "__main__":
    main()
