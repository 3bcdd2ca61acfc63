"""The all-reduces of `bench/examples/dist_cpu` through Python's torch.distributed (gloo), for
the side-by-side in docs/PERFORMANCE.md. Run under torchrun, from the venv the crate links:

    scripts/with-torch torchrun --nproc-per-node 2 --master-addr 127.0.0.1 \
        --master-port 29532 scripts/bench_allreduce_torch.py [--reps 20]

`--backend nccl` (on a GPU host; without torchrun, a group of one) times instead the NCCL
all-reduce of 1 to 256 MB of f32, as the GPU harness's `--only allreduce` does through the
binding (median ms, bus GB/s = 2(n−1)/n × bytes ÷ time, or bytes ÷ time at a world of one).
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


def nccl(reps, warmup=5):
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29572")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", timeout=timedelta(seconds=300),
                            device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    factor = 2 * (world - 1) / world if world > 1 else 1.0
    if rank == 0:
        print(f"torch.distributed {torch.__version__} NCCL all-reduce ({world} rank(s), f32 sum)"
              "    MB    median ms    bus GB/s")
    for mb in (1, 4, 16, 64, 256):
        t = torch.ones(int(mb * 1e6 / 4), device="cuda")
        v = []
        for i in range(warmup + reps):
            dist.barrier()
            torch.cuda.synchronize()
            s = time.perf_counter()
            dist.all_reduce(t)
            torch.cuda.synchronize()
            if i >= warmup:
                v.append((time.perf_counter() - s) * 1e3)
        v.sort()
        ms = v[len(v) // 2]
        if rank == 0:
            print(f"{'':>66} {mb:>5} {ms:>12.3f} {factor * mb * 1e6 / (ms * 1e-3) / 1e9:>11.1f}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    a = ap.parse_args()
    reps = a.reps
    if a.backend == "nccl":
        return nccl(reps)
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
