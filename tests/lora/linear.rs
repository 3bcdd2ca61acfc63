//! LoRA on Linear: forward against float64 recomputation, merge/unmerge, gradients, dropout,
//! dtypes and the typed errors of bad input.

use crate::common::*;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{LoraBias, LoraConfig, LoraInit, LoraLinear};
use tch_peft::{Adapter, Error};

fn cfg(r: i64, alpha: f64) -> LoraConfig {
    LoraConfig { r, lora_alpha: alpha, ..Default::default() }
}

/// A layer with an f64 base and random (non-zero) A and B.
fn f64_layer(vs_base: &nn::VarStore, vs_ad: &nn::VarStore, c: &LoraConfig) -> LoraLinear {
    let base = base_linear(vs_base, "proj", 12, 10);
    let l = LoraLinear::new(base, &(vs_ad.root() / "proj"), c).unwrap();
    set(l.lora_b(), &randn(&[10, c.r], Kind::Double));
    l
}

fn f64_stores() -> (nn::VarStore, nn::VarStore) {
    let mut b = nn::VarStore::new(Device::Cpu);
    b.set_kind(Kind::Double);
    (b, nn::VarStore::new(Device::Cpu))
}

/// x Wᵀ + b + s · x Aᵀ Bᵀ in float64.
fn reference(x: &Tensor, l: &LoraLinear) -> Tensor {
    let d = |t: &Tensor| t.to_kind(Kind::Double);
    let base = d(x).matmul(&d(&l.base().dense().unwrap().ws).tr())
        + d(l.base().dense().unwrap().bs.as_ref().unwrap());
    base + d(x).matmul(&d(l.lora_a()).tr()).matmul(&d(l.lora_b()).tr()) * l.scaling()
}

#[test]
fn zero_init_b_leaves_output_unchanged() {
    tch::manual_seed(0);
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let base = base_linear(&vb, "proj", 16, 8);
    let x = randn(&[3, 5, 16], Kind::Float);
    let expected = x.apply(&base);
    let l = LoraLinear::new(base, &(va.root() / "proj"), &cfg(4, 16.0)).unwrap();
    assert_eq!(l.lora_b().abs().sum(Kind::Double).double_value(&[]), 0.0);
    assert!(bit_equal(&l.forward_t(&x, false), &expected));
    assert!(bit_equal(&l.forward_t(&x, true), &expected));
}

#[test]
fn forward_matches_float64_recomputation() {
    tch::manual_seed(1);
    let (vb, va) = f64_stores();
    let l = f64_layer(&vb, &va, &cfg(4, 12.0));
    assert_eq!(l.lora_a().kind(), Kind::Double, "adapters follow an f64 base");
    let x = randn(&[2, 3, 12], Kind::Double);
    let y = l.forward_t(&x, false);
    assert_eq!(y.size(), [2, 3, 10]);
    assert!(max_abs_diff(&y, &reference(&x, &l)) < 1e-12);
    assert_eq!(l.scaling(), 3.0);
}

#[test]
fn f32_forward_matches_float64_recomputation() {
    tch::manual_seed(11);
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let l =
        LoraLinear::new(base_linear(&vb, "p", 32, 24), &(va.root() / "p"), &cfg(8, 16.0)).unwrap();
    set(l.lora_b(), &randn(&[24, 8], Kind::Float));
    let x = randn(&[7, 32], Kind::Float);
    assert!(max_abs_diff(&l.forward_t(&x, false), &reference(&x, &l)) < 1e-4);
}

#[test]
fn rslora_scaling_is_alpha_over_sqrt_r() {
    tch::manual_seed(2);
    let (vb, va) = f64_stores();
    let c = LoraConfig { use_rslora: true, ..cfg(4, 6.0) };
    let l = f64_layer(&vb, &va, &c);
    assert_eq!(l.scaling(), 3.0);
    let x = randn(&[4, 12], Kind::Double);
    assert!(max_abs_diff(&l.forward_t(&x, false), &reference(&x, &l)) < 1e-12);
}

#[test]
fn merged_forward_equals_unmerged_forward() {
    tch::manual_seed(3);
    let (vb, va) = f64_stores();
    let l = f64_layer(&vb, &va, &cfg(4, 8.0));
    let x = randn(&[6, 12], Kind::Double);
    let unmerged = l.forward_t(&x, false);
    l.merge().unwrap();
    assert!(l.is_merged());
    let merged = l.forward_t(&x, false);
    assert!(max_abs_diff(&merged, &unmerged) < 1e-12);
    // the merged weight is W + s·BA and the forward is the plain base layer
    assert!(max_abs_diff(&x.apply(l.base().dense().unwrap()), &unmerged) < 1e-12);
    assert!(matches!(l.merge(), Err(Error::MergeState { .. })));
    l.unmerge().unwrap();
    assert!(matches!(l.unmerge(), Err(Error::MergeState { .. })));
}

fn unmerge_is_bit_exact(kind: Kind) {
    tch::manual_seed(4);
    let mut vb = nn::VarStore::new(Device::Cpu);
    let base = base_linear(&vb, "proj", 64, 48);
    vb.set_kind(kind);
    let va = nn::VarStore::new(Device::Cpu);
    assert_eq!(base.ws.kind(), kind, "set_kind converts the variables in place");
    let original = base.ws.copy();
    let l = LoraLinear::new(base, &(va.root() / "proj"), &cfg(8, 16.0)).unwrap();
    assert_eq!(l.lora_a().kind(), if kind == Kind::Double { Kind::Double } else { Kind::Float });
    set(l.lora_b(), &(randn(&[48, 8], Kind::Float) * 0.1));
    for _ in 0..50 {
        l.merge().unwrap();
        assert!(!bit_equal(&l.base().dense().unwrap().ws, &original), "merge changed the weight");
        l.unmerge().unwrap();
    }
    assert!(
        bit_equal(&l.base().dense().unwrap().ws, &original),
        "50 merge/unmerge cycles are bit-exact in {kind:?}"
    );
}

#[test]
fn unmerge_is_bit_exact_in_f32() {
    unmerge_is_bit_exact(Kind::Float);
}

#[test]
fn unmerge_is_bit_exact_in_bf16() {
    unmerge_is_bit_exact(Kind::BFloat16);
}

#[test]
fn unmerge_is_bit_exact_in_f16() {
    unmerge_is_bit_exact(Kind::Half);
}

#[test]
fn bf16_base_keeps_f32_adapters_and_bf16_output() {
    tch::manual_seed(5);
    let (_vb, _va, l) = bf16_lora_layer(&cfg(4, 8.0), 32, 16);
    assert_eq!(l.lora_a().kind(), Kind::Float);
    set(l.lora_b(), &randn(&[16, 4], Kind::Float));
    let x = randn(&[5, 32], Kind::Float).to_kind(Kind::BFloat16);
    let y = l.forward_t(&x, false);
    assert_eq!(y.kind(), Kind::BFloat16);
    let r = reference(&x, &l);
    let rel = rel_diff(&y, &r);
    assert!(rel < 2e-2, "bf16 output within bf16 precision of the f64 reference: {rel}");
}

#[test]
fn gradients_reach_only_a_and_b() {
    tch::manual_seed(6);
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let l = LoraLinear::new(base_linear(&vb, "proj", 8, 6), &(va.root() / "proj"), &cfg(2, 4.0))
        .unwrap();
    set(l.lora_b(), &randn(&[6, 2], Kind::Float));
    let x = randn(&[4, 8], Kind::Float);
    l.forward_t(&x, true).square().sum(Kind::Float).backward();
    assert!(
        l.lora_a().grad().defined()
            && l.lora_a().grad().abs().sum(Kind::Float).double_value(&[]) > 0.0
    );
    assert!(l.lora_b().grad().defined());
    assert!(
        !l.base().dense().unwrap().ws.requires_grad()
            && !l.base().dense().unwrap().ws.grad().defined()
    );
    assert!(!l.base().dense().unwrap().bs.as_ref().unwrap().grad().defined());
    assert_eq!(l.num_trainable_parameters(), 2 * 8 + 6 * 2);
}

#[test]
fn dropout_acts_in_training_only_and_on_the_adapter_branch_only() {
    tch::manual_seed(7);
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let c = LoraConfig { lora_dropout: 0.5, ..cfg(4, 8.0) };
    let l = LoraLinear::new(base_linear(&vb, "proj", 16, 16), &(va.root() / "proj"), &c).unwrap();
    let x = randn(&[8, 16], Kind::Float);
    let base_out = x.apply(l.base().dense().unwrap());
    // B = 0: dropout on the adapter branch cannot show, so train output equals base output
    assert!(bit_equal(&l.forward_t(&x, true), &base_out));
    set(l.lora_b(), &randn(&[16, 4], Kind::Float));
    let eval1 = l.forward_t(&x, false);
    let eval2 = l.forward_t(&x, false);
    assert!(bit_equal(&eval1, &eval2), "eval is deterministic");
    assert!(max_abs_diff(&eval1, &reference(&x, &l)) < 1e-4);
    let train = l.forward_t(&x, true);
    assert!(max_abs_diff(&train, &eval1) > 1e-3, "dropout changes the training output");
}

#[test]
fn disabled_adapter_runs_the_base_layer() {
    tch::manual_seed(8);
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let l = LoraLinear::new(base_linear(&vb, "proj", 8, 8), &(va.root() / "proj"), &cfg(2, 2.0))
        .unwrap();
    set(l.lora_b(), &randn(&[8, 2], Kind::Float));
    let x = randn(&[3, 8], Kind::Float);
    let base_out = x.apply(l.base().dense().unwrap());
    l.merge().unwrap();
    l.set_enabled(false).unwrap();
    assert!(!l.is_merged(), "disabling unmerges first");
    assert!(bit_equal(&l.forward_t(&x, false), &base_out));
    l.set_enabled(true).unwrap();
    assert!(max_abs_diff(&l.forward_t(&x, false), &base_out) > 1e-3);
}

#[test]
fn inits_match_peft() {
    tch::manual_seed(9);
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (i, o, r) = (400, 300, 16);
    let k = LoraLinear::new(base_linear(&vb, "k", i, o), &(va.root() / "k"), &cfg(r, 8.0)).unwrap();
    let bound = 1.0 / (i as f64).sqrt();
    let amax = k.lora_a().abs().max().double_value(&[]);
    assert!(amax <= bound && amax > 0.95 * bound, "A ~ U(±1/√in): max {amax}, bound {bound}");
    let g = LoraConfig { init_lora_weights: LoraInit::Gaussian, ..cfg(r, 8.0) };
    let g = LoraLinear::new(base_linear(&vb, "g", i, o), &(va.root() / "g"), &g).unwrap();
    let std = g.lora_a().std(true).double_value(&[]);
    assert!((std - 1.0 / r as f64).abs() < 0.005, "A ~ N(0, 1/r): std {std}");
    assert_eq!(g.lora_b().abs().sum(Kind::Double).double_value(&[]), 0.0);
    let f = LoraConfig { init_lora_weights: LoraInit::Random, ..cfg(r, 8.0) };
    let f = LoraLinear::new(base_linear(&vb, "f", i, o), &(va.root() / "f"), &f).unwrap();
    let bmax = f.lora_b().abs().max().double_value(&[]);
    assert!(bmax > 0.0 && bmax <= 1.0 / (r as f64).sqrt(), "init false: B ~ U(±1/√r)");
}

#[test]
fn safe_merge_refuses_non_finite_weights_and_leaves_the_base_unchanged() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let l = LoraLinear::new(base_linear(&vb, "proj", 4, 4), &(va.root() / "proj"), &cfg(2, 2.0))
        .unwrap();
    let before = l.base().dense().unwrap().ws.copy();
    set(l.lora_b(), &Tensor::full([4, 2], f64::INFINITY, (Kind::Float, Device::Cpu)));
    let err = l.safe_merge().unwrap_err();
    assert!(matches!(&err, Error::NonFiniteMerge { module } if module == "proj"), "{err}");
    assert!(bit_equal(&l.base().dense().unwrap().ws, &before));
    assert!(!l.is_merged());
}

#[test]
fn bias_lora_only_trains_a_copy_of_the_base_bias() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let c = LoraConfig { bias: LoraBias::LoraOnly, ..cfg(2, 2.0) };
    let l = LoraLinear::new(base_linear(&vb, "proj", 4, 3), &(va.root() / "proj"), &c).unwrap();
    let names: Vec<String> = l.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["proj.lora_A.weight", "proj.lora_B.weight", "proj.base_layer.bias"]);
    let mut opt = nn::Sgd::default().build(&va, 0.1).unwrap();
    let x = randn(&[5, 4], Kind::Float);
    let before = l.base().dense().unwrap().bs.as_ref().unwrap().copy();
    opt.backward_step(&l.forward_t(&x, true).sum(Kind::Float));
    let trained = &l.named_tensors()[2].1;
    assert!(max_abs_diff(trained, &before) > 0.1, "the bias copy trains");
    assert!(
        bit_equal(l.base().dense().unwrap().bs.as_ref().unwrap(), &before),
        "the base bias stays"
    );
}

// ---------- bad input gives the typed error ----------

#[test]
fn rank_larger_than_the_layer_is_refused() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let err = LoraLinear::new(base_linear(&vb, "proj", 16, 4), &(va.root() / "proj"), &cfg(5, 8.0))
        .unwrap_err();
    assert!(
        matches!(err, Error::RankTooLarge { rank: 5, in_features: 16, out_features: 4, .. }),
        "{err}"
    );
    assert_eq!(va.len(), 0, "nothing registered on failure");
}

#[test]
fn wrong_input_shape_dtype_or_device_is_a_typed_error() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let l = LoraLinear::new(base_linear(&vb, "proj", 8, 4), &(va.root() / "proj"), &cfg(2, 2.0))
        .unwrap();
    let err = l.f_forward_t(&randn(&[3, 7], Kind::Float), false).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { expected, actual, .. } if expected == &[-1, 8] && actual == &[3, 7]),
        "{err}"
    );
    assert!(err.to_string().contains("proj"), "{err}");
    let err = l.f_forward_t(&randn(&[3, 8], Kind::Double), false).unwrap_err();
    assert!(matches!(err, Error::DtypeMismatch { actual: Kind::Double, .. }), "{err}");
    let err = l.f_forward_t(&Tensor::zeros([0], (Kind::Float, Device::Cpu)), false).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }));
}

#[test]
fn forward_t_panics_with_the_typed_message() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let l = LoraLinear::new(base_linear(&vb, "proj", 8, 4), &(va.root() / "proj"), &cfg(2, 2.0))
        .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        l.forward_t(&randn(&[2, 5], Kind::Float), false)
    }));
    let msg = *r.unwrap_err().downcast::<String>().unwrap();
    assert!(msg.starts_with("shape mismatch for `input of `proj``"), "{msg}");
}

#[test]
fn integer_or_non_matrix_base_weights_are_refused() {
    let va = nn::VarStore::new(Device::Cpu);
    let int_base = nn::Linear { ws: Tensor::zeros([4, 4], (Kind::Int64, Device::Cpu)), bs: None };
    let err = LoraLinear::new(int_base, &(va.root() / "a"), &cfg(2, 2.0)).unwrap_err();
    assert!(matches!(err, Error::DtypeMismatch { actual: Kind::Int64, .. }), "{err}");
    let cube = nn::Linear { ws: Tensor::zeros([4, 4, 4], (Kind::Float, Device::Cpu)), bs: None };
    let err = LoraLinear::new(cube, &(va.root() / "b"), &cfg(2, 2.0)).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let bad_bias = nn::Linear {
        ws: Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
        bs: Some(Tensor::zeros([3], (Kind::Float, Device::Cpu))),
    };
    let err = LoraLinear::new(bad_bias, &(va.root() / "c"), &cfg(2, 2.0)).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { ref name, .. } if name == "c.bias"), "{err}");
}

#[test]
fn adapting_the_same_path_twice_is_refused() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let _l =
        LoraLinear::new(base_linear(&vb, "p", 4, 4), &(va.root() / "p"), &cfg(2, 2.0)).unwrap();
    let err =
        LoraLinear::new(base_linear(&vb, "q", 4, 4), &(va.root() / "p"), &cfg(2, 2.0)).unwrap_err();
    assert!(matches!(err, Error::DuplicateParameter(ref n) if n == "p.lora_A.weight"), "{err}");
}

#[test]
fn invalid_config_is_refused_at_construction() {
    let (vb, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let c = LoraConfig { lora_dropout: 1.5, ..cfg(2, 2.0) };
    let err = LoraLinear::new(base_linear(&vb, "p", 4, 4), &(va.root() / "p"), &c).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { ref field, .. } if field == "lora_dropout"));
}

// ---------- gradients of the fused node and of the composed ops, against the math ----------

/// Forward + backward of `sum(y ⊙ g)`; returns (y, dx, dA, dB).
fn grads(l: &LoraLinear, x: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let y = l.forward_t(&x, true);
    let gr = Tensor::run_backward(
        &[(&y * g).sum(Kind::Double)],
        &[&x, l.lora_a(), l.lora_b()],
        false,
        false,
    );
    (y.detach(), gr[0].shallow_clone(), gr[1].shallow_clone(), gr[2].shallow_clone())
}

#[test]
fn fused_and_composed_gradients_equal_the_analytic_gradients() {
    tch::manual_seed(12);
    let (vb, va) = f64_stores();
    let l = f64_layer(&vb, &va, &cfg(3, 6.0));
    // 8 tokens: dx as g W + (s gB) A; 48 tokens (≥ 2 × out): dx through W + s·BA
    for tokens in [4, 24] {
        let x = randn(&[2, tokens, 12], Kind::Double);
        let g = randn(&[2, tokens, 10], Kind::Double);
        // dx = g (W + sBA), dA = s (gB)ᵀ x, dB = s gᵀ (x Aᵀ), over the flattened tokens
        let (w, a, b, s) = (&l.base().dense().unwrap().ws, l.lora_a(), l.lora_b(), l.scaling());
        let (x2, g2) = (x.reshape([-1, 12]), g.reshape([-1, 10]));
        let dx = g2.matmul(&(w + b.matmul(a) * s)).reshape([2, tokens, 12]);
        let da = g2.matmul(b).tr().matmul(&x2) * s;
        let db = g2.tr().matmul(&x2.matmul(&a.tr())) * s;
        for fused in [true, false] {
            l.set_fused(fused);
            let (y, gx, ga, gb) = grads(&l, &x, &g);
            assert!(max_abs_diff(&y, &reference(&x, &l)) < 1e-12, "fused={fused}");
            assert!(max_abs_diff(&gx, &dx) < 1e-12, "dx fused={fused}");
            assert!(max_abs_diff(&ga, &da) < 1e-12, "dA fused={fused}");
            assert!(max_abs_diff(&gb, &db) < 1e-12, "dB fused={fused}");
        }
    }
    assert_eq!(tch_peft::lora::fused_kernel_available(), cfg!(target_os = "linux"));
}

#[test]
fn fused_node_passes_gradients_to_a_trainable_bias_or_an_unfrozen_base() {
    tch::manual_seed(13);
    let (vb, va) = f64_stores();
    let c = LoraConfig { bias: LoraBias::LoraOnly, ..cfg(2, 2.0) };
    let l = f64_layer(&vb, &va, &c);
    let _ = l.base().dense().unwrap().ws.set_requires_grad(true); // the user unfroze the base weight
    let x = randn(&[5, 12], Kind::Double);
    let g = randn(&[5, 10], Kind::Double);
    let bias = l.named_tensors()[2].1.shallow_clone();
    let mut out = Vec::new();
    for fused in [true, false] {
        l.set_fused(fused);
        let y = l.forward_t(&x, true);
        let gr = Tensor::run_backward(
            &[(&y * &g).sum(Kind::Double)],
            &[&l.base().dense().unwrap().ws, &bias],
            false,
            false,
        );
        assert!(max_abs_diff(&gr[0], &g.tr().matmul(&x)) < 1e-12, "dW fused={fused}");
        assert!(
            max_abs_diff(&gr[1], &g.sum_dim_intlist(0, false, Kind::Double)) < 1e-12,
            "db fused={fused}"
        );
        out.push(y);
    }
    assert!(max_abs_diff(&out[0], &out[1]) < 1e-12);
}

#[test]
fn fused_node_on_a_bf16_base_returns_f32_gradients_for_the_factors() {
    tch::manual_seed(14);
    let (_vb, _va, l) = bf16_lora_layer(&cfg(4, 8.0), 32, 16);
    set(l.lora_b(), &randn(&[16, 4], Kind::Float));
    let x = randn(&[6, 32], Kind::Float).to_kind(Kind::BFloat16);
    let g = randn(&[6, 16], Kind::Float).to_kind(Kind::BFloat16);
    let res: Vec<Vec<Tensor>> = fused_and_composed(&l, &x, &g)
        .into_iter()
        .map(|(y, gr)| {
            assert_eq!(y.kind(), Kind::BFloat16);
            assert_eq!((gr[1].kind(), gr[2].kind()), (Kind::Float, Kind::Float));
            assert_eq!(gr[0].kind(), Kind::BFloat16);
            gr
        })
        .collect();
    for (i, (fused, composed)) in res[0].iter().zip(&res[1]).enumerate() {
        let rel = rel_diff(fused, composed);
        assert!(rel < 2e-2, "gradient {i}: fused and composed agree within bf16 precision ({rel})");
    }
}

#[test]
fn lora_bias_adds_s_times_its_bias_and_merges_into_the_base_bias() {
    tch::manual_seed(15);
    let (vb, va) = f64_stores();
    let c = LoraConfig { lora_bias: true, ..cfg(2, 6.0) };
    let l = f64_layer(&vb, &va, &c);
    let bb = l.lora_b_bias().unwrap();
    assert_eq!(bb.abs().sum(Kind::Double).double_value(&[]), 0.0, "zero-initialised");
    set(bb, &randn(&[10], Kind::Double));
    let names: Vec<String> = l.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[2], "proj.lora_B.bias");
    let x = randn(&[4, 12], Kind::Double);
    let expected = reference(&x, &l) + bb * l.scaling();
    for (train, fused) in [(false, true), (true, true), (true, false)] {
        l.set_fused(fused);
        assert!(max_abs_diff(&l.forward_t(&x, train), &expected) < 1e-12);
    }
    let (w0, b0) = (
        l.base().dense().unwrap().ws.copy(),
        l.base().dense().unwrap().bs.as_ref().unwrap().copy(),
    );
    l.merge().unwrap();
    assert!(
        max_abs_diff(l.base().dense().unwrap().bs.as_ref().unwrap(), &(&b0 + bb * l.scaling()))
            < 1e-12
    );
    assert!(max_abs_diff(&l.forward_t(&x, false), &expected) < 1e-12);
    l.unmerge().unwrap();
    assert!(
        bit_equal(&l.base().dense().unwrap().ws, &w0)
            && bit_equal(l.base().dense().unwrap().bs.as_ref().unwrap(), &b0)
    );
    // a bias-less base cannot take the merge (as PEFT)
    let no_bias = nn::linear(
        vb.root() / "nb",
        12,
        10,
        nn::LinearConfig { bias: false, ..Default::default() },
    );
    let l2 = LoraLinear::new(no_bias, &(va.root() / "nb"), &c).unwrap();
    assert!(
        matches!(l2.merge(), Err(Error::Unsupported { ref field, .. }) if field == "lora_bias")
    );
    assert!(!l2.is_merged());
}

#[test]
fn conv1d_weights_stored_in_out_work_for_forward_gradients_and_merge() {
    tch::manual_seed(16);
    let va = nn::VarStore::new(Device::Cpu);
    let w = randn(&[12, 10], Kind::Double); // [in, out], y = x W + b
    let b = randn(&[10], Kind::Double);
    let l = LoraLinear::from_conv1d(
        w.shallow_clone(),
        Some(b.shallow_clone()),
        &(va.root() / "c_attn"),
        "c_attn",
        &cfg(3, 6.0),
    )
    .unwrap();
    assert_eq!((l.in_features(), l.out_features()), (12, 10));
    set(l.lora_b(), &randn(&[10, 3], Kind::Double));
    let x = randn(&[5, 12], Kind::Double);
    let g = randn(&[5, 10], Kind::Double);
    let (a, bm, s) = (l.lora_a(), l.lora_b(), l.scaling());
    let expected = x.matmul(&w) + &b + x.matmul(&a.tr()).matmul(&bm.tr()) * s;
    let dx = g.matmul(&(w.tr() + bm.matmul(a) * s));
    for fused in [true, false] {
        l.set_fused(fused);
        let (y, gx, _, _) = grads(&l, &x, &g);
        assert!(max_abs_diff(&y, &expected) < 1e-12, "fused={fused}");
        assert!(max_abs_diff(&gx, &dx) < 1e-12, "fused={fused}");
    }
    let w0 = w.copy();
    l.merge().unwrap();
    assert!(
        max_abs_diff(&w, &(&w0 + bm.matmul(a).tr() * s)) < 1e-12,
        "merged into the [in, out] storage"
    );
    l.unmerge().unwrap();
    assert!(bit_equal(&w, &w0));
}

#[test]
fn orthogonal_init_has_non_zero_factors_whose_product_is_zero() {
    tch::manual_seed(17);
    let (vb, va) = f64_stores();
    let c = LoraConfig { init_lora_weights: LoraInit::Orthogonal, ..cfg(4, 8.0) };
    let base = base_linear(&vb, "proj", 12, 10);
    let x = randn(&[3, 12], Kind::Double);
    let expected = x.apply(&base);
    let l = LoraLinear::new(base, &(va.root() / "proj"), &c).unwrap();
    assert!(l.lora_a().abs().max().double_value(&[]) > 1e-3);
    assert!(l.lora_b().abs().max().double_value(&[]) > 1e-3);
    assert!(l.delta_weight().abs().max().double_value(&[]) < 1e-12, "BA = 0");
    assert!(max_abs_diff(&l.forward_t(&x, false), &expected) < 1e-12);
    let odd = LoraConfig { init_lora_weights: LoraInit::Orthogonal, ..cfg(3, 8.0) };
    assert!(matches!(odd.validate(), Err(Error::InvalidConfig { ref field, .. }) if field == "r"));
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["init_lora_weights"], "orthogonal");
}

/// `pissa_niter_K`: randomized SVD; the base keeps the exact residual, and on a weight with a
/// spectral gap the update matches exact PiSSA's.
#[test]
fn pissa_niter_keeps_the_exact_residual_and_finds_the_top_subspace() {
    let cfg: LoraConfig =
        serde_json::from_str(r#"{"r": 3, "lora_alpha": 6, "init_lora_weights": "pissa_niter_4", "target_modules": ["w"]}"#)
            .unwrap();
    assert_eq!(cfg.init_lora_weights, LoraInit::PissaNiter(4));
    assert!(serde_json::to_string(&cfg)
        .unwrap()
        .contains(r#""init_lora_weights":"pissa_niter_4""#));
    tch::manual_seed(2);
    // W = U diag(S) Vᵀ with singular values 10, 9, 8, then ≤ 0.1
    let (u, _) = Tensor::linalg_qr(&randn(&[12, 12], Kind::Double), "reduced");
    let (v, _) = Tensor::linalg_qr(&randn(&[10, 10], Kind::Double), "reduced");
    let s = Tensor::from_slice(&[10.0, 9.0, 8.0, 0.1, 0.08, 0.06, 0.05, 0.04, 0.02, 0.01]);
    let w = u.narrow(1, 0, 10).mm(&s.diag(0)).mm(&v.tr());
    let mut deltas = Vec::new();
    for init in [LoraInit::PissaNiter(4), LoraInit::Pissa] {
        let base_vs = nn::VarStore::new(Device::Cpu);
        let vs = nn::VarStore::new(Device::Cpu);
        let base = nn::Linear { ws: base_vs.root().add("w", w.copy(), false), bs: None };
        let layer = LoraLinear::new(
            base,
            &vs.root(),
            &LoraConfig { init_lora_weights: init, ..cfg.clone() },
        )
        .unwrap();
        let restored = &layer.base().dense().unwrap().ws + layer.delta_weight();
        assert!(max_abs_diff(&restored, &w) < 1e-12, "{init:?}");
        deltas.push(layer.delta_weight());
    }
    assert!(max_abs_diff(&deltas[0], &deltas[1]) < 1e-6);
    let bad = serde_json::from_str::<LoraConfig>(r#"{"init_lora_weights": "pissa_niter_x"}"#);
    assert!(bad.unwrap_err().to_string().contains("pissa_niter_K"));
}

#[test]
fn inference_reuses_cast_factors_until_they_change() {
    // bf16 base, f32 factors: under no_grad the casts are cached on the factors' versions
    tch::manual_seed(15);
    let (_vb, _va, l) = bf16_lora_layer(&cfg(4, 8.0), 32, 16);
    set(l.lora_b(), &randn(&[16, 4], Kind::Float));
    let x = randn(&[6, 32], Kind::Float).to_kind(Kind::BFloat16);
    let composed = |l: &LoraLinear| {
        l.set_fused(false);
        let y = tch::no_grad(|| l.forward_t(&x, false));
        l.set_fused(true);
        y
    };
    let first = tch::no_grad(|| l.forward_t(&x, false));
    assert!(max_abs_diff(&first, &composed(&l)) < 0.1);
    // an in-place change of a factor (an optimizer step, a load) must be seen
    set(l.lora_b(), &randn(&[16, 4], Kind::Float));
    set(l.lora_a(), &randn(&[4, 32], Kind::Float));
    let second = tch::no_grad(|| l.forward_t(&x, false));
    assert!(max_abs_diff(&second, &first) > 0.5, "stale cast factors");
    // the two paths round in different orders: within a bf16 step of the output's magnitude
    let tol = second.abs().max().to_kind(Kind::Float).double_value(&[]) / 128.0;
    let d = max_abs_diff(&second, &composed(&l));
    assert!(d < tol, "max |Δ| {d} (tolerance {tol})");
    // with autograd on, gradients still reach the f32 factors
    let y = l.forward_t(&x, false);
    let g = Tensor::run_backward(&[y.sum(Kind::Float)], &[l.lora_a()], false, false);
    assert_eq!(g[0].kind(), Kind::Float);
}

#[test]
fn into_merged_linear_leaves_other_handles_of_the_layer_consistent() {
    // the model's handle and the registry's share the base weight: after one of them is merged
    // for good, the other must not add the update a second time (nor restore an original)
    tch::manual_seed(11);
    let (vb, va) = f64_stores();
    let builder =
        tch_peft::LoraBuilder::new(&va.root(), LoraConfig::for_targets(["proj"])).unwrap();
    let model_layer = builder.linear(&(vb.root() / "proj"), 12, 10, Default::default()).unwrap();
    let adapter = builder.finish().unwrap();
    let handle = model_layer.as_lora().unwrap();
    let other = model_layer.as_lora().unwrap();
    set(handle.lora_b(), &randn(&[10, 8], Kind::Double));
    let x = randn(&[6, 12], Kind::Double);
    let expected = reference(&x, &handle);
    let merged = handle.into_merged_linear().unwrap();
    assert!(max_abs_diff(&x.apply(&merged), &expected) < 1e-12);
    assert!(max_abs_diff(&model_layer.forward_t(&x, false), &expected) < 1e-12);
    // the model's stack dropped the adapter (its update is in the base now)
    assert!(model_layer.as_lora().is_none());
    assert!(other.is_merged());
    assert!(matches!(other.unmerge(), Err(Error::MergeState { .. })));
    assert!(matches!(other.merge(), Err(Error::MergeState { .. })));
    // a second into_merged_linear keeps the weights as they are
    let again = other.into_merged_linear().unwrap();
    assert!(max_abs_diff(&x.apply(&again), &expected) < 1e-12);
    drop(adapter);
}
