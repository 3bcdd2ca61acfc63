//! Quick start: attach LoRA to a model written with tch, train only the adapter, save it, load
//! it into a fresh copy of the model, merge it, and check that every step gives the same outputs.
//!
//! ```text
//! scripts/with-torch cargo run --release --example quickstart
//! ```
//!
//! The "pre-trained" model is a small residual MLP first trained on one synthetic regression task
//! (so its weights are not random); LoRA then adapts it to a second, related task while its own
//! weights stay frozen in a separate `VarStore`.

use std::time::Instant;

use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{self, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::{Applicable, ParamReport, Result};

const D: i64 = 64;
const HIDDEN: i64 = 256;
const BLOCKS: i64 = 4;

/// A residual MLP whose layers are named like a transformer's (`blocks.N.mlp.{up,down}_proj`).
#[derive(Debug)]
struct Model {
    blocks: Vec<(MaybeLoraLinear, MaybeLoraLinear)>,
    head: MaybeLoraLinear,
}

impl Model {
    /// The one change a model makes to accept LoRA: build its linear layers through
    /// `lora::linear(..., lora)` instead of `nn::linear(...)`.
    fn new(p: &nn::Path, lora: Option<&LoraBuilder>) -> Result<Self> {
        let mut blocks = Vec::new();
        for i in 0..BLOCKS {
            let b = p / "blocks" / i / "mlp";
            let up = lora::linear(&(&b / "up_proj"), D, HIDDEN, Default::default(), lora)?;
            let down = lora::linear(&(&b / "down_proj"), HIDDEN, D, Default::default(), lora)?;
            blocks.push((up, down));
        }
        let head = lora::linear(&(p / "head"), D, 1, Default::default(), lora)?;
        Ok(Model { blocks, head })
    }
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        for (up, down) in &self.blocks {
            h = &h + up.forward_t(&h, train).gelu("none").apply_t(down, train) * 0.5;
        }
        h.apply_t(&self.head, train).squeeze_dim(-1)
    }
}

/// A synthetic regression task: y = sin(x·u) + 0.5·cos(x·v).
fn task(u: &Tensor, v: &Tensor, n: i64) -> (Tensor, Tensor) {
    let x = Tensor::randn([n, D], (Kind::Float, Device::Cpu));
    let y = x.matmul(u).sin() + x.matmul(v).cos() * 0.5;
    (x, y)
}

fn mse(model: &impl ModuleT, x: &Tensor, y: &Tensor, train: bool) -> Tensor {
    model.forward_t(x, train).mse_loss(y, tch::Reduction::Mean)
}

fn main() -> Result<()> {
    tch::manual_seed(42);
    let dir = std::env::temp_dir().join(format!("tch-peft-quickstart-{}", std::process::id()));

    // 1. A "pre-trained" base model: trained in full on task A.
    let u = Tensor::randn([D], (Kind::Float, Device::Cpu)) / (D as f64).sqrt();
    let v = Tensor::randn([D], (Kind::Float, Device::Cpu)) / (D as f64).sqrt();
    let mut base_vs = nn::VarStore::new(Device::Cpu);
    let pretrained = Model::new(&base_vs.root(), None)?;
    let (xa, ya) = task(&u, &v, 8192);
    let (xa_val, ya_val) = task(&u, &v, 512);
    let mut opt = nn::AdamW::default().build(&base_vs, 1e-3)?;
    for _ in 0..300 {
        opt.backward_step(&mse(&pretrained, &xa, &ya, true));
    }
    let val_a = mse(&pretrained, &xa_val, &ya_val, false).double_value(&[]);
    println!("pre-trained on task A: validation loss {val_a:.4}");
    let base_file = dir.join("base.safetensors");
    std::fs::create_dir_all(&dir)
        .map_err(|e| tch_peft::Error::Io { path: dir.clone(), source: e })?;
    base_vs.save(&base_file)?;

    // 2. Task B: a shifted target. Load the base weights frozen, attach LoRA to the MLP layers.
    let u2 = &u + Tensor::randn([D], (Kind::Float, Device::Cpu)) * (0.5 / (D as f64).sqrt());
    let (xb, yb) = task(&u2, &v, 8192);
    let (xb_val, yb_val) = task(&u2, &v, 512);
    base_vs = nn::VarStore::new(Device::Cpu);
    let adapter_vs = nn::VarStore::new(Device::Cpu);
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.05,
        ..LoraConfig::for_targets(["up_proj", "down_proj"])
    };
    let builder = LoraBuilder::new(&adapter_vs.root(), config.clone())?;
    let model = Model::new(&base_vs.root(), Some(&builder))?;
    let adapter = builder.finish()?;
    base_vs.load(&base_file)?;
    base_vs.freeze();
    println!("LoRA on {} layers: {}", adapter.modules().len(), adapter.modules().join(", "));
    println!("{}", ParamReport::from_var_stores(&[&base_vs, &adapter_vs]));

    // 3. Train only the adapter (the optimizer sees the adapter store alone).
    let mut opt = nn::AdamW::default().build(&adapter_vs, 1e-2)?;
    let batch = 256;
    let start = Instant::now();
    let initial_val = mse(&model, &xb_val, &yb_val, false).double_value(&[]);
    for epoch in 0..=20 {
        if epoch % 5 == 0 {
            let val = mse(&model, &xb_val, &yb_val, false).double_value(&[]);
            println!("epoch {epoch:>2}: validation loss on task B {val:.4}");
        }
        if epoch == 20 {
            break;
        }
        let perm = Tensor::randperm(xb.size()[0], (Kind::Int64, Device::Cpu));
        for i in (0..xb.size()[0]).step_by(batch as usize) {
            let idx = perm.narrow(0, i, batch);
            opt.backward_step(&mse(
                &model,
                &xb.index_select(0, &idx),
                &yb.index_select(0, &idx),
                true,
            ));
        }
    }
    println!("trained in {:.2?}", start.elapsed());

    // 4. Save the adapter (PEFT layout: adapter_config.json + adapter_model.safetensors).
    let adapter_dir = dir.join("adapter");
    adapter.save_pretrained(&adapter_dir)?;
    let size = std::fs::metadata(adapter_dir.join("adapter_model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("saved adapter to {} ({size} bytes)", adapter_dir.display());

    // 5. Reload it into a fresh model built from the saved config and the same base weights.
    let mut base2 = nn::VarStore::new(Device::Cpu);
    let adapter_vs2 = nn::VarStore::new(Device::Cpu);
    let builder2 =
        LoraBuilder::new(&adapter_vs2.root(), LoraConfig::from_pretrained(&adapter_dir)?)?;
    let model2 = Model::new(&base2.root(), Some(&builder2))?;
    let mut adapter2 = builder2.finish()?;
    base2.load(&base_file)?;
    base2.freeze();
    adapter2.load_pretrained(&adapter_dir)?;
    let y_trained = model.forward_t(&xb_val, false);
    let y_loaded = model2.forward_t(&xb_val, false);
    let diff_loaded = (&y_trained - &y_loaded).abs().max().double_value(&[]);
    println!("reloaded adapter: max |Δ output| = {diff_loaded:.3e}");

    // 6. Merge for zero-overhead inference, and unmerge exactly.
    let w_before = base2.variables()["blocks.0.mlp.up_proj.weight"].copy();
    adapter2.apply()?; // Applicable::apply: merge every layer of the active adapter
    let y_merged = model2.forward_t(&xb_val, false);
    let diff_merged = (&y_trained - &y_merged).abs().max().double_value(&[]);
    println!("merged: max |Δ output| = {diff_merged:.3e}");
    adapter2.revert()?;
    let exact = base2.variables()["blocks.0.mlp.up_proj.weight"].equal(&w_before);
    println!("unmerged: base weights restored bit-exactly: {exact}");

    let final_val = mse(&model2, &xb_val, &yb_val, false).double_value(&[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(final_val < 0.5 * initial_val, "LoRA training lowers the task B loss");
    assert!(diff_loaded == 0.0, "a reloaded adapter gives the same outputs");
    assert!(diff_merged < 1e-4, "merged outputs agree");
    assert!(exact, "unmerge is exact");
    println!("done: validation loss on task B {final_val:.4}");
    Ok(())
}
