//! Merging: parity with mergekit 0.1.5 (fixtures by `scripts/make_merge_fixtures.py`), DARE's
//! statistics and exact behaviour, WiSE-FT against an f64 recomputation, config errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use tch::nn;
use tch::{Device, Kind, Tensor};
use tch_peft::merge::{
    extract_lora, merge_directories, merge_tensor, wise_ft, ExtractOptions, GlobalParams,
    MergeConfig, MergeMethod, ModelFiles, ModelParams, WiseFt,
};
use tch_peft::{io, Adapter, Applicable, Error};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

/// The case's YAML with its model paths made absolute.
fn config(case: &str) -> MergeConfig {
    MergeConfig::from_file(fixture().join(format!("{case}.yml"))).unwrap()
}

fn json(path: impl AsRef<Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    io::read_safetensors(path).unwrap().tensors.into_iter().collect()
}

#[test]
fn deterministic_methods_match_mergekit() {
    for case in [
        "linear",
        "linear_gradient_filters",
        "slerp",
        "task_arithmetic",
        "ties",
        "ties_unnormalized",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "model_stock_filter_wise",
        "slerp_base_listed",
        "ties_base_listed",
        "linear_base_listed",
        "slices_slerp",
        "slices_two",
        "slices_task_arithmetic",
        "passthrough",
        "nuslerp",
        "nuslerp_base_rows",
        "nuslerp_base_columns",
        "multislerp",
        "multislerp_base",
        "karcher",
        "karcher_base",
        "sce",
        "sce_topk",
    ] {
        // the one-pass kernels where they apply, and merge_tensor everywhere
        for fused in [true, false] {
            check_case(case, fused);
        }
    }
}

fn check_case(case: &str, fused: bool) {
    {
        let out = temp_dir(&format!("merge-{case}-{fused}"));
        let stats = if fused {
            merge_directories(&config(case), &out).unwrap()
        } else {
            tch_peft::merge::without_fused_kernels(|| merge_directories(&config(case), &out))
                .unwrap()
        };
        let ours = tensors(&out.join("model.safetensors"));
        let theirs = tensors(&fixture().join(case).join("model.safetensors"));
        let names = |m: &BTreeMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs), "{case}");
        assert_eq!(stats.tensors, theirs.len());
        for (k, t) in &theirs {
            // f16/bf16 outputs: within one rounding step of the output dtype
            let tol = match t.kind() {
                Kind::Float => 1e-6,
                _ => 2e-3 * t.abs().max().double_value(&[]).max(1e-3),
            };
            let d = max_abs_diff(&ours[k].to_kind(Kind::Float), &t.to_kind(Kind::Float));
            assert!(d <= tol, "{case} (fused {fused}): {k}: {d}");
            assert_eq!(ours[k].kind(), t.kind(), "{case}: {k}");
        }
        let their_config = fixture().join(case).join("config.json");
        let ours_config = json(out.join("config.json"));
        if their_config.exists() {
            let theirs_config = json(&their_config);
            for key in ["num_hidden_layers", "dtype"] {
                assert_eq!(ours_config[key], theirs_config[key], "{case}: {key}");
            }
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn an_extracted_lora_is_mergekit_s_and_rebuilds_the_model() {
    let out = temp_dir("merge-extract");
    let opts = ExtractOptions { max_rank: 4, ..Default::default() };
    let stats = extract_lora(fixture().join("base"), fixture().join("m1"), &out, &opts).unwrap();
    let ours = tensors(&out.join("adapter_model.safetensors"));
    let theirs = tensors(&fixture().join("extract_lora/adapter_model.safetensors"));
    let names = |m: &BTreeMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs));
    for (k, t) in &theirs {
        if let Some(module) = k.strip_suffix(".lora_A.weight") {
            // the SVD's signs are arbitrary: compare B·A
            let b = |m: &BTreeMap<String, Tensor>| {
                m[&format!("{module}.lora_B.weight")].shallow_clone()
            };
            let d = max_abs_diff(&b(&ours).matmul(&ours[k]), &b(&theirs).matmul(t));
            assert!(d < 1e-5, "{module}: {d}");
        } else if !k.contains("lora_B") {
            assert!(bit_equal(&ours[k], t), "{k}: saved at full rank");
        }
    }
    let ours_cfg = json(out.join("adapter_config.json"));
    let theirs_cfg = json(fixture().join("extract_lora/adapter_config.json"));
    let set = |v: &serde_json::Value| {
        let mut s: Vec<String> =
            v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        s.sort();
        s
    };
    for key in ["target_modules", "modules_to_save"] {
        assert_eq!(set(&ours_cfg[key]), set(&theirs_cfg[key]), "{key}");
    }
    for key in ["r", "lora_alpha", "peft_type", "use_rslora", "rank_pattern"] {
        assert_eq!(ours_cfg[key], theirs_cfg[key], "{key}");
    }
    assert!(stats.relative_error > 0.0 && stats.relative_error < 1.0);
    // and this crate's LoRA config reads it back as r = 4, scaling 1
    let text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    let cfg: tch_peft::lora::LoraConfig = serde_json::from_str(&text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.scaling_for("model.layers.0.self_attn.q_proj").unwrap(), 1.0);
    // at full rank, B·A is the task vector
    let full = ExtractOptions { max_rank: 64, ..Default::default() };
    let stats = extract_lora(fixture().join("base"), fixture().join("m1"), &out, &full).unwrap();
    assert!(stats.relative_error < 1e-6, "{}", stats.relative_error);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn dare_keeps_the_density_in_expectation_and_rescales_by_the_l1_norm() {
    tch::manual_seed(0);
    let base = Tensor::zeros([400, 50], (Kind::Float, Device::Cpu));
    let a = randn(&[400, 50], Kind::Float);
    let p = ModelParams { weight: 1.0, density: 0.3, ..Default::default() };
    let g = GlobalParams::default();
    tch::manual_seed(5);
    let m = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &g).unwrap();
    let kept = m.ne(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((kept - 0.3).abs() < 0.01, "{kept}");
    // mergekit's rescale keeps the L1 norm (not the paper's 1/density)
    let l1 = |t: &Tensor| t.abs().sum(Kind::Double).double_value(&[]);
    assert!((l1(&m) - l1(&a)).abs() / l1(&a) < 1e-5);
    // kept entries are the originals times one common factor
    let mask = m.ne(0.0);
    let ratio = m.masked_select(&mask) / a.masked_select(&mask);
    assert!(ratio.max().double_value(&[]) - ratio.min().double_value(&[]) < 1e-4);
    // the same mask under the same seed, and the paper's 1/density option: tests/seeded.rs
    // (the global RNG is shared by test threads)
    // without rescale, density 1: exactly task arithmetic
    let full = ModelParams { density: 1.0, ..p };
    let g2 = GlobalParams { rescale: Some(false), ..g };
    let d = merge_tensor(MergeMethod::DareTies, Some(&base), &[(&a, full)], &g2).unwrap();
    let t = merge_tensor(MergeMethod::Ties, Some(&base), &[(&a, full)], &g2).unwrap();
    assert!(bit_equal(&d, &t));
}

#[test]
fn config_errors_name_what_is_wrong() {
    let bad = "merge_method: ties\nmodels:\n  - model: m1\n";
    let err = MergeConfig::from_yaml(bad).unwrap_err();
    assert!(err.to_string().contains("base_model"), "{err}");
    let bad =
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1, densty: 0.1}\n";
    let err = MergeConfig::from_yaml(bad).unwrap_err();
    assert!(err.to_string().contains("densty"), "a typo is named: {err}");
    let both = "merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 1]}]\nmodels:\n  - model: m1\n";
    let err = MergeConfig::from_yaml(both).unwrap_err();
    assert!(err.to_string().contains("slices"), "{err}");
    let bad = "merge_method: nearswap\nmodels:\n  - model: m1\n";
    assert!(MergeConfig::from_yaml(bad).unwrap_err().to_string().contains("nearswap"));
    let bad = "merge_method: linear\nmodels:\n  - model: m1\nmodules: {}\n";
    assert!(MergeConfig::from_yaml(bad).unwrap_err().to_string().contains("modules"));
    // structure, as mergekit checks it
    for (yaml, needle) in [
        ("merge_method: slerp\nbase_model: b\nmodels: [{model: b}, {model: m1}, {model: m2}]\nparameters: {t: 0.5}\n", "exactly 1"),
        ("merge_method: nuslerp\nmodels: [{model: m1, parameters: {weight: 1}}]\n", "exactly 2"),
        ("merge_method: model_stock\nbase_model: b\nmodels: [{model: m1}]\n", "at least 2"),
        ("merge_method: passthrough\nmodels: [{model: m1}, {model: m2}]\n", "exactly 1"),
        ("merge_method: linear\nmodels: [{model: m1, parameters: {weight: 1}}, {model: m1, parameters: {weight: 1}}]\n", "twice"),
        ("merge_method: slerp\nbase_model: b\nslices:\n  - sources: [{model: m1, layer_range: [0, 2]}, {model: m2, layer_range: [0, 2]}]\nparameters: {t: 0.5}\n", "not among the sources"),
        ("merge_method: slerp\nbase_model: b\nslices:\n  - sources: [{model: b, layer_range: [0, 2]}, {model: m2, layer_range: [0, 3]}]\nparameters: {t: 0.5}\n", "same number of layers"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: b, layer_range: [2, 1]}]\n", "not a range"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: m1}]\ntokenizer_source: union\n", "union"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: m1}]\ntokenizer: {source: base, tokens: {x: {source: base}}}\n", "tokens"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: m1}]\ndtype: int8\n", "dtype"),
        ("merge_method: multislerp\nbase_model: b\nmodels: [{model: b}]\n", "at least 1"),
    ] {
        let err = MergeConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(err.contains(needle), "{yaml}: {err}");
    }
    // models of different depths (mergekit: take layer ranges with slices)
    let shallow = temp_dir("merge-shallow");
    let t = tensors(&fixture().join("m1/model.safetensors"));
    let kept: Vec<(String, Tensor)> =
        t.into_iter().filter(|(k, _)| !k.contains("layers.2.")).collect();
    io::write_safetensors(shallow.join("model.safetensors"), &kept, None).unwrap();
    let mut cfg = config("linear");
    cfg.models[1].model = shallow.clone();
    let err = merge_directories(&cfg, temp_dir("merge-shallow-out")).unwrap_err().to_string();
    assert!(err.contains("as many"), "{err}");
    let _ = std::fs::remove_dir_all(&shallow);
    // a layer range past the model's layers
    let mut cfg = config("passthrough");
    cfg.slices[1].sources[0].layer_range = [1, 4];
    let err = merge_directories(&cfg, temp_dir("merge-range")).unwrap_err().to_string();
    assert!(err.contains("past the model's 3 layers"), "{err}");
    // a weighted method without a weight
    let mut cfg = config("linear");
    cfg.models[0].parameters.clear();
    let out = temp_dir("merge-noweight");
    let err = merge_directories(&cfg, &out).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
    assert!(!out.join("model.safetensors").exists(), "nothing half-written");
    let _ = std::fs::remove_dir_all(&out);
    // a model lacking a tensor: the error names both
    let partial = temp_dir("merge-partial");
    let t = tensors(&fixture().join("m1/model.safetensors"));
    let kept: Vec<(String, Tensor)> =
        t.into_iter().filter(|(k, _)| !k.contains("lm_head")).collect();
    io::write_safetensors(partial.join("model.safetensors"), &kept, None).unwrap();
    let mut cfg = config("linear");
    cfg.models[1].model = partial.clone();
    let err = merge_directories(&cfg, temp_dir("merge-partial-out")).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref name, .. } if name.contains("lm_head")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&partial);
    assert!(ModelFiles::open(fixture().join("nope")).is_err());
}

fn store(values: &[(&str, &[f64])]) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    for (name, v) in values {
        let _ = vs.root().add(name, Tensor::from_slice(v).to_kind(Kind::Float), true);
    }
    vs
}

#[test]
fn wise_ft_interpolates_every_variable_as_f64_recomputation() {
    let zs = store(&[("w", &[1.0, 2.0, 3.0]), ("b", &[0.5])]);
    let ft = store(&[("w", &[3.0, -2.0, 0.0]), ("b", &[1.5])]);
    let model = store(&[("w", &[0.0, 0.0, 0.0]), ("b", &[0.0])]);
    let _ = zs.root().zeros_no_train("running", &[2]);
    let _ = ft.root().ones_no_train("running", &[2]);
    let _ = model.root().zeros_no_train("running", &[2]);
    for alpha in [0.0, 0.25, 0.5, 0.75, 1.0] {
        wise_ft::interpolate_into(&model, &zs, &ft, alpha, false).unwrap();
        for name in ["w", "b", "running"] {
            let (a, b) = (
                zs.variables()[name].to_kind(Kind::Double),
                ft.variables()[name].to_kind(Kind::Double),
            );
            let expected = a * (1.0 - alpha) + b * alpha;
            assert!(max_abs_diff(&model.variables()[name], &expected) < 1e-7, "{name} at {alpha}");
        }
    }
    // the adapter: apply writes θ(α), revert restores bit-exactly
    let before = model.variables()["w"].copy();
    let mut w = WiseFt::new(&model, &zs, &ft, 0.3).unwrap();
    w.apply().unwrap();
    assert!(!bit_equal(&model.variables()["w"], &before));
    w.revert().unwrap();
    assert!(bit_equal(&model.variables()["w"], &before));
    // the sweep restores the model and returns the curve
    let curve = wise_ft::sweep(&model, &zs, &ft, &[0.0, 1.0], |_| {
        Ok(model.variables()["b"].double_value(&[0]))
    })
    .unwrap();
    assert_eq!(curve, [(0.0, 0.5), (1.0, 1.5)]);
    assert!(bit_equal(&model.variables()["w"], &before));
    // strict checks, partial opt-in
    let other = store(&[("w", &[1.0, 2.0]), ("b", &[0.0])]);
    let _ = other.root().zeros_no_train("running", &[2]);
    assert!(matches!(
        wise_ft::interpolate_into(&model, &zs, &other, 0.5, false),
        Err(Error::ShapeMismatch { .. })
    ));
    let fewer = store(&[("w", &[1.0, 1.0, 1.0])]);
    assert!(wise_ft::interpolate_into(&model, &zs, &fewer, 0.5, false).is_err());
    wise_ft::interpolate_into(&model, &zs, &fewer, 0.5, true).unwrap();
    assert!(max_abs_diff(&model.variables()["w"], &Tensor::from_slice(&[1.0f32, 1.5, 2.0])) < 1e-7);
}

#[test]
fn wise_ft_owns_its_endpoints_and_trains_nothing() {
    // the model's variables require grad; WiSE-FT trains none of them and owns θ₀, θ₁
    let zs = store(&[("w", &[1.0, 2.0]), ("b", &[0.5])]);
    let ft = store(&[("w", &[3.0, -2.0]), ("b", &[1.5])]);
    let model = store(&[("w", &[0.0, 0.0]), ("b", &[0.0])]);
    assert!(model.variables()["w"].requires_grad());
    let w = WiseFt::new(&model, &zs, &ft, 0.5).unwrap();
    assert_eq!(w.kind(), tch_peft::AdapterKind::Interpolation);
    assert!(w.trainable_tensors().is_empty());
    assert_eq!(w.num_trainable_parameters(), 0);
    let mut names: Vec<String> = w.named_tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["theta0.b", "theta0.w", "theta1.b", "theta1.w"]);
    assert_eq!(w.num_parameters(), 6);
    // a sweep's evaluation can return several metrics
    let curve = wise_ft::sweep(&model, &zs, &ft, &[0.0, 1.0], |a| {
        Ok((a, model.variables()["b"].double_value(&[0])))
    })
    .unwrap();
    assert_eq!(curve, [(0.0, (0.0, 0.5)), (1.0, (1.0, 1.5))]);
}

#[test]
fn a_tokenizer_source_is_copied_when_the_vocabularies_agree() {
    let root = temp_dir("merge-tokenizer");
    let model = |name: &str, vocab: &str, extra: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(fixture().join("m1").join(f), d.join(f)).unwrap();
        }
        std::fs::write(d.join("tokenizer.json"), vocab).unwrap();
        std::fs::write(d.join("tokenizer_config.json"), extra).unwrap();
        d
    };
    let (a, b, c) = (
        model("a", "{\"v\": 1}", "a"),
        model("b", "{\"v\": 1}", "b"),
        model("c", "{\"v\": 2}", "c"),
    );
    let yaml = |src: &str, second: &Path| {
        format!(
            "merge_method: linear\nmodels:\n  - {{model: {}, parameters: {{weight: 1}}}}\n  - {{model: {}, parameters: {{weight: 1}}}}\ntokenizer_source: {src}\n",
            a.display(),
            second.display()
        )
    };
    let out = root.join("out");
    let cfg = MergeConfig::from_yaml(&yaml(&b.display().to_string(), &b)).unwrap();
    merge_directories(&cfg, &out).unwrap();
    // the source's tokenizer files, in place of the donor's (the first model's)
    assert_eq!(std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(), "b");
    // a model with another vocabulary would need its embeddings permuted: refused, by name
    let cfg = MergeConfig::from_yaml(&yaml(&b.display().to_string(), &c)).unwrap();
    let err = merge_directories(&cfg, root.join("out2")).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "tokenizer_source"),
        "{err}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A model directory of `tensors` under `root`.
fn write_model(root: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let ts: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    io::write_safetensors(d.join("model.safetensors"), &ts, None).unwrap();
    d
}

#[test]
fn the_streamed_ties_threshold_keeps_tied_entries_and_exact_ties_keeps_mergekit_s_count() {
    let root = temp_dir("merge-ties-threshold");
    let n = "model.layers.0.w";
    let base = write_model(&root, "base", &[(n, Tensor::zeros([8], (Kind::Float, Device::Cpu)))]);
    let delta = Tensor::from_slice(&[1.0f32, -1.0, 1.0, 1.0, 0.5, 0.5, 2.0, -2.0]);
    let a = write_model(&root, "a", &[(n, delta.shallow_clone())]);
    let yaml = |extra: &str| {
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - {{model: {}, parameters: {{weight: 1.0, density: 0.5}}}}\n{extra}",
            base.display(),
            a.display()
        )
    };
    let merged = |extra: &str| {
        let out = root.join("out");
        merge_directories(&MergeConfig::from_yaml(&yaml(extra)).unwrap(), &out).unwrap();
        tensors(&out.join("model.safetensors"))[n].shallow_clone()
    };
    let nonzero = |t: &Tensor| t.ne(0.0).sum(Kind::Int64).int64_value(&[]);
    // k = 4 of 8; four entries tie at |1| for the last two places: the threshold keeps all four
    let fast = merged("");
    assert_eq!(nonzero(&fast), 6);
    assert!(bit_equal(&fast, &delta.where_self(&delta.abs().ge(1.0), &delta.zeros_like())));
    // exact_ties: mergekit's argsort picks exactly four, as merge_tensor does
    let exact = merged("parameters: {exact_ties: true}\n");
    assert_eq!(nonzero(&exact), 4);
    let p = ModelParams { weight: 1.0, density: 0.5, ..Default::default() };
    let zero = Tensor::zeros([8], (Kind::Float, Device::Cpu));
    let reference =
        merge_tensor(MergeMethod::Ties, Some(&zero), &[(&delta, p)], &GlobalParams::default())
            .unwrap();
    assert!(bit_equal(&exact, &reference));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_one_pass_kernels_round_bf16_once_from_f32() {
    let root = temp_dir("merge-bf16-kernels");
    let n = "model.layers.0.w";
    tch::manual_seed(3);
    let t = |s: f64| (randn(&[3000], Kind::Float) * s).to_kind(Kind::BFloat16);
    let (b, x1, x2) = (t(1.0), t(1.0), t(1.0));
    let base = write_model(&root, "base", &[(n, b.shallow_clone())]);
    let m1 = write_model(&root, "m1", &[(n, x1.shallow_clone())]);
    let m2 = write_model(&root, "m2", &[(n, x2.shallow_clone())]);
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - {{model: {}, parameters: {{weight: 0.7}}}}\n  - {{model: {}, parameters: {{weight: -0.4}}}}\nparameters: {{lambda: 0.9}}\n",
        base.display(),
        m1.display(),
        m2.display()
    );
    let out = root.join("out");
    merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &out).unwrap();
    let got = tensors(&out.join("model.safetensors"))[n].shallow_clone();
    assert_eq!(got.kind(), Kind::BFloat16);
    let d = |x: &Tensor| x.to_kind(Kind::Double);
    let exact = d(&b) + (d(&x1) - d(&b)) * (0.9 * 0.7) + (d(&x2) - d(&b)) * (0.9 * -0.4);
    // within half a bf16 step of the exact value (one rounding, from f32), plus f32's error
    let err = (d(&got) - &exact).abs();
    let step = exact.abs() * 2f64.powi(-8) + 1e-6;
    assert!(bool::try_from(err.le_tensor(&step).all()).unwrap());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_streamed_dare_keeps_the_density_and_the_l1_norm_and_repeats_under_a_seed() {
    let root = temp_dir("merge-dare-streamed");
    let n = "model.layers.0.w";
    // two threads' halves, and a last mask word partly used
    let base =
        write_model(&root, "base", &[(n, Tensor::zeros([300, 301], (Kind::Float, Device::Cpu)))]);
    let delta = randn(&[300, 301], Kind::Float);
    let a = write_model(&root, "a", &[(n, delta.shallow_clone())]);
    let merged = |seed: i64, extra: &str| {
        let yaml = format!(
            "merge_method: dare_linear\nbase_model: {}\nmodels:\n  - {{model: {}, parameters: {{weight: 1.0, density: 0.3}}}}\nrandom_seed: {seed}\n{extra}",
            base.display(),
            a.display()
        );
        let out = root.join("out");
        merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &out).unwrap();
        tensors(&out.join("model.safetensors"))[n].shallow_clone()
    };
    let m = merged(1, "");
    let kept = m.ne(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((kept - 0.3).abs() < 0.01, "{kept}");
    let l1 = |t: &Tensor| t.abs().sum(Kind::Double).double_value(&[]);
    assert!((l1(&m) - l1(&delta)).abs() / l1(&delta) < 1e-5, "mergekit's L1 rescale");
    assert!(bit_equal(&m, &merged(1, "")), "the same seed, the same masks");
    assert!(!bit_equal(&m.ne(0.0), &merged(2, "").ne(0.0)), "another seed, other masks");
    // the rescaled merge keeps its mask as bits; without rescaling the kernel draws each entry
    let drawn = merged(1, "parameters: {rescale: false}\n");
    assert!(bit_equal(&m.ne(0.0), &drawn.ne(0.0)), "the bits are the draws");
    // exact_masks (libtorch's generator, as merge_tensor draws): tests/seeded.rs
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_streamed_della_keeps_large_entries_more_often_and_the_l1_norm() {
    let root = temp_dir("merge-della-streamed");
    let n = "model.layers.0.w";
    let base =
        write_model(&root, "base", &[(n, Tensor::zeros([200, 100], (Kind::Float, Device::Cpu)))]);
    let delta = randn(&[200, 100], Kind::Float);
    let a = write_model(&root, "a", &[(n, delta.shallow_clone())]);
    let yaml = format!(
        "merge_method: della_linear\nbase_model: {}\nmodels:\n  - {{model: {}, parameters: {{weight: 1.0, density: 0.4, epsilon: 0.3}}}}\nrandom_seed: 3\n",
        base.display(),
        a.display()
    );
    let out = root.join("out");
    merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &out).unwrap();
    let m = tensors(&out.join("model.safetensors"))[n].shallow_clone();
    let kept = m.ne(0.0);
    let frac = |mask: &Tensor| mask.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((frac(&kept) - 0.4).abs() < 0.02, "{}", frac(&kept));
    // keep probabilities run from 0.1 (smallest in a row) to 0.7 (largest)
    let large = delta.abs().gt(1.5);
    let small = delta.abs().lt(0.1);
    let of = |sel: &Tensor| frac(&kept.masked_select(sel));
    assert!(of(&large) > 0.6 && of(&small) < 0.2, "{} {}", of(&large), of(&small));
    let l1 = |t: &Tensor| t.abs().sum(Kind::Double).double_value(&[]);
    assert!((l1(&m) - l1(&delta)).abs() / l1(&delta) < 1e-5, "mergekit's L1 rescale");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_one_pass_kernels_on_two_threads_agree_with_merge_tensor() {
    let root = temp_dir("merge-two-threads");
    let n = "model.layers.0.w";
    let t = || randn(&[300, 301], Kind::Float);
    let (b, x1, x2) = (t(), t(), t());
    let base = write_model(&root, "base", &[(n, b)]);
    let m1 = write_model(&root, "m1", &[(n, x1)]);
    let m2 = write_model(&root, "m2", &[(n, x2)]);
    for method in ["task_arithmetic", "ties", "multislerp"] {
        let yaml = format!(
            "merge_method: {method}\nbase_model: {}\nmodels:\n  - {{model: {}, parameters: {{weight: 0.7, density: 0.4}}}}\n  - {{model: {}, parameters: {{weight: 0.3, density: 0.6}}}}\n",
            base.display(),
            m1.display(),
            m2.display()
        );
        let cfg = MergeConfig::from_yaml(&yaml).unwrap();
        let (fast, slow) = (root.join("fast"), root.join("slow"));
        merge_directories(&cfg, &fast).unwrap();
        tch_peft::merge::without_fused_kernels(|| merge_directories(&cfg, &slow)).unwrap();
        let d = max_abs_diff(
            &tensors(&fast.join("model.safetensors"))[n],
            &tensors(&slow.join("model.safetensors"))[n],
        );
        assert!(d < 1e-5, "{method}: {d}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn tensors_merged_in_chunks_agree_with_merge_tensor_entry_for_entry() {
    // past one read chunk (2^20 entries) with a tail; integers copied in chunks; no entries
    let root = temp_dir("merge-chunks");
    let (w, ids, empty) = ("model.layers.0.w", "model.layers.0.ids", "model.layers.0.empty");
    let model = |name: &str, ids_t: Tensor| {
        // negative zeros among the values (a copy keeps them)
        let values = randn(&[1025, 1027], Kind::Float);
        let _ = values.narrow(0, 7, 3).fill_(-0.0);
        let tensors =
            [(w, values), (ids, ids_t), (empty, Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)))];
        write_model(&root, name, &tensors)
    };
    let first_ids = Tensor::arange((1 << 20) + 3, (Kind::Int, Device::Cpu));
    let base = model("base", first_ids.shallow_clone());
    let m1 = model("m1", first_ids.shallow_clone());
    let m1_w = tensors(&m1.join("model.safetensors"))[w].shallow_clone();
    let m2 = model("m2", first_ids.zeros_like());
    let (b, m1, m2) = (base.display(), m1.display(), m2.display());
    for yaml in [
        format!("merge_method: linear\nmodels:\n  - {{model: {m1}, parameters: {{weight: 0.7}}}}\n  - {{model: {m2}, parameters: {{weight: 0.2}}}}\nout_dtype: bfloat16\n"),
        format!("merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - {{model: {m1}, parameters: {{weight: 0.7}}}}\n  - {{model: {m2}, parameters: {{weight: 0.3}}}}\n"),
        format!("merge_method: passthrough\nmodels:\n  - {{model: {m1}, parameters: {{scale: 0.5}}}}\n"),
        format!("merge_method: passthrough\nmodels:\n  - {{model: {m1}}}\n"),
    ] {
        let cfg = MergeConfig::from_yaml(&yaml).unwrap();
        let (fast, slow) = (root.join("fast"), root.join("slow"));
        merge_directories(&cfg, &fast).unwrap();
        tch_peft::merge::without_fused_kernels(|| merge_directories(&cfg, &slow)).unwrap();
        let (a, b) = (tensors(&fast.join("model.safetensors")), tensors(&slow.join("model.safetensors")));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        // bf16 output: the two paths' f32 sums (in other orders) may round one ulp apart
        let (x, y) = (a[w].to_kind(Kind::Double), b[w].to_kind(Kind::Double));
        let (rel, abs) = if a[w].kind() == Kind::BFloat16 { (1.0 / 128.0, 0.0) } else { (0.0, 1e-6) };
        let over = ((&x - &y).abs() - y.abs() * rel - abs).max().double_value(&[]);
        assert!(over <= 1e-30, "{yaml}: {over}");
        assert_eq!(a[w].kind(), b[w].kind());
        assert!(bit_equal(&a[ids], &first_ids), "{yaml}");
        assert_eq!(a[empty].size(), [0, 4]);
        if !yaml.contains("scale") && yaml.contains("passthrough") {
            // bit for bit, negative zeros included
            let bits = |t: &Tensor| t.view_dtype(Kind::Int);
            assert!(bit_equal(&bits(&a[w]), &bits(&m1_w)), "{yaml}");
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
