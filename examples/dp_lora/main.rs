//! Data-parallel LoRA training, one process per rank (c10d: gloo on CPUs, NCCL on the GPU of
//! `LOCAL_RANK` where CUDA is): every rank builds the same model, takes its shard of the batch,
//! and DDP's Reducer averages the adapters' gradients during the backward (`--flat`: one
//! all-reduce after it) before each AdamW step; rank 0 saves the adapter. Launch with torchrun
//! (from the torch the crate links):
//!
//! ```text
//! scripts/with-torch cargo build --release --example dp_lora
//! torchrun --no-python --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29511 \
//!     target/release/examples/dp_lora --out /tmp/dp-adapter
//! ```
//!
//! or by hand: `RANK=r WORLD_SIZE=n MASTER_ADDR=… MASTER_PORT=… dp_lora …` in each process.
//! Prints each step's loss (averaged over ranks) on rank 0. See docs/DISTRIBUTED.md.

use std::path::PathBuf;
use std::time::Duration;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::dist::{
    on_rank0, shard, DataParallel, DdpOptions, DistributedDataParallel, ProcessGroup, ReduceOp,
};
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::models::llama::{Llama, LlamaConfig};

fn main() -> tch_peft::Result<()> {
    let mut out = None;
    let mut steps = 5usize;
    let mut flat = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().map(PathBuf::from),
            "--steps" => steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(steps),
            "--flat" => flat = true,
            other => {
                eprintln!("usage: dp_lora [--out DIR] [--steps N] [--flat] (unknown `{other}`)");
                std::process::exit(2);
            }
        }
    }
    let group = ProcessGroup::from_env(Duration::from_secs(120))?;
    let (rank, world) = (group.rank(), group.world_size());
    // the same model on every rank (same seed); DataParallel makes the adapters rank 0's
    tch::manual_seed(0);
    let cfg = LlamaConfig {
        vocab_size: 128,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        ..LlamaConfig::default()
    };
    let device = group.device();
    let (mut base, adapters) = (nn::VarStore::new(device), nn::VarStore::new(device));
    let builder = LoraBuilder::new(
        &adapters.root(),
        LoraConfig { r: 8, lora_alpha: 16.0, ..LoraConfig::for_targets(["q_proj", "v_proj"]) },
    )?;
    let model = Llama::new(&base.root(), &cfg, Some(&builder))?;
    let adapter = builder.finish()?;
    base.freeze();
    // rank 0's adapters everywhere, then kept in step: DDP's buckets, or one flat all-reduce
    let (mut ddp, dp) = if flat {
        (None, Some(DataParallel::from_var_store(&group, &adapters)?))
    } else {
        (
            Some(DistributedDataParallel::from_var_store(
                &group,
                &adapters,
                DdpOptions::default(),
            )?),
            None,
        )
    };
    let mut opt = nn::AdamW::default().build(&adapters, 1e-3)?;
    // a global batch of 16 sequences; each rank takes every `world`-th one
    let batch = Tensor::randint(cfg.vocab_size, [16, 32], (Kind::Int64, Device::Cpu)).to(device);
    let rows: Vec<i64> = shard(&(0..16).collect::<Vec<i64>>(), rank, world);
    let mine = batch.index_select(0, &Tensor::from_slice(&rows).to(device));
    for step in 0..steps {
        opt.zero_grad();
        let forward = || -> tch_peft::Result<Tensor> {
            let h = model.hidden_states(&mine, None, true, None)?;
            model.causal_lm_loss(&h, &mine, true)
        };
        let loss = match ddp.as_mut() {
            Some(ddp) => {
                ddp.pre_forward()?;
                let loss = forward()?;
                ddp.post_forward(&[&loss])?;
                loss
            }
            None => forward()?,
        };
        loss.f_backward()?; // under DDP, the buckets are all-reduced while this runs
        if let Some(dp) = &dp {
            dp.sync_gradients()?;
        }
        opt.step();
        let mean = loss.detach().copy();
        group.all_reduce(&[&mean], ReduceOp::Average)?;
        if rank == 0 {
            println!("step {step}: loss {:.4} (mean over {world} ranks)", mean.double_value(&[]));
        }
    }
    if let Some(dir) = out {
        on_rank0(&group, || adapter.save_pretrained(&dir))?;
        if rank == 0 {
            println!("adapter saved to {}", dir.display());
        }
    }
    Ok(())
}
