//! Data-parallel costs on CPUs, run as one process per rank under torchrun (gloo over
//! loopback), beside `scripts/bench_allreduce_torch.py` (the same all-reduces through Python's
//! `torch.distributed`):
//!
//! ```text
//! scripts/with-torch cargo build --release -p tch-peft-bench --example dist_cpu
//! scripts/with-torch torchrun --no-python --nproc-per-node 2 --master-addr 127.0.0.1 \
//!     --master-port 29531 target/release/examples/dist_cpu [--reps 20] [--steps 10]
//! ```
//!
//! 1. All-reduce (sum) of 1 M and 16 M f32 through `ProcessGroup::all_reduce`: the median time
//!    and the algorithm bandwidth (bytes ÷ time); 256 tensors of 4,096 floats as one flat
//!    buffer against one all-reduce per tensor.
//! 2. A LoRA training step (a Llama-shaped model: hidden 256, 4 layers, LoRA r 8 on all seven
//!    linears, batch 4 × 128 per rank, AdamW): alone (no communication), under
//!    `DistributedDataParallel` (its Reducer), the same inside `no_sync` (the Reducer's hooks, no
//!    all-reduce), and `DataParallel` (one flat all-reduce after the backward). The exposed
//!    communication is the synchronised step minus the `no_sync` one.
//!
//! Rank 0 prints the table; every rank runs the same work. The four step variants are built
//! at once and their steps interleaved (three warm-up rounds, then `--steps`), medians.

use std::time::{Duration, Instant};

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::dist::{DataParallel, DdpOptions, DistributedDataParallel, ProcessGroup, ReduceOp};
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::models::llama::{Llama, LlamaConfig};

/// The median as Python's `statistics.median` takes it (the mean of the middle two of an even
/// count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median milliseconds of `reps` runs of `f` after one warm-up, every rank starting each
/// run together (a barrier before it, outside the time).
fn time(group: &ProcessGroup, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        group.barrier().expect("barrier");
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median(v)
}

fn main() -> tch_peft::Result<()> {
    let mut reps = 20usize;
    let mut steps = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |d: usize| args.next().and_then(|s| s.parse().ok()).unwrap_or(d);
        match a.as_str() {
            "--reps" => reps = num(reps),
            "--steps" => steps = num(steps),
            other => panic!("unknown argument `{other}` (--reps N, --steps N)"),
        }
    }
    let group = ProcessGroup::from_env_cpu(Duration::from_secs(300))?;
    let (rank, world) = (group.rank(), group.world_size());
    let say = |s: String| {
        if rank == 0 {
            println!("{s}");
        }
    };
    say(format!(
        "dist_cpu: {world} ranks, gloo over loopback, {} intra-op threads per rank",
        tch::get_num_threads()
    ));
    say("all-reduce (sum, f32)                      median ms    GB/s (algbw)".into());
    for n in [1i64 << 20, 1 << 24] {
        let t = Tensor::ones([n], (Kind::Float, Device::Cpu));
        let r = if n > 1 << 20 { reps.div_ceil(4).max(3) } else { reps };
        let ms = time(&group, r, || group.all_reduce(&[&t], ReduceOp::Sum).expect("all_reduce"));
        let gbs = 4.0 * n as f64 / (ms * 1e-3) / 1e9;
        say(format!("{:<42} {ms:>9.2} {gbs:>10.3}", format!("{} M floats, one tensor", n >> 20)));
    }
    let many: Vec<Tensor> =
        (0..256).map(|_| Tensor::ones([4096], (Kind::Float, Device::Cpu))).collect();
    let refs: Vec<&Tensor> = many.iter().collect();
    let flat = time(&group, reps, || group.all_reduce(&refs, ReduceOp::Sum).expect("flat"));
    let each = time(&group, reps.div_ceil(4).max(3), || {
        for t in &refs {
            group.all_reduce(&[t], ReduceOp::Sum).expect("one");
        }
    });
    say(format!("{:<42} {flat:>9.2}", "256 × 4096 floats, one flat buffer"));
    say(format!(
        "{:<42} {each:>9.2}   ({:.1}× the flat buffer)",
        "256 × 4096 floats, one per tensor",
        each / flat
    ));

    // the LoRA step
    let cfg = LlamaConfig {
        vocab_size: 1024,
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        ..LlamaConfig::default()
    };
    say(String::new());
    say(format!(
        "LoRA step (hidden {}, {} layers, r 8 on all linears, batch 4 × 128 per rank)   median ms",
        cfg.hidden_size, cfg.num_hidden_layers
    ));
    // every mode built at once and their steps interleaved, so that no mode carries the drift
    let modes = ["alone", "ddp", "ddp no_sync", "flat"];
    let mut setups = Vec::new();
    for mode in modes {
        tch::manual_seed(0);
        let (mut base, adapters) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        let builder = LoraBuilder::new(
            &adapters.root(),
            LoraConfig { r: 8, lora_alpha: 16.0, ..LoraConfig::for_targets(targets) },
        )?;
        let model = Llama::new(&base.root(), &cfg, Some(&builder))?;
        let _adapter = builder.finish()?;
        base.freeze();
        let opt = nn::AdamW::default().build(&adapters, 1e-4)?;
        setups.push((mode, base, adapters, model, opt));
    }
    let ids = Tensor::randint(cfg.vocab_size, [4, 128], (Kind::Int64, Device::Cpu));
    let mut ddps = Vec::new();
    let mut flats = Vec::new();
    for (mode, _, adapters, _, _) in &setups {
        let o = DdpOptions::default();
        ddps.push(
            mode.starts_with("ddp")
                .then(|| DistributedDataParallel::from_var_store(&group, adapters, o))
                .transpose()?,
        );
        flats.push(
            (*mode == "flat")
                .then(|| DataParallel::from_var_store(&group, adapters))
                .transpose()?,
        );
    }
    let mut times = vec![Vec::new(); modes.len()];
    for rep in 0..steps + 3 {
        for (k, (mode, _, _, model, opt)) in setups.iter_mut().enumerate() {
            group.barrier()?;
            let t = Instant::now();
            opt.zero_grad();
            let forward = || {
                let h = model.hidden_states(&ids, None, true, None).expect("forward");
                model.causal_lm_loss(&h, &ids, true).expect("loss")
            };
            let loss = match ddps[k].as_mut() {
                Some(d) if *mode == "ddp no_sync" => d.no_sync(|d| d.forward(forward))?,
                Some(d) => d.forward(forward)?,
                None => forward(),
            };
            loss.backward();
            if let Some(dp) = &flats[k] {
                dp.sync_gradients()?;
            }
            opt.step();
            if rep >= 3 {
                // three warm-up steps each
                times[k].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let trainable: i64 = setups[0].2.variables().values().map(|t| t.numel() as i64).sum();
    say(format!(
        "  ({trainable} trainable f32 = {:.2} MB of gradients)",
        4.0 * trainable as f64 / 1e6
    ));
    let mut results = Vec::new();
    for (k, mode) in modes.iter().enumerate() {
        let ms = median(times[k].clone());
        let buckets = match &ddps[k] {
            Some(d) => format!(
                "   ({} bucket(s), {})",
                d.buckets()?.len(),
                if d.buckets_rebuilt() { "rebuilt in ready order" } else { "not rebuilt" }
            ),
            None => String::new(),
        };
        say(format!("{mode:<42} {ms:>9.2}{buckets}"));
        results.push(ms);
    }
    say(format!(
        "exposed communication (ddp − ddp no_sync): {:.2} ms; flat − alone: {:.2} ms; ddp − alone: {:.2} ms",
        results[1] - results[2],
        results[3] - results[0],
        results[1] - results[0]
    ));
    group.barrier()?;
    Ok(())
}
