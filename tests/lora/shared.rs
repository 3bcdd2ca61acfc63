//! `lora::forward_shared`: several layers on one input as one node, against each layer's own
//! forward — values and every gradient, LoRA and DoRA members together and DoRA ones alone,
//! with members that must fall back (a plain layer, dropout), an output left unused, and a bf16
//! base.

use crate::common::*;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{self, forward_shared, LoraBias, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::Adapter;

struct Block {
    _base: nn::VarStore,
    _adapters: Vec<nn::VarStore>,
    layers: Vec<MaybeLoraLinear>,
    /// Every trainable tensor (A, B, trained bias copies, magnitudes).
    trained: Vec<Tensor>,
}

/// q (LoRA, trained bias copy), k (LoRA, r 2), v (not targeted), d (DoRA), e (LoRA with
/// dropout): 12 → 10, 6, 6, 4, 5.
fn block(kind: Kind, dropout: f64) -> Block {
    let mut base = nn::VarStore::new(Device::Cpu);
    let (va, vd) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig {
        r: 3,
        lora_alpha: 6.0,
        bias: LoraBias::LoraOnly,
        rank_pattern: [("k".to_string(), 2)].into_iter().collect(),
        ..LoraConfig::for_targets(["q", "k"])
    };
    let b1 = LoraBuilder::new(&va.root(), cfg).unwrap();
    let dora = LoraConfig { r: 2, use_dora: true, ..LoraConfig::for_targets(["d"]) };
    let b2 = LoraBuilder::new(&vd.root(), dora).unwrap();
    let ve = nn::VarStore::new(Device::Cpu);
    let drop = LoraConfig { r: 2, lora_dropout: dropout, ..LoraConfig::for_targets(["e"]) };
    let b3 = LoraBuilder::new(&ve.root(), drop).unwrap();
    let root = base.root();
    let layers = vec![
        b1.linear(&(&root / "q"), 12, 10, Default::default()).unwrap(),
        b1.linear(&(&root / "k"), 12, 6, Default::default()).unwrap(),
        b1.linear(&(&root / "v"), 12, 6, Default::default()).unwrap(),
        b2.linear(&(&root / "d"), 12, 4, Default::default()).unwrap(),
        b3.linear(&(&root / "e"), 12, 5, Default::default()).unwrap(),
    ];
    base.set_kind(kind);
    let mut trained = Vec::new();
    for b in [b1, b2, b3] {
        let adapter = b.finish().unwrap();
        adapter.init_from_base_weights().unwrap();
        for l in adapter.layers() {
            set(l.lora_b(), &(randn(&l.lora_b().size(), l.lora_b().kind()) * 0.3));
            trained.extend(l.named_tensors().into_iter().map(|(_, t)| t));
        }
    }
    Block { _base: base, _adapters: vec![va, vd, ve], layers, trained }
}

fn outputs_and_grads(
    b: &Block,
    x: &Tensor,
    shared: bool,
    used: &[usize],
    train: bool,
) -> (Vec<Tensor>, Vec<Tensor>) {
    let x = x.detach().set_requires_grad(true);
    let refs: Vec<&MaybeLoraLinear> = b.layers.iter().collect();
    let ys = if shared {
        forward_shared(&refs, &x, train).unwrap()
    } else {
        refs.iter().map(|l| l.f_forward_t(&x, train).unwrap()).collect()
    };
    // the same upstream gradients in both runs, whatever other test threads draw meanwhile
    let mut loss = Tensor::zeros([], (Kind::Double, Device::Cpu));
    for &i in used {
        let n = ys[i].numel() as i64;
        let g = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.7 + i as f64)).sin();
        loss += (ys[i].to_kind(Kind::Double) * g.view(ys[i].size().as_slice())).sum(Kind::Double);
    }
    let params: Vec<&Tensor> = std::iter::once(&x).chain(&b.trained).collect();
    let grads = Tensor::run_backward(&[loss], &params, false, true);
    (ys.into_iter().map(|y| y.detach()).collect(), grads)
}

#[test]
fn shared_forward_equals_each_layers_forward_with_every_gradient() {
    tch::manual_seed(0);
    let b = block(Kind::Double, 0.0);
    // 14 tokens: the input gradient's low-rank part as one thin GEMM (few tokens against the
    // summed output width); 128 tokens: through W + s·BA per layer
    for (x, used) in [[2, 7, 12], [8, 16, 12]].iter().flat_map(|shape| {
        [vec![0, 1, 2, 3, 4], vec![0, 2, 4]].map(|u| (randn(shape, Kind::Double), u))
    }) {
        let (ys, gs) = outputs_and_grads(&b, &x, true, &used, true);
        let (ys0, gs0) = outputs_and_grads(&b, &x, false, &used, true);
        for (i, (y, y0)) in ys.iter().zip(&ys0).enumerate() {
            assert_eq!(y.size(), y0.size());
            assert!(max_abs_diff(y, y0) < 1e-12, "output {i}");
        }
        assert_eq!(gs.len(), gs0.len());
        for (i, (g, g0)) in gs.iter().zip(&gs0).enumerate() {
            assert_eq!(g.defined(), g0.defined(), "gradient {i} (used {used:?})");
            if g.defined() {
                let d = max_abs_diff(g, g0);
                assert!(d < 1e-12, "gradient {i} (used {used:?}): {d}");
            }
        }
    }
}

#[test]
fn dropout_or_eval_falls_back_to_the_same_values() {
    tch::manual_seed(1);
    let b = block(Kind::Double, 0.5);
    let x = randn(&[9, 12], Kind::Double);
    // eval: every member eligible except v (plain)
    let (ys, _) = outputs_and_grads(&b, &x, true, &[0], false);
    let (ys0, _) = outputs_and_grads(&b, &x, false, &[0], false);
    for (y, y0) in ys.iter().zip(&ys0) {
        assert!(max_abs_diff(y, y0) < 1e-12);
    }
    // training with dropout on e: e runs on its own, the others still match exactly
    let (ys, _) = outputs_and_grads(&b, &x, true, &[0], true);
    let (ys0, _) = outputs_and_grads(&b, &x, false, &[0], true);
    for i in 0..4 {
        assert!(max_abs_diff(&ys[i], &ys0[i]) < 1e-12, "output {i}");
    }
}

#[test]
fn shared_forward_on_a_bf16_base_agrees_and_keeps_f32_gradients() {
    tch::manual_seed(2);
    let b = block(Kind::BFloat16, 0.0);
    let x = randn(&[16, 12], Kind::Float).to_kind(Kind::BFloat16);
    let (ys, gs) = outputs_and_grads(&b, &x, true, &[0, 1, 2, 3, 4], true);
    let (ys0, gs0) = outputs_and_grads(&b, &x, false, &[0, 1, 2, 3, 4], true);
    for (i, (y, y0)) in ys.iter().zip(&ys0).enumerate() {
        assert_eq!(y.kind(), Kind::BFloat16);
        assert!(rel_diff(y, y0) < 2e-2, "output {i}: {}", rel_diff(y, y0));
    }
    for (i, (g, g0)) in gs.iter().zip(&gs0).enumerate() {
        assert_eq!(g.kind(), g0.kind(), "gradient {i}");
        assert!(rel_diff(g, g0) < 3e-2, "gradient {i}: {}", rel_diff(g, g0));
    }
    assert!(gs[1..].iter().all(|g| g.kind() == Kind::Float), "adapter gradients stay f32");
}

#[test]
fn a_wrong_input_is_a_typed_error() {
    let b = block(Kind::Double, 0.0);
    let refs: Vec<&MaybeLoraLinear> = b.layers.iter().collect();
    let err = forward_shared(&refs, &randn(&[3, 11], Kind::Double), true).unwrap_err();
    assert!(err.to_string().contains("input of"), "{err}");
    let err = forward_shared(&refs, &randn(&[3, 12], Kind::Float), true).unwrap_err();
    assert!(matches!(err, tch_peft::Error::DtypeMismatch { .. }), "{err}");
    // and without adapters it is just the layers
    let plain = lora::linear(
        &(nn::VarStore::new(Device::Cpu).root() / "p"),
        4,
        3,
        Default::default(),
        None,
    )
    .unwrap();
    let x = randn(&[2, 4], Kind::Float);
    let y = forward_shared(&[&plain, &plain], &x, false).unwrap();
    assert!(max_abs_diff(&y[1], &plain.forward_t(&x, false)) < 1e-12);
}

#[test]
fn inference_on_a_bf16_base_reuses_cast_factors_until_they_change() {
    tch::manual_seed(3);
    let b = block(Kind::BFloat16, 0.0);
    let refs: Vec<&MaybeLoraLinear> = b.layers.iter().collect();
    let x = randn(&[16, 12], Kind::Float).to_kind(Kind::BFloat16);
    let check = || {
        let shared = tch::no_grad(|| forward_shared(&refs, &x, false).unwrap());
        for (y, l) in shared.iter().zip(&refs) {
            let alone = l.f_forward_t(&x, false).unwrap();
            let d = max_abs_diff(y, &alone);
            let scale = alone.abs().max().to_kind(Kind::Float).double_value(&[]);
            assert!(d <= scale / 64.0, "max |Δ| {d} at output scale {scale}");
        }
        shared
    };
    let first = check();
    // an in-place change of the factors (an optimizer step, a load) must be seen
    for t in &b.trained {
        set(t, &(randn(&t.size(), t.kind()) * 0.5));
    }
    let second = check();
    assert!(max_abs_diff(&first[0], &second[0]) > 1e-2, "stale cast factors");
}

#[test]
fn dora_layers_share_one_node_with_every_gradient() {
    // DoRA members only (their A casts concatenated from the weight-side part), one with a
    // trained bias copy, one of them twice, an output unused
    tch::manual_seed(4);
    let base = nn::VarStore::new(Device::Cpu);
    let va = nn::VarStore::new(Device::Cpu);
    let cfg = LoraConfig {
        r: 3,
        lora_alpha: 5.0,
        use_dora: true,
        bias: LoraBias::LoraOnly,
        rank_pattern: [("g".to_string(), 2)].into_iter().collect(),
        ..LoraConfig::for_targets(["f", "g"])
    };
    let builder = LoraBuilder::new(&va.root(), cfg).unwrap();
    let f = builder.linear(&(base.root() / "f"), 12, 8, Default::default()).unwrap();
    let nobias = nn::LinearConfig { bias: false, ..Default::default() };
    let g = builder.linear(&(base.root() / "g"), 12, 5, nobias).unwrap();
    let mut base = base;
    base.set_kind(Kind::Double);
    let adapter = builder.finish().unwrap();
    adapter.init_from_base_weights().unwrap();
    let mut trained = Vec::new();
    for l in adapter.layers() {
        set(l.lora_b(), &(randn(&l.lora_b().size(), Kind::Double) * 0.3));
        trained.extend(l.named_tensors().into_iter().map(|(_, t)| t));
    }
    let b = Block { _base: base, _adapters: vec![va], layers: vec![f, g], trained };
    let layers: Vec<&MaybeLoraLinear> = vec![&b.layers[0], &b.layers[1], &b.layers[0]];
    for (rows, used) in [(5, vec![0, 1, 2]), (40, vec![0, 1]), (40, vec![1])] {
        let x = randn(&[rows, 12], Kind::Double);
        let run = |shared: bool| {
            let x = x.detach().set_requires_grad(true);
            let ys = if shared {
                forward_shared(&layers, &x, true).unwrap()
            } else {
                layers.iter().map(|l| l.f_forward_t(&x, true).unwrap()).collect()
            };
            let mut loss = Tensor::zeros([], (Kind::Double, Device::Cpu));
            for &i in &used {
                let n = ys[i].numel() as i64;
                let w = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.3 + i as f64)).cos();
                loss += (&ys[i] * w.view(ys[i].size().as_slice())).sum(Kind::Double);
            }
            let params: Vec<&Tensor> = std::iter::once(&x).chain(&b.trained).collect();
            let grads = Tensor::run_backward(&[loss], &params, false, true);
            (ys, grads)
        };
        let ((ys, gs), (ys0, gs0)) = (run(true), run(false));
        for (i, (y, y0)) in ys.iter().zip(&ys0).enumerate() {
            assert!(max_abs_diff(y, y0) < 1e-12, "rows {rows}, output {i}");
        }
        assert_eq!(gs.len(), 1 + 7, "x, then A, B, bias copy, m of f; A, B, m of g");
        for (i, (g, g0)) in gs.iter().zip(&gs0).enumerate() {
            assert_eq!(g.defined(), g0.defined(), "rows {rows}, gradient {i}");
            if g.defined() {
                let d = max_abs_diff(g, g0);
                assert!(d < 1e-12, "rows {rows}, used {used:?}, gradient {i}: {d}");
            }
        }
    }
}
