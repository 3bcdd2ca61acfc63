//! The GPU side-by-side harness, Rust half (issue 7). `bench/benches/gpu/peft_side.py` runs the same
//! workloads with Python PEFT / pyreft / transformers; both print the same table.
//!
//! ```text
//! scripts/with-torch cargo bench -p tch-peft-bench --bench gpu --no-run     # build here, run where the GPU is:
//! target/release/deps/gpu-<hash> --bench [--only linear,train,infer,interleaved] [--variants none,lora,dora,loreft,full]
//!     [--steps 20] [--warmup 5] [--layers 16] [--batch 8] [--seq 1024] [--json FILE]
//!     [--phases] [--profile] [--optimizer fused|libtorch] [--loss fused|logits]
//! (`--profile`: the GPU's kernel time per step and the top kernels, `TCH_PEFT_PROFILE_TOP=N` of
//! them, 14 by default)
//! python3 bench/benches/gpu/peft_side.py   [the same flags]
//! ```
//!
//! Workloads (bf16 base, f32 adapters, seed 0, a median of `--steps` CUDA-synchronised steps
//! after `--warmup`; peak memory = the caching allocator's peak of allocated bytes from the
//! variant's construction to its last step):
//! 1. `linear`: one Linear 4096 → 4096 on 8192 tokens, forward + backward of `sum(y ⊙ g)` to the
//!    input (and the adapter): the frozen base, LoRA r 16, DoRA r 16.
//! 2. `train`: a training step (forward, causal-LM cross-entropy in f32 — fused, without the logits,
//!    unless `--loss logits` — backward,
//!    AdamW) of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP
//!    8192, vocabulary 128256, tied embeddings) on 8 × 1024 random tokens: `none` (frozen; the
//!    input embeddings require grad, so the backward runs through every block: the floor), `lora`
//!    (r 16, α 32, on all seven linear layers of every block), `dora`, `loreft` (r 8, `f7+l7`,
//!    every layer), `full` (every weight, AdamW on the bf16 weights); besides those,
//!    `lora-keep` (LoRA with every LoRA node keeping its input: `ops::set_recompute(false)`) and
//!    `none-ckpt` / `lora-ckpt` (activation checkpointing per block:
//!    `Llama::causal_lm_backward_checkpointed`); any of them with `+ddp`, `+ddp-bf16`,
//!    `+ddp-nosync` or `+flat` (data-parallel: `bench/benches/gpu/dist.rs`).
//! 3. `infer`: the same model's inference forward (logits, `no_grad`): base, LoRA unmerged, LoRA
//!    merged (`merge`, which keeps the pre-merge weights in host memory for a bit-exact unmerge)
//!    and `merge_and_unload` (no copy kept, as PEFT's merge).
//! 4. `interleaved` (not in the default `--only`): the training step (none, LoRA, DoRA) and the
//!    four inference variants again, every variant built at once and their steps alternated, so
//!    that the ratios carry no run-to-run drift (no peak memory there).
//!
//! Besides the median step, each row gives the host time (until the step's last kernel is
//! queued): when it is close to the step time, the GPU waits on the CPU (launch-bound).
//!
//! Without `--bench` (`cargo test --benches`) or without CUDA it measures nothing.

use std::time::Instant;

#[path = "../../../benches/common/mod.rs"]
mod common;
mod dist;
use common::sync;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};
use tch_peft::lora::{LoraBuilder, LoraConfig, LoraLinear};
use tch_peft::models::llama::{Llama, LlamaConfig};
use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};

struct Args {
    only: Vec<String>,
    variants: Vec<String>,
    steps: usize,
    warmup: usize,
    layers: i64,
    batch: i64,
    seq: i64,
    json: Option<String>,
    /// `fused` (tch_peft::optim::FusedAdamW, default) or `libtorch` (tch's nn::AdamW).
    optimizer: String,
    /// Also time forward+loss, backward and the optimizer apart (synchronised between).
    phases: bool,
    /// Also profile a few steps: the GPU's summed kernel time per step and the top kernels.
    profile: bool,
    /// `1b` (Llama-3.2-1B-shaped, default) or `8b` (Llama-3.1-8B-shaped).
    model: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        only: vec!["linear".into(), "train".into(), "infer".into()],
        variants: ["none", "lora", "dora", "loreft", "full"].map(String::from).to_vec(),
        steps: 20,
        warmup: 5,
        layers: 16,
        batch: 8,
        seq: 1024,
        json: None,
        optimizer: "fused".into(),
        phases: false,
        profile: false,
        model: "1b".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let list = |v: Option<String>| -> Vec<String> {
            v.unwrap_or_default().split(',').map(|s| s.trim().to_string()).collect()
        };
        let num = |v: Option<String>| -> i64 {
            v.and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{k} takes a number"))
        };
        match k.as_str() {
            "--only" => a.only = list(it.next()),
            "--variants" => a.variants = list(it.next()),
            "--steps" => a.steps = num(it.next()) as usize,
            "--warmup" => a.warmup = num(it.next()) as usize,
            "--layers" => a.layers = num(it.next()),
            "--batch" => a.batch = num(it.next()),
            "--seq" => a.seq = num(it.next()),
            "--json" => a.json = it.next(),
            "--optimizer" => a.optimizer = it.next().unwrap_or_default(),
            "--phases" => a.phases = true,
            "--profile" => a.profile = true,
            "--model" => a.model = it.next().unwrap_or_default(),
            "--loss" => {
                let fused = match it.next().as_deref() {
                    Some("fused") => true,
                    Some("logits") => false,
                    other => panic!("--loss takes fused or logits, not {other:?}"),
                };
                FUSED_LOSS.store(fused, std::sync::atomic::Ordering::Relaxed);
            }
            _ => {} // cargo's and criterion's own flags (--bench, filters)
        }
    }
    a
}

/// The optimizer of a training step.
enum Opt {
    Fused(tch_peft::optim::FusedAdamW),
    Libtorch(nn::Optimizer),
}

impl Opt {
    fn zero_grad(&mut self) {
        match self {
            Opt::Fused(o) => o.zero_grad(),
            Opt::Libtorch(o) => o.zero_grad(),
        }
    }
    fn step(&mut self) {
        match self {
            Opt::Fused(o) => o.step().expect("step"),
            Opt::Libtorch(o) => o.step(),
        }
    }
}

/// One measured row.
struct Row {
    workload: String,
    variant: String,
    step_ms: f64,
    host_ms: f64,
    peak_gb: f64,
    trainable: i64,
}

/// Medians of the step time and of the host (enqueue) time over `steps` after `warmup`.
fn time_steps(device: Device, warmup: usize, steps: usize, f: impl FnMut()) -> (f64, f64) {
    time_interleaved(device, warmup, steps, &mut [Box::new(f)])[0]
}

/// Profiles `steps` synchronised runs of `f` and prints the device's busy time per step against
/// the wall time, and the kernels that cost most.
fn profile_steps(label: &str, device: Device, steps: usize, mut f: impl FnMut()) {
    sync(device);
    let start = Instant::now();
    let (_, p) = tch_peft::profiler::profile_device(|| {
        for _ in 0..steps {
            f();
        }
        sync(device);
    })
    .expect("profiler");
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / steps as f64;
    println!(
        "profile {label}: wall {:.2} ms/step (profiled), GPU busy {:.2} ms/step, {} launches/step",
        start.elapsed().as_secs_f64() * 1e3 / steps as f64,
        per(p.busy()),
        p.launches() / steps as u64
    );
    let shown = std::env::var("TCH_PEFT_PROFILE_TOP").ok().and_then(|v| v.parse().ok());
    for k in p.kernels.iter().take(shown.unwrap_or(14)) {
        let name: String = k.name.chars().take(110).collect();
        println!("  {:>8.3} ms {:>6} {}", per(k.total), k.count / steps as u64, name);
    }
}

fn peak_gb(device: Device) -> f64 {
    tch_peft::memory::peak_bytes(device).map(|b| b as f64 / 1e9).unwrap_or(f64::NAN)
}

/// Decode-sized forwards (a batch of 1 token, `no_grad`) of single layers of the 1B and 8B
/// shapes: the 4-bit layer (NF4 + double quantization: the GEMV kernel), the same through
/// dequantize-then-GEMM, and the bf16 layer.
fn gemv_rows(args: &Args, device: Device, rows: &mut Vec<Row>) {
    use tch_peft::quant::{Bnb4bitWeight, QuantLinear, QuantType};
    let shapes =
        [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 4096), (4096, 14336), (14336, 4096)];
    for (i, o) in shapes {
        tch::manual_seed(0);
        let w = Tensor::randn([o, i], (Kind::BFloat16, device)) * 0.02;
        let q = QuantLinear::new(
            Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true).expect("quantize"),
            None,
        )
        .expect("layer");
        let x = Tensor::randn([1, i], (Kind::BFloat16, device));
        let steps = args.steps * 10;
        let _guard = tch::no_grad_guard();
        for (variant, f) in [
            ("4-bit gemv", Box::new(|| drop(q.f_forward(&x).expect("forward"))) as Box<dyn Fn()>),
            ("4-bit dequant+gemm", Box::new(|| drop(q.f_forward_composed(&x).expect("forward")))),
            ("bf16", Box::new(|| drop(x.linear::<Tensor>(&w, None)))),
        ] {
            let (step_ms, host_ms) = time_steps(device, args.warmup, steps, &f);
            rows.push(Row {
                workload: format!("decode linear 1x{i}->{o}"),
                variant: variant.into(),
                step_ms,
                host_ms,
                peak_gb: f64::NAN,
                trainable: 0,
            });
        }
    }
}

fn linear_rows(args: &Args, device: Device, rows: &mut Vec<Row>) {
    let (tokens, d) = (8192, 4096);
    for variant in ["base", "lora", "dora"] {
        tch_peft::memory::reset_peak(device);
        tch::manual_seed(0);
        let mut base_vs = nn::VarStore::new(device);
        let base = nn::linear(base_vs.root() / "proj", d, d, Default::default());
        base_vs.set_kind(Kind::BFloat16);
        base_vs.freeze();
        let adapter_vs = nn::VarStore::new(device);
        let x = Tensor::randn([tokens, d], (Kind::BFloat16, device)).set_requires_grad(true);
        let g = Tensor::randn([tokens, d], (Kind::BFloat16, device));
        let cfg = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            use_dora: variant == "dora",
            ..Default::default()
        };
        let (step_ms, host_ms, trainable) = if variant == "base" {
            let (s, h) = time_steps(device, args.warmup, args.steps, || {
                let y = x.apply(&base);
                let _ = Tensor::run_backward(&[(y * &g).sum(Kind::BFloat16)], &[&x], false, false);
            });
            (s, h, 0)
        } else {
            let lora = LoraLinear::new(base, &(adapter_vs.root() / "proj"), &cfg).expect("lora");
            let (a, b) = (lora.lora_a().shallow_clone(), lora.lora_b().shallow_clone());
            let mut inputs = vec![x.shallow_clone(), a, b];
            if let Some(m) = lora.magnitude() {
                inputs.push(m.shallow_clone());
            }
            let refs: Vec<&Tensor> = inputs.iter().collect();
            let (s, h) = time_steps(device, args.warmup, args.steps, || {
                let y = lora.f_forward_t(&x, true).expect("forward");
                let _ = Tensor::run_backward(&[(y * &g).sum(Kind::BFloat16)], &refs, false, false);
            });
            let n = adapter_vs.variables().values().map(|t| t.numel() as i64).sum();
            (s, h, n)
        };
        rows.push(Row {
            workload: "linear 8192x4096->4096 r16 fwd+bwd".into(),
            variant: variant.into(),
            step_ms,
            host_ms,
            peak_gb: peak_gb(device),
            trainable,
        });
    }
}

fn llama_config(args: &Args) -> LlamaConfig {
    let (d, mlp, tied) = match args.model.as_str() {
        "1b" => (2048, 8192, true),
        "8b" => (4096, 14336, false),
        other => panic!("--model takes 1b or 8b, not {other}"),
    };
    serde_json::from_str(&format!(
        r#"{{"vocab_size": 128256, "hidden_size": {d}, "intermediate_size": {mlp},
            "num_hidden_layers": {}, "num_attention_heads": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": {tied}}}"#,
        args.layers
    ))
    .expect("config")
}

/// The workload's model, as the rows name it.
fn model_label(args: &Args) -> String {
    format!("llama-{}", args.model.to_uppercase())
}

const ALL_LINEAR: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A frozen bf16 Llama with, for `lora`/`dora`, f32 adapters on every linear layer of the
/// blocks; `qlora`/`qdora`: the same on a base whose block linears are 4-bit (NF4, double
/// quantization, random bf16 weights quantized on the GPU; `lm_head` and the embeddings bf16).
fn llama(
    cfg: &LlamaConfig,
    device: Device,
    variant: &str,
) -> (nn::VarStore, nn::VarStore, Llama, Option<tch_peft::LoraAdapter>) {
    tch::manual_seed(0);
    let mut base_vs = nn::VarStore::new(device);
    let adapter_vs = nn::VarStore::new(device);
    let quant = matches!(variant, "qlora" | "qdora");
    let builder = matches!(variant, "lora" | "dora" | "qlora" | "qdora").then(|| {
        LoraBuilder::new(
            &adapter_vs.root(),
            LoraConfig {
                r: 16,
                lora_alpha: 32.0,
                use_dora: variant.ends_with("dora"),
                ..LoraConfig::for_targets(ALL_LINEAR)
            },
        )
        .expect("lora config")
    });
    let cfg = if quant {
        &cfg.clone().with_bnb_4bit(&tch_peft::quant::Bnb4bitConfig::default())
    } else {
        cfg
    };
    // the float variables made in bf16 directly (an 8B model's f32 embeddings need not exist)
    base_vs.set_kind(Kind::BFloat16);
    let model = Llama::new(&base_vs.root(), cfg, builder.as_ref()).expect("model");
    let lora = builder.map(|b| b.finish().expect("lora"));
    base_vs.set_kind(Kind::BFloat16);
    base_vs.freeze();
    if quant {
        use tch_peft::quant::{Bnb4bitWeight, QuantType};
        let mut dense = 0i64;
        tch::no_grad(|| {
            for (name, layer) in model.quantized_layers() {
                let (o, i) = (layer.out_features(), layer.in_features());
                let w = Tensor::randn([o, i], (Kind::BFloat16, device)) * 0.02;
                let q = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true).expect("quantize");
                layer.load(&name, &q).expect("load");
                dense += o * i;
            }
        });
        let bytes = model.quantized_bytes() as f64;
        println!(
            "{variant}: 4-bit block linears hold {:.3} GB = {:.3}x their bf16 {:.3} GB ({:.3} bits/weight)",
            bytes / 1e9,
            bytes / (2.0 * dense as f64),
            2.0 * dense as f64 / 1e9,
            8.0 * bytes / dense as f64
        );
    }
    if let Some(l) = &lora {
        // DoRA's magnitude from the bf16 weights
        l.init_from_base_weights().expect("init");
    }
    (base_vs, adapter_vs, model, lora)
}

/// `--loss fused` (default): the model's `causal_lm_loss` of its final hidden states
/// (`tch_peft::ops::causal_lm_loss`, no logits held); `--loss logits`: the full f32 logits and
/// their cross-entropy, as transformers' eager loss.
static FUSED_LOSS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// A training step's forward and backward with activation checkpointing per block (the fused
/// loss; `frozen` as in [`step_loss`]).
fn checkpointed_step(
    model: &Llama,
    ids: &Tensor,
    frozen: bool,
    hook: Option<&dyn tch_peft::models::ResidualHook>,
) {
    if frozen {
        let emb = model.embed(ids).expect("embed").detach().set_requires_grad(true);
        let _ = model.causal_lm_backward_checkpointed_embeds(&emb, None, ids, None).expect("step");
    } else {
        let _ = model.causal_lm_backward_checkpointed(ids, None, ids, hook).expect("step");
    }
}

/// A training step's loss: `frozen` feeds detached embeddings that require grad (the floor's
/// backward through every block); `labels` are `ids` shifted (the fused loss shifts itself).
fn step_loss(
    model: &Llama,
    ids: &Tensor,
    labels: &Tensor,
    frozen: bool,
    hook: Option<&dyn tch_peft::models::ResidualHook>,
) -> Tensor {
    let h = if frozen {
        let emb = model.embed(ids).expect("embed").detach().set_requires_grad(true);
        model.hidden_states_embeds(&emb, None, true, None).expect("forward")
    } else {
        model.hidden_states(ids, None, true, hook).expect("forward")
    };
    if FUSED_LOSS.load(std::sync::atomic::Ordering::Relaxed) {
        model.causal_lm_loss(&h, ids, true).expect("loss")
    } else {
        causal_lm_loss(&model.logits(&h, true).expect("head"), labels)
    }
}

fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let v = logits.size()[2];
    logits.to_kind(Kind::Float).view([-1, v]).cross_entropy_loss::<Tensor>(
        &labels.view([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    )
}

/// The token batch (seed 1) and its causal-LM labels: transformers' shift, position i predicts
/// token i + 1, the last position is ignored.
fn batch(cfg: &LlamaConfig, args: &Args, device: Device) -> (Tensor, Tensor) {
    let (b, s) = (args.batch, args.seq);
    tch::manual_seed(1);
    let ids = Tensor::randint(cfg.vocab_size, [b, s], (Kind::Int64, device));
    let labels = Tensor::cat(
        &[ids.narrow(1, 1, s - 1), Tensor::full([b, 1], -100, (Kind::Int64, device))],
        1,
    );
    (ids, labels)
}

const INFER_VARIANTS: [&str; 4] = ["base", "lora unmerged", "lora merged", "lora merge_and_unload"];

/// The model of an inference variant (base and adapter stores kept alive with it).
fn infer_model(
    cfg: &LlamaConfig,
    device: Device,
    variant: &str,
) -> (nn::VarStore, nn::VarStore, Llama) {
    let (base_vs, adapter_vs, model, lora) =
        llama(cfg, device, if variant == "base" { "none" } else { "lora" });
    if let Some(l) = lora {
        // non-zero B so the unmerged branch does real work and the merge changes weights
        tch::no_grad(|| {
            for (_, t) in adapter_vs.variables() {
                let _ = t.shallow_clone().normal_(0.0, 0.01);
            }
        });
        match variant {
            // keeps the pre-merge weights (in host memory) for a bit-exact unmerge
            "lora merged" => l.merge().expect("merge"),
            // PEFT's merge_and_unload: no copy kept, the adapters dropped
            "lora merge_and_unload" => l.merge_and_unload(Some(&adapter_vs)).expect("merge"),
            _ => {}
        }
    }
    (base_vs, adapter_vs, model)
}

fn train_rows(args: &Args, device: Device, rows: &mut Vec<Row>) {
    let cfg = llama_config(args);
    let (b, s) = (args.batch, args.seq);
    let (ids, labels) = batch(&cfg, args, device);
    for variant in &args.variants {
        tch_peft::memory::reset_peak(device);
        // `lora-keep`: LoRA with every LoRA node keeping its input (no recomputation);
        // `…-ckpt`: the variant with activation checkpointing per block
        // `…+ddp` and the like: data-parallel (bench/benches/gpu/dist.rs)
        let (plain, dp_mode) = dist::parse(variant);
        tch_peft::ops::set_recompute(plain != "lora-keep");
        let ckpt = plain.ends_with("-ckpt");
        let built = match plain {
            "lora-keep" => "lora",
            v => v.trim_end_matches("-ckpt"),
        };
        let (mut base_vs, adapter_vs, model, _lora) = llama(&cfg, device, built);
        let reft = (built == "loreft").then(|| {
            ReftModel::new(
                &adapter_vs.root(),
                ReftConfig::new(
                    InterventionConfig::new(InterventionKind::LoReft, cfg.hidden_size, 8),
                    ReftLayers::all(),
                    "f7+l7".parse().expect("positions"),
                ),
                cfg.num_hidden_layers,
            )
            .expect("reft")
        });
        let loc = reft.as_ref().map(|r| {
            r.config()
                .positions
                .batch_locations(&vec![s; b as usize], &vec![0; b as usize], true, device)
                .expect("locations")
        });
        let hook = reft.as_ref().zip(loc.as_ref()).map(|(r, l)| r.hook(l));
        if built == "full" {
            base_vs.unfreeze();
        }
        let trained_vs = if built == "full" { &base_vs } else { &adapter_vs };
        let trainable: i64 = trained_vs.variables().values().map(|t| t.numel() as i64).sum();
        let mut opt = (built != "none").then(|| {
            if args.optimizer == "libtorch" {
                Opt::Libtorch(nn::AdamW::default().build(trained_vs, 1e-5).expect("optimizer"))
            } else {
                Opt::Fused(
                    tch_peft::optim::FusedAdamW::from_var_store(trained_vs, 1e-5).expect("optim"),
                )
            }
        });
        let mut dp = dp_mode.map(|m| dist::Dp::new(m, trained_vs));
        let forward = || {
            let hook = hook.as_ref().map(|h| h as &dyn tch_peft::models::ResidualHook);
            step_loss(&model, &ids, &labels, built == "none", hook)
        };
        let mut step = |phase: &mut dyn FnMut(usize)| {
            if ckpt {
                // forward and backward in one call (phase 0 stays empty)
                phase(0);
                if let Some(o) = opt.as_mut() {
                    o.zero_grad();
                }
                if let Some(dp) = dp.as_mut() {
                    dp.before_forward();
                    dp.after_forward(&[]);
                }
                let hook = hook.as_ref().map(|h| h as &dyn tch_peft::models::ResidualHook);
                checkpointed_step(&model, &ids, built == "none", hook);
            } else {
                if let Some(dp) = dp.as_mut() {
                    dp.before_forward();
                }
                let loss = forward();
                if let Some(dp) = dp.as_mut() {
                    dp.after_forward(&[&loss]);
                }
                phase(0);
                if let Some(o) = opt.as_mut() {
                    o.zero_grad();
                }
                loss.backward();
            }
            if let Some(dp) = dp.as_ref() {
                dp.after_backward();
            }
            phase(1);
            if let Some(o) = opt.as_mut() {
                o.step();
            }
            if let Some(r) = &reft {
                r.retract().expect("retract");
            }
            phase(2);
        };
        let (step_ms, host_ms) =
            time_steps(device, args.warmup, args.steps, || step(&mut |_: usize| {}));
        if args.phases {
            let mut t = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..args.steps.min(10) {
                sync(device);
                let mut last = Instant::now();
                step(&mut |p: usize| {
                    sync(device);
                    t[p].push(last.elapsed().as_secs_f64() * 1e3);
                    last = Instant::now();
                });
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "phases {variant}: forward+loss {:.2} ms, backward {:.2} ms, optimizer+retraction {:.2} ms (synchronised)",
                med(&mut t[0]),
                med(&mut t[1]),
                med(&mut t[2])
            );
        }
        if args.profile {
            profile_steps(&format!("train {variant}"), device, 3, || step(&mut |_: usize| {}));
        }
        rows.push(Row {
            workload: format!("train {} b{b} s{s} L{}", model_label(args), cfg.num_hidden_layers),
            variant: if variant == "none" {
                variant.clone()
            } else {
                format!("{variant} ({} AdamW)", args.optimizer)
            },
            step_ms,
            host_ms,
            peak_gb: peak_gb(device),
            trainable,
        });
    }
    tch_peft::ops::set_recompute(true);
}

fn infer_rows(args: &Args, device: Device, rows: &mut Vec<Row>) {
    let cfg = llama_config(args);
    let (b, s) = (args.batch, args.seq);
    let (ids, _) = batch(&cfg, args, device);
    for variant in INFER_VARIANTS {
        tch_peft::memory::reset_peak(device);
        let (_base_vs, _adapter_vs, model) = infer_model(&cfg, device, variant);
        let mut forward = || {
            let _ = tch::no_grad(|| model.forward_t(&ids, None, false).expect("forward"));
        };
        let (step_ms, host_ms) = time_steps(device, args.warmup, args.steps, &mut forward);
        if args.profile {
            profile_steps(&format!("infer {variant}"), device, 3, &mut forward);
        }
        rows.push(Row {
            workload: format!("infer {} b{b} s{s} L{}", model_label(args), cfg.num_hidden_layers),
            variant: variant.into(),
            step_ms,
            host_ms,
            peak_gb: peak_gb(device),
            trainable: 0,
        });
    }
}

/// Medians (step, host) of each closure, the closures run in alternation (one step of each per
/// round), so that drift of the GPU's clocks or the host's load hits them all alike.
fn time_interleaved(
    device: Device,
    warmup: usize,
    steps: usize,
    fs: &mut [Box<dyn FnMut() + '_>],
) -> Vec<(f64, f64)> {
    for f in fs.iter_mut() {
        for _ in 0..warmup {
            f();
        }
    }
    sync(device);
    let mut times = vec![(Vec::new(), Vec::new()); fs.len()];
    for _ in 0..steps {
        for (f, (total, host)) in fs.iter_mut().zip(times.iter_mut()) {
            let t = Instant::now();
            f();
            host.push(t.elapsed().as_secs_f64() * 1e3);
            sync(device);
            total.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    times.iter_mut().map(|(t, h)| (median(t), median(h))).collect()
}

/// The ratios without run-to-run drift: the training step (floor, LoRA, DoRA) and the inference
/// forward (base, unmerged, merged, merge_and_unload) with every variant built at once and the
/// steps interleaved. Peak memory is not separable here (`NaN`); the sequential rows give it.
fn interleaved_rows(args: &Args, device: Device, rows: &mut Vec<Row>) {
    let cfg = llama_config(args);
    let (b, s) = (args.batch, args.seq);
    let (ids, labels) = batch(&cfg, args, device);
    let variants: Vec<&str> = ["none", "lora", "dora"]
        .into_iter()
        .filter(|v| args.variants.iter().any(|a| a == v))
        .collect();
    let mut built: Vec<_> = variants
        .iter()
        .map(|v| {
            let (base_vs, adapter_vs, model, _) = llama(&cfg, device, v);
            let opt = (*v != "none").then(|| {
                tch_peft::optim::FusedAdamW::from_var_store(&adapter_vs, 1e-5).expect("optim")
            });
            (*v, base_vs, adapter_vs, model, opt)
        })
        .collect();
    let mut fs: Vec<Box<dyn FnMut() + '_>> = built
        .iter_mut()
        .map(|(v, _, _, model, opt)| {
            let (v, model, ids, labels) = (*v, &*model, &ids, &labels);
            Box::new(move || {
                let loss = step_loss(model, ids, labels, v == "none", None);
                if let Some(o) = opt.as_mut() {
                    o.zero_grad();
                }
                loss.backward();
                if let Some(o) = opt.as_mut() {
                    o.step().expect("step");
                }
            }) as Box<dyn FnMut() + '_>
        })
        .collect();
    let layers = cfg.num_hidden_layers;
    // one row per variant; peak memory is not separable here
    let mut push = |what: &str, names: &[&str], times: Vec<(f64, f64)>| {
        for (v, (step_ms, host_ms)) in names.iter().zip(times) {
            rows.push(Row {
                workload: format!("{what} llama-1B b{b} s{s} L{layers} interleaved"),
                variant: v.to_string(),
                step_ms,
                host_ms,
                peak_gb: f64::NAN,
                trainable: 0,
            });
        }
    };
    let times = time_interleaved(device, args.warmup, args.steps, &mut fs);
    drop(fs);
    push("train", &variants, times);
    drop(built);

    let models: Vec<_> = INFER_VARIANTS.iter().map(|v| infer_model(&cfg, device, v)).collect();
    let mut fs: Vec<Box<dyn FnMut() + '_>> = models
        .iter()
        .map(|(_, _, model)| {
            let ids = &ids;
            Box::new(move || {
                let _ = tch::no_grad(|| model.forward_t(ids, None, false).expect("forward"));
            }) as Box<dyn FnMut() + '_>
        })
        .collect();
    let times = time_interleaved(device, args.warmup, args.steps, &mut fs);
    push("infer", &INFER_VARIANTS, times);
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    if !benching {
        println!("gpu harness: run with --bench on a CUDA machine (nothing measured)");
        return;
    }
    if !tch::Cuda::is_available() {
        println!("gpu harness: no CUDA device (nothing measured)");
        return;
    }
    let args = parse_args();
    // under torchrun: this rank's GPU (NCCL on LOCAL_RANK), and rank 0 alone reports
    let launched = std::env::var_os("RANK").is_some();
    let device = if launched { dist::group().device() } else { Device::Cuda(0) };
    let rank0 = !launched || dist::group().rank() == 0;
    println!(
        "tch-peft {} (libtorch via tch 0.24), fused LoRA node: {}",
        env!("CARGO_PKG_VERSION"),
        tch_peft::lora::fused_kernel_available()
    );
    let mut rows = Vec::new();
    for w in &args.only {
        match w.as_str() {
            "linear" => linear_rows(&args, device, &mut rows),
            "gemv" => gemv_rows(&args, device, &mut rows),
            "train" => train_rows(&args, device, &mut rows),
            "infer" => infer_rows(&args, device, &mut rows),
            "interleaved" => interleaved_rows(&args, device, &mut rows),
            "allreduce" => {
                let g = dist::group();
                println!(
                    "NCCL all-reduce through the binding ({} rank(s), f32 sum)    MB    median ms    bus GB/s",
                    g.world_size()
                );
                let sizes = [1.0, 4.0, 16.0, 64.0, 256.0];
                for (mb, ms, gbs) in dist::all_reduce_rows(&sizes, args.warmup, args.steps) {
                    println!("{:>66} {mb:>5} {ms:>12.3} {gbs:>11.1}", "");
                }
            }
            other => eprintln!(
                "unknown workload `{other}` (linear, gemv, train, infer, interleaved, allreduce)"
            ),
        }
    }
    if !rank0 {
        return;
    }
    println!(
        "{:<40} {:<24} {:>10} {:>10} {:>9} {:>12}",
        "workload", "variant", "step ms", "host ms", "peak GB", "trainable"
    );
    for r in &rows {
        println!(
            "{:<40} {:<24} {:>10.2} {:>10.2} {:>9.2} {:>12}",
            r.workload, r.variant, r.step_ms, r.host_ms, r.peak_gb, r.trainable
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "library": "tch-peft",
            "steps": args.steps, "warmup": args.warmup,
            "rows": rows.iter().map(|r| serde_json::json!({
                "workload": r.workload, "variant": r.variant, "step_ms": r.step_ms,
                "host_ms": r.host_ms, "peak_gb": r.peak_gb, "trainable": r.trainable,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json).expect("json"))
            .expect("write json");
    }
}
