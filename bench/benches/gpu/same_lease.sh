#!/usr/bin/env bash
# Issue 18's same-lease comparison on the GPU host, one part per call (each part fits a 10-minute
# call; run them back to back in one lease). Expects the harness binary at dev-bin/gpu (built
# here with `scripts/with-torch cargo bench -p tch-peft-bench --bench gpu --no-run`) and, for
# `liger`, the liger-kernel 0.8.5 wheel in .whl/. Writes NAME.txt and NAME.json under $OUT.
#
#   bash bench/benches/gpu/same_lease.sh rust|rust-logits|eager|liger|compile|profile
#   bash bench/benches/gpu/same_lease.sh qlora-rust|qlora-peft|qlora-8b-rust|qlora-8b-peft
#   bash bench/benches/gpu/same_lease.sh dist1   (issue 20; dev-bin/cuda and dev-bin/dp_lora too)
#   bash bench/benches/gpu/same_lease.sh dist1-rust|dist1-peft|dist2-rust|dist2-peft   (issue 21)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os; print(os.path.dirname(torch.__file__)+"/lib")')
py=bench/benches/gpu/peft_side.py
case "${1:-}" in
  rust) dev-bin/gpu --bench --only train,infer --variants none,lora,lora-keep,dora,loreft,full,none-ckpt,lora-ckpt --json "$OUT/rust.json" 2>&1 | tee "$OUT/rust.txt" ;;
  rust-logits) dev-bin/gpu --bench --only train --variants none,lora --loss logits \
      --json "$OUT/rust-logits.json" 2>&1 | tee "$OUT/rust-logits.txt" ;;
  profile) dev-bin/gpu --bench --only train --variants none,lora --profile --phases \
      2>&1 | tee "$OUT/rust-profile.txt" ;;
  eager) python3 $py --only train,infer --variants none,lora,lora_bf16,full \
      --infer-variants "base,lora unmerged bf16" --json "$OUT/eager.json" 2>&1 | tee "$OUT/eager.txt" ;;
  liger) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
    python3 $py --stack liger --only train --variants none,lora_bf16 \
      --json "$OUT/liger.json" 2>&1 | tee "$OUT/liger.txt" ;;
  compile) python3 $py --stack compile --only train,infer --variants none,lora_bf16,full \
      --infer-variants "base,lora unmerged bf16" --json "$OUT/compile.json" 2>&1 | tee "$OUT/compile.txt" ;;
  # issue 19: QLoRA beside bf16 LoRA, and PEFT + bitsandbytes (its wheel in .whl-bnb/)
  qlora-rust) dev-bin/gpu --bench --only train,gemv --variants lora,qlora,qdora,lora-ckpt,qlora-ckpt \
      --json "$OUT/qlora-rust.json" 2>&1 | tee "$OUT/qlora-rust.txt" ;;
  qlora-peft) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-bnb .whl-bnb/*.whl && export PYTHONPATH=/tmp/site-bnb &&
    python3 $py --only train,gemv --variants qlora,qlora-ckpt --json "$OUT/qlora-peft.json" 2>&1 \
      | tee "$OUT/qlora-peft.txt" ;;
  qlora-8b-rust) dev-bin/gpu --bench --only train --model 8b --layers 32 --batch 1 --seq 2048 \
      --variants qlora,qlora-ckpt --steps 10 --warmup 3 --json "$OUT/qlora-8b-rust.json" 2>&1 \
      | tee "$OUT/qlora-8b-rust.txt" ;;
  qlora-8b-peft) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-bnb .whl-bnb/*.whl && export PYTHONPATH=/tmp/site-bnb &&
    python3 $py --only train --model 8b --layers 32 --batch 1 --seq 2048 --variants qlora,qlora-ckpt \
      --steps 10 --warmup 3 --json "$OUT/qlora-8b-peft.json" 2>&1 | tee "$OUT/qlora-8b-peft.txt" ;;
  # issue 20: NCCL at a world of one: the CUDA tests (their NCCL test among them), dp_lora under
  # torchrun (NCCL from the environment), and the data-parallel forms of the LoRA step
  dist1) { dev-bin/cuda --test-threads=1 &&
      python3 -m torch.distributed.run --no-python --nproc-per-node 1 --master-addr 127.0.0.1 \
        --master-port 29541 dev-bin/dp_lora --steps 3 --out /tmp/dp-adapter; } 2>&1 \
      | tee "$OUT/dist1-check.txt" &&
    dev-bin/gpu --bench --only train --variants lora,lora+ddp,lora+ddp-nosync,lora+flat,lora+ddp-bf16,lora-ckpt,lora-ckpt+ddp \
      --json "$OUT/dist1.json" 2>&1 | tee "$OUT/dist1.txt" ;;
  # issue 21 on one GPU (a world of one: the wrapper's own cost), ours and PyTorch DDP + PEFT
  dist1-rust) dev-bin/gpu --bench --only allreduce,train \
      --variants lora,lora+ddp,lora+ddp-b1,lora+ddp-b5,lora+ddp-b100,lora+ddp-bf16,lora+ddp-nosync,lora+flat,lora+pertensor,dora,dora+ddp \
      --json "$OUT/dist1-rust.json" 2>&1 | tee "$OUT/dist1-rust.txt" ;;
  dist1-peft) { python3 scripts/bench_allreduce_torch.py --backend nccl &&
      python3 $py --only train --variants lora,lora+ddp,lora+ddp-nosync,lora+ddp-bf16 \
        --json "$OUT/dist1-peft.json"; } 2>&1 | tee "$OUT/dist1-peft.txt" ;;
  # issue 21 on nvidia-h200-x2 (NCCL_NVLS_ENABLE=0): the same under torchrun, 2 ranks
  dist2-rust) NCCL_NVLS_ENABLE=0 python3 -m torch.distributed.run --no-python --nproc-per-node 2 \
      --master-addr 127.0.0.1 --master-port 29581 dev-bin/gpu --bench --only allreduce,train \
      --variants lora+ddp,lora+ddp-b1,lora+ddp-b5,lora+ddp-b100,lora+ddp-bf16,lora+ddp-nosync,lora+flat,lora+pertensor,dora+ddp \
      --json "$OUT/dist2-rust.json" 2>&1 | tee "$OUT/dist2-rust.txt" ;;
  dist2-peft) { NCCL_NVLS_ENABLE=0 python3 -m torch.distributed.run --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port 29582 scripts/bench_allreduce_torch.py --backend nccl &&
      NCCL_NVLS_ENABLE=0 python3 -m torch.distributed.run --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port 29583 $py --only train \
        --variants lora+ddp,lora+ddp-nosync,lora+ddp-bf16 --json "$OUT/dist2-peft.json"; } 2>&1 \
      | tee "$OUT/dist2-peft.txt" ;;
  *) echo "usage: $0 rust|rust-logits|eager|liger|compile|profile|qlora-rust|qlora-peft|qlora-8b-rust|qlora-8b-peft|dist1|dist1-rust|dist1-peft|dist2-rust|dist2-peft" >&2; exit 2 ;;
esac
