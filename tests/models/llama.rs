//! The reference Llama against transformers 5 on fixtures made by
//! `scripts/make_llama_fixtures.py`: logits (single and sharded checkpoints, GQA, tied
//! embeddings, left and right padding), and with a PEFT LoRA adapter, unmerged and merged.

use std::path::{Path, PathBuf};

use crate::common::*;
use tch::{nn, Device, Kind, Tensor};
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::models::llama::{load_weights, Llama, LlamaConfig};
use tch_peft::quant::{Bnb4bitConfig, Bnb4bitWeight, QuantType};
use tch_peft::{io, Error};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(name)
}

fn io_tensors(name: &str) -> std::collections::BTreeMap<String, Tensor> {
    io::read_safetensors(fixture(name).join("io.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .collect()
}

fn load(name: &str) -> (nn::VarStore, Llama) {
    let dir = fixture(name);
    let cfg = LlamaConfig::from_pretrained(&dir).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg, None).unwrap();
    load_weights(&vs, &dir, &cfg).unwrap();
    (vs, model)
}

/// Max |Δ| over the positions that are not padding.
fn diff_on_tokens(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let keep = mask.to_kind(Kind::Double).unsqueeze(-1);
    max_abs_diff(&(a.to_kind(Kind::Double) * &keep), &(b.to_kind(Kind::Double) * &keep))
}

#[test]
fn gqa_logits_match_transformers() {
    let (_vs, model) = load("gqa");
    let t = io_tensors("gqa");
    let logits = model.forward_t(&t["input_ids"], Some(&t["attention_mask"]), false).unwrap();
    assert_eq!(logits.size(), [3, 7, 128]);
    let d = diff_on_tokens(&logits, &t["logits"], &t["attention_mask"]);
    assert!(d < 1e-4, "max |Δ logits| on tokens = {d}");
    assert!(max_abs_diff(&logits, &t["logits"]) < 1e-4, "padded positions match too");
}

#[test]
fn sharded_tied_checkpoint_logits_match_transformers() {
    let (vs, model) = load("tied");
    assert!(!vs.variables().contains_key("lm_head.weight"), "tied: no separate lm_head");
    let t = io_tensors("tied");
    let logits = model.forward_t(&t["input_ids"], Some(&t["attention_mask"]), false).unwrap();
    let d = diff_on_tokens(&logits, &t["logits"], &t["attention_mask"]);
    assert!(d < 1e-4, "max |Δ logits| on tokens = {d}");
}

#[test]
fn peft_adapter_on_llama_matches_unmerged_and_merged() {
    let dir = fixture("gqa");
    let cfg = LlamaConfig::from_pretrained(&dir).unwrap();
    let lora_cfg = LoraConfig::from_pretrained(dir.join("adapter")).unwrap();
    let (base_vs, adapter_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs.root(), lora_cfg).unwrap();
    let model = Llama::new(&base_vs.root(), &cfg, Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    assert_eq!(adapter.layers().len(), 2 * 4);
    assert_eq!(adapter.embeddings().len(), 1, "embed_tokens is adapted too");
    assert_eq!(adapter.modules()[0], "model.embed_tokens");
    load_weights(&base_vs, &dir, &cfg).unwrap();
    adapter.load_pretrained(dir.join("adapter")).unwrap();
    let t = io_tensors("gqa");
    let (ids, mask) = (&t["input_ids"], &t["attention_mask"]);
    let unmerged = model.forward_t(ids, Some(mask), false).unwrap();
    assert!(diff_on_tokens(&unmerged, &t["logits_adapter"], mask) < 1e-4);
    assert!(diff_on_tokens(&unmerged, &t["logits"], mask) > 1e-3, "the adapter matters");
    let table = base_vs.variables()["model.embed_tokens.weight"].copy();
    adapter.merge().unwrap();
    let merged = model.forward_t(ids, Some(mask), false).unwrap();
    assert!(diff_on_tokens(&merged, &t["logits_adapter"], mask) < 1e-4);
    adapter.unmerge().unwrap();
    assert!(bit_equal(&base_vs.variables()["model.embed_tokens.weight"], &table));
    adapter.set_enabled(false).unwrap();
    let base = model.forward_t(ids, Some(mask), false).unwrap();
    assert!(diff_on_tokens(&base, &t["logits"], mask) < 1e-4);
}

#[test]
fn bad_inputs_and_mismatched_checkpoints_are_typed_errors() {
    let (_vs, model) = load("gqa");
    let ids = Tensor::from_slice(&[1i64, 2, 500]).view([1, 3]);
    let vocab = model.config().vocab_size;
    assert!(matches!(
        model.forward_t(&ids, None, false),
        Err(Error::TokenOutOfRange { input: "input_ids", vocab_size }) if vocab_size == vocab
    ));
    let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let mask = Tensor::ones([1, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(model.forward_t(&ids, Some(&mask), false), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        model.forward_t(&ids.to_kind(Kind::Float), None, false),
        Err(Error::ShapeMismatch { .. })
    ));
    // weights of the tied model do not fit the gqa config
    let cfg = LlamaConfig::from_pretrained(fixture("gqa")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Llama::new(&vs.root(), &cfg, None).unwrap();
    let err = load_weights(&vs, fixture("tied"), &cfg).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. } | Error::MissingTensor { .. }), "{err}");
}

#[test]
fn forward_from_embeddings_equals_forward_from_ids_and_checks_its_input() {
    let (_vs, model) = load("gqa");
    let t = io_tensors("gqa");
    let (ids, mask) = (&t["input_ids"], &t["attention_mask"]);
    let from_ids = model.forward_t(ids, Some(mask), false).unwrap();
    // the embeddings made trainable: gradients reach them through every block
    let emb = model.embed(ids).unwrap().detach().set_requires_grad(true);
    let from_embeds = model.forward_embeds(&emb, Some(mask), false, None).unwrap();
    assert_eq!(max_abs_diff(&from_ids, &from_embeds), 0.0);
    from_embeds.sum(Kind::Float).backward();
    assert!(emb.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let d = model.config().hidden_size;
    let wrong_width = Tensor::zeros([1, 3, d + 1], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.forward_embeds(&wrong_width, None, false, None),
        Err(Error::ShapeMismatch { .. })
    ));
    let wrong_kind = Tensor::zeros([1, 3, d], (Kind::Double, Device::Cpu));
    assert!(matches!(
        model.forward_embeds(&wrong_kind, None, false, None),
        Err(Error::DtypeMismatch { .. })
    ));
    let wrong_mask = Tensor::ones([1, 4], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        model.forward_embeds(&emb.narrow(0, 0, 1).narrow(1, 0, 3), Some(&wrong_mask), false, None),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn unpadded_fast_attention_path_equals_the_masked_path() {
    // no mask: SDPA's is_causal with native GQA; an all-ones mask: the additive-mask path
    let (_vs, model) = load("gqa");
    let ids = io_tensors("gqa")["input_ids"].shallow_clone();
    let ones = ids.ones_like();
    let fast = model.forward_t(&ids, None, false).unwrap();
    let masked = model.forward_t(&ids, Some(&ones), false).unwrap();
    let d = max_abs_diff(&fast, &masked);
    assert!(d < 1e-5, "max |Δ| = {d}");
    // one token: no causal mask at all
    let one = ids.narrow(1, 0, 1);
    let d1 = max_abs_diff(
        &model.forward_t(&one, None, false).unwrap(),
        &model.forward_t(&one, Some(&one.ones_like()), false).unwrap(),
    );
    assert!(d1 < 1e-5, "max |Δ| = {d1}");
}

/// transformers' causal-LM loss of `logits` [B, T, V] for `labels` [B, T]: positions 0..T−1
/// predict labels 1..T, the mean over labels that are not -100, in f64.
fn shifted_cross_entropy(logits: &Tensor, labels: &Tensor) -> f64 {
    let (b, t, v) = (logits.size()[0], logits.size()[1], logits.size()[2]);
    let lp = logits.narrow(1, 0, t - 1).to_kind(Kind::Double).log_softmax(-1, Kind::Double);
    let (mut sum, mut count) = (0.0, 0.0);
    for i in 0..b {
        for j in 0..t - 1 {
            let y = labels.int64_value(&[i, j + 1]);
            if y != -100 {
                assert!((0..v).contains(&y));
                sum -= lp.double_value(&[i, j, y]);
                count += 1.0;
            }
        }
    }
    sum / count
}

#[test]
fn causal_lm_loss_from_hidden_states_is_transformers_shifted_loss() {
    for name in ["gqa", "tied"] {
        let (_vs, model) = load(name);
        let t = io_tensors(name);
        let (ids, mask) = (&t["input_ids"], &t["attention_mask"]);
        // padding not predicted, as a user masks it
        let labels = ids.masked_fill(&mask.eq(0), -100);
        let hidden = model.hidden_states(ids, Some(mask), false, None).unwrap();
        let loss = model.causal_lm_loss(&hidden, &labels, false).unwrap().double_value(&[]);
        let want = shifted_cross_entropy(&t["logits"], &labels);
        assert!((loss - want).abs() < 1e-4 * want.abs().max(1.0), "{name}: {loss} vs {want}");
        // the logits of the same hidden states are forward_t's
        let logits = model.logits(&hidden, false).unwrap();
        let direct = model.forward_t(ids, Some(mask), false).unwrap();
        assert!(max_abs_diff(&logits, &direct) < 1e-6, "{name}");
    }
}

#[test]
fn config_defaults_are_transformers_and_save_pretrained_round_trips() {
    let d = LlamaConfig::default();
    assert_eq!((d.vocab_size, d.hidden_size, d.intermediate_size), (32_000, 4096, 11_008));
    assert_eq!((d.num_hidden_layers, d.num_attention_heads, d.kv_heads()), (32, 32, 32));
    assert_eq!((d.rms_norm_eps, d.theta(), d.tie_word_embeddings), (1e-6, 10_000.0, false));
    let cfg = LlamaConfig {
        vocab_size: 64,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        ..LlamaConfig::default()
    };
    let dir = temp_dir("llama-config");
    cfg.save_pretrained(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["model_type"], "llama");
    assert_eq!(json["architectures"][0], "LlamaForCausalLM");
    assert!(json.get("head_dim").is_none(), "unset options are left out: {text}");
    assert_eq!(LlamaConfig::from_pretrained(&dir).unwrap(), cfg);
    let bad = LlamaConfig { num_key_value_heads: Some(3), ..cfg };
    assert!(matches!(bad.save_pretrained(&dir), Err(Error::InvalidConfig { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

/// A small f32 Llama with LoRA on every linear layer, B non-zero.
fn lora_llama(dropout: f64) -> (nn::VarStore, nn::VarStore, Llama, LlamaConfig) {
    let cfg = LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        tie_word_embeddings: true,
        ..LlamaConfig::default()
    };
    tch::manual_seed(11);
    let (mut vs, va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: dropout,
        ..LoraConfig::for_targets(targets)
    };
    let builder = LoraBuilder::new(&va.root(), lora).unwrap();
    let model = Llama::new(&vs.root(), &cfg, Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    tch::no_grad(|| {
        for (name, t) in vs.variables() {
            if name.ends_with("norm.weight") {
                let _ = t.shallow_clone().uniform_(0.5, 1.5);
            } else {
                let _ = t.shallow_clone().normal_(0.0, 0.2);
            }
        }
        for l in adapter.layers() {
            let _ = l.lora_b().shallow_clone().normal_(0.0, 0.1);
        }
    });
    vs.freeze();
    (vs, va, model, cfg)
}

fn grads_of(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut g: Vec<_> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| {
            let g = t.grad().copy();
            let _ = t.grad().zero_();
            (n, g)
        })
        .collect();
    g.sort_by(|a, b| a.0.cmp(&b.0));
    g
}

#[test]
fn checkpointed_step_gives_the_ordinary_backwards_loss_and_gradients() {
    let (_vs, va, model, cfg) = lora_llama(0.0);
    let ids = Tensor::randint(cfg.vocab_size, [2, 7], (Kind::Int64, Device::Cpu));
    let mask = Tensor::from_slice2(&[[1i64, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]);
    let labels = ids.masked_fill(&mask.eq(0), -100);
    for mask in [None, Some(&mask)] {
        // ids: the adapters' gradients
        let h = model.hidden_states(&ids, mask, true, None).unwrap();
        let plain = model.causal_lm_loss(&h, &labels, true).unwrap();
        plain.backward();
        let want = grads_of(&va);
        let loss = model.causal_lm_backward_checkpointed(&ids, mask, &labels, None).unwrap();
        let got = grads_of(&va);
        assert!(!loss.requires_grad());
        assert!((loss.double_value(&[]) - plain.double_value(&[])).abs() < 1e-6);
        assert_eq!(got.len(), 2 * 7 * cfg.num_hidden_layers as usize);
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            assert!(w.abs().max().double_value(&[]) > 0.0, "{name}: no gradient");
            let rel = rel_diff(g, w);
            assert!(rel < 1e-5, "{name}: relative difference {rel} (mask {})", mask.is_some());
        }
        // embeddings that require grad: their gradient too (the frozen floor of the benches)
        let emb = model.embed(&ids).unwrap().detach().set_requires_grad(true);
        let h = model.hidden_states_embeds(&emb, mask, true, None).unwrap();
        model.causal_lm_loss(&h, &labels, true).unwrap().backward();
        let want_emb = emb.grad().copy();
        let _ = grads_of(&va);
        let emb2 = emb.detach().set_requires_grad(true);
        let _ = model.causal_lm_backward_checkpointed_embeds(&emb2, mask, &labels, None).unwrap();
        let rel = rel_diff(&emb2.grad(), &want_emb);
        assert!(rel < 1e-5, "embeddings' gradient: relative difference {rel}");
        let _ = grads_of(&va);
    }
    // wrong embeddings are the usual typed errors
    let bad = Tensor::zeros([2, 7, 5], (Kind::Float, Device::Cpu));
    let err = model.causal_lm_backward_checkpointed_embeds(&bad, None, &labels, None).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn checkpointed_step_refuses_lora_dropout_and_hooks_that_draw_random_numbers() {
    let (_vs, _va, model, cfg) = lora_llama(0.1);
    let ids = Tensor::randint(cfg.vocab_size, [1, 5], (Kind::Int64, Device::Cpu));
    let err = model.causal_lm_backward_checkpointed(&ids, None, &ids, None).unwrap_err();
    assert!(matches!(&err, Error::InvalidConfig { field, .. } if field == "lora_dropout"), "{err}");
    // a hook that does not say it is deterministic is refused; one that says so runs
    struct Identity(bool);
    impl tch_peft::models::ResidualHook for Identity {
        fn after_block(&self, _: i64, h: &Tensor, _: bool) -> tch_peft::Result<Tensor> {
            Ok(h.shallow_clone())
        }
        fn draws_random(&self, train: bool) -> bool {
            self.0 && train
        }
    }
    let (_vs, _va, model, _) = lora_llama(0.0);
    let err = model.causal_lm_backward_checkpointed(&ids, None, &ids, Some(&Identity(true)));
    assert!(matches!(&err, Err(Error::InvalidConfig { field, .. }) if field == "hook"), "{err:?}");
    assert!(model
        .causal_lm_backward_checkpointed(&ids, None, &ids, Some(&Identity(false)))
        .is_ok());
}

#[test]
fn a_gguf_llama_gives_transformers_logits_from_the_same_file() {
    // tests/fixtures/gguf/llama.gguf: llama.cpp's names, q/k permutation and Q8_0/Q4_0/Q4_1/
    // Q5_0/Q5_1 tensors; transformers' logits from the same file (scripts/make_gguf_fixtures.py)
    use tch_peft::models::gguf;
    use tch_peft::quant::gguf::GgufFile;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let file = GgufFile::open(dir.join("llama.gguf")).unwrap();
    let cfg = gguf::llama_config(&file).unwrap();
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.kv_heads()), (64, 2, 2));
    assert!(!cfg.tie_word_embeddings);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg, None).unwrap();
    gguf::load_llama_weights(&vs, &file, &cfg).unwrap();
    let io: std::collections::BTreeMap<String, Tensor> =
        io::read_safetensors(dir.join("llama-io.safetensors"))
            .unwrap()
            .tensors
            .into_iter()
            .collect();
    let logits = model.forward_t(&io["input_ids"], None, false).unwrap();
    let d = max_abs_diff(&logits, &io["logits"]);
    assert!(d < 5e-4, "max |Δ| {d}");
    // a 4-bit model from the same file: each block linear quantized on load (NF4, double
    // quantization) from the dequantized GGUF tensor, the rest as above
    let q = Bnb4bitConfig { compute_dtype: Kind::Float, ..Bnb4bitConfig::default() };
    let vs4 = nn::VarStore::new(Device::Cpu);
    let model4 = Llama::new(&vs4.root(), &cfg.clone().with_bnb_4bit(&q), None).unwrap();
    model4.load_gguf(&vs4, &file).unwrap();
    let float_vars = vs.variables();
    for (name, layer) in model4.quantized_layers() {
        let want = Bnb4bitWeight::quantize(&float_vars[&name], QuantType::Nf4, 64, true).unwrap();
        for ((k, a), (_, b)) in
            layer.weight().state(&name).unwrap().iter().zip(want.state(&name).unwrap())
        {
            assert!(bit_equal(a, &b), "`{k}`");
        }
        // the float model with that weight computes what the 4-bit one does
        tch::no_grad(|| float_vars[&name].shallow_clone().copy_(&want.dequantize().unwrap()));
    }
    let logits4 = model4.forward_t(&io["input_ids"], None, false).unwrap();
    let same = model.forward_t(&io["input_ids"], None, false).unwrap();
    assert!(max_abs_diff(&logits4, &same) < 1e-5);
    // a model of another shape is refused by name
    let other = LlamaConfig { intermediate_size: 96, ..cfg.clone() };
    let vs2 = nn::VarStore::new(Device::Cpu);
    let _m = Llama::new(&vs2.root(), &other, None).unwrap();
    assert!(matches!(
        gguf::load_llama_weights(&vs2, &file, &other),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(
        gguf::hf_name("blk.3.ffn_down.weight").as_deref(),
        Some("model.layers.3.mlp.down_proj.weight")
    );
    assert_eq!(gguf::hf_name("blk.x.ffn_down.weight"), None);
}

#[test]
fn a_bitsandbytes_4bit_checkpoint_and_its_peft_qlora_adapter_give_transformers_logits() {
    // tests/fixtures/bnb/llama-nf4: transformers' save_pretrained of a Llama loaded with
    // BitsAndBytesConfig(nf4, double quantization, f32 compute), its logits, and a PEFT LoRA
    // adapter trained on that 4-bit base with its logits (scripts/make_bnb_fixtures.py)
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb/llama-nf4");
    let cfg = LlamaConfig::from_pretrained(&dir).unwrap();
    assert_eq!(cfg.quantization().unwrap(), Some("bitsandbytes-4bit"));
    let t: std::collections::BTreeMap<String, Tensor> =
        io::read_safetensors(dir.join("io.safetensors")).unwrap().tensors.into_iter().collect();
    let ids = &t["input_ids"];
    // the base alone, kept 4-bit: no float variable for the quantized layers
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg, None).unwrap();
    assert_eq!(model.quantized_layers().len(), 2 * 7);
    assert!(vs.variables().keys().all(|k| !k.contains("_proj")));
    model.load_weights(&vs, &dir).unwrap();
    let base_logits = model.forward_t(ids, None, false).unwrap();
    let d = max_abs_diff(&base_logits, &t["logits"]);
    assert!(d < 1e-4, "4-bit base: max |Δ| {d}");
    // the same checkpoint dequantized into a float model
    let float_cfg = LlamaConfig { quantization_config: None, ..cfg.clone() };
    let vs_f = nn::VarStore::new(Device::Cpu);
    let float_model = Llama::new(&vs_f.root(), &float_cfg, None).unwrap();
    load_weights(&vs_f, &dir, &cfg).unwrap();
    let d = max_abs_diff(&float_model.forward_t(ids, None, false).unwrap(), &t["logits"]);
    assert!(d < 1e-4, "dequantized: max |Δ| {d}");
    // with PEFT's adapter, on the 4-bit base (QLoRA)
    let lora_cfg = LoraConfig::from_pretrained(dir.join("adapter")).unwrap();
    let (base_vs, adapter_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let builder = LoraBuilder::new(&adapter_vs.root(), lora_cfg.clone()).unwrap();
    let model = Llama::new(&base_vs.root(), &cfg, Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    model.load_weights(&base_vs, &dir).unwrap();
    adapter.load_pretrained(dir.join("adapter")).unwrap();
    let logits = model.forward_t(ids, None, false).unwrap();
    let d = max_abs_diff(&logits, &t["logits_adapter"]);
    assert!(d < 1e-4, "adapter: max |Δ| {d}");
    assert!(max_abs_diff(&logits, &t["logits"]) > 1e-3, "the adapter matters");
    // a training step on the 4-bit base gives the adapters the gradients they get on the
    // dequantized float base
    let (fb_vs, fa_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let fbuilder = LoraBuilder::new(&fa_vs.root(), lora_cfg).unwrap();
    let fmodel = Llama::new(&fb_vs.root(), &float_cfg, Some(&fbuilder)).unwrap();
    let fadapter = fbuilder.finish().unwrap();
    load_weights(&fb_vs, &dir, &cfg).unwrap();
    fadapter.load_pretrained(dir.join("adapter")).unwrap();
    for (m, vs) in [(&model, &adapter_vs), (&fmodel, &fa_vs)] {
        let h = m.hidden_states(ids, None, true, None).unwrap();
        m.causal_lm_loss(&h, ids, true).unwrap().backward();
        assert!(vs.trainable_variables().iter().all(|v| v.grad().defined()));
    }
    let (qv, fv) = (adapter_vs.variables(), fa_vs.variables());
    assert_eq!(qv.len(), fv.len());
    for (name, v) in &qv {
        let rel = rel_diff(&v.grad(), &fv[name].grad());
        assert!(rel < 1e-4, "`{name}`: gradient off by {rel}");
    }
    // the config is saved with its quantization_config; other methods are refused by name
    let out = temp_dir("llama-nf4-config");
    cfg.save_pretrained(&out).unwrap();
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(text.contains("quantization_config"), "{text}");
    let gptq = LlamaConfig {
        quantization_config: Some(serde_json::json!({"quant_method": "gptq", "bits": 4})),
        ..cfg.clone()
    };
    assert!(matches!(gptq.quantization(), Err(Error::Unsupported { .. })));
    assert!(matches!(Llama::new(&vs.root(), &gptq, None), Err(Error::Unsupported { .. })));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn reft_and_parameter_reports_on_a_4bit_llama_match_the_dequantized_float_model() {
    use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};
    use tch_peft::ParamReport;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb/llama-nf4");
    let cfg = LlamaConfig::from_pretrained(&dir).unwrap();
    let float_cfg = LlamaConfig { quantization_config: None, ..cfg.clone() };
    let ids = Tensor::from_slice(&[3i64, 9, 27, 1, 60, 8]).view([1, 6]);
    let mut grads = Vec::new();
    let mut totals = Vec::new();
    let mut first: Option<std::collections::HashMap<String, Tensor>> = None;
    for c in [&cfg, &float_cfg] {
        let mut base = nn::VarStore::new(Device::Cpu);
        let model = Llama::new(&base.root(), c, None).unwrap();
        model.load_weights(&base, &dir).unwrap();
        base.freeze();
        let reft_vs = nn::VarStore::new(Device::Cpu);
        let rc = ReftConfig::new(
            InterventionConfig::new(InterventionKind::LoReft, c.hidden_size, 4),
            ReftLayers::all(),
            "f2+l2".parse().unwrap(),
        );
        let reft = ReftModel::new(&reft_vs.root(), rc, c.num_hidden_layers).unwrap();
        let loc = reft.config().positions.batch_locations(&[6], &[0], true, Device::Cpu).unwrap();
        let hook = reft.hook(&loc);
        // the same interventions in both (other tests draw from the global RNG meanwhile)
        match &first {
            None => first = Some(reft_vs.variables()),
            Some(vars) => tch::no_grad(|| {
                for (k, v) in reft_vs.variables() {
                    v.shallow_clone().copy_(&vars[&k]);
                }
            }),
        }
        let logits = model.forward_hooked(&ids, None, true, Some(&hook)).unwrap();
        logits.square().sum(Kind::Float).backward();
        let mut g: Vec<(String, Tensor)> =
            reft_vs.variables().into_iter().map(|(k, v)| (k, v.grad())).collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        grads.push(g);
        let report = ParamReport::from_var_stores(&[&base, &reft_vs])
            .with_quantized(&model.quantized_layers());
        totals.push((report.trainable, report.total));
    }
    for ((name, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
        assert!(a.defined(), "`{name}` got no gradient on the 4-bit base");
        let rel = rel_diff(a, b);
        assert!(rel < 1e-4, "`{name}`: {rel}");
    }
    // PEFT's count: a 4-bit weight counts as its float size
    assert_eq!(totals[0], totals[1]);
    assert_eq!(totals[0].1 - totals[0].0, cfg.num_parameters().unwrap());
}

#[test]
fn quantize_on_load_gives_the_codes_transformers_saved_and_a_saved_4bit_model_reads_back() {
    // llama-src is the bf16 model that transformers quantized into llama-nf4
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb");
    let src_cfg = LlamaConfig::from_pretrained(root.join("llama-src")).unwrap();
    let q = Bnb4bitConfig { compute_dtype: Kind::Float, ..Bnb4bitConfig::default() };
    let cfg = src_cfg.clone().with_bnb_4bit(&q);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg, None).unwrap();
    model.load_weights(&vs, root.join("llama-src")).unwrap();
    let theirs: std::collections::BTreeMap<String, Tensor> =
        io::read_safetensors(root.join("llama-nf4/model.safetensors"))
            .unwrap()
            .tensors
            .into_iter()
            .collect();
    for (name, layer) in model.quantized_layers() {
        for (key, t) in layer.weight().state(&name).unwrap() {
            if !key.contains("quant_state") {
                assert!(bit_equal(&t, &theirs[&key]), "`{key}` differs from bitsandbytes'");
            }
        }
    }
    // memory: half a byte a weight, a byte per block of 64, 4 bytes per 256 blocks and the
    // two tables (16 and 256 f32) per layer: ≈ 4.13 bits a weight on large layers
    let want: i64 = model
        .quantized_layers()
        .iter()
        .map(|(_, l)| {
            let n = l.num_parameters();
            let blocks = (n + 63) / 64;
            n / 2 + blocks + (blocks + 255) / 256 * 4 + (16 + 256) * 4
        })
        .sum();
    assert_eq!(model.quantized_bytes() as i64, want);
    // saved in bitsandbytes' layout and read back: the same tensors, the same logits
    let out = temp_dir("llama-nf4-saved");
    model.save_pretrained(&vs, &out).unwrap();
    let saved: std::collections::BTreeMap<String, Tensor> =
        io::read_safetensors(out.join("model.safetensors")).unwrap().tensors.into_iter().collect();
    assert_eq!(
        saved.keys().filter(|k| !k.contains("quant_state")).collect::<Vec<_>>(),
        theirs.keys().filter(|k| !k.contains("quant_state")).collect::<Vec<_>>()
    );
    for (k, t) in &saved {
        if !k.contains("quant_state") && theirs[k].kind() == Kind::Uint8 {
            assert!(bit_equal(t, &theirs[k]), "`{k}`");
        }
    }
    let cfg2 = LlamaConfig::from_pretrained(&out).unwrap();
    assert_eq!(cfg2.bnb_4bit().unwrap().as_ref(), Some(&q));
    let vs2 = nn::VarStore::new(Device::Cpu);
    let model2 = Llama::new(&vs2.root(), &cfg2, None).unwrap();
    model2.load_weights(&vs2, &out).unwrap();
    let ids = Tensor::from_slice(&[1i64, 5, 9, 33, 2, 60]).view([1, 6]);
    let (a, b) =
        (model.forward_t(&ids, None, false).unwrap(), model2.forward_t(&ids, None, false).unwrap());
    assert!(a.equal(&b));
    // a layout the checkpoint does not have is refused by name, nothing written
    let fp4 = src_cfg.with_bnb_4bit(&Bnb4bitConfig { quant_type: QuantType::Fp4, ..q });
    let vs3 = nn::VarStore::new(Device::Cpu);
    let model3 = Llama::new(&vs3.root(), &fp4, None).unwrap();
    assert!(matches!(model3.load_weights(&vs3, &out), Err(Error::Quantization { .. })));
    std::fs::remove_dir_all(&out).ok();
}
