//! LoRA Linear cost relative to its frozen base layer, in one run.
//!
//! ```text
//! scripts/with-torch cargo bench --bench lora_linear
//! ```
//!
//! First, for each shape, one line per group with the medians of base, LoRA (fused autograd
//! node), merged LoRA, LoRA through composed tch ops and DoRA, measured in alternation (`interleaved fwd_bwd ...: base .. ms, lora .. ms (1.0xx), ...`): the
//! ratios to quote, since alternation cancels the load drift of a shared machine. Then the
//! criterion groups (each times base, LoRA and merged LoRA on the same input):
//! * `fwd_bwd/<tokens>x<in>x<out>_r<r>`: forward, then backward to the input (and to A, B for
//!   LoRA), as in fine-tuning where the frozen layer still passes gradients down.
//! * `fwd/<...>`: inference forward under `no_grad`.
//!
//! Environment: `TCH_PEFT_BENCH_DEVICE=cuda` runs on the first GPU (each iteration ends with a
//! device synchronisation), `TCH_PEFT_BENCH_KIND=bf16|f16|f32` sets the base dtype (adapters stay
//! f32), `TCH_PEFT_BENCH_SHAPES=4096x1024x1024,4096x2048x2048` overrides the shapes and
//! `TCH_PEFT_BENCH_RANK=16` the rank (default 8), `TCH_PEFT_BENCH_ROUNDS` the interleaved rounds
//! (default 25).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tch::nn::{self, ModuleT};
use tch::Tensor;
use tch_peft::lora::{LoraConfig, LoraLinear};

mod common;
use common::{device, interleaved, kind, sync};

fn rank() -> i64 {
    std::env::var("TCH_PEFT_BENCH_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(8)
}

fn shapes() -> Vec<(i64, i64, i64)> {
    let spec = std::env::var("TCH_PEFT_BENCH_SHAPES")
        .unwrap_or_else(|_| "4096x1024x1024,4096x2048x2048".to_string());
    spec.split(',')
        .map(|s| {
            let v: Vec<i64> = s.split('x').map(|d| d.trim().parse().expect("NxINxOUT")).collect();
            (v[0], v[1], v[2])
        })
        .collect()
}

/// Forward, then backward of a dense upstream gradient `g` to `inputs` (injected as
/// `sum(y ⊙ g)`, which costs the same two elementwise kernels in every variant; a bare `sum(y)`
/// would hand back a stride-0 gradient that each consumer copies, which real training never
/// sees). Returns the gradients so nothing is elided.
fn fwd_bwd(layer: &impl ModuleT, x: &Tensor, g: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
    let y = layer.forward_t(x, true);
    Tensor::run_backward(&[(y * g).sum(g.kind())], inputs, false, false)
}

fn bench(c: &mut Criterion) {
    let (device, kind, rank) = (device(), kind(), rank());
    for (tokens, d_in, d_out) in shapes() {
        tch::manual_seed(0);
        let mut base_vs = nn::VarStore::new(device);
        let base = nn::linear(base_vs.root() / "proj", d_in, d_out, Default::default());
        base_vs.set_kind(kind);
        base_vs.freeze();
        let adapter_vs = nn::VarStore::new(device);
        let cfg = LoraConfig { r: rank, lora_alpha: 16.0, ..Default::default() };
        let plain = nn::Linear {
            ws: base.ws.shallow_clone(),
            bs: base.bs.as_ref().map(Tensor::shallow_clone),
        };
        let lora = LoraLinear::new(base, &(adapter_vs.root() / "proj"), &cfg).expect("lora");
        // a non-zero B so the branch does real work
        tch::no_grad(|| {
            let mut b = lora.lora_b().shallow_clone();
            let _ = b.normal_(0.0, 0.02);
        });
        // the same adapter, computed by composed tch ops instead of the fused node
        let composed_vs = nn::VarStore::new(device);
        let composed = LoraLinear::new(
            nn::Linear {
                ws: plain.ws.shallow_clone(),
                bs: plain.bs.as_ref().map(Tensor::shallow_clone),
            },
            &(composed_vs.root() / "proj"),
            &cfg,
        )
        .expect("lora");
        composed.set_fused(false);
        tch::no_grad(|| {
            let mut b = composed.lora_b().shallow_clone();
            b.copy_(lora.lora_b());
            let mut a = composed.lora_a().shallow_clone();
            a.copy_(lora.lora_a());
        });
        let (ca, cb) = (composed.lora_a().shallow_clone(), composed.lora_b().shallow_clone());
        // DoRA on the same base and factors
        let dora_vs = nn::VarStore::new(device);
        let dora = LoraLinear::new(
            nn::Linear {
                ws: plain.ws.shallow_clone(),
                bs: plain.bs.as_ref().map(Tensor::shallow_clone),
            },
            &(dora_vs.root() / "proj"),
            &LoraConfig { use_dora: true, ..cfg.clone() },
        )
        .expect("dora");
        tch::no_grad(|| {
            dora.lora_b().shallow_clone().copy_(lora.lora_b());
            dora.lora_a().shallow_clone().copy_(lora.lora_a());
        });
        let (da, db) = (dora.lora_a().shallow_clone(), dora.lora_b().shallow_clone());
        let dm = dora.magnitude().expect("dora magnitude").shallow_clone();
        let mut merged_vs = nn::VarStore::new(device);
        let merged_base = nn::linear(merged_vs.root() / "proj", d_in, d_out, Default::default());
        merged_vs.set_kind(kind);
        merged_vs.freeze();
        let merged = LoraLinear::new(merged_base, &(merged_vs.root() / "m"), &cfg).expect("lora");
        merged.merge().expect("merge");
        let x = Tensor::randn([tokens, d_in], (kind, device)).set_requires_grad(true);
        let grad = Tensor::randn([tokens, d_out], (kind, device));
        let (a, b) = (lora.lora_a().shallow_clone(), lora.lora_b().shallow_clone());
        let id = format!("{tokens}x{d_in}x{d_out}_r{rank}_{kind:?}_{device:?}");

        // `cargo test --all-targets` runs this binary without `--bench`: criterion then runs each
        // function once as a smoke test, and the interleaved phase is skipped.
        let benching = std::env::args().any(|a| a == "--bench");
        let rounds = match std::env::var("TCH_PEFT_BENCH_ROUNDS") {
            _ if !benching => 0,
            Ok(r) => r.parse().expect("TCH_PEFT_BENCH_ROUNDS is a number"),
            Err(_) => 25,
        };
        let xi = x.detach();
        let fb = interleaved(
            &mut [
                &mut || drop((fwd_bwd(&plain, &x, &grad, &[&x]), sync(device))),
                &mut || drop((fwd_bwd(&lora, &x, &grad, &[&x, &a, &b]), sync(device))),
                &mut || drop((fwd_bwd(&merged, &x, &grad, &[&x]), sync(device))),
                &mut || drop((fwd_bwd(&composed, &x, &grad, &[&x, &ca, &cb]), sync(device))),
                &mut || drop((fwd_bwd(&dora, &x, &grad, &[&x, &da, &db, &dm]), sync(device))),
            ],
            rounds,
        );
        let fw = interleaved(
            &mut [
                &mut || drop((tch::no_grad(|| xi.apply_t(&plain, false)), sync(device))),
                &mut || drop((tch::no_grad(|| lora.forward_t(&xi, false)), sync(device))),
                &mut || drop((tch::no_grad(|| merged.forward_t(&xi, false)), sync(device))),
                &mut || drop((tch::no_grad(|| composed.forward_t(&xi, false)), sync(device))),
                &mut || drop((tch::no_grad(|| dora.forward_t(&xi, false)), sync(device))),
            ],
            rounds,
        );
        for (group, m) in [("fwd_bwd", &fb), ("fwd", &fw)].into_iter().filter(|_| benching) {
            println!(
                "interleaved {group:<7} {id}: base {:.3} ms, lora {:.3} ms ({:.3}x), merged {:.3} ms ({:.3}x), lora composed ops {:.3} ms ({:.3}x), dora {:.3} ms ({:.3}x) [median of {rounds}]",
                m[0] * 1e3,
                m[1] * 1e3,
                m[1] / m[0],
                m[2] * 1e3,
                m[2] / m[0],
                m[3] * 1e3,
                m[3] / m[0],
                m[4] * 1e3,
                m[4] / m[0]
            );
        }

        let mut g = c.benchmark_group("fwd_bwd");
        g.sample_size(20);
        g.bench_function(BenchmarkId::new("base", &id), |bch| {
            bch.iter(|| {
                let r = fwd_bwd(&plain, &x, &grad, &[&x]);
                sync(device);
                r
            })
        });
        g.bench_function(BenchmarkId::new("lora", &id), |bch| {
            bch.iter(|| {
                let r = fwd_bwd(&lora, &x, &grad, &[&x, &a, &b]);
                sync(device);
                r
            })
        });
        g.bench_function(BenchmarkId::new("dora", &id), |bch| {
            bch.iter(|| {
                let r = fwd_bwd(&dora, &x, &grad, &[&x, &da, &db, &dm]);
                sync(device);
                r
            })
        });
        g.bench_function(BenchmarkId::new("merged", &id), |bch| {
            bch.iter(|| {
                let r = fwd_bwd(&merged, &x, &grad, &[&x]);
                sync(device);
                r
            })
        });
        g.finish();

        let mut g = c.benchmark_group("fwd");
        g.sample_size(20);
        for (name, layer) in [("base", None), ("lora", Some(&lora)), ("merged", Some(&merged))] {
            g.bench_function(BenchmarkId::new(name, &id), |bch| {
                bch.iter(|| {
                    let y = tch::no_grad(|| match layer {
                        None => xi.apply_t(&plain, false),
                        Some(l) => l.forward_t(&xi, false),
                    });
                    sync(device);
                    y
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
