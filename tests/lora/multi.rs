//! Several named adapters on one model: declare/add, the active set (summed), disable guard,
//! delete, merge a subset, save/load each — expectations recomputed in f64 from the factors.

use crate::common::*;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{self, LoraAdapter, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::{io, Error};

/// `blocks.N.{up,down}` and `head`, in f64.
#[derive(Debug)]
struct Mlp {
    blocks: Vec<(MaybeLoraLinear, MaybeLoraLinear)>,
    head: MaybeLoraLinear,
}

impl Mlp {
    fn new(p: &nn::Path, lora: Option<&LoraBuilder>) -> Result<Self, Error> {
        let mut blocks = Vec::new();
        for i in 0..2 {
            let b = p / "blocks" / i;
            let up = lora::linear(&(&b / "up"), 6, 12, Default::default(), lora)?;
            let down = lora::linear(&(&b / "down"), 12, 6, Default::default(), lora)?;
            blocks.push((up, down));
        }
        let head = lora::linear(&(p / "head"), 6, 3, Default::default(), lora)?;
        Ok(Mlp { blocks, head })
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        for (up, down) in &self.blocks {
            h = &h + up.forward_t(&h, train).tanh().apply_t(down, train);
        }
        h.apply_t(&self.head, train)
    }
}

/// The same network computed by hand, each linear layer `W + Σ_adapters s·BA` over the given
/// adapters (f64).
fn reference(model: &Mlp, adapter: &LoraAdapter, names: &[&str], xs: &Tensor) -> Tensor {
    let lin = |l: &MaybeLoraLinear, x: &Tensor| {
        let base = l.base().unwrap();
        let mut w = base.ws.copy();
        if let Some(stack) = l.as_stack() {
            for n in names {
                if let Some(layer) = stack.get(n) {
                    w += layer.lora_b().mm(layer.lora_a()) * layer.scaling();
                }
            }
        }
        let _ = adapter;
        x.linear(&w, base.bs.as_ref())
    };
    let mut h = xs.shallow_clone();
    for (up, down) in &model.blocks {
        h = &h + lin(down, &lin(up, &h).tanh());
    }
    lin(&model.head, &h)
}

struct Built {
    _base: nn::VarStore,
    vs_a: nn::VarStore,
    vs_b: nn::VarStore,
    model: Mlp,
    adapter: LoraAdapter,
}

/// "default" on `up` (r 2), "other" on `up` and `down` (r 3, rsLoRA); B factors random.
fn build() -> Built {
    tch::manual_seed(7);
    let base = nn::VarStore::new(Device::Cpu);
    let (vs_a, vs_b) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let c1 = LoraConfig { r: 2, lora_alpha: 4.0, ..LoraConfig::for_targets(["up"]) };
    let c2 = LoraConfig {
        r: 3,
        lora_alpha: 5.0,
        use_rslora: true,
        ..LoraConfig::for_targets(["up", "down"])
    };
    let builder = LoraBuilder::new(&vs_a.root(), c1)
        .unwrap()
        .with_adapter("other", &vs_b.root(), c2)
        .unwrap();
    let model = Mlp::new(&base.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    let mut base = base;
    base.double();
    let (mut vs_a, mut vs_b) = (vs_a, vs_b);
    vs_a.double();
    vs_b.double();
    for name in ["default", "other"] {
        for l in adapter.layers_of(name) {
            set(l.lora_b(), &(randn(&l.lora_b().size(), Kind::Double) * 0.3));
        }
    }
    Built { _base: base, vs_a, vs_b, model, adapter }
}

fn xs() -> Tensor {
    randn(&[4, 6], Kind::Double)
}

#[test]
fn declared_adapters_sum_when_active_together() {
    let Built { model, mut adapter, .. } = build();
    assert_eq!(adapter.adapter_names(), ["default", "other"]);
    assert_eq!(adapter.active_adapters(), ["default"]);
    assert_eq!(
        adapter.modules_of("other"),
        ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    );
    let x = xs();
    let y = model.forward_t(&x, false);
    assert!(max_abs_diff(&y, &reference(&model, &adapter, &["default"], &x)) < 1e-12);

    adapter.set_active(&["default", "other"]).unwrap();
    let y2 = model.forward_t(&x, false);
    assert!(max_abs_diff(&y2, &reference(&model, &adapter, &["default", "other"], &x)) < 1e-12);
    assert!(max_abs_diff(&y2, &y) > 1e-3, "the second adapter changes the output");

    adapter.set_active(&["other"]).unwrap();
    assert_eq!(adapter.current(), "other");
    let y3 = model.forward_t(&x, false);
    assert!(max_abs_diff(&y3, &reference(&model, &adapter, &["other"], &x)) < 1e-12);
    // rsLoRA scaling of "other": 5/√3
    assert!((adapter.layers()[0].scaling() - 5.0 / 3f64.sqrt()).abs() < 1e-12);

    let err = adapter.set_active(&["nope"]).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { .. }) && err.to_string().contains("nope"),
        "{err}"
    );
}

#[test]
fn disable_guard_gives_the_base_and_restores_the_active_set() {
    let Built { model, mut adapter, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    let x = xs();
    let y = model.forward_t(&x, false);
    {
        let _off = adapter.disable_adapters().unwrap();
        let base = model.forward_t(&x, false);
        assert!(max_abs_diff(&base, &reference(&model, &adapter, &[], &x)) < 1e-12);
    }
    assert!(bit_equal(&model.forward_t(&x, false), &y));
}

#[test]
fn merging_a_subset_keeps_outputs_and_unmerges_bit_exactly() {
    let Built { model, mut adapter, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    let x = xs();
    let y = model.forward_t(&x, false);
    let originals: Vec<Tensor> =
        model.blocks.iter().map(|(u, _)| u.base().unwrap().ws.copy()).collect();
    adapter.merge_adapters(&["other"], false).unwrap();
    assert_eq!(adapter.merged_adapters(), ["other"]);
    // "other" is in the weights, "default" still runs as a branch
    assert!(max_abs_diff(&model.forward_t(&x, false), &y) < 1e-12);
    adapter.merge_adapters(&["default"], true).unwrap();
    assert_eq!(adapter.merged_adapters(), ["other", "default"]);
    assert!(max_abs_diff(&model.forward_t(&x, false), &y) < 1e-12);
    let err = adapter.delete_adapter("other", None).unwrap_err();
    assert!(matches!(err, Error::MergeState { .. }), "{err}");
    adapter.unmerge().unwrap();
    assert!(adapter.merged_adapters().is_empty());
    for ((u, _), w0) in model.blocks.iter().zip(&originals) {
        assert!(bit_equal(&u.base().unwrap().ws, w0));
    }
    assert!(bit_equal(&model.forward_t(&x, false), &y));
    assert!(adapter.merge_adapters(&["missing"], false).is_err());
}

#[test]
fn delete_removes_the_adapter_and_its_variables() {
    let Built { model, mut adapter, vs_b, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    assert_eq!(vs_b.trainable_variables().len(), 8);
    adapter.delete_adapter("other", Some(&vs_b)).unwrap();
    assert_eq!(adapter.adapter_names(), ["default"]);
    assert_eq!(adapter.active_adapters(), ["default"]);
    assert_eq!(vs_b.trainable_variables().len(), 0);
    assert!(vs_b.variables().is_empty());
    let x = xs();
    assert!(
        max_abs_diff(&model.forward_t(&x, false), &reference(&model, &adapter, &["default"], &x))
            < 1e-12
    );
    let err = adapter.delete_adapter("default", None).unwrap_err();
    assert!(err.to_string().contains("only adapter"), "{err}");
}

#[test]
fn added_adapter_is_inactive_until_set_and_refuses_plain_layers() {
    let Built { model, mut adapter, .. } = build();
    let vs_c = nn::VarStore::new(Device::Cpu);
    let c3 = LoraConfig {
        r: 1,
        lora_alpha: 1.0,
        init_lora_weights: lora::LoraInit::Random,
        ..LoraConfig::for_targets(["down"])
    };
    adapter.add_adapter("third", &vs_c.root(), c3.clone()).unwrap();
    let x = randn(&[4, 6], Kind::Double);
    let y_default = reference(&model, &adapter, &["default"], &x);
    // on an f64 base the new factors are f64
    assert_eq!(adapter.layers_of("third")[0].lora_a().kind(), Kind::Double);
    assert!(max_abs_diff(&model.forward_t(&x, false), &y_default) < 1e-12, "inactive");
    adapter.set_active(&["third"]).unwrap();
    assert!(
        max_abs_diff(&model.forward_t(&x, false), &reference(&model, &adapter, &["third"], &x))
            < 1e-12
    );

    // a name in use, an unusable name, a plain layer as target
    let err = adapter.add_adapter("third", &vs_c.root(), c3.clone()).unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
    assert!(adapter.add_adapter("a.b", &vs_c.root(), c3).is_err());
    let vs_d = nn::VarStore::new(Device::Cpu);
    let err =
        adapter.add_adapter("head", &vs_d.root(), LoraConfig::for_targets(["head"])).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { .. }) && err.to_string().contains("with_adapter"),
        "{err}"
    );
    assert_eq!(vs_d.len(), 0, "nothing registered on error");
    assert_eq!(adapter.adapter_names(), ["default", "other", "third"]);
}

#[test]
fn only_the_active_adapter_trains() {
    let Built { model, mut adapter, vs_a, vs_b, .. } = build();
    adapter.set_active(&["other"]).unwrap();
    let a_before: Vec<Tensor> = vs_a.trainable_variables().iter().map(Tensor::copy).collect();
    // Adam: bounded steps whatever the (thread-shared, so unpredictable) random draws
    let mut opt = nn::Adam::default().build(&vs_b, 0.01).unwrap();
    let x = xs();
    let target = Tensor::zeros([4, 3], (Kind::Double, Device::Cpu));
    let loss0 = (model.forward_t(&x, true) - &target).square().mean(Kind::Double).double_value(&[]);
    for _ in 0..20 {
        let loss = (model.forward_t(&x, true) - &target).square().mean(Kind::Double);
        opt.backward_step(&loss);
    }
    let loss1 = (model.forward_t(&x, true) - &target).square().mean(Kind::Double).double_value(&[]);
    assert!(loss1 < loss0 * 0.9, "{loss0} → {loss1}");
    for (t, t0) in vs_a.trainable_variables().iter().zip(&a_before) {
        assert!(bit_equal(t, t0), "the inactive adapter is untouched");
        assert!(!t.grad().defined() || t.grad().abs().max().double_value(&[]) == 0.0);
    }
}

#[test]
fn save_and_load_every_adapter_in_peft_layout() {
    let Built { model, mut adapter, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    let dir = temp_dir("multi-save");
    adapter.save_pretrained(&dir).unwrap();
    assert!(dir.join(io::PEFT_WEIGHTS_NAME).exists() && dir.join(io::PEFT_CONFIG_NAME).exists());
    assert!(dir.join("other").join(io::PEFT_WEIGHTS_NAME).exists());
    let other_cfg = LoraConfig::from_pretrained(dir.join("other")).unwrap();
    assert!(other_cfg.use_rslora && other_cfg.r == 3);
    let file = io::read_safetensors(dir.join("other").join(io::PEFT_WEIGHTS_NAME)).unwrap();
    assert_eq!(file.tensors.len(), 8);
    assert!(file.tensors.iter().any(|(k, _)| k == "base_model.model.blocks.1.down.lora_B.weight"));

    // a fresh model declaring both adapters from the saved configs loads them all
    let base2 = nn::VarStore::new(Device::Cpu);
    let (a2, b2) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&a2.root(), LoraConfig::from_pretrained(&dir).unwrap())
        .unwrap()
        .with_adapter("other", &b2.root(), other_cfg)
        .unwrap();
    let model2 = Mlp::new(&base2.root(), Some(&builder)).unwrap();
    let mut adapter2 = builder.finish().unwrap();
    let mut base2 = base2;
    base2.double();
    let (mut a2, mut b2) = (a2, b2);
    a2.double();
    b2.double();
    base2.copy(&model_store(&model)).unwrap();
    adapter2.load_pretrained(&dir).unwrap();
    adapter2.set_active(&["default", "other"]).unwrap();
    let x = xs();
    assert!(bit_equal(&model2.forward_t(&x, false), &model.forward_t(&x, false)));

    // load_adapter: one directory as a new, inactive adapter
    let c = nn::VarStore::new(Device::Cpu);
    adapter2.load_adapter(dir.join("other"), "again", &c.root()).unwrap();
    assert_eq!(adapter2.adapter_names(), ["default", "other", "again"]);
    for (l1, l2) in adapter2.layers_of("other").iter().zip(adapter2.layers_of("again")) {
        assert!(max_abs_diff(l1.lora_b(), l2.lora_b()) == 0.0);
    }
    // a file that does not fit the adapter's layers: nothing is added
    let bad = temp_dir("multi-save-bad");
    std::fs::copy(dir.join("other").join(io::PEFT_CONFIG_NAME), bad.join(io::PEFT_CONFIG_NAME))
        .unwrap();
    std::fs::copy(dir.join(io::PEFT_WEIGHTS_NAME), bad.join(io::PEFT_WEIGHTS_NAME)).unwrap();
    let d = nn::VarStore::new(Device::Cpu);
    let err = adapter2.load_adapter(&bad, "bad", &d.root()).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. } | Error::MissingTensor { .. }), "{err}");
    assert_eq!(adapter2.adapter_names(), ["default", "other", "again"]);
    let _ = std::fs::remove_dir_all(&bad);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VarStore holding the base weights of `model` under their names (for copying).
fn model_store(model: &Mlp) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let put = |name: String, l: &MaybeLoraLinear| {
        let b = l.base().unwrap();
        let p = name.split('.').fold(root.clone(), |p, c| p / c);
        let _ = p.add("weight", b.ws.copy(), false);
        if let Some(bs) = &b.bs {
            let _ = p.add("bias", bs.copy(), false);
        }
    };
    for (i, (u, d)) in model.blocks.iter().enumerate() {
        put(format!("blocks.{i}.up"), u);
        put(format!("blocks.{i}.down"), d);
    }
    put("head".into(), &model.head);
    vs
}

/// PiSSA/OLoRA adapters saved as a plain rank-2r LoRA apply to the original base weights and
/// reproduce the trained model (PEFT's `path_initial_model_for_weight_conversion`).
#[test]
fn pissa_and_olora_convert_to_plain_lora_on_the_original_base() {
    for (init, rslora) in [(lora::LoraInit::Pissa, false), (lora::LoraInit::Olora, true)] {
        tch::manual_seed(5);
        let cfg = LoraConfig {
            r: 2,
            lora_alpha: 3.0,
            use_rslora: rslora,
            init_lora_weights: init,
            alpha_pattern: [("down".to_string(), 5.0)].into(),
            ..LoraConfig::for_targets(["up", "down"])
        };
        let mut base = nn::VarStore::new(Device::Cpu);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let builder = LoraBuilder::new(&vs.root(), cfg).unwrap();
        let model = Mlp::new(&base.root(), Some(&builder)).unwrap();
        let adapter = builder.finish().unwrap();
        base.double();
        vs.double();
        let original = model_store(&model);
        let x = xs();
        let y_base = {
            let _off = adapter.disable_adapters().unwrap();
            model.forward_t(&x, false)
        };
        adapter.init_from_base_weights().unwrap();
        // PiSSA/OLoRA start where the base was
        assert!(max_abs_diff(&model.forward_t(&x, false), &y_base) < 1e-10);
        let initial = temp_dir(&format!("convert-initial-{init:?}"));
        adapter.save_pretrained(&initial).unwrap();
        // "training"
        for t in vs.trainable_variables() {
            set(&t, &(&t + randn(&t.size(), Kind::Double) * 0.05));
        }
        let y_trained = model.forward_t(&x, false);
        assert!(max_abs_diff(&y_trained, &y_base) > 1e-3);
        let out = temp_dir(&format!("convert-out-{init:?}"));
        adapter.save_pretrained_converted("default", &out, &initial).unwrap();

        // a plain LoRA of rank 4 on the original weights
        let cfg2 = LoraConfig::from_pretrained(&out).unwrap();
        assert_eq!((cfg2.r, cfg2.init_lora_weights), (4, lora::LoraInit::Kaiming));
        for m in ["blocks.0.up", "blocks.1.down"] {
            let before = adapter.adapter_config("default").unwrap().scaling_for(m).unwrap();
            assert!((cfg2.scaling_for(m).unwrap() - before).abs() < 1e-12, "{m}");
        }
        let mut base2 = nn::VarStore::new(Device::Cpu);
        let mut vs2 = nn::VarStore::new(Device::Cpu);
        let builder = LoraBuilder::new(&vs2.root(), cfg2).unwrap();
        let model2 = Mlp::new(&base2.root(), Some(&builder)).unwrap();
        let adapter2 = builder.finish().unwrap();
        base2.double();
        vs2.double();
        base2.copy(&original).unwrap();
        adapter2.load_pretrained(&out).unwrap();
        let d = max_abs_diff(&model2.forward_t(&x, false), &y_trained);
        assert!(d < 1e-10, "{init:?}: {d}");
        // merged on the original weights, too
        adapter2.merge().unwrap();
        assert!(max_abs_diff(&model2.forward_t(&x, false), &y_trained) < 1e-10);
        let _ = (std::fs::remove_dir_all(&initial), std::fs::remove_dir_all(&out));
    }
}

#[test]
fn merge_and_unload_folds_the_active_adapters_in_and_leaves_a_plain_model() {
    let Built { model, mut adapter, vs_a, vs_b, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    let x = xs();
    let y = model.forward_t(&x, false);
    let w0 = model.blocks[0].0.base().unwrap().ws.copy();
    adapter.merge_and_unload(Some(&vs_a)).unwrap();
    // same outputs, from the merged weights alone
    assert!(max_abs_diff(&model.forward_t(&x, false), &y) < 1e-12);
    assert!(
        max_abs_diff(&model.blocks[0].0.base().unwrap().ws, &w0) > 1e-3,
        "the weight holds the merge"
    );
    // no adapter is left on any layer, and a training forward is the plain one too
    for (up, down) in &model.blocks {
        for l in [up, down] {
            if let MaybeLoraLinear::Lora(stack) = l {
                assert!(stack.adapter_names().is_empty());
            }
        }
    }
    assert!(max_abs_diff(&model.forward_t(&x, true), &y) < 1e-12);
    // the store passed lost its variables ("default" lives in vs_a; "other" in vs_b stays)
    assert!(vs_a.variables().is_empty());
    assert_eq!(vs_b.variables().len(), 8);
}

#[test]
fn applied_means_every_active_adapter_merged_and_modules_lists_every_active_adapter() {
    use tch_peft::{Adapter, AdapterKind, Applicable};
    let Built { model, mut adapter, _base, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    // "default" adapts the two `up` layers, "other" also the `down` layers
    assert_eq!(adapter.modules(), ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]);
    assert!(!adapter.is_applied());
    adapter.merge_adapters(&["default"], false).unwrap();
    assert!(!adapter.is_applied(), "only the first active adapter is merged");
    adapter.unmerge().unwrap();
    let x = xs();
    let unmerged = model.forward_t(&x, false);
    adapter.apply().unwrap();
    assert!(adapter.is_applied());
    assert!(max_abs_diff(&model.forward_t(&x, false), &unmerged) < 1e-12);
    adapter.revert().unwrap();
    assert!(!adapter.is_applied());
    assert_eq!(adapter.kind(), AdapterKind::Lora);
    // PEFT's print_trainable_parameters: the base store counts, frozen by the builder
    let report = adapter.report(&_base);
    let base_params = 2 * (6 * 12 + 12 + 12 * 6 + 6) + 6 * 3 + 3;
    let adapter_params = 2 * 2 * (6 + 12) + 2 * 3 * (6 + 12) * 2;
    assert_eq!((report.trainable, report.total), (adapter_params, base_params + adapter_params));
}

#[test]
fn dora_adapters_and_layers_report_their_kind() {
    use tch_peft::{Adapter, AdapterKind};
    let (base, vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig { r: 2, use_dora: true, ..LoraConfig::for_targets(["up"]) };
    let builder = LoraBuilder::new(&vs.root(), cfg).unwrap();
    let _model = Mlp::new(&base.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    assert_eq!(adapter.kind(), AdapterKind::Dora);
    assert!(adapter.layers().iter().all(|l| l.kind() == AdapterKind::Dora));
}

#[test]
fn a_layer_merged_for_good_leaves_the_registry_usable() {
    // into_merged_linear on one handle: that layer's update is part of the base for good, its
    // stack drops the adapter, and every registry operation still works on the other layers
    let Built { model, mut adapter, .. } = build();
    adapter.set_active(&["default", "other"]).unwrap();
    let x = xs();
    let both = model.forward_t(&x, false);
    let up0 = model.blocks[0].0.as_stack().unwrap().get("default").unwrap();
    let _ = up0.into_merged_linear().unwrap();
    assert!(max_abs_diff(&model.forward_t(&x, false), &both) < 1e-12);
    assert_eq!(model.blocks[0].0.as_stack().unwrap().adapter_names(), ["other"]);
    adapter.merge().unwrap();
    assert!(max_abs_diff(&model.forward_t(&x, false), &both) < 1e-12);
    adapter.unmerge().unwrap();
    adapter.set_active(&["other"]).unwrap();
    {
        let _off = adapter.disable_adapters().unwrap();
    }
    adapter.set_active(&["default", "other"]).unwrap();
    assert!(max_abs_diff(&model.forward_t(&x, false), &both) < 1e-12);
}
