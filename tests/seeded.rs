//! Reproducibility under a seed: DARE's random drops, PEFT's (`TaskMerge::DareLinear`) and
//! mergekit's (`MergeMethod::DareLinear`, with both rescales), draw the same mask after the same
//! `manual_seed`; and DARE and DELLA draw the very masks mergekit 0.1.5 draws after the same
//! seed (libtorch's CPU generator is the one both use; fixtures by
//! `scripts/make_merge_fixtures.py`). One test in a binary of its own: the generator is
//! global, so any other test thread drawing between the seed and the draw would change the mask.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use tch_peft::io;
use tch_peft::lora::TaskMerge;
use tch_peft::merge::{merge_tensor, GlobalParams, MergeMethod, ModelParams};

#[test]
fn dare_masks_repeat_under_the_same_seed() {
    // PEFT's DARE: same seed, same merged tensor
    let t = Tensor::ones([200, 50], (Kind::Double, Device::Cpu));
    tch::manual_seed(11);
    let merged =
        TaskMerge::DareLinear { density: 0.3 }.merge(&[t.shallow_clone()], &[1.0]).unwrap();
    tch::manual_seed(11);
    let again = TaskMerge::DareLinear { density: 0.3 }.merge(&[t], &[1.0]).unwrap();
    assert!(bit_equal(&merged, &again), "seeded");

    // mergekit's DARE: same seed, same mask, with the L1 rescale and the paper's 1/density
    let base = Tensor::zeros([400, 50], (Kind::Float, Device::Cpu));
    let a = randn(&[400, 50], Kind::Float);
    let p = ModelParams { weight: 1.0, density: 0.3, ..Default::default() };
    let g = GlobalParams::default();
    tch::manual_seed(5);
    let m = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &g).unwrap();
    let mask = m.ne(0.0);
    tch::manual_seed(5);
    let again = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &g).unwrap();
    assert!(bit_equal(&m, &again));
    tch::manual_seed(5);
    let gi = GlobalParams { inverse_density: true, ..g };
    let inv = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &gi).unwrap();
    assert!(bit_equal(&inv.ne(0.0), &mask), "same seed, same mask");
    let expected = a.masked_select(&mask) / 0.3;
    assert!(max_abs_diff(&inv.masked_select(&mask), &expected) < 1e-6);

    random_methods_draw_mergekit_s_masks();
    streamed_exact_masks_are_merge_tensor_s();
}

/// The streamed DARE with `exact_masks` draws from libtorch's generator after `random_seed`,
/// as `merge_tensor` (and mergekit) after the same seed.
fn streamed_exact_masks_are_merge_tensor_s() {
    let root = temp_dir("seeded-exact-masks");
    let n = "model.layers.0.w";
    let write = |name: &str, t: &Tensor| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        io::write_safetensors(
            d.join("model.safetensors"),
            &[(n.to_string(), t.shallow_clone())],
            None,
        )
        .unwrap();
        d
    };
    let zero = Tensor::zeros([400, 50], (Kind::Float, Device::Cpu));
    let delta = randn(&[400, 50], Kind::Float);
    let (base, a) = (write("base", &zero), write("a", &delta));
    let yaml = format!(
        "merge_method: dare_linear\nbase_model: {}\nmodels:\n  - {{model: {}, parameters: {{weight: 1.0, density: 0.3}}}}\nrandom_seed: 5\nparameters: {{exact_masks: true}}\n",
        base.display(),
        a.display()
    );
    let out = root.join("out");
    tch_peft::merge::merge_directories(
        &tch_peft::merge::MergeConfig::from_yaml(&yaml).unwrap(),
        &out,
    )
    .unwrap();
    let got: std::collections::HashMap<String, Tensor> =
        io::read_safetensors(out.join("model.safetensors")).unwrap().tensors.into_iter().collect();
    tch::manual_seed(5);
    let p = ModelParams { weight: 1.0, density: 0.3, ..Default::default() };
    let reference = merge_tensor(
        MergeMethod::DareLinear,
        Some(&zero),
        &[(&delta, p)],
        &GlobalParams::default(),
    )
    .unwrap();
    assert!(bit_equal(&got[n], &reference));
    let _ = std::fs::remove_dir_all(&root);
}

/// Each case of `random.json`: the same seed before each tensor, the same merged tensor.
fn random_methods_draw_mergekit_s_masks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("random.json")).unwrap()).unwrap();
    let t: std::collections::HashMap<String, Tensor> =
        io::read_safetensors(dir.join("random.safetensors")).unwrap().tensors.into_iter().collect();
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    for (case, c) in cases.as_object().unwrap() {
        let method: MergeMethod = serde_json::from_value(c["method"].clone()).unwrap();
        let d = ModelParams::default();
        let params: Vec<ModelParams> = c["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ModelParams {
                weight: num(m, "weight").unwrap(),
                density: num(m, "density").unwrap_or(d.density),
                epsilon: num(m, "epsilon").unwrap_or(d.epsilon),
                ..d
            })
            .collect();
        let p = &c["parameters"];
        let g = GlobalParams {
            lambda: num(p, "lambda").unwrap_or(1.0),
            rescale: p.get("rescale").and_then(|x| x.as_bool()),
            normalize: p.get("normalize").and_then(|x| x.as_bool()),
            ..GlobalParams::default()
        };
        for shape in ["matrix", "vector", "conv"] {
            let base = &t[&format!("{shape}.base")];
            let models: Vec<(&Tensor, ModelParams)> = ["m1", "m2"]
                .iter()
                .map(|m| &t[&format!("{shape}.{m}")])
                .zip(params.clone())
                .collect();
            tch::manual_seed(c["seed"].as_i64().unwrap());
            let ours = merge_tensor(method, Some(base), &models, &g).unwrap();
            let theirs = &t[&format!("{case}.{shape}")];
            let d = max_abs_diff(&ours, theirs);
            assert!(d < 1e-6, "{case} {shape}: {d}");
        }
    }
}
