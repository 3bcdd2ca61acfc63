//! The comparison's methods side by side on all-MiniLM-L6-v2 and real sentences: one training
//! step (forward, backward, AdamW, the method's extra work) per method on the same batch.
//!
//! ```text
//! scripts/fetch-assets.sh
//! scripts/with-torch cargo bench -p tch-peft-bench --bench compare
//! ```
//!
//! The batch: 32 Kotzias Amazon sentences (seeded), padded to the longest, at most 64 tokens —
//! what `bench/examples/compare --task c` trains on. Printed first: the medians of every method's step
//! measured in alternation (so drifting load hits all alike) and their ratio to the linear
//! probe's step (the frozen encoder's forward plus the head: the floor of every method that
//! trains through the encoder); then a criterion group per method. Without the assets it says
//! so and measures nothing.
//!
//! Environment: `TCH_PEFT_BENCH_DEVICE=cuda`, `TCH_PEFT_BENCH_ROUNDS` (default 9).

#[path = "../../benches/common/mod.rs"]
mod common;

use std::path::PathBuf;

use common::{device, interleaved, sync};
use criterion::{criterion_group, criterion_main, Criterion};
use tch_peft_bench::compare::{sentiment_prompts, Method, RunConfig, Trainer};
use tch_peft_bench::data::{kotzias, shuffle, TextBatcher};

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets");
    if !root.join("minilm/model.safetensors").exists() || !root.join("kotzias").exists() {
        eprintln!("compare bench: assets missing (run scripts/fetch-assets.sh); nothing measured");
        return;
    }
    let benching = std::env::args().any(|a| a == "--bench");
    let device = device();
    let rounds: usize = match std::env::var("TCH_PEFT_BENCH_ROUNDS") {
        _ if !benching => 0,
        Ok(v) => v.parse().unwrap_or(9),
        Err(_) => 9,
    };
    let batcher =
        TextBatcher::from_file(root.join("minilm/tokenizer.json"), 64).expect("tokenizer");
    let mut ex = kotzias(root.join("kotzias"), "amazon").expect("kotzias");
    shuffle(&mut ex, 0);
    let batch = batcher.batch(&ex[..32], device).expect("batch");
    let cfg = RunConfig {
        model_dir: root.join("minilm"),
        epochs: 1,
        batch: 32,
        max_length: 64,
        seed: 0,
        device,
        patience: 1,
    };
    let methods = [
        Method::LinearProbe,
        Method::LoReft,
        Method::TopLayers(2),
        Method::Lora,
        Method::Dora,
        Method::GradualUnfreezing,
        Method::Full,
    ];
    let mut trainers: Vec<Trainer> = methods
        .iter()
        .map(|&m| Trainer::new(m, &cfg, &batcher, &sentiment_prompts(), 1).expect("trainer"))
        .collect();
    // a small learning rate: the weights barely move, so every step costs the same
    let lr = 1e-6;
    let batch = &batch;
    let mut closures: Vec<Box<dyn FnMut() + '_>> = trainers
        .iter_mut()
        .map(|t| {
            Box::new(move || {
                let _loss = t.step(batch, lr).expect("step");
                sync(device);
            }) as Box<dyn FnMut()>
        })
        .collect();
    if benching {
        let mut refs: Vec<&mut dyn FnMut()> =
            closures.iter_mut().map(|f| f.as_mut() as &mut dyn FnMut()).collect();
        let medians = interleaved(&mut refs, rounds);
        println!(
            "one training step, batch 32 × {} tokens, {device:?} (median of {rounds}, interleaved):",
            batch.input_ids.size()[1]
        );
        for (m, t) in methods.iter().zip(&medians) {
            println!(
                "  {:<22} {:>8.1} ms  {:.2}× the linear probe",
                m.name(),
                t * 1e3,
                t / medians[0]
            );
        }
        let mut g = c.benchmark_group("compare_step");
        g.sample_size(10);
        for (m, f) in methods.iter().zip(closures.iter_mut()) {
            g.bench_function(m.name().replace(' ', "_"), |b| b.iter(&mut *f));
        }
        g.finish();
    } else {
        // `cargo test --benches`: one step each, to prove the bench runs
        for f in closures.iter_mut() {
            f();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
