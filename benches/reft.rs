//! LoReFT's cost relative to the model forward it sits in, in one run.
//!
//! ```text
//! scripts/with-torch cargo bench --bench reft
//! ```
//!
//! A Llama-shaped decoder (hidden 1024, intermediate 2816, 16 heads / 8 KV heads, vocab 1000,
//! random weights, frozen) on one sequence of 512 tokens; LoReFT r 4 at every layer on the
//! `f7+l7` positions (14 of 512), tied. Printed: the medians of the plain forward and the hooked
//! forward (`no_grad`) measured in alternation. Then criterion groups for both forwards and for a
//! training step of the interventions (forward, backward through the frozen model, SGD).
//!
//! Environment: `TCH_PEFT_BENCH_DEVICE=cuda`, `TCH_PEFT_BENCH_KIND=bf16|f16|f32` (the model's
//! dtype; interventions stay f32), `TCH_PEFT_BENCH_LAYERS` (default 2), `TCH_PEFT_BENCH_SEQ`
//! (default 512), `TCH_PEFT_BENCH_BATCH` (default 1), `TCH_PEFT_BENCH_ROUNDS` (default 15).

use criterion::{criterion_group, criterion_main, Criterion};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};
use tch_peft::models::llama::{Llama, LlamaConfig};
use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};

mod common;
use common::{device, interleaved, kind, sync};

fn env_i64(name: &str, default: i64) -> i64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let (device, kind) = (device(), kind());
    let layers = env_i64("TCH_PEFT_BENCH_LAYERS", 2);
    let (seq, batch) = (env_i64("TCH_PEFT_BENCH_SEQ", 512), env_i64("TCH_PEFT_BENCH_BATCH", 1));
    let cfg: LlamaConfig = serde_json::from_str(&format!(
        r#"{{"vocab_size": 1000, "hidden_size": 1024, "intermediate_size": 2816,
            "num_hidden_layers": {layers}, "num_attention_heads": 16, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}}"#
    ))
    .expect("config");
    tch::manual_seed(0);
    let mut base_vs = nn::VarStore::new(device);
    let model = Llama::new(&base_vs.root(), &cfg, None).expect("model");
    base_vs.set_kind(kind);
    base_vs.freeze();
    let reft_vs = nn::VarStore::new(device);
    let rcfg = ReftConfig::new(
        InterventionConfig::new(InterventionKind::LoReft, cfg.hidden_size, 4),
        ReftLayers::all(),
        "f7+l7".parse().expect("positions"),
    );
    let reft = ReftModel::new(&reft_vs.root(), rcfg, cfg.num_hidden_layers).expect("reft");
    let prompt_lengths = vec![seq; batch as usize];
    let offsets = vec![0; batch as usize];
    let loc = reft
        .config()
        .positions
        .batch_locations(&prompt_lengths, &offsets, true, device)
        .expect("locations");
    let ids = Tensor::randint(cfg.vocab_size, [batch, seq], (Kind::Int64, device));
    let mut opt = nn::Sgd::default().build(&reft_vs, 0.0).expect("optimizer");
    let hook = reft.hook(&loc);
    let id = format!("L{layers}_d1024_seq{seq}_b{batch}_{kind:?}_{device:?}");

    let benching = std::env::args().any(|a| a == "--bench");
    let rounds = match std::env::var("TCH_PEFT_BENCH_ROUNDS") {
        _ if !benching => 0,
        Ok(r) => r.parse().expect("TCH_PEFT_BENCH_ROUNDS is a number"),
        Err(_) => 15,
    };
    let fwd_plain = || {
        let y = tch::no_grad(|| model.forward_t(&ids, None, false).expect("forward"));
        sync(device);
        y
    };
    let fwd_reft = || {
        let y = tch::no_grad(|| model.forward_hooked(&ids, None, false, Some(&hook)).expect("fwd"));
        sync(device);
        y
    };
    // a training step of the interventions (the frozen model passes gradients down to them)
    let step = |opt: &mut nn::Optimizer| {
        let logits = model.forward_hooked(&ids, None, true, Some(&hook)).expect("forward");
        reft.step(opt, &logits.to_kind(Kind::Float).mean(Kind::Float)).expect("step");
        sync(device);
    };
    let m_fwd = interleaved(&mut [&mut || drop(fwd_plain()), &mut || drop(fwd_reft())], rounds);
    if benching {
        println!(
            "interleaved fwd {id}: model {:.3} ms, with LoReFT r4 f7+l7 at every layer {:.3} ms ({:.4}x) [median of {rounds}]",
            m_fwd[0] * 1e3,
            m_fwd[1] * 1e3,
            m_fwd[1] / m_fwd[0]
        );
    }
    // the intervention alone, at the positions of the batch: the orthonormalisation of R
    // (CholeskyQR2, forward and backward) against the whole intervention's forward and backward
    let d = cfg.hidden_size;
    let iv_vs = nn::VarStore::new(device);
    let iv = tch_peft::reft::LowRankIntervention::new(
        &iv_vs.root(),
        InterventionConfig {
            orthogonality: tch_peft::reft::Orthogonality::Parametrized,
            ..InterventionConfig::new(InterventionKind::LoReft, d, 4)
        },
    )
    .expect("intervention");
    let v = iv_vs.variables()["rotate_layer"].shallow_clone();
    let h = Tensor::randn([batch * 14, d], (Kind::Float, device));
    let ortho = || {
        let q = tch_peft::reft::orthogonal::orthonormalize(&v).expect("orthonormalize");
        q.sum(Kind::Float).backward();
        sync(device);
    };
    let whole = || {
        use tch_peft::reft::Intervention;
        iv.f_forward_t(&h, true).expect("intervention").sum(Kind::Float).backward();
        sync(device);
    };
    let fast_vs = nn::VarStore::new(device);
    let fast = tch_peft::reft::LowRankIntervention::new(
        &fast_vs.root(),
        InterventionConfig::new(InterventionKind::LoReft, d, 4),
    )
    .expect("intervention");
    let fast_step = || {
        use tch_peft::reft::Intervention;
        fast.f_forward_t(&h, true).expect("intervention").sum(Kind::Float).backward();
        fast.retract().expect("retract");
        sync(device);
    };
    let m_iv =
        interleaved(&mut [&mut || ortho(), &mut || whole(), &mut || fast_step()], rounds * 20);
    if benching {
        println!(
            "interleaved intervention d{d} r4 {} positions: parametrized R = CholeskyQR2(V) fwd+bwd {:.1} us, whole parametrized LoReFT fwd+bwd {:.1} us; retraction LoReFT fwd+bwd + QR retraction {:.1} us [median of {}]",
            batch * 14,
            m_iv[0] * 1e6,
            m_iv[1] * 1e6,
            m_iv[2] * 1e6,
            rounds * 20
        );
    }

    let mut g = c.benchmark_group("reft_fwd");
    g.sample_size(10);
    g.bench_function(format!("model/{id}"), |b| b.iter(fwd_plain));
    g.bench_function(format!("loreft/{id}"), |b| b.iter(fwd_reft));
    g.finish();
    let mut g = c.benchmark_group("reft_train_step");
    g.sample_size(10);
    g.bench_function(format!("loreft/{id}"), |b| b.iter(|| step(&mut opt)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
