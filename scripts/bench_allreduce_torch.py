"""The all-reduces of `bench/examples/dist_cpu` through Python's torch.distributed (gloo), for
the side-by-side in docs/PERFORMANCE.md. Run under torchrun, from the venv the crate links:

    scripts/with-torch torchrun --nproc-per-node 2 --master-addr 127.0.0.1 \
        --master-port 29532 scripts/bench_allreduce_torch.py [--reps 20]
"""
import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def timed(reps, f):
    f()
    v = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        f()
        v.append((time.perf_counter() - t) * 1e3)
    return statistics.median(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    reps = ap.parse_args().reps
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a: None)
    say(f"torch.distributed {torch.__version__}: {world} ranks, gloo over loopback, "
        f"{torch.get_num_threads()} intra-op threads per rank")
    say("all-reduce (sum, f32)                      median ms    GB/s (algbw)")
    for n in (1 << 20, 1 << 24):
        t = torch.ones(n)
        r = reps if n <= 1 << 20 else max(3, -(-reps // 4))
        ms = timed(r, lambda: dist.all_reduce(t))
        say(f"{f'{n >> 20} M floats, one tensor':<42} {ms:>9.2f} {4 * n / (ms * 1e-3) / 1e9:>10.3f}")
    many = [torch.ones(4096) for _ in range(256)]
    flat = timed(reps, lambda: dist.all_reduce_coalesced(many))
    each = timed(max(3, -(-reps // 4)), lambda: [dist.all_reduce(t) for t in many])
    say(f"{'256 × 4096 floats, all_reduce_coalesced':<42} {flat:>9.2f}")
    say(f"{'256 × 4096 floats, one per tensor':<42} {each:>9.2f}   ({each / flat:.1f}× coalesced)")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
