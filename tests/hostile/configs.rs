//! Sizes a config declares are bounded before anything is allocated or iterated: PiSSA's
//! iterations, a Llama's vocabulary, heads and layers (also against the weight files' sizes),
//! and `peft_type` must name LoRA.

use crate::common::temp_dir;
use tch::{nn, Device, Kind, Tensor};
use tch_peft::lora::LoraConfig;
use tch_peft::models::{Llama, LlamaConfig};
use tch_peft::{io, Error};

#[test]
fn pissa_iterations_are_bounded() {
    let json = r#"{"r": 2, "lora_alpha": 4, "init_lora_weights": "pissa_niter_4000000000"}"#;
    let cfg: LoraConfig = serde_json::from_str(json).unwrap();
    let e = cfg.validate().unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field == "init_lora_weights"),
        "{e}"
    );
    let ok: LoraConfig =
        serde_json::from_str(r#"{"r": 2, "init_lora_weights": "pissa_niter_16"}"#).unwrap();
    ok.validate().unwrap();
}

#[test]
fn peft_type_must_be_the_string_lora() {
    let dir = temp_dir("hostile-peft-type");
    for (value, ok) in [("\"LORA\"", true), ("5", false), ("null", false), ("\"IA3\"", false)] {
        let text = format!(r#"{{"peft_type": {value}, "r": 2, "lora_alpha": 4}}"#);
        std::fs::write(dir.join("adapter_config.json"), text).unwrap();
        assert_eq!(LoraConfig::from_pretrained(&dir).is_ok(), ok, "peft_type {value}");
    }
}

fn small() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32,
        hidden_size: 8,
        intermediate_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        ..LlamaConfig::default()
    }
}

#[test]
fn llama_sizes_are_bounded_before_allocation() {
    let cases = [
        LlamaConfig { vocab_size: 1_000_000_000_000, ..small() },
        LlamaConfig { num_hidden_layers: 1_000_000_000, ..small() },
        LlamaConfig { num_attention_heads: 1 << 40, num_key_value_heads: Some(1), ..small() },
        LlamaConfig { head_dim: Some(1 << 40), ..small() },
        LlamaConfig { hidden_size: -8, ..small() },
        LlamaConfig { rms_norm_eps: f64::NAN, ..small() },
    ];
    for cfg in cases {
        assert!(cfg.validate().is_err(), "{cfg:?}");
        let vs = nn::VarStore::new(Device::Cpu);
        assert!(Llama::new(&vs.root(), &cfg, None).is_err());
        assert_eq!(vs.len(), 0);
    }
    // within the limits, but more parameters than the directory's weights hold
    let dir = temp_dir("hostile-llama-size");
    let big = LlamaConfig { vocab_size: 1 << 20, hidden_size: 4096, ..small() };
    big.validate().unwrap();
    big.save_pretrained(&dir).unwrap();
    let t = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    io::write_safetensors(dir.join("model.safetensors"), &[("w".into(), t)], None).unwrap();
    let e = LlamaConfig::from_pretrained(&dir).unwrap_err();
    assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
    // the tiny config reads fine from a directory without weights
    let dir = temp_dir("hostile-llama-config-only");
    small().save_pretrained(&dir).unwrap();
    assert_eq!(LlamaConfig::from_pretrained(&dir).unwrap(), small());
}

#[test]
fn an_integer_weight_is_a_dtype_mismatch_for_the_llama() {
    let dir = temp_dir("hostile-llama-int");
    let cfg = small();
    cfg.save_pretrained(&dir).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Llama::new(&vs.root(), &cfg, None).unwrap();
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| if n == "model.norm.weight" { (n, t.to_kind(Kind::Int64)) } else { (n, t) })
        .collect();
    io::write_safetensors(dir.join("model.safetensors"), &tensors, None).unwrap();
    let e = tch_peft::models::llama::load_weights(&vs, &dir, &cfg).unwrap_err();
    assert!(matches!(&e, Error::DtypeMismatch { name, .. } if name == "model.norm.weight"), "{e}");
}
