//! Llama-family models from GGUF files (llama.cpp's format): the config from the file's
//! metadata, and the weights, dequantized, under transformers' names with llama.cpp's q/k row
//! permutation undone — what transformers' `from_pretrained(dir, gguf_file=…)` loads.
//!
//! ```text
//! token_embd.weight            model.embed_tokens.weight
//! blk.N.attn_norm.weight       model.layers.N.input_layernorm.weight
//! blk.N.attn_q/k/v.weight      model.layers.N.self_attn.q_proj/k_proj/v_proj.weight
//! blk.N.attn_output.weight     model.layers.N.self_attn.o_proj.weight
//! blk.N.ffn_norm.weight        model.layers.N.post_attention_layernorm.weight
//! blk.N.ffn_gate/up/down.weight  model.layers.N.mlp.gate_proj/up_proj/down_proj.weight
//! output_norm.weight           model.norm.weight
//! output.weight                lm_head.weight (absent: tied embeddings)
//! ```
//!
//! llama.cpp stores q and k with each head's two rotary halves interleaved: for `n` heads (k:
//! the key/value heads) of `2·d` rows, GGUF row `h·2d + 2i + j` is transformers' row
//! `h·2d + j·d + i`.

use tch::{nn, Tensor};

#[cfg(feature = "tokenizer")]
pub use super::gguf_tokenizer::GgufTokenizer;

use super::llama::{LlamaConfig, RopeParameters};
use crate::quant::gguf::{GgufFile, GgufValue};
use crate::quant::{Bnb4bitWeight, QuantLinear};
use crate::{Error, Result};

fn bad(file: &GgufFile, key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: format!("{key} (in {})", file.path().display()),
        reason: reason.into(),
    }
}

fn int(file: &GgufFile, key: &str) -> Result<Option<i64>> {
    match file.metadata().get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|v| i64::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| bad(file, key, format!("{v:?} is not a non-negative integer"))),
    }
}

fn float(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    match file.metadata().get(key) {
        None => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| bad(file, key, format!("{v:?} is not a number")))
        }
    }
}

/// The Llama config a GGUF file describes (`general.architecture` `llama`; transformers' GGUF
/// mapping of its `llama.*` keys), checked as any config ([`LlamaConfig::validate`]).
///
/// # Errors
/// `Unsupported` for another architecture or a rope scaling other than none; `InvalidConfig`
/// for a missing or malformed key.
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let arch = file.metadata().get("general.architecture").and_then(GgufValue::as_str);
    if arch != Some("llama") {
        return Err(Error::Unsupported {
            field: "general.architecture".into(),
            reason: format!("{arch:?}; Llama-family GGUF files (`llama`) are read"),
        });
    }
    if let Some(kind) = file.metadata().get("llama.rope.scaling.type") {
        if kind.as_str() != Some("none") {
            return Err(Error::Unsupported {
                field: "llama.rope.scaling.type".into(),
                reason: format!("{kind:?}; only unscaled RoPE is read"),
            });
        }
    }
    let need = |key: &str| int(file, key)?.ok_or_else(|| bad(file, key, "missing"));
    let hidden = need("llama.embedding_length")?;
    let heads = need("llama.attention.head_count")?;
    let kv = int(file, "llama.attention.head_count_kv")?;
    let embd =
        file.info("token_embd.weight").ok_or_else(|| bad(file, "token_embd.weight", "missing"))?;
    let vocab = match int(file, "llama.vocab_size")? {
        Some(v) => v,
        None => match file.metadata().get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(t)) => t.len() as i64,
            _ => embd.shape()[0],
        },
    };
    let head_dim =
        int(file, "llama.rope.dimension_count")?.filter(|&d| heads > 0 && d != hidden / heads);
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: need("llama.feed_forward_length")?,
        num_hidden_layers: need("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rms_norm_eps: float(file, "llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: None,
        rope_parameters: Some(RopeParameters {
            rope_theta: float(file, "llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_type: None,
        }),
        tie_word_embeddings: file.info("output.weight").is_none(),
        ..LlamaConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The transformers name of a llama.cpp tensor name (`None` for names a Llama does not have).
pub fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (digits, part) = rest.split_once('.')?;
            let n: u32 = digits.parse().ok()?;
            // one spelling per block (`blk.00` or `blk.+0` would alias `blk.0`)
            if n.to_string() != digits {
                return None;
            }
            let hf = match part {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("model.layers.{n}.{hf}")
        }
    })
}

/// llama.cpp's q/k rows back in transformers' order, for `heads` heads (see the module docs).
pub fn unpermute_rows(w: &Tensor, heads: i64) -> Result<Tensor> {
    let size = w.size();
    let rows = size[0];
    if heads <= 0 || rows % (2 * heads) != 0 {
        return Err(Error::ShapeMismatch {
            name: "q/k weight rows (two halves per head)".into(),
            expected: vec![2 * heads.max(1), -1],
            actual: size,
        });
    }
    let d = rows / heads / 2;
    let mut split = vec![heads, d, 2];
    split.extend_from_slice(&size[1..]);
    Ok(w.f_reshape(split.as_slice())?.f_transpose(1, 2)?.f_reshape(size.as_slice())?)
}

/// Loads a GGUF file's weights into the variables of a [`Llama`](super::Llama) built with
/// `config` in `vs` (every variable found with its shape, cast to its dtype; every tensor of
/// the file a variable), dequantized and q/k unpermuted.
///
/// ```no_run
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{nn, Device};
/// use tch_peft::models::{gguf, Llama};
/// use tch_peft::quant::gguf::GgufFile;
/// let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let cfg = gguf::llama_config(&file)?;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let model = Llama::new(&vs.root(), &cfg, None)?;
/// gguf::load_llama_weights(&vs, &file, &cfg)?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// `UnexpectedTensor` for a tensor a Llama does not have, `MissingTensor` for one the file
/// lacks, `ShapeMismatch` for a wrong shape, and the file's read errors.
pub fn load_llama_weights(vs: &nn::VarStore, file: &GgufFile, config: &LlamaConfig) -> Result<()> {
    load_llama_into(vs, file, config, &[])
}

/// Where a GGUF tensor goes: a variable, or a 4-bit layer (quantized on load).
enum Target<'a> {
    Var(tch::Tensor),
    Quant(&'a QuantLinear),
}

/// [`load_llama_weights`], with `quantized` (weight names and their 4-bit layers) taking the
/// tensors of those names, dequantized from the file and quantized into each layer's layout
/// on its device. Names, shapes and completeness are checked before anything is read.
pub(crate) fn load_llama_into(
    vs: &nn::VarStore,
    file: &GgufFile,
    config: &LlamaConfig,
    quantized: &[(String, &QuantLinear)],
) -> Result<()> {
    let vars = vs.variables();
    let layers: std::collections::BTreeMap<&str, &QuantLinear> =
        quantized.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    // names, shapes and completeness checked before the first tensor is read or written
    let mut targets = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for info in file.tensors() {
        let unexpected =
            || Error::UnexpectedTensor { name: info.name.clone(), file: file.path().into() };
        let name = hf_name(&info.name).ok_or_else(unexpected)?;
        let (target, shape) = match (vars.get(&name), layers.get(name.as_str())) {
            (Some(var), _) => (Target::Var(var.shallow_clone()), var.size()),
            (None, Some(l)) => (Target::Quant(l), vec![l.out_features(), l.in_features()]),
            (None, None) => return Err(unexpected()),
        };
        if shape != info.shape() {
            return Err(Error::ShapeMismatch {
                name: info.name.clone(),
                expected: shape,
                actual: info.shape(),
            });
        }
        if !seen.insert(name.clone()) {
            return Err(unexpected());
        }
        targets.push((info, name, target));
    }
    let wanted = vars.keys().map(String::as_str).chain(layers.keys().copied());
    if let Some(name) = wanted.filter(|n| !seen.contains(*n)).min() {
        return Err(Error::MissingTensor { name: name.into(), file: file.path().into() });
    }
    let read = |info: &crate::quant::gguf::GgufTensorInfo, name: &str| -> Result<Tensor> {
        let t = file.tensor(&info.name)?;
        if name.ends_with("q_proj.weight") {
            unpermute_rows(&t, config.num_attention_heads)
        } else if name.ends_with("k_proj.weight") {
            unpermute_rows(&t, config.kv_heads())
        } else {
            Ok(t)
        }
    };
    // the 4-bit layers' weights quantized first (half a byte a weight, so a failure there
    // writes nothing); then the variables streamed one by one, then the layers
    let mut quantized = Vec::new();
    for (info, name, target) in &targets {
        if let Target::Quant(layer) = target {
            let dest = layer.weight();
            let nested = dest.nested().is_some();
            let t = read(info, name)?.f_to_device(layer.device())?;
            let q = Bnb4bitWeight::quantize(&t, dest.quant_type(), dest.blocksize(), nested)?;
            quantized.push((*layer, name, q));
        }
    }
    for (info, name, target) in &targets {
        if let Target::Var(var) = target {
            let src = read(info, name)?.f_to_kind(var.kind())?;
            let mut dst = var.shallow_clone();
            tch::no_grad(|| dst.f_copy_(&src))?;
        }
    }
    for (layer, name, q) in quantized {
        layer.load(name, &q)?;
    }
    Ok(())
}
