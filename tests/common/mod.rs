//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod tiny;

use std::path::PathBuf;

use tch::{nn, Device, Kind, Tensor};

/// A fresh temporary directory, unique per test and process.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-peft-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Overwrites a variable's values (under no_grad).
pub fn set(t: &Tensor, v: &Tensor) {
    tch::no_grad(|| {
        let mut d = t.shallow_clone();
        d.copy_(v);
    });
}

/// Max absolute difference, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Whether two tensors are bit-identical (same dtype, shape and bytes).
pub fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    a.kind() == b.kind() && a.size() == b.size() && a.equal(b)
}

/// A linear layer in `vs` at `name` with seeded random weights of the store's kind.
pub fn base_linear(vs: &nn::VarStore, name: &str, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs.root() / name, i, o, Default::default())
}

/// Seeded random input.
pub fn randn(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (kind, Device::Cpu))
}

/// Max absolute difference relative to `reference`'s largest magnitude, as f64.
pub fn rel_diff(a: &Tensor, reference: &Tensor) -> f64 {
    let scale = reference.to_kind(Kind::Double).abs().max().double_value(&[]);
    max_abs_diff(a, reference) / scale.max(1e-30)
}

/// A LoRA layer `proj` (`i → o`) on a bf16 base with f32 factors (B zero, as initialised); the
/// base and adapter stores come with it.
pub fn bf16_lora_layer(
    cfg: &tch_peft::lora::LoraConfig,
    i: i64,
    o: i64,
) -> (nn::VarStore, nn::VarStore, tch_peft::lora::LoraLinear) {
    let mut vb = nn::VarStore::new(Device::Cpu);
    let base = base_linear(&vb, "proj", i, o);
    vb.bfloat16();
    let va = nn::VarStore::new(Device::Cpu);
    let l = tch_peft::lora::LoraLinear::new(base, &(va.root() / "proj"), cfg).unwrap();
    (vb, va, l)
}

/// The output of `l` on `x` (training mode) and the gradients of `sum(y ⊙ g)` with respect to
/// `x` and every tensor the adapter trains (in `named_tensors` order).
#[allow(dead_code)]
pub fn output_and_grads(
    l: &tch_peft::lora::LoraLinear,
    x: &Tensor,
    g: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    use tch::nn::ModuleT;
    use tch_peft::Adapter;
    let trained: Vec<Tensor> = l.named_tensors().into_iter().map(|(_, t)| t).collect();
    let xg = x.detach().set_requires_grad(true);
    let y = l.forward_t(&xg, true);
    let params: Vec<&Tensor> = std::iter::once(&xg).chain(&trained).collect();
    let loss = (&y * g).sum(Kind::Float);
    (y, Tensor::run_backward(&[loss], &params, false, false))
}

/// [`output_and_grads`] for the fused node, then for the composed ops.
pub fn fused_and_composed(
    l: &tch_peft::lora::LoraLinear,
    x: &Tensor,
    g: &Tensor,
) -> Vec<(Tensor, Vec<Tensor>)> {
    [true, false]
        .into_iter()
        .map(|fused| {
            l.set_fused(fused);
            output_and_grads(l, x, g)
        })
        .collect()
}
