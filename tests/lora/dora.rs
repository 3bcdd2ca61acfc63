//! DoRA on Linear: the forward against the materialised formula in float64, the norm computed
//! without forming `W + s·BA`, gradients with the norm detached, magnitude initialisation, and
//! bit-exact unmerge. (PEFT parity of outputs, merged weights and files: `tests/peft_parity.rs`.)

use crate::common::*;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{LoraBuilder, LoraConfig, LoraLinear};
use tch_peft::{Adapter, Error};

fn dora_cfg(r: i64) -> LoraConfig {
    LoraConfig { r, lora_alpha: 3.0 * r as f64, use_dora: true, ..Default::default() }
}

fn f64_dora(vb: &nn::VarStore, va: &nn::VarStore) -> LoraLinear {
    let base = nn::linear(vb.root() / "proj", 12, 10, Default::default());
    let l = LoraLinear::new(base, &(va.root() / "proj"), &dora_cfg(3)).unwrap();
    set(l.lora_b(), &(randn(&[10, 3], Kind::Double) * 0.3));
    l
}

fn f64_stores() -> (nn::VarStore, nn::VarStore) {
    let mut b = nn::VarStore::new(Device::Cpu);
    b.set_kind(Kind::Double);
    (b, nn::VarStore::new(Device::Cpu))
}

/// `(m / ‖W'‖_row) ⊙ W'` with `W' = W + s·BA`, the norm detached.
fn materialised_weight(l: &LoraLinear) -> Tensor {
    let w = &l.base().dense().unwrap().ws + l.lora_b().matmul(l.lora_a()) * l.scaling();
    let norm = w.detach().square().sum_dim_intlist(1, true, Kind::Double).sqrt();
    w * (l.magnitude().unwrap().unsqueeze(1) / norm)
}

#[test]
fn magnitude_starts_at_the_row_norm_so_the_layer_starts_as_the_base() {
    tch::manual_seed(0);
    let (vb, va) = f64_stores();
    let base = nn::linear(vb.root() / "proj", 12, 10, Default::default());
    let row_norm = base.ws.square().sum_dim_intlist(1, false, Kind::Double).sqrt();
    let l = LoraLinear::new(base, &(va.root() / "proj"), &dora_cfg(3)).unwrap();
    assert!(max_abs_diff(l.magnitude().unwrap(), &row_norm) < 1e-12);
    let x = randn(&[4, 12], Kind::Double);
    assert!(max_abs_diff(&l.forward_t(&x, false), &x.apply(l.base().dense().unwrap())) < 1e-12);
    let names: Vec<String> = l.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[2], "proj.lora_magnitude_vector");
    assert_eq!(l.num_trainable_parameters(), 3 * 12 + 10 * 3 + 10);
}

#[test]
fn forward_and_merge_match_the_materialised_formula() {
    tch::manual_seed(1);
    let (vb, va) = f64_stores();
    let l = f64_dora(&vb, &va);
    set(l.magnitude().unwrap(), &(randn(&[10], Kind::Double).abs() + 0.5));
    let x = randn(&[2, 5, 12], Kind::Double);
    let expected =
        x.matmul(&materialised_weight(&l).tr()) + l.base().dense().unwrap().bs.as_ref().unwrap();
    for train in [false, true] {
        assert!(max_abs_diff(&l.forward_t(&x, train), &expected) < 1e-12, "train={train}");
    }
    let original = l.base().dense().unwrap().ws.copy();
    l.merge().unwrap();
    assert!(
        max_abs_diff(&l.base().dense().unwrap().ws, &materialised_weight_unmerged(&l, &original))
            < 1e-12
    );
    assert!(max_abs_diff(&l.forward_t(&x, false), &expected) < 1e-12);
    l.unmerge().unwrap();
    assert!(bit_equal(&l.base().dense().unwrap().ws, &original));
}

fn materialised_weight_unmerged(l: &LoraLinear, w: &Tensor) -> Tensor {
    let w2 = w + l.lora_b().matmul(l.lora_a()) * l.scaling();
    let norm = w2.square().sum_dim_intlist(1, true, Kind::Double).sqrt();
    &w2 * (l.magnitude().unwrap().unsqueeze(1) / norm)
}

#[test]
fn gradients_treat_the_norm_as_a_constant() {
    tch::manual_seed(2);
    let (vb, va) = f64_stores();
    let l = f64_dora(&vb, &va);
    let x = randn(&[6, 12], Kind::Double);
    let g = randn(&[6, 10], Kind::Double);
    let params = [l.lora_a(), l.lora_b(), l.magnitude().unwrap()];
    let ours = Tensor::run_backward(
        &[(l.forward_t(&x, true) * &g).sum(Kind::Double)],
        &params,
        false,
        false,
    );
    let reference =
        x.matmul(&materialised_weight(&l).tr()) + l.base().dense().unwrap().bs.as_ref().unwrap();
    let theirs = Tensor::run_backward(&[(reference * &g).sum(Kind::Double)], &params, false, false);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(max_abs_diff(a, b) < 1e-10, "gradient {i}");
    }
}

#[test]
fn builder_layers_need_their_magnitude_initialised_after_loading() {
    tch::manual_seed(3);
    let (base_vs, adapter_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig { use_dora: true, ..LoraConfig::for_targets(["q"]) };
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let q = builder.linear(&(base_vs.root() / "q"), 16, 16, Default::default()).unwrap();
    let adapter = builder.finish().unwrap();
    let x = randn(&[3, 16], Kind::Float);
    let err = q.f_forward_t(&x, true).unwrap_err();
    assert!(matches!(err, Error::Uninitialized { ref module, .. } if module == "q"), "{err}");
    assert!(matches!(adapter.merge(), Err(Error::Uninitialized { .. })));
    // "load" pre-trained weights, then initialise
    set(&base_vs.variables()["q.weight"], &randn(&[16, 16], Kind::Float));
    adapter.init_from_base_weights().unwrap();
    let base = x.apply(q.base().unwrap());
    assert!(max_abs_diff(&q.f_forward_t(&x, true).unwrap(), &base) < 1e-5);
}

#[test]
fn bf16_dora_unmerge_is_bit_exact() {
    tch::manual_seed(4);
    let mut vb = nn::VarStore::new(Device::Cpu);
    let base = nn::linear(vb.root() / "proj", 64, 32, Default::default());
    vb.bfloat16();
    let va = nn::VarStore::new(Device::Cpu);
    let l = LoraLinear::new(base, &(va.root() / "proj"), &dora_cfg(4)).unwrap();
    assert_eq!(l.magnitude().unwrap().kind(), Kind::Float);
    set(l.lora_b(), &(randn(&[32, 4], Kind::Float) * 0.1));
    let original = l.base().dense().unwrap().ws.copy();
    let x = randn(&[5, 64], Kind::Float).to_kind(Kind::BFloat16);
    let unmerged = l.forward_t(&x, false);
    assert_eq!(unmerged.kind(), Kind::BFloat16);
    for _ in 0..10 {
        l.safe_merge().unwrap();
        let rel = max_abs_diff(&l.forward_t(&x, false), &unmerged)
            / unmerged.abs().max().double_value(&[]);
        assert!(rel < 2e-2, "{rel}");
        l.unmerge().unwrap();
    }
    assert!(bit_equal(&l.base().dense().unwrap().ws, &original));
}

#[test]
fn dora_with_lora_bias_or_on_convolutions_is_refused() {
    let c = LoraConfig { lora_bias: true, ..dora_cfg(2) };
    assert!(
        matches!(c.validate(), Err(Error::InvalidConfig { ref field, .. }) if field == "lora_bias")
    );
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let conv = nn::conv2d(vb.root() / "c", 3, 4, 3, Default::default());
    let cfg = tch_peft::lora::Conv2dConfig::default();
    let err = tch_peft::lora::LoraConv2d::new(conv, cfg, &(va.root() / "c"), "c", &dora_cfg(2))
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { ref field, .. } if field == "use_dora"), "{err}");
    // (DoRA on embeddings is supported: tests/peft_parity.rs)
}

#[test]
fn dropout_in_training_follows_peft_form() {
    tch::manual_seed(5);
    let (vb, va) = f64_stores();
    let base = nn::linear(vb.root() / "proj", 12, 10, Default::default());
    let p = 0.3;
    let c = LoraConfig { lora_dropout: p, ..dora_cfg(3) };
    let l = LoraLinear::new(base, &(va.root() / "proj"), &c).unwrap();
    set(l.lora_b(), &(randn(&[10, 3], Kind::Double) * 0.3));
    set(l.magnitude().unwrap(), &(randn(&[10], Kind::Double).abs() + 0.5));
    let x = randn(&[8, 12], Kind::Double);
    let y = l.forward_t(&x, true);
    // y = x Wᵀ + b + (g − 1)·(x_d Wᵀ) + g·s·x_d Aᵀ Bᵀ,  g = m / ‖W + s·BA‖_row, for the
    // dropped-out input x_d = x ⊙ mask / (1 − p). The mask comes from the process-wide RNG, which
    // tests on other threads draw from too, so each row's mask is found among all 2¹² instead of
    // being replayed from a seed: exactly one must give PEFT's form to 1e-12.
    let w = &l.base().dense().unwrap().ws;
    let norm = (w + l.lora_b().matmul(l.lora_a()) * l.scaling())
        .square()
        .sum_dim_intlist(1, false, Kind::Double)
        .sqrt();
    let g = l.magnitude().unwrap() / norm;
    let masks = Tensor::arange(1 << 12, (Kind::Int64, tch::Device::Cpu))
        .unsqueeze(1)
        .bitwise_right_shift(&Tensor::arange(12, (Kind::Int64, tch::Device::Cpu)))
        .bitwise_and(1)
        .to_kind(Kind::Double); // [4096, 12]: every keep/drop pattern
    let mut dropped = 0;
    for i in 0..8 {
        let xi = x.get(i).unsqueeze(0); // [1, 12]
        let xd = &masks * &xi / (1.0 - p); // [4096, 12]
        let expected = xi.apply(l.base().dense().unwrap())
            + xd.matmul(&w.tr()) * (&g - 1.0)
            + xd.matmul(&l.lora_a().tr()).matmul(&l.lora_b().tr()) * l.scaling() * &g;
        let err = (expected - y.get(i).unsqueeze(0)).abs().amax([1].as_slice(), false);
        let matching = err.le(1e-12).nonzero();
        assert_eq!(matching.size()[0], 1, "row {i}: one dropout mask gives PEFT's form");
        let mask = masks.get(matching.int64_value(&[0, 0]));
        dropped += 12 - mask.sum(Kind::Double).double_value(&[]) as i64;
    }
    assert!(dropped > 0, "dropout acted");
    assert!(max_abs_diff(&y, &l.forward_t(&x, false)) > 1e-3, "dropout changed the output");
}

#[test]
fn the_cached_row_norm_follows_in_place_changes_of_the_base_weight() {
    tch::manual_seed(4);
    let (vb, va) = f64_stores();
    let l = f64_dora(&vb, &va);
    let x = randn(&[5, 12], Kind::Double);
    let _ = l.forward_t(&x, false); // fills the cache
                                    // the base weight changes in place (a reload, say): the norm must follow
    set(&l.base().dense().unwrap().ws, &randn(&[10, 12], Kind::Double));
    let expected =
        x.matmul(&materialised_weight(&l).tr()) + l.base().dense().unwrap().bs.as_ref().unwrap();
    let d = max_abs_diff(&l.forward_t(&x, false), &expected);
    assert!(d < 1e-10, "stale ‖W‖ cache: max |Δ| = {d}");
}

#[test]
fn fused_and_composed_nodes_give_every_gradient_of_the_materialised_formula() {
    tch::manual_seed(6);
    let (vb, va) = f64_stores();
    let base = nn::linear(vb.root() / "proj", 12, 10, Default::default());
    let c = LoraConfig { bias: tch_peft::lora::LoraBias::LoraOnly, ..dora_cfg(3) };
    let l = LoraLinear::new(base, &(va.root() / "proj"), &c).unwrap();
    set(l.lora_b(), &(randn(&[10, 3], Kind::Double) * 0.3));
    set(l.magnitude().unwrap(), &(randn(&[10], Kind::Double).abs() + 0.5));
    let _ = l.base().dense().unwrap().ws.set_requires_grad(true); // the user unfroze the base weight
    let bias = l.named_tensors().into_iter().find(|(n, _)| n.ends_with("bias")).unwrap().1;
    // 6 tokens: dx as g W_g + (s g B_g) A; 48 tokens (≥ 2 × out): through W_g + s·B_g A
    for tokens in [3, 24] {
        let x = randn(&[2, tokens, 12], Kind::Double).set_requires_grad(true);
        let g = randn(&[2, tokens, 10], Kind::Double);
        let params = [
            &x,
            &l.base().dense().unwrap().ws,
            &bias,
            l.lora_a(),
            l.lora_b(),
            l.magnitude().unwrap(),
        ];
        let reference = x.matmul(&materialised_weight(&l).tr()) + &bias;
        let theirs =
            Tensor::run_backward(&[(&reference * &g).sum(Kind::Double)], &params, false, false);
        for fused in [true, false] {
            l.set_fused(fused);
            let y = l.forward_t(&x, true);
            assert!(max_abs_diff(&y, &reference) < 1e-12, "forward fused={fused}");
            let ours = Tensor::run_backward(&[(&y * &g).sum(Kind::Double)], &params, false, false);
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                // the base weight's gradient: the reference differentiates through the norm's
                // `W` only where DoRA does (the norm is detached in both)
                assert!(max_abs_diff(a, b) < 1e-10, "gradient {i} fused={fused}");
            }
        }
    }
}

#[test]
fn fused_node_on_a_bf16_base_agrees_with_the_composed_ops() {
    tch::manual_seed(7);
    let (_vb, _va, l) = bf16_lora_layer(&dora_cfg(4), 32, 16);
    set(l.lora_b(), &(randn(&[16, 4], Kind::Float) * 0.1));
    let x = randn(&[6, 32], Kind::Float).to_kind(Kind::BFloat16);
    let g = randn(&[6, 16], Kind::Float).to_kind(Kind::BFloat16);
    let res = fused_and_composed(&l, &x, &g);
    for (y, gr) in &res {
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(gr[0].kind(), Kind::BFloat16);
        for t in &gr[1..] {
            assert_eq!(t.kind(), Kind::Float, "factor and magnitude gradients stay f32");
        }
    }
    assert!(rel_diff(&res[0].0, &res[1].0) < 2e-2, "forward");
    for i in 0..4 {
        let d = rel_diff(&res[0].1[i], &res[1].1[i]);
        assert!(d < 3e-2, "gradient {i}: relative difference {d}");
    }
}

#[test]
fn fused_node_gives_a_zero_magnitude_entry_a_zero_gradient_and_the_rest_exactly() {
    // documented: the fused node recovers x·Wᵀ + s·hBᵀ from the output, impossible where m is 0
    tch::manual_seed(8);
    let (vb, va) = f64_stores();
    let l = f64_dora(&vb, &va);
    let m = randn(&[10], Kind::Double).abs() + 0.5;
    let _ = m.get(3).fill_(0.0);
    set(l.magnitude().unwrap(), &m);
    let x = randn(&[6, 12], Kind::Double);
    let g = randn(&[6, 10], Kind::Double);
    let mut dm = Vec::new();
    for fused in [true, false] {
        l.set_fused(fused);
        let y = l.forward_t(&x, true);
        let loss = (&y * &g).sum(Kind::Double);
        dm.push(Tensor::run_backward(&[loss], &[l.magnitude().unwrap()], false, false).remove(0));
    }
    assert_eq!(dm[0].double_value(&[3]), 0.0);
    assert!(dm[1].double_value(&[3]).abs() > 1e-6, "the composed path's true gradient");
    let (f, c) = (
        dm[0].index_select(0, &Tensor::from_slice(&[0i64, 1, 2, 4, 5, 6, 7, 8, 9])),
        dm[1].index_select(0, &Tensor::from_slice(&[0i64, 1, 2, 4, 5, 6, 7, 8, 9])),
    );
    assert!(max_abs_diff(&f, &c) < 1e-10);
}
