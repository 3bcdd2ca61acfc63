//! ReFT in a few steps: LoReFT interventions on a frozen Llama's residual stream learn to make
//! it continue a few prompts with chosen tokens; the interventions are saved, reloaded, and
//! compared; the model's weights never change.
//!
//! ```text
//! scripts/with-torch cargo run --release --example reft_quickstart
//! ```
//!
//! The model is the tiny random Llama of `tests/fixtures/llama/gqa` (hidden 64, 2 layers, GQA)
//! with its output head scaled up (its random head, std 0.02, keeps every logit near 0, so no
//! hidden-state edit could make a confident prediction). LoReFT r 4 at both layers on the first
//! 2 and last 2 prompt positions (`f2+l2`, tied): 2 × (2·64·4 + 4) = 1,032 parameters.

use std::path::Path;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::models::llama::{load_weights, Llama, LlamaConfig};
use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};
use tch_peft::ParamReport;

fn main() -> tch_peft::Result<()> {
    tch::manual_seed(0);
    let device = Device::cuda_if_available();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/gqa");
    let cfg = LlamaConfig::from_pretrained(&dir)?;
    let mut base_vs = nn::VarStore::new(device);
    let model = Llama::new(&base_vs.root(), &cfg, None)?;
    load_weights(&base_vs, &dir, &cfg)?;
    tch::no_grad(|| {
        let _ = base_vs.variables()["lm_head.weight"].shallow_clone().g_mul_scalar_(10.0);
    });
    base_vs.freeze();
    let weights_before: Vec<(String, Tensor)> =
        base_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();

    // 1. the interventions: LoReFT r 4 at every block, f2+l2, tied
    let reft_vs = nn::VarStore::new(device);
    let config = ReftConfig::new(
        InterventionConfig::new(InterventionKind::LoReft, cfg.hidden_size, 4),
        ReftLayers::all(),
        "f2+l2".parse()?,
    );
    let reft = ReftModel::new(&reft_vs.root(), config, cfg.num_hidden_layers)?;
    println!("{}", ParamReport::from_var_stores(&[&base_vs, &reft_vs]));

    // 2. data: four 8-token prompts (right-padded to 8), each to be continued by a chosen token
    let prompts = Tensor::randint(cfg.vocab_size, [4, 8], (Kind::Int64, device));
    let prompt_lengths = [8i64, 6, 8, 5];
    let targets = Tensor::from_slice(&[7i64, 42, 99, 3]).to_device(device);
    let mask = Tensor::from_slice2(&[
        [1i64, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0],
    ])
    .to_device(device);
    let last = Tensor::from_slice(&prompt_lengths.map(|n| n - 1)).to_device(device);
    let loc = reft.config().positions.batch_locations(&prompt_lengths, &[0; 4], true, device)?;
    let next_token_logits = |train: bool, reft: &ReftModel| -> tch_peft::Result<Tensor> {
        let logits = model.forward_hooked(&prompts, Some(&mask), train, Some(&reft.hook(&loc)))?;
        let idx = last.view([4, 1, 1]).expand([4, 1, cfg.vocab_size], false);
        Ok(logits.gather(1, &idx, false).squeeze_dim(1))
    };

    // 3. train the interventions only
    let mut opt = nn::Adam::default().build(&reft_vs, 2e-2)?;
    for step in 0..=60 {
        let loss = next_token_logits(true, &reft)?.cross_entropy_for_logits(&targets);
        if step % 20 == 0 {
            println!("step {step:2}: loss {:.4}", loss.double_value(&[]));
        }
        reft.step(&mut opt, &loss)?; // backward, step, and R back to orthonormal rows
    }
    let predicted = tch::no_grad(|| next_token_logits(false, &reft))?.argmax(-1, false);
    println!("predicted {:?}, wanted {:?}", Vec::<i64>::try_from(&predicted)?, [7, 42, 99, 3]);

    // 4. save, reload into a fresh store, compare
    let out = std::env::temp_dir().join(format!("tch-peft-reft-quickstart-{}", std::process::id()));
    reft.save(&out)?;
    let again_vs = nn::VarStore::new(device);
    let again = ReftModel::load(&again_vs.root(), &out, cfg.num_hidden_layers)?;
    let (a, b) = tch::no_grad(|| {
        Ok::<_, tch_peft::Error>((
            next_token_logits(false, &reft)?,
            next_token_logits(false, &again)?,
        ))
    })?;
    println!(
        "saved to {}; reloaded: max |Δ logits| = {:.3e}",
        out.display(),
        (a - b).abs().max().double_value(&[])
    );
    let unchanged = weights_before.iter().all(|(k, v)| base_vs.variables()[k].equal(v));
    println!("model weights unchanged: {unchanged}");
    std::fs::remove_dir_all(&out).ok();
    Ok(())
}
