//! Several adapters and adapter combination against PEFT 0.21 (`tests/fixtures/peft/multi`,
//! made by `scripts/make_peft_fixtures.py`), and the combination's exactness properties
//! (identity for one adapter, `cat` exact; rsLoRA, `lora_bias` and DoRA sources) from the math.

use crate::common::tiny::{fixture, tensors, Tiny};
use crate::common::*;
use tch::nn;
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{Combination, LoraAdapter, LoraBuilder, LoraConfig, MajoritySign, TaskMerge};
use tch_peft::{io, Error};

struct Loaded {
    _stores: Vec<nn::VarStore>,
    model: Tiny,
    adapter: LoraAdapter,
}

/// The fixture's two adapters, declared on the builder from their saved configs and loaded.
fn load_multi() -> Loaded {
    let dir = fixture("multi");
    let mut base = nn::VarStore::new(Device::Cpu);
    let (a, b) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&a.root(), LoraConfig::from_pretrained(&dir).unwrap())
        .unwrap()
        .with_adapter("other", &b.root(), LoraConfig::from_pretrained(dir.join("other")).unwrap())
        .unwrap();
    let model = Tiny::new(&base.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    base.load(dir.join("base.safetensors")).unwrap();
    adapter.load_pretrained(&dir).unwrap();
    Loaded { _stores: vec![base, a, b], model, adapter }
}

#[test]
fn two_peft_adapters_load_activate_and_sum_like_peft() {
    let Loaded { model, mut adapter, .. } = load_multi();
    let io_t = tensors(&fixture("multi").join("io.safetensors"));
    let x = &io_t["x"];
    let close = |y: &Tensor, key: &str| {
        let d = max_abs_diff(y, &io_t[key]);
        assert!(d < 1e-5, "{key}: {d}");
    };
    close(&model.forward(x), "y_default");
    adapter.set_active(&["other"]).unwrap();
    close(&model.forward(x), "y_other");
    adapter.set_active(&["default", "other"]).unwrap();
    close(&model.forward(x), "y_both");
    // merged, both at once and one after the other, the model still computes PEFT's output
    adapter.merge().unwrap();
    close(&model.forward(x), "y_both");
    adapter.unmerge().unwrap();

    // saved back: PEFT's layout, keys and values
    let out = temp_dir("peft-multi-save");
    adapter.save_pretrained(&out).unwrap();
    for sub in ["", "other"] {
        let ours = io::read_safetensors(out.join(sub).join(io::PEFT_WEIGHTS_NAME)).unwrap();
        let theirs =
            io::read_safetensors(fixture("multi").join(sub).join(io::PEFT_WEIGHTS_NAME)).unwrap();
        assert_eq!(ours.tensors.len(), theirs.tensors.len());
        for ((ka, ta), (kb, tb)) in ours.tensors.iter().zip(&theirs.tensors) {
            assert_eq!(ka, kb);
            assert!(bit_equal(ta, tb), "{sub}/{ka}");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The fixture's combinations of (default 0.7, other −0.4).
fn combinations() -> Vec<(&'static str, Combination)> {
    let ties = |majority_sign| TaskMerge::Ties { density: 0.5, majority_sign };
    vec![
        ("cat", Combination::Cat),
        ("svd", Combination::svd()),
        ("svd_r2", Combination::Svd { merge: TaskMerge::Linear, rank: Some(2), clamp: None }),
        ("linear", Combination::linear()),
        ("ties", Combination::Factors(ties(MajoritySign::Total))),
        ("ties_frequency", Combination::Factors(ties(MajoritySign::Frequency))),
        (
            "ties_svd",
            Combination::Svd { merge: ties(MajoritySign::Total), rank: None, clamp: None },
        ),
        ("dare_linear_full", Combination::Factors(TaskMerge::DareLinear { density: 1.0 })),
        ("magnitude_prune", Combination::Factors(TaskMerge::MagnitudePrune { density: 0.5 })),
    ]
}

#[test]
fn weighted_combinations_match_peft() {
    let Loaded { model, mut adapter, .. } = load_multi();
    let io_t = tensors(&fixture("multi").join("io.safetensors"));
    for (name, how) in combinations() {
        let store = nn::VarStore::new(Device::Cpu);
        let new = format!("mix_{name}");
        adapter
            .add_weighted_adapter(&[("default", 0.7), ("other", -0.4)], &new, &store.root(), how)
            .unwrap();
        for l in adapter.layers_of(&new) {
            assert_eq!(l.scaling(), 1.0, "{name}");
            let ba = l.lora_b().mm(l.lora_a());
            let key = format!("BA.{name}.{}", l.module());
            let d = max_abs_diff(&ba, &io_t[&key]);
            assert!(d < 2e-6, "{key}: {d}");
        }
        adapter.set_active(&[&new]).unwrap();
        let d = max_abs_diff(&model.forward(&io_t["x"]), &io_t[&format!("y.{name}")]);
        assert!(d < 1e-5, "{name}: {d}");
        adapter.set_active(&["default"]).unwrap();
        adapter.delete_adapter(&new, Some(&store)).unwrap();
    }
}

/// A model with the given configs declared as adapters "one", "two", … on Tiny, B factors (and
/// magnitudes, lora_B biases) random; f64.
fn build(configs: &[LoraConfig]) -> (Vec<nn::VarStore>, Tiny, LoraAdapter) {
    tch::manual_seed(3);
    let mut stores: Vec<nn::VarStore> =
        (0..=configs.len()).map(|_| nn::VarStore::new(Device::Cpu)).collect();
    let names = ["one", "two", "three"];
    let mut builder = LoraBuilder::named(&stores[1].root(), names[0], configs[0].clone()).unwrap();
    for (i, c) in configs.iter().enumerate().skip(1) {
        builder = builder.with_adapter(names[i], &stores[i + 1].root(), c.clone()).unwrap();
    }
    let model = Tiny::new(&stores[0].root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    for s in &mut stores {
        s.double();
    }
    adapter.init_from_base_weights().unwrap();
    for s in &stores[1..] {
        for t in s.trainable_variables() {
            set(&t, &(randn(&t.size(), Kind::Double) * 0.2 + &t));
        }
    }
    (stores, model, adapter)
}

fn x() -> Tensor {
    randn(&[3, 4, 16], Kind::Double)
}

#[test]
fn one_adapter_with_weight_one_is_an_identity_also_for_rslora_lora_bias_and_dora() {
    let base =
        LoraConfig { r: 4, lora_alpha: 6.0, ..LoraConfig::for_targets(["q_proj", "up_proj"]) };
    let cases = [
        ("rslora", LoraConfig { use_rslora: true, ..base.clone() }),
        ("lora_bias", LoraConfig { lora_bias: true, ..base.clone() }),
        ("dora", LoraConfig { use_dora: true, ..base.clone() }),
        (
            "rank_pattern",
            LoraConfig { rank_pattern: [("up_proj".into(), 2)].into(), ..base.clone() },
        ),
    ];
    for (case, cfg) in cases {
        let (_stores, model, mut adapter) = build(&[cfg]);
        let xs = x();
        let y = model.forward(&xs);
        let store = nn::VarStore::new(Device::Cpu);
        for how in [Combination::Cat, Combination::svd()] {
            adapter.add_weighted_adapter(&[("one", 1.0)], "same", &store.root(), how).unwrap();
            adapter.set_active(&["same"]).unwrap();
            let d = max_abs_diff(&model.forward(&xs), &y);
            assert!(d < 1e-10, "{case}: {d}");
            assert!(!adapter.config().use_rslora);
            adapter.set_active(&["one"]).unwrap();
            adapter.delete_adapter("same", Some(&store)).unwrap();
        }
    }
}

#[test]
fn cat_is_exact_and_svd_at_full_rank_too() {
    let c1 = LoraConfig {
        r: 3,
        lora_alpha: 5.0,
        use_rslora: true,
        lora_bias: true,
        ..LoraConfig::for_targets(["q_proj", "v_proj"])
    };
    let c2 = LoraConfig { r: 2, lora_alpha: 4.0, ..LoraConfig::for_targets(["q_proj", "up_proj"]) };
    let (_stores, model, mut adapter) = build(&[c1, c2]);
    let xs = x();
    // the target: both active, with weights folded in by scaling each adapter's B
    let (wa, wb) = (0.6, -1.3);
    let expected = {
        let before: Vec<(Tensor, Tensor)> = ["one", "two"]
            .iter()
            .flat_map(|n| adapter.layers_of(n))
            .map(|l| {
                (
                    l.lora_b().copy(),
                    l.lora_b_bias().map_or_else(
                        || Tensor::zeros([1], (Kind::Double, Device::Cpu)),
                        Tensor::copy,
                    ),
                )
            })
            .collect();
        for (n, w) in [("one", wa), ("two", wb)] {
            for l in adapter.layers_of(n) {
                set(l.lora_b(), &(l.lora_b() * w));
                if let Some(bb) = l.lora_b_bias() {
                    set(bb, &(bb * w));
                }
            }
        }
        adapter.set_active(&["one", "two"]).unwrap();
        let y = model.forward(&xs);
        let layers: Vec<_> = ["one", "two"].iter().flat_map(|n| adapter.layers_of(n)).collect();
        for (l, (b, bb)) in layers.iter().zip(&before) {
            set(l.lora_b(), b);
            if let Some(d) = l.lora_b_bias() {
                set(d, bb);
            }
        }
        y
    };
    let store = nn::VarStore::new(Device::Cpu);
    adapter
        .add_weighted_adapter(&[("one", wa), ("two", wb)], "cat", &store.root(), Combination::Cat)
        .unwrap();
    let ranks: Vec<i64> = adapter.layers_of("cat").iter().map(|l| l.rank()).collect();
    assert_eq!(ranks, [5, 3, 2, 5, 3, 2], "q: 3+2, v: 3, up: 2");
    assert!(adapter.adapter_config("cat").unwrap().lora_bias);
    adapter.set_active(&["cat"]).unwrap();
    let d = max_abs_diff(&model.forward(&xs), &expected);
    assert!(d < 1e-10, "cat: {d}");
    // SVD at rank 5 reproduces the rank-≤5 sum exactly (the lora_B bias rides along)
    let svd = Combination::Svd { merge: TaskMerge::Linear, rank: Some(5), clamp: None };
    adapter
        .add_weighted_adapter(&[("one", wa), ("two", wb)], "svd", &(store.root() / "svd"), svd)
        .unwrap();
    adapter.set_active(&["svd"]).unwrap();
    let d = max_abs_diff(&model.forward(&xs), &expected);
    assert!(d < 1e-10, "svd: {d}");
    // a rank above a layer's min(in, out) (v_proj: 16 → 8) is refused
    let svd = Combination::Svd { merge: TaskMerge::Linear, rank: Some(9), clamp: None };
    let err = adapter.add_weighted_adapter(
        &[("one", wa), ("two", wb)],
        "big",
        &(store.root() / "big"),
        svd,
    );
    assert!(matches!(err, Err(Error::RankTooLarge { .. })), "{err:?}");
    // clamping bounds the factors' entries
    let svd = Combination::Svd { merge: TaskMerge::Linear, rank: Some(2), clamp: Some(0.9) };
    adapter
        .add_weighted_adapter(
            &[("one", wa), ("two", wb)],
            "clamped",
            &(store.root() / "clamped"),
            svd,
        )
        .unwrap();
    for l in adapter.layers_of("clamped") {
        // entries above the 0.9 quantile were set to it: the top value repeats (≈10% of them)
        // and nothing lies below its negative
        let all = Tensor::cat(&[l.lora_a().reshape([-1]), l.lora_b().reshape([-1])], 0);
        let top = all.max().double_value(&[]);
        let at_top = all.eq(top).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!(at_top >= 0.05, "{}: {at_top}", l.module());
        assert!(all.min().double_value(&[]) >= -top - 1e-12);
    }
    // the saved config of the combination reloads with the same shapes (rank_pattern escaped)
    let dir = temp_dir("peft-multi-cat");
    adapter.save_pretrained_selected(&dir, &["cat"]).unwrap();
    let cfg = LoraConfig::from_pretrained(dir.join("cat")).unwrap();
    assert_eq!(cfg.scaling_for("model.layers.0.self_attn.q_proj").unwrap(), 1.0);
    assert_eq!(cfg.rank_for("model.layers.1.mlp.up_proj").unwrap(), 2);
    assert_eq!(cfg.rank_for("model.layers.1.self_attn.v_proj").unwrap(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn combination_errors_name_what_is_wrong() {
    let c1 = LoraConfig { r: 3, ..LoraConfig::for_targets(["q_proj"]) };
    let c2 = LoraConfig { r: 2, ..LoraConfig::for_targets(["q_proj"]) };
    let c3 = LoraConfig { r: 2, use_dora: true, ..LoraConfig::for_targets(["q_proj"]) };
    let (_stores, _model, mut adapter) = build(&[c1, c2, c3]);
    let n_vars = _stores[1].len();
    let s = nn::VarStore::new(Device::Cpu);
    // a root another adapter uses is refused before anything is registered
    let err =
        adapter.add_adapter("four", &stores_root(&_stores[1]), LoraConfig::for_targets(["q_proj"]));
    assert!(matches!(err, Err(Error::DuplicateParameter(_))), "{err:?}");
    let err = adapter
        .add_weighted_adapter(&[("one", 1.0), ("two", 1.0)], "x", &s.root(), Combination::linear())
        .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { .. }) && err.to_string().contains("equal ranks"),
        "{err}"
    );
    let err = adapter
        .add_weighted_adapter(&[("two", 1.0), ("three", 1.0)], "x", &s.root(), Combination::Cat)
        .unwrap_err();
    assert!(err.to_string().contains("use_dora"), "{err}");
    let err = adapter
        .add_weighted_adapter(&[("one", 1.0), ("zz", 1.0)], "x", &s.root(), Combination::Cat)
        .unwrap_err();
    assert!(err.to_string().contains("zz"), "{err}");
    let dare = Combination::Factors(TaskMerge::DareLinear { density: 1.5 });
    let err = adapter
        .add_weighted_adapter(&[("one", 1.0), ("two", 1.0)], "x", &s.root(), dare)
        .unwrap_err();
    assert!(err.to_string().contains("density"), "{err}");
    assert_eq!(adapter.adapter_names(), ["one", "two", "three"]);
    assert_eq!(s.len(), 0);
    assert_eq!(_stores[1].len(), n_vars);
}

#[test]
fn dare_drops_entries_at_the_density_and_rescales() {
    let t = Tensor::ones([200, 50], (Kind::Double, Device::Cpu));
    tch::manual_seed(11);
    let merged =
        TaskMerge::DareLinear { density: 0.3 }.merge(&[t.shallow_clone()], &[1.0]).unwrap();
    let kept = merged.ne(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((kept - 0.3).abs() < 0.02, "{kept}");
    let nonzero = merged.masked_select(&merged.ne(0.0));
    assert!(max_abs_diff(&nonzero, &(nonzero.ones_like() / 0.3)) < 1e-12);
    // reproducibility under a seed: tests/seeded.rs (the global RNG is shared by test threads)
}

fn stores_root(vs: &nn::VarStore) -> nn::Path<'_> {
    vs.root()
}
