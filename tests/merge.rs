//! Merging: parity with mergekit 0.1.5 (fixtures by `scripts/make_merge_fixtures.py`), DARE's
//! statistics and exact behaviour, WiSE-FT against an f64 recomputation, config errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use tch::nn;
use tch::{Device, Kind, Tensor};
use tch_peft::merge::{
    merge_directories, merge_tensor, wise_ft, GlobalParams, MergeConfig, MergeMethod, ModelFiles,
    ModelParams, WiseFt,
};
use tch_peft::{io, Adapter, Applicable, Error};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge")
}

/// The case's YAML with its model paths made absolute.
fn config(case: &str) -> MergeConfig {
    let text = std::fs::read_to_string(fixture().join(format!("{case}.yml"))).unwrap();
    let mut cfg = MergeConfig::from_yaml(&text).unwrap();
    cfg.base_model = cfg.base_model.map(|b| fixture().join(b));
    for m in &mut cfg.models {
        m.model = fixture().join(&m.model);
    }
    cfg
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
    ] {
        let out = temp_dir(&format!("merge-{case}"));
        let stats = merge_directories(&config(case), &out).unwrap();
        let ours = tensors(&out.join("model.safetensors"));
        let theirs = tensors(&fixture().join(case).join("model.safetensors"));
        assert_eq!(ours.len(), theirs.len(), "{case}");
        assert_eq!(stats.tensors, theirs.len());
        for (k, t) in &theirs {
            let d = max_abs_diff(&ours[k], t);
            assert!(d <= 1e-6, "{case}: {k}: {d}");
            assert_eq!(ours[k].kind(), t.kind(), "{case}: {k}");
        }
        assert!(out.join("config.json").exists(), "the base's config is copied");
        let _ = std::fs::remove_dir_all(&out);
    }
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
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1, epsilon: 0.1}\n";
    let err = MergeConfig::from_yaml(bad).unwrap_err();
    assert!(err.to_string().contains("epsilon"), "{err}");
    let bad = "merge_method: linear\nslices: []\nmodels:\n  - model: m1\n";
    let err = MergeConfig::from_yaml(bad).unwrap_err();
    assert!(err.to_string().contains("slices"), "{err}");
    let bad = "merge_method: karcher\nmodels:\n  - model: m1\n";
    assert!(MergeConfig::from_yaml(bad).unwrap_err().to_string().contains("karcher"));
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
