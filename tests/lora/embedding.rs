//! LoRA on an embedding table: PEFT's layout and init, the formula in float64, merge/unmerge,
//! gradients and errors. (PEFT parity of outputs and files: `tests/llama.rs`.)

use crate::common::*;
use tch::{nn, Device, Kind, Tensor};
use tch_peft::lora::{LoraConfig, LoraEmbedding, LoraInit};
use tch_peft::{Adapter, Error};

fn table(kind: Kind, v: i64, d: i64) -> Tensor {
    Tensor::randn([v, d], (Kind::Float, Device::Cpu)).to_kind(kind)
}

fn cfg(r: i64) -> LoraConfig {
    LoraConfig { r, lora_alpha: 2.0 * r as f64, ..Default::default() }
}

#[test]
fn default_init_is_a_zero_b_normal_and_leaves_the_table_unchanged() {
    tch::manual_seed(0);
    let va = nn::VarStore::new(Device::Cpu);
    let w = table(Kind::Float, 50, 40);
    let e = LoraEmbedding::new(w.shallow_clone(), &(va.root() / "emb"), "emb", &cfg(8)).unwrap();
    assert_eq!(e.lora_a().size(), [8, 50]);
    assert_eq!(e.lora_b().size(), [40, 8]);
    assert_eq!(e.lora_a().abs().sum(Kind::Double).double_value(&[]), 0.0);
    let std = e.lora_b().std(true).double_value(&[]);
    assert!((std - 1.0).abs() < 0.15, "B ~ N(0, 1): std {std}");
    let ids = Tensor::from_slice(&[3i64, 0, 49, 7]).view([2, 2]);
    assert!(bit_equal(&e.f_forward(&ids).unwrap(), &Tensor::embedding(&w, &ids, -1, false, false)));
    let names: Vec<String> = e.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["emb.lora_embedding_A", "emb.lora_embedding_B"]);
    let mut keys: Vec<String> = va.variables().into_keys().collect();
    keys.sort();
    assert_eq!(keys, ["emb.lora_embedding_A", "emb.lora_embedding_B"]);
}

#[test]
fn forward_merge_and_gradients_follow_the_formula_in_f64() {
    tch::manual_seed(1);
    let va = nn::VarStore::new(Device::Cpu);
    let w = table(Kind::Double, 30, 12);
    let c = LoraConfig { init_lora_weights: LoraInit::Random, ..cfg(3) };
    let e = LoraEmbedding::new(w.shallow_clone(), &(va.root() / "emb"), "emb", &c).unwrap();
    assert_eq!(e.lora_a().kind(), Kind::Double);
    let ids = Tensor::from_slice(&[1i64, 29, 5, 5, 0]);
    // y = W[ids] + s · Aᵀ[ids] Bᵀ
    let expected = Tensor::embedding(&w, &ids, -1, false, false)
        + e.lora_a().tr().index_select(0, &ids).matmul(&e.lora_b().tr()) * e.scaling();
    let y = e.f_forward(&ids).unwrap();
    assert!(max_abs_diff(&y, &expected) < 1e-12);
    assert_eq!(e.delta_weight().size(), [30, 12]);
    // gradients reach the factors only
    let g = Tensor::randn([5, 12], (Kind::Double, Device::Cpu));
    let gr = Tensor::run_backward(
        &[(&y * &g).sum(Kind::Double)],
        &[e.lora_a(), e.lora_b()],
        false,
        false,
    );
    let h = e.lora_a().tr().index_select(0, &ids); // [5, r]
    assert!(max_abs_diff(&gr[1], &(g.tr().matmul(&h) * e.scaling())) < 1e-12, "dB");
    assert!(!w.requires_grad());
    // merge = forward, unmerge is exact
    let original = w.copy();
    e.merge().unwrap();
    assert!(max_abs_diff(&e.f_forward(&ids).unwrap(), &expected) < 1e-12);
    e.unmerge().unwrap();
    assert!(bit_equal(&w, &original));
}

#[test]
fn bf16_table_merge_unmerge_is_bit_exact() {
    tch::manual_seed(2);
    let va = nn::VarStore::new(Device::Cpu);
    let w = table(Kind::BFloat16, 64, 32);
    let original = w.copy();
    let c = LoraConfig { init_lora_weights: LoraInit::Random, ..cfg(4) };
    let e = LoraEmbedding::new(w.shallow_clone(), &(va.root() / "emb"), "emb", &c).unwrap();
    for _ in 0..20 {
        e.safe_merge().unwrap();
        assert!(!bit_equal(&w, &original));
        e.unmerge().unwrap();
    }
    assert!(bit_equal(&w, &original));
    let ids = Tensor::from_slice(&[0i64, 63]);
    assert_eq!(e.f_forward(&ids).unwrap().kind(), Kind::BFloat16);
}

#[test]
fn bad_input_gives_typed_errors() {
    let va = nn::VarStore::new(Device::Cpu);
    let err = LoraEmbedding::new(table(Kind::Float, 10, 3), &(va.root() / "a"), "a", &cfg(4))
        .unwrap_err();
    assert!(matches!(err, Error::RankTooLarge { rank: 4, .. }), "{err}");
    let ints = Tensor::zeros([10, 8], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        LoraEmbedding::new(ints, &(va.root() / "b"), "b", &cfg(2)),
        Err(Error::DtypeMismatch { .. })
    ));
    let e =
        LoraEmbedding::new(table(Kind::Float, 10, 8), &(va.root() / "c"), "c", &cfg(2)).unwrap();
    assert!(matches!(e.f_forward(&Tensor::from_slice(&[10i64])), Err(Error::Tch(_))));
    let dup = LoraEmbedding::new(table(Kind::Float, 10, 8), &(va.root() / "c"), "c", &cfg(2));
    assert!(matches!(dup, Err(Error::DuplicateParameter(ref n)) if n == "c.lora_embedding_A"));
}
