//! Parity with Hugging Face PEFT 0.21 on fixtures made by `scripts/make_peft_fixtures.py`:
//! PEFT's adapter directory loads here and gives PEFT's outputs and merged weights, and the
//! directory written here has PEFT's keys, shapes, values and config fields.

use std::path::{Path, PathBuf};

use crate::common::tiny::{fixture, tensors, Tiny};
use crate::common::*;
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};
use tch_peft::io;
use tch_peft::lora::{LoraAdapter, LoraBuilder, LoraConfig};

/// Saves `adapter` and checks that its weights file equals PEFT's in `dir`: same metadata,
/// keys, shapes and values. Returns the directory written (the caller removes it).
fn assert_saves_peft_file(case: &str, adapter: &LoraAdapter, dir: &Path) -> PathBuf {
    let out = temp_dir(&format!("parity-{case}"));
    adapter.save_pretrained(&out).unwrap();
    let ours = io::read_safetensors(out.join(io::PEFT_WEIGHTS_NAME)).unwrap();
    let theirs = io::read_safetensors(dir.join(io::PEFT_WEIGHTS_NAME)).unwrap();
    assert_eq!(ours.metadata, theirs.metadata, "{case}: metadata");
    assert_eq!(ours.tensors.len(), theirs.tensors.len(), "{case}: number of tensors");
    for ((ka, ta), (kb, tb)) in ours.tensors.iter().zip(&theirs.tensors) {
        assert_eq!(ka, kb);
        assert!(bit_equal(ta, tb), "{case}: {ka}");
    }
    out
}

fn load_case(case: &str) -> (nn::VarStore, nn::VarStore, Tiny, LoraAdapter) {
    let dir = fixture(case);
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    let mut base_vs = nn::VarStore::new(Device::Cpu);
    let adapter_vs = nn::VarStore::new(Device::Cpu);
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let model = Tiny::new(&base_vs.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    base_vs.load(dir.join("base.safetensors")).unwrap();
    adapter.load_pretrained(&dir).unwrap();
    (base_vs, adapter_vs, model, adapter)
}

fn check_case(case: &str, expected_modules: &[&str]) {
    let dir = fixture(case);
    let io_t = tensors(&dir.join("io.safetensors"));
    let (base_vs, _adapter_vs, model, adapter) = load_case(case);
    assert_eq!(adapter.modules(), expected_modules);

    // forward with the adapter, and with it disabled
    let y = model.forward(&io_t["x"]);
    assert!(max_abs_diff(&y, &io_t["y"]) < 1e-5, "{case}: {}", max_abs_diff(&y, &io_t["y"]));
    adapter.set_enabled(false).unwrap();
    assert!(max_abs_diff(&model.forward(&io_t["x"]), &io_t["y_base"]) < 1e-6);
    adapter.set_enabled(true).unwrap();

    // merged weights equal PEFT's merge_and_unload
    adapter.merge().unwrap();
    let vars = base_vs.variables();
    for (k, v) in &io_t {
        if let Some(name) = k.strip_prefix("merged.") {
            assert!(max_abs_diff(&vars[name], v) < 1e-6, "{case}: merged {name}");
        }
    }
    assert!(max_abs_diff(&model.forward(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.unmerge().unwrap();

    // what we write is what PEFT wrote: same keys, shapes, values, metadata and config fields
    let out = assert_saves_peft_file(case, &adapter, &dir);
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (a, b) = (json(out.join(io::PEFT_CONFIG_NAME)), json(dir.join(io::PEFT_CONFIG_NAME)));
    for key in [
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "init_lora_weights",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "bias",
        "fan_in_fan_out",
        "use_dora",
        "lora_bias",
        "modules_to_save",
        "peft_type",
        "task_type",
        "inference_mode",
    ] {
        assert_eq!(a[key], b[key], "{case}: config field {key}");
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn peft_default_adapter_loads_and_matches_outputs_merges_and_files() {
    check_case(
        "default",
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ],
    );
}

#[test]
fn peft_rslora_rank_alpha_patterns_and_layers_match() {
    check_case(
        "rslora_patterns",
        &[
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.up_proj",
        ],
    );
    let (_b, _a, _m, adapter) = load_case("rslora_patterns");
    let by_module: Vec<(i64, f64)> =
        adapter.layers().iter().map(|l| (l.rank(), l.scaling())).collect();
    assert_eq!(by_module, [(4, 3.0 / 2.0), (4, 8.0 / 2.0), (2, 8.0 / 2f64.sqrt())]);
}

#[test]
fn peft_dora_adapter_matches_outputs_merged_weights_and_files() {
    check_case(
        "dora",
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.up_proj",
        ],
    );
    let (_b, _a, _m, adapter) = load_case("dora");
    assert!(adapter
        .layers()
        .iter()
        .all(|l| l.magnitude().map(|m| m.size()) == Some(vec![l.out_features()])));
}

#[test]
fn peft_lora_bias_adapter_matches_outputs_merged_weights_and_files() {
    check_case(
        "lora_bias",
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.up_proj",
        ],
    );
}

/// GPT-2 style block of the conv1d fixture: `c_proj(gelu(c_attn(x)))`, weights stored `[in, out]`.
#[test]
fn peft_conv1d_adapter_fan_in_fan_out_matches_outputs_merged_weights_and_files() {
    let dir = fixture("conv1d");
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    assert!(cfg.fan_in_fan_out);
    let (mut base_vs, adapter_vs) =
        (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let c_attn = builder.conv1d(&(base_vs.root() / "c_attn"), 16, 24).unwrap();
    let c_proj = builder.conv1d(&(base_vs.root() / "c_proj"), 24, 16).unwrap();
    let adapter = builder.finish().unwrap();
    base_vs.load(dir.join("base.safetensors")).unwrap();
    adapter.load_pretrained(&dir).unwrap();
    let io_t = tensors(&dir.join("io.safetensors"));
    let fwd = |x: &Tensor| c_proj.forward_t(&c_attn.forward_t(x, false).gelu("none"), false);
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.merge().unwrap();
    let vars = base_vs.variables();
    for name in ["c_attn.weight", "c_proj.weight", "c_attn.bias"] {
        assert_eq!(
            vars[name].size(),
            io_t[&format!("merged.{name}")].size(),
            "{name} stays [in, out]"
        );
        assert!(
            max_abs_diff(&vars[name], &io_t[&format!("merged.{name}")]) < 1e-6,
            "merged {name}"
        );
    }
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.unmerge().unwrap();
    let out = assert_saves_peft_file("conv1d", &adapter, &dir);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn peft_conv2d_adapter_matches_outputs_merged_weights_and_files() {
    let dir = fixture("conv2d");
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    let (mut base_vs, adapter_vs) =
        (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let c1 = nn::ConvConfig { padding: 1, ..Default::default() };
    let c2 = nn::ConvConfig { padding: 1, stride: 2, ..Default::default() };
    let conv1 = builder.conv2d(&(base_vs.root() / "conv1"), 3, 8, 3, c1).unwrap();
    let conv2 = builder.conv2d(&(base_vs.root() / "conv2"), 8, 4, 3, c2).unwrap();
    let adapter = builder.finish().unwrap();
    assert_eq!(adapter.modules(), ["conv1", "conv2"]);
    base_vs.load(dir.join("base.safetensors")).unwrap();
    adapter.load_pretrained(&dir).unwrap();
    let io_t = tensors(&dir.join("io.safetensors"));
    let fwd = |x: &Tensor| conv2.forward_t(&conv1.forward_t(x, false).relu(), false);
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.merge().unwrap();
    let vars = base_vs.variables();
    for name in ["conv1.weight", "conv2.weight"] {
        assert!(
            max_abs_diff(&vars[name], &io_t[&format!("merged.{name}")]) < 1e-6,
            "merged {name}"
        );
    }
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.unmerge().unwrap();
    let out = assert_saves_peft_file("conv2d", &adapter, &dir);
    std::fs::remove_dir_all(out).unwrap();
}

/// PiSSA and OLoRA: initialised here from the original base weights, the factors' product, the
/// residual base weights and the outputs equal PEFT's.
fn check_base_init_case(case: &str) {
    let dir = fixture(case);
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    let mut base_vs = nn::VarStore::new(Device::Cpu);
    let adapter_vs = nn::VarStore::new(Device::Cpu);
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let model = Tiny::new(&base_vs.root(), Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    base_vs.load(dir.join("base.safetensors")).unwrap();
    let io_t = tensors(&dir.join("io.safetensors"));
    let x = &io_t["x"];
    let err = adapter.layers()[0].f_forward_t(&x.reshape([-1, 16]), false).unwrap_err();
    assert!(matches!(err, tch_peft::Error::Uninitialized { .. }), "{case}: {err}");
    adapter.init_from_base_weights().unwrap();
    let vars = base_vs.variables();
    let theirs = tensors(&dir.join(io::PEFT_WEIGHTS_NAME));
    for l in adapter.layers() {
        let m = l.module();
        let residual = &io_t[&format!("residual.{m}.weight")];
        assert!(
            max_abs_diff(&vars[&format!("{m}.weight")], residual) < 1e-5,
            "{case}: residual {m}"
        );
        let (a, b) = (
            &theirs[&format!("base_model.model.{m}.lora_A.weight")],
            &theirs[&format!("base_model.model.{m}.lora_B.weight")],
        );
        assert!(max_abs_diff(&l.lora_b().mm(l.lora_a()), &b.mm(a)) < 1e-5, "{case}: BA of {m}");
    }
    assert!(max_abs_diff(&model.forward(x), &io_t["y"]) < 1e-5, "{case}: outputs");
    // initialising twice keeps the factors (the base already holds the residual)
    let a0 = adapter.layers()[0].lora_a().copy();
    adapter.init_from_base_weights().unwrap();
    assert!(bit_equal(adapter.layers()[0].lora_a(), &a0));
}

#[test]
fn pissa_init_matches_peft() {
    check_base_init_case("pissa");
}

#[test]
fn olora_init_matches_peft() {
    check_base_init_case("olora");
}

/// DoRA on an embedding table (magnitude per coordinate, norm over the vocabulary) and on a
/// linear layer: `proj(embed_tokens(ids))`.
#[test]
fn peft_dora_embedding_adapter_matches_outputs_merged_weights_and_files() {
    let dir = fixture("dora_embedding");
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    assert!(cfg.use_dora);
    let (mut base_vs, adapter_vs) =
        (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let emb = builder.embedding(&(base_vs.root() / "embed_tokens"), 20, 8, Default::default());
    let emb = emb.unwrap();
    let proj = builder.linear(&(base_vs.root() / "proj"), 8, 6, Default::default()).unwrap();
    let adapter = builder.finish().unwrap();
    base_vs.load(dir.join("base.safetensors")).unwrap();
    let io_t = tensors(&dir.join("io.safetensors"));
    let fwd = |ids: &Tensor| proj.forward_t(&emb.f_forward(ids).unwrap(), false);
    // before the magnitudes are initialised or loaded, the forward refuses
    assert!(emb.f_forward(&io_t["x"]).is_err());
    adapter.load_pretrained(&dir).unwrap();
    assert_eq!(adapter.embeddings()[0].magnitude().unwrap().size(), [8]);
    let y = fwd(&io_t["x"]);
    assert!(max_abs_diff(&y, &io_t["y"]) < 1e-5, "{}", max_abs_diff(&y, &io_t["y"]));
    {
        let _off = adapter.disable_adapters().unwrap();
        assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y_base"]) < 1e-6);
    }
    adapter.merge().unwrap();
    let vars = base_vs.variables();
    for name in ["embed_tokens.weight", "proj.weight", "proj.bias"] {
        let d = max_abs_diff(&vars[name], &io_t[&format!("merged.{name}")]);
        assert!(d < 1e-6, "merged {name}: {d}");
    }
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.unmerge().unwrap();
    let out = assert_saves_peft_file("dora_embedding", &adapter, &dir);
    std::fs::remove_dir_all(out).unwrap();

    // a fresh DoRA embedding starts at ‖W_:j‖ and equal to the base
    let (base2, vs2) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig { r: 2, use_dora: true, ..LoraConfig::for_targets(["embed_tokens"]) };
    let b2 = LoraBuilder::new(&vs2.root(), cfg).unwrap();
    let e2 = b2.embedding(&(base2.root() / "embed_tokens"), 20, 8, Default::default()).unwrap();
    let a2 = b2.finish().unwrap();
    a2.init_from_base_weights().unwrap();
    let w = e2.weight();
    let col = w.square().sum_dim_intlist(0, false, tch::Kind::Float).sqrt();
    assert!(max_abs_diff(a2.embeddings()[0].magnitude().unwrap(), &col) < 1e-6);
    let ids = Tensor::from_slice(&[0i64, 5, 19]);
    assert!(max_abs_diff(&e2.f_forward(&ids).unwrap(), &w.index_select(0, &ids)) < 1e-6);
}

/// `modules_to_save`: a trainable copy of each `up_proj` next to LoRA on `q_proj`/`v_proj`.
#[test]
fn peft_modules_to_save_linear_matches_outputs_merged_weights_and_files() {
    check_case(
        "modules_to_save",
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.up_proj",
        ],
    );
    let (_b, adapter_vs, model, adapter) = load_case("modules_to_save");
    assert!(matches!(model.layers[0][2], tch_peft::lora::MaybeLoraLinear::Copy { .. }));
    // the copies train, the base does not
    assert!(adapter_vs.variables()["model.layers.0.mlp.up_proj.weight"].requires_grad());
    assert_eq!(adapter.module_copies().len(), 2);
}

/// `modules_to_save` on an embedding table, LoRA on the projection after it.
#[test]
fn peft_modules_to_save_embedding_matches_outputs_merged_weights_and_files() {
    let dir = fixture("modules_to_save_embedding");
    let cfg = LoraConfig::from_pretrained(&dir).unwrap();
    let (mut base_vs, adapter_vs) =
        (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs.root(), cfg).unwrap();
    let emb = builder.embedding(&(base_vs.root() / "embed_tokens"), 20, 8, Default::default());
    let emb = emb.unwrap();
    let proj = builder.linear(&(base_vs.root() / "proj"), 8, 6, Default::default()).unwrap();
    let adapter = builder.finish().unwrap();
    base_vs.load(dir.join("base.safetensors")).unwrap();
    let io_t = tensors(&dir.join("io.safetensors"));
    let fwd = |ids: &Tensor| proj.forward_t(&emb.f_forward(ids).unwrap(), false);
    assert!(emb.f_forward(&io_t["x"]).is_err(), "the copy is not taken yet");
    adapter.load_pretrained(&dir).unwrap();
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    {
        let _off = adapter.disable_adapters().unwrap();
        assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y_base"]) < 1e-6);
    }
    let original = base_vs.variables()["embed_tokens.weight"].copy();
    adapter.merge().unwrap();
    let vars = base_vs.variables();
    for name in ["embed_tokens.weight", "proj.weight", "proj.bias"] {
        let d = max_abs_diff(&vars[name], &io_t[&format!("merged.{name}")]);
        assert!(d < 1e-6, "merged {name}: {d}");
    }
    assert!(max_abs_diff(&fwd(&io_t["x"]), &io_t["y"]) < 1e-5);
    adapter.unmerge().unwrap();
    assert!(bit_equal(&vars["embed_tokens.weight"], &original));
    let out = assert_saves_peft_file("modules_to_save_embedding", &adapter, &dir);
    std::fs::remove_dir_all(out).unwrap();

    // a module both copied and targeted by LoRA is refused; an entry matching nothing too
    let (b2, v2) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig {
        r: 2,
        modules_to_save: Some(vec!["proj".into()]),
        ..LoraConfig::for_targets(["proj"])
    };
    let other = LoraConfig { r: 2, ..LoraConfig::for_targets(["proj"]) };
    let builder = LoraBuilder::new(&v2.root(), cfg.clone())
        .unwrap()
        .with_adapter("second", &(v2.root() / "second"), other)
        .unwrap();
    let err = builder.linear(&(b2.root() / "proj"), 8, 6, Default::default()).unwrap_err();
    assert!(err.to_string().contains("copied in full"), "{err}");
    let cfg = LoraConfig {
        r: 2,
        modules_to_save: Some(vec!["head".into()]),
        ..LoraConfig::for_targets(["proj"])
    };
    let builder = LoraBuilder::new(&v2.root(), cfg).unwrap();
    let b3 = nn::VarStore::new(Device::Cpu);
    let _ = builder.linear(&(b3.root() / "proj"), 8, 6, Default::default()).unwrap();
    let err = builder.finish().unwrap_err();
    assert!(err.to_string().contains("head"), "{err}");
}
