//! Build-time targeting, the model-level adapter (merge, save, load) and an end-to-end training
//! run on a small frozen network.

use crate::common::*;
use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{self, LoraAdapter, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::target::TargetModules;
use tch_peft::{io, Adapter, AdapterKind, Applicable, Error, ParamReport};

/// A two-block MLP with transformer-like names: `blocks.N.{up,down}` and `head`.
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
            let up = lora::linear(&(&b / "up"), 8, 16, Default::default(), lora)?;
            let down = lora::linear(&(&b / "down"), 16, 8, Default::default(), lora)?;
            blocks.push((up, down));
        }
        let head = lora::linear(&(p / "head"), 8, 2, Default::default(), lora)?;
        Ok(Mlp { blocks, head })
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        for (up, down) in &self.blocks {
            h = &h + up.forward_t(&h, train).relu().apply_t(down, train);
        }
        h.apply_t(&self.head, train)
    }
}

fn build(targets: &[&str], r: i64) -> (nn::VarStore, nn::VarStore, Mlp, LoraAdapter) {
    let base_vs = nn::VarStore::new(Device::Cpu);
    let adapter_vs = nn::VarStore::new(Device::Cpu);
    let cfg = LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        ..LoraConfig::for_targets(targets.iter().copied())
    };
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let model = Mlp::new(&base_vs.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    (base_vs, adapter_vs, model, adapter)
}

fn randomize_b(adapter: &LoraAdapter) {
    for l in adapter.layers() {
        set(l.lora_b(), &(randn(&l.lora_b().size(), Kind::Float) * 0.5));
    }
}

#[test]
fn targets_select_layers_by_peft_rules() {
    tch::manual_seed(0);
    let (_b, adapter_vs, model, adapter) = build(&["up", "blocks.1.down"], 4);
    assert_eq!(adapter.modules(), ["blocks.0.up", "blocks.1.up", "blocks.1.down"]);
    assert!(model.blocks[0].1.as_lora().is_none() && model.head.as_lora().is_none());
    let mut names: Vec<String> = adapter_vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(names[0], "blocks.0.up.lora_A.weight", "adapter paths mirror the base paths");
    assert_eq!(names.len(), 6);
}

#[test]
fn a_target_that_matches_nothing_is_an_error() {
    let base_vs = nn::VarStore::new(Device::Cpu);
    let adapter_vs = nn::VarStore::new(Device::Cpu);
    let builder =
        LoraBuilder::new(&adapter_vs.root(), LoraConfig::for_targets(["up", "q_proj"])).unwrap();
    let _model = Mlp::new(&base_vs.root(), Some(&builder)).unwrap();
    let err = builder.finish().unwrap_err();
    assert!(matches!(&err, Error::UnmatchedTarget { target, .. } if target == "q_proj"), "{err}");
    assert_eq!(
        err.to_string(),
        "target `q_proj` in `target_modules` matched no module (checked 5 module names)"
    );
}

#[test]
fn regex_targets_and_rank_pattern_apply() {
    let base_vs = nn::VarStore::new(Device::Cpu);
    let adapter_vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = LoraConfig {
        target_modules: Some(TargetModules::regex(r"blocks\.\d+\.(up|down)")),
        ..Default::default()
    };
    cfg.rank_pattern.insert("down".into(), 2);
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let _model = Mlp::new(&base_vs.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    let ranks: Vec<i64> = adapter.layers().iter().map(|l| l.rank()).collect();
    assert_eq!(ranks, [8, 2, 8, 2]);
}

#[test]
fn model_merge_then_forward_matches_unmerged_and_unmerge_restores_bits() {
    tch::manual_seed(1);
    let (base_vs, _a, model, adapter) = build(&["up", "down", "head"], 2);
    randomize_b(&adapter);
    let originals: Vec<Tensor> =
        adapter.layers().iter().map(|l| l.base().dense().unwrap().ws.copy()).collect();
    let x = randn(&[5, 8], Kind::Float);
    let unmerged = model.forward_t(&x, false);
    let mut boxed: Box<dyn Applicable> = Box::new(adapter);
    assert_eq!(boxed.kind(), AdapterKind::Lora);
    boxed.apply().unwrap();
    assert!(boxed.is_applied());
    let merged = model.forward_t(&x, false);
    assert!(max_abs_diff(&merged, &unmerged) < 1e-5);
    boxed.revert().unwrap();
    assert!(!boxed.is_applied());
    let vars = base_vs.variables();
    for (l, orig) in ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]
        .iter()
        .zip(&originals)
    {
        assert!(bit_equal(&vars[&format!("{l}.weight")], orig), "{l} restored");
    }
}

#[test]
fn save_and_load_round_trip_with_peft_keys_and_metadata() {
    tch::manual_seed(2);
    let dir = temp_dir("roundtrip");
    let (_b1, _a1, model1, adapter1) = build(&["up", "head"], 2);
    randomize_b(&adapter1);
    adapter1.save_pretrained(&dir).unwrap();
    let file = io::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(file.metadata.as_ref().unwrap()["format"], "pt");
    let keys: Vec<&str> = file.tensors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys[0], "base_model.model.blocks.0.up.lora_A.weight");
    assert_eq!(keys.len(), 6);
    assert_eq!(file.tensors[1].1.size(), [16, 2], "lora_B is [out, r]");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 2);
    assert_eq!(json["lora_alpha"], 4);
    assert!(json["task_type"].is_null(), "no task type unless the config names one");
    // PEFT's task type is carried to the file (Python then builds PeftModelForCausalLM)
    let typed =
        LoraConfig { task_type: Some(tch_peft::lora::TaskType::CausalLm), ..LoraConfig::default() };
    let v = serde_json::to_value(&typed).unwrap();
    assert_eq!(v["task_type"], "CAUSAL_LM");
    assert_eq!(serde_json::from_value::<LoraConfig>(v).unwrap(), typed);

    // a second model with the same base weights and the loaded adapter gives the same outputs
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    assert_eq!(&cfg, adapter1.config());
    let (mut base2, adapter_vs2) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs2.root(), cfg).unwrap();
    let model2 = Mlp::new(&base2.root(), Some(&builder)).unwrap();
    let adapter2 = builder.finish().unwrap();
    base2.copy(&_b1).unwrap();
    let x = randn(&[3, 8], Kind::Float);
    assert!(max_abs_diff(&model1.forward_t(&x, false), &model2.forward_t(&x, false)) > 1e-3);
    adapter2.load_pretrained(&dir).unwrap();
    assert!(bit_equal(&model1.forward_t(&x, false), &model2.forward_t(&x, false)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loading_checks_every_key_and_shape_and_names_what_is_wrong() {
    tch::manual_seed(3);
    let dir = temp_dir("badload");
    let (_b, _a, _m, adapter) = build(&["up"], 4);
    let path = dir.join("a.safetensors");
    let own = adapter.named_tensors();

    // missing tensor
    io::write_safetensors(&path, &own[..3], None).unwrap();
    let err = adapter.load_safetensors(&path).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "base_model.model.blocks.1.up.lora_B.weight"),
        "{err}"
    );

    // wrong shape
    let mut wrong: Vec<(String, Tensor)> = own.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
    wrong[0].1 = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
    io::write_safetensors(&path, &wrong, None).unwrap();
    let err = adapter.load_safetensors(&path).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, expected, actual } if name.ends_with("blocks.0.up.lora_A.weight") && expected == &[4, 8] && actual == &[2, 8]),
        "{err}"
    );

    // unexpected tensor
    let mut extra: Vec<(String, Tensor)> = own.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
    extra.push((
        "blocks.0.down.lora_A.weight".into(),
        Tensor::zeros([4, 16], (Kind::Float, Device::Cpu)),
    ));
    io::write_safetensors(&path, &extra, None).unwrap();
    let err = adapter.load_safetensors(&path).unwrap_err();
    assert!(
        matches!(&err, Error::UnexpectedTensor { name, .. } if name.ends_with("blocks.0.down.lora_A.weight")),
        "{err}"
    );

    // corrupt and truncated files
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(adapter.load_safetensors(&path), Err(Error::CorruptFile { .. })));
    io::write_safetensors(&path, &own, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
    let err = adapter.load_safetensors(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptFile { .. }), "{err}");
    // missing file
    assert!(matches!(adapter.load_safetensors(dir.join("nope")), Err(Error::Io { .. })));
    // nothing was written by the failed loads: B is still zero
    for l in adapter.layers() {
        assert_eq!(l.lora_b().abs().sum(Kind::Double).double_value(&[]), 0.0);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn save_is_atomic_and_leaves_no_temp_files() {
    let dir = temp_dir("atomic");
    let (_b, _a, _m, adapter) = build(&["head"], 2);
    adapter.save_safetensors(dir.join("x.safetensors")).unwrap();
    adapter.save_safetensors(dir.join("x.safetensors")).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["x.safetensors"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn lora_on_a_frozen_network_lowers_the_loss_and_leaves_the_base_untouched() {
    tch::manual_seed(4);
    let (base_vs, adapter_vs, model, adapter) = build(&["up", "down"], 4);
    let base_before: Vec<(String, Tensor)> =
        base_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let x = randn(&[64, 8], Kind::Float);
    let target = Tensor::randint(2, [64], (Kind::Int64, Device::Cpu));
    let mut opt = nn::AdamW::default().build(&adapter_vs, 1e-2).unwrap();
    let loss0 = model.forward_t(&x, true).cross_entropy_for_logits(&target).double_value(&[]);
    let mut loss = loss0;
    for _ in 0..60 {
        let l = model.forward_t(&x, true).cross_entropy_for_logits(&target);
        opt.backward_step(&l);
        loss = l.double_value(&[]);
    }
    assert!(loss < 0.8 * loss0, "loss {loss0:.4} -> {loss:.4}");
    let vars = base_vs.variables();
    for (k, v) in base_before {
        assert!(bit_equal(&vars[&k], &v), "base variable {k} changed");
    }
    let report = ParamReport::from_var_stores(&[&base_vs, &adapter_vs]);
    assert_eq!(report.trainable, adapter.num_trainable_parameters());
    assert_eq!(report.trainable, 2 * (4 * 8 + 16 * 4) + 2 * (4 * 16 + 8 * 4));
    assert_eq!(report.total, report.trainable + 2 * (8 * 16 + 16 + 16 * 8 + 8) + (8 * 2 + 2));
    assert!(
        report
            .to_string()
            .starts_with("trainable params: 384 || all params: 962 || trainable%: 39.9168"),
        "{report}"
    );
}

#[test]
fn single_store_use_trains_only_the_adapter() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let builder = LoraBuilder::new(&(vs.root() / "lora"), LoraConfig::for_targets(["up"])).unwrap();
    let model = Mlp::new(&(vs.root() / "base"), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    let w = vs.variables()["base.blocks.0.up.weight"].copy();
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = randn(&[4, 8], Kind::Float);
    for _ in 0..3 {
        opt.backward_step(&model.forward_t(&x, true).square().mean(Kind::Float));
    }
    assert!(bit_equal(&vs.variables()["base.blocks.0.up.weight"], &w));
    assert!(adapter.layers()[0].lora_b().abs().sum(Kind::Double).double_value(&[]) > 0.0);
    let _ = model.head.base().unwrap().forward(&x);
}
