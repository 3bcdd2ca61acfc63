//! A Llama-family causal language model with Hugging Face `transformers` variable names, whose
//! linear layers are built through [`LoraBuilder`] so that any LoRA config applies to it.
//!
//! ```text
//! h = embed_tokens[input_ids]
//! for each layer:  h = h + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = input_layernorm(h)
//!                  h = h + down_proj(silu(gate_proj(m)) * up_proj(m))                         m = post_attention_layernorm(h)
//! logits = lm_head(norm(h))            (lm_head = embed_tokensᵀ with tie_word_embeddings)
//! ```
//!
//! RMSNorm computes in f32 and scales by its weight after casting back (as transformers);
//! RoPE uses the `rotate_half` convention with `inv_freq = rope_theta^(-2i/head_dim)`; attention
//! is libtorch's scaled-dot-product kernel with grouped-query heads repeated, a causal mask and a
//! key padding mask (masked scores get the dtype's lowest value, as transformers does, so fully
//! padded query rows stay finite).
//!
//! Variable names: `model.embed_tokens.weight`, `model.layers.N.input_layernorm.weight`,
//! `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}`,
//! `model.layers.N.post_attention_layernorm.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`,
//! `model.norm.weight`, `lm_head.weight` (absent when tied).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use super::{embed_checked, ResidualHook};
use crate::io;
use crate::lora::{self, LoraBuilder, MaybeLoraEmbedding, MaybeLoraLinear};
use crate::ops;
use crate::quant::{Bnb4bitConfig, Bnb4bitWeight, QuantLinear};
use crate::{Error, Result};

fn default_eps() -> f64 {
    1e-6
}

fn default_act() -> String {
    "silu".into()
}

/// `rope_parameters` of a transformers 5 config.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RopeParameters {
    /// RoPE base.
    pub rope_theta: f64,
    /// Only `"default"` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
}

/// The fields of a Hugging Face `LlamaConfig` (`config.json`) this model uses; other keys are
/// ignored when reading. [`Default`] holds transformers' `LlamaConfig()` defaults (Llama-2-7B's
/// shape); [`save_pretrained`](Self::save_pretrained) writes a `config.json` transformers loads.
///
/// ```
/// use tch_peft::models::LlamaConfig;
/// let cfg = LlamaConfig {
///     vocab_size: 128_256,
///     hidden_size: 2048,
///     intermediate_size: 8192,
///     num_hidden_layers: 16,
///     num_attention_heads: 32,
///     num_key_value_heads: Some(8),
///     tie_word_embeddings: true,
///     ..LlamaConfig::default()
/// };
/// assert_eq!(cfg.head_dim(), 64);
/// cfg.validate()?;
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Model width `d`.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// RMSNorm epsilon (default 1e-6).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base of transformers 4 configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE parameters of transformers 5 configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Only `"silu"` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// transformers' `quantization_config`, as read. With a bitsandbytes 4-bit one
    /// (`quant_method: "bitsandbytes"`, `load_in_4bit`; see [`Bnb4bitConfig`]) [`Llama::new`]
    /// builds 4-bit linear layers (QLoRA's base) and [`Llama::load_weights`] fills them from a
    /// 4-bit checkpoint or quantizes a float one on load; set it to `None` to build a float
    /// model, into which [`Llama::load_weights`] dequantizes a 4-bit checkpoint. Other methods
    /// are refused. Written by [`save_pretrained`](Self::save_pretrained) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

impl Default for LlamaConfig {
    /// transformers' `LlamaConfig()`: vocabulary 32000, width 4096, MLP 11008, 32 layers of 32
    /// heads, RMSNorm ε 1e-6, RoPE θ 10000, untied embeddings, no biases, SiLU.
    fn default() -> Self {
        LlamaConfig {
            vocab_size: 32_000,
            hidden_size: 4096,
            intermediate_size: 11_008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: default_eps(),
            rope_theta: Some(10_000.0),
            rope_parameters: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: default_act(),
            quantization_config: None,
        }
    }
}

impl LlamaConfig {
    /// Writes `dir/config.json` (atomically, creating `dir`) with these fields, `model_type:
    /// "llama"` and `architectures: ["LlamaForCausalLM"]`, so that transformers'
    /// `AutoModelForCausalLM.from_pretrained(dir)` builds the same model. Validates first.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut value = serde_json::to_value(self)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("model_type".into(), "llama".into());
            map.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        }
        let text = serde_json::to_string_pretty(&value)?;
        io::write_atomic(&dir.join("config.json"), text.as_bytes())
    }

    /// Reads `config.json` from a model directory (or the file itself) and validates it.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = io::read_config(&file)?;
        let cfg: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| Error::CorruptFile { file: file.clone(), reason: e.to_string() })?;
        cfg.validate()?;
        if path.is_dir() {
            // a 4-bit checkpoint holds half a byte per quantized weight
            let n = cfg.num_parameters()?;
            let n = if cfg.quantization()?.is_some() { n / 2 } else { n };
            super::check_against_weights(path, n, weight_files(path))?;
        }
        Ok(cfg)
    }

    /// The checkpoint's quantization: `None` for float weights, `Some("bitsandbytes-4bit")`
    /// for bitsandbytes' 4-bit layout.
    ///
    /// # Errors
    /// `Unsupported` for another `quantization_config` (8-bit, GPTQ, AWQ, …).
    pub fn quantization(&self) -> Result<Option<&'static str>> {
        Ok(self.bnb_4bit()?.map(|_| "bitsandbytes-4bit"))
    }

    /// The 4-bit layout of `quantization_config`, if set.
    ///
    /// # Errors
    /// `Unsupported` for a `quantization_config` other than bitsandbytes 4-bit.
    pub fn bnb_4bit(&self) -> Result<Option<Bnb4bitConfig>> {
        self.quantization_config.as_ref().map(Bnb4bitConfig::from_quantization_config).transpose()
    }

    /// This config with its linear layers quantized to 4 bits as `q` says (QLoRA; what
    /// transformers' `from_pretrained(…, quantization_config=BitsAndBytesConfig(…))` does).
    pub fn with_bnb_4bit(mut self, q: &Bnb4bitConfig) -> Self {
        self.quantization_config = Some(q.to_quantization_config());
        self
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE base (default 10000).
    pub fn theta(&self) -> f64 {
        self.rope_parameters.as_ref().map(|r| r.rope_theta).or(self.rope_theta).unwrap_or(10_000.0)
    }

    /// The number of parameters the config describes (embeddings, every block, the final
    /// norm, and `lm_head` when untied); an error past
    /// [`MAX_PARAMETERS`](super::MAX_PARAMETERS).
    pub fn num_parameters(&self) -> Result<i64> {
        let too_large = || {
            Error::config(
                "num_attention_heads",
                format!("the model has more than {} parameters", super::MAX_PARAMETERS),
            )
        };
        let (d, v, i) = (self.hidden_size, self.vocab_size, self.intermediate_size);
        let q = self.num_attention_heads.checked_mul(self.head_dim()).ok_or_else(too_large)?;
        let kv = self.kv_heads().checked_mul(self.head_dim()).ok_or_else(too_large)?;
        let attn_bias = if self.attention_bias {
            super::count_parameters(&[(q, 2), (kv, 2)]).ok_or_else(too_large)?
        } else {
            0
        };
        let mlp_bias = if self.mlp_bias {
            super::count_parameters(&[(i, 2), (d, 1)]).ok_or_else(too_large)?
        } else {
            0
        };
        let block = super::count_parameters(&[
            (d, 2),
            (d, q),
            (d, 2 * kv),
            (q, d),
            (d, 3 * i),
            (attn_bias, 1),
            (mlp_bias, 1),
        ]);
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        block
            .and_then(|b| {
                super::count_parameters(&[(b, self.num_hidden_layers), (v, heads * d), (d, 1)])
            })
            .ok_or_else(|| {
                Error::config(
                    "num_hidden_layers",
                    format!("the model has more than {} parameters", super::MAX_PARAMETERS),
                )
            })
    }

    /// Checks sizes (each within [`MAX_VOCAB`](super::MAX_VOCAB),
    /// [`MAX_WIDTH`](super::MAX_WIDTH) or [`MAX_COUNT`](super::MAX_COUNT), the whole within
    /// [`MAX_PARAMETERS`](super::MAX_PARAMETERS)) and the supported options.
    pub fn validate(&self) -> Result<()> {
        use super::{MAX_COUNT, MAX_VOCAB, MAX_WIDTH};
        for (field, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_COUNT),
            ("num_attention_heads", self.num_attention_heads, MAX_COUNT),
            ("num_key_value_heads", self.kv_heads(), MAX_COUNT),
            ("head_dim", self.head_dim(), MAX_COUNT),
        ] {
            super::check_size(field, v, max)?;
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(Error::config(
                "rms_norm_eps",
                format!("{} is not a finite number ≥ 0", self.rms_norm_eps),
            ));
        }
        if !(self.theta().is_finite() && self.theta() > 0.0) {
            return Err(Error::config(
                "rope_theta",
                format!("{} is not a finite number > 0", self.theta()),
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(Error::config("head_dim", "RoPE needs an even head_dim"));
        }
        self.num_parameters()?;
        if self.hidden_act != "silu" {
            return Err(Error::Unsupported {
                field: "hidden_act".into(),
                reason: format!("`{}` (only silu)", self.hidden_act),
            });
        }
        if let Some(t) = self.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if t != "default" {
                return Err(Error::Unsupported {
                    field: "rope_parameters.rope_type".into(),
                    reason: format!("`{t}` (only default RoPE)"),
                });
            }
        }
        Ok(())
    }
}

/// RMSNorm as transformers computes it: in f32, scaled after casting back.
#[derive(Debug)]
struct Block {
    input_layernorm: Tensor,
    q_proj: MaybeLoraLinear,
    k_proj: MaybeLoraLinear,
    v_proj: MaybeLoraLinear,
    o_proj: MaybeLoraLinear,
    post_attention_layernorm: Tensor,
    gate_proj: MaybeLoraLinear,
    up_proj: MaybeLoraLinear,
    down_proj: MaybeLoraLinear,
}

/// A Llama causal LM. See the [module docs](self).
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: MaybeLoraEmbedding,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<MaybeLoraLinear>,
}

impl Llama {
    /// Creates the variables under `p` (so `p` is usually a store's root) and the layers,
    /// adapting the linear layers that `lora` targets.
    ///
    /// With a 4-bit `quantization_config` ([`LlamaConfig::bnb_4bit`]) the quantized linear
    /// layers are [`QuantLinear`]s on `p`'s device, their codes outside the store (zero until
    /// [`load_weights`](Self::load_weights) fills them; their biases are variables), and the
    /// LoRA adapters `lora` puts on them train on the 4-bit base (QLoRA). The store's float
    /// variables may be cast (`set_kind`) as usual: the 4-bit layers compute in their input's
    /// dtype.
    pub fn new(p: &nn::Path, config: &LlamaConfig, lora: Option<&LoraBuilder>) -> Result<Self> {
        config.validate()?;
        let quant = config.bnb_4bit()?;
        if let Some(q) = quant.as_ref().filter(|q| q.blocksize != 64) {
            return Err(Error::Unsupported {
                field: "Bnb4bitConfig::blocksize".into(),
                reason: format!(
                    "{}: transformers' quantization_config has no block size and bitsandbytes \
                     quantizes its models in blocks of 64",
                    q.blocksize
                ),
            });
        }
        let c = config;
        let (d, hd) = (c.hidden_size, c.head_dim());
        let m = p / "model";
        let embed_tokens =
            lora::embedding(&(&m / "embed_tokens"), c.vocab_size, d, Default::default(), lora)?;
        let attn_cfg = nn::LinearConfig { bias: c.attention_bias, ..Default::default() };
        let mlp_cfg = nn::LinearConfig { bias: c.mlp_bias, ..Default::default() };
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let l = &m / "layers" / i;
            let a = &l / "self_attn";
            let mlp = &l / "mlp";
            let lin = |path: nn::Path, i: i64, o: i64, lc: nn::LinearConfig| match &quant {
                Some(q) if q.quantizes(&lora::path_name(&path)) => {
                    quant_linear(&path, i, o, lc.bias, q, lora)
                }
                _ => lora::linear(&path, i, o, lc, lora),
            };
            layers.push(Block {
                input_layernorm: (&l / "input_layernorm").f_ones("weight", &[d])?,
                q_proj: lin(&a / "q_proj", d, c.num_attention_heads * hd, attn_cfg)?,
                k_proj: lin(&a / "k_proj", d, c.kv_heads() * hd, attn_cfg)?,
                v_proj: lin(&a / "v_proj", d, c.kv_heads() * hd, attn_cfg)?,
                o_proj: lin(&a / "o_proj", c.num_attention_heads * hd, d, attn_cfg)?,
                post_attention_layernorm: (&l / "post_attention_layernorm")
                    .f_ones("weight", &[d])?,
                gate_proj: lin(&mlp / "gate_proj", d, c.intermediate_size, mlp_cfg)?,
                up_proj: lin(&mlp / "up_proj", d, c.intermediate_size, mlp_cfg)?,
                down_proj: lin(&mlp / "down_proj", c.intermediate_size, d, mlp_cfg)?,
            });
        }
        let norm = (&m / "norm").f_ones("weight", &[d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
            let head = p / "lm_head";
            Some(match &quant {
                Some(q) if q.quantizes("lm_head") => {
                    quant_linear(&head, d, c.vocab_size, false, q, lora)?
                }
                _ => lora::linear(&head, d, c.vocab_size, no_bias, lora)?,
            })
        };
        Ok(Llama { config: config.clone(), embed_tokens, layers, norm, lm_head })
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Every linear layer with its module name (`model.layers.0.self_attn.q_proj`, …,
    /// `lm_head`).
    pub fn linear_layers(&self) -> Vec<(String, &MaybeLoraLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.layers.iter().enumerate() {
            let l = format!("model.layers.{i}");
            for (name, layer) in [
                ("self_attn.q_proj", &b.q_proj),
                ("self_attn.k_proj", &b.k_proj),
                ("self_attn.v_proj", &b.v_proj),
                ("self_attn.o_proj", &b.o_proj),
                ("mlp.gate_proj", &b.gate_proj),
                ("mlp.up_proj", &b.up_proj),
                ("mlp.down_proj", &b.down_proj),
            ] {
                out.push((format!("{l}.{name}"), layer));
            }
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head".into(), h));
        }
        out
    }

    /// The 4-bit linear layers with their weights' names (`….q_proj.weight`).
    pub fn quantized_layers(&self) -> Vec<(String, &QuantLinear)> {
        self.linear_layers()
            .into_iter()
            .filter_map(|(n, l)| l.quantized_base().map(|q| (format!("{n}.weight"), q)))
            .collect()
    }

    /// Bytes the 4-bit layers' weights hold (codes, absmax, tables).
    pub fn quantized_bytes(&self) -> u64 {
        self.quantized_layers().iter().map(|(_, q)| q.storage_bytes()).sum()
    }

    /// Writes the model as a Hugging Face directory that transformers loads
    /// (`AutoModelForCausalLM.from_pretrained(dir)`, with bitsandbytes installed for a 4-bit
    /// model): `config.json` (with the `quantization_config` of a 4-bit model) and
    /// `model.safetensors` with the variables of `vs` (the store the model was built in) and each
    /// 4-bit layer's weight in bitsandbytes' layout ([`Bnb4bitWeight::state`]). The directory is
    /// replaced as a whole (the old files or the new, never a mix); other files in it are kept.
    pub fn save_pretrained(&self, vs: &nn::VarStore, dir: impl AsRef<Path>) -> Result<()> {
        self.config.validate()?;
        let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        for (name, layer) in self.quantized_layers() {
            tensors.extend(layer.weight().state(&name)?);
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let owns = |n: &str| n == "config.json" || n == "model.safetensors";
        io::replace_dir(dir.as_ref(), &owns, |tmp| {
            self.config.save_pretrained(tmp)?;
            io::write_safetensors(tmp.join("model.safetensors"), &tensors, Some(io::pt_metadata()))
        })
    }

    /// Loads a llama.cpp GGUF file into this model (built with
    /// [`gguf::llama_config`](super::gguf::llama_config)'s config): the variables of `vs` as
    /// [`gguf::load_llama_weights`](super::gguf::load_llama_weights) loads them, and for a model
    /// built with a 4-bit `quantization_config` each 4-bit layer's weight dequantized from the
    /// file and quantized into the layer's layout (GGUF's own block formats are not kept: a
    /// Q4_K weight becomes NF4, rounded twice). Everything is read and formed before anything
    /// is written.
    pub fn load_gguf(&self, vs: &nn::VarStore, file: &crate::quant::gguf::GgufFile) -> Result<()> {
        super::gguf::load_llama_into(vs, file, &self.config, &self.quantized_layers())
    }

    /// Loads a Hugging Face Llama directory into this model: the variables of `vs` (the store
    /// the model was built in) as [`load_weights`] loads them, and the 4-bit layers' weights —
    /// from a bitsandbytes 4-bit checkpoint as they are (every part checked, the layout the
    /// layer's), or quantized on load from a float checkpoint exactly as bitsandbytes
    /// quantizes (on the layer's device). Everything is read and checked before anything is
    /// written.
    pub fn load_weights(&self, vs: &nn::VarStore, dir: impl AsRef<Path>) -> Result<()> {
        // a 4-bit checkpoint into a float model dequantizes, whatever the model's config says
        let quantized = self.quantized_layers();
        let files = weight_files(&dir)?;
        let tied = self.config.tie_word_embeddings;
        let ignore = |name: &str| {
            name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
        };
        load_checkpoint(vs, &files, ignore, &quantized)
    }

    /// Logits `[batch, seq, vocab]` for `input_ids: [batch, seq]` (i64). `attention_mask`
    /// (`[batch, seq]`, 1 = token, 0 = padding) masks padded keys; positions run `0..seq` in every
    /// row, as transformers' forward without `position_ids`.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_hooked(input_ids, attention_mask, train, None)
    }

    /// As [`forward_t`](Self::forward_t), calling `hook` on the residual stream after every
    /// decoder block it edits ([`ResidualHook::edits_block`]; `hidden: [batch, seq, hidden]`,
    /// block index from 0) and continuing with what it returns: where ReFT interventions attach
    /// (see [`ReftModel::hook`](crate::reft::ReftModel::hook)).
    pub fn forward_hooked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask, train, hook)?;
        self.logits(&h, train)
    }

    /// The final norm's output `[batch, seq, hidden]` (what the head reads), as
    /// [`forward_hooked`](Self::forward_hooked) forms it before the head: with
    /// [`causal_lm_loss`](Self::causal_lm_loss) a training step never holds the logits.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        let (b, s, h) =
            embed_checked(&self.embed_tokens, input_ids, attention_mask, self.config.vocab_size)?;
        self.decode(b, s, h, attention_mask, train, hook)
    }

    /// The logits `[batch, seq, vocab]` of final hidden states ([`hidden_states`](Self::hidden_states)).
    pub fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(head) => head.f_forward_t(hidden, train)?,
            None => hidden.f_matmul(&self.embed_tokens.weight().f_tr()?)?,
        })
    }

    /// The causal-LM loss of final hidden states `[batch, seq, hidden]` against `labels`
    /// `[batch, seq]` (int64; usually the input ids, `-100` where a token is not predicted), as
    /// transformers' `LlamaForCausalLM(labels=…)`: position `t` predicts label `t + 1`, the mean
    /// over labels not ignored, the logits in f32. Through
    /// [`ops::causal_lm_loss`](crate::ops::causal_lm_loss()), which never holds the
    /// `[tokens, vocab]` logits, where the head is a plain (or tied) weight; a head with LoRA
    /// adapters or trainable copies goes through its own forward and the full logits.
    pub fn causal_lm_loss(&self, hidden: &Tensor, labels: &Tensor, train: bool) -> Result<Tensor> {
        let opts = ops::LinearCrossEntropy::default();
        let (weight, bias) = match &self.lm_head {
            None => (self.embed_tokens.weight().shallow_clone(), None),
            Some(MaybeLoraLinear::Plain(crate::lora::LinearBase::Dense(l))) => {
                (l.ws.shallow_clone(), l.bs.as_ref())
            }
            Some(head) => {
                // the head's own forward and the loss of its full logits
                let logits = head.f_forward_t(hidden, train)?;
                let v = self.config.vocab_size;
                let labels = ops::shifted_labels(labels, hidden.size()[..2].to_vec(), &opts)?;
                return Ok(logits
                    .f_reshape([-1, v])?
                    .f_to_kind(Kind::Float)?
                    .f_cross_entropy_loss::<Tensor>(
                        &labels,
                        None,
                        tch::Reduction::Mean,
                        opts.ignore_index,
                        0.0,
                    )?);
            }
        };
        ops::causal_lm_loss(hidden, &weight, bias, labels, &opts)
    }

    /// The token embeddings `[batch, seq, hidden]` of `input_ids: [batch, seq]` (checked as in
    /// [`forward_t`](Self::forward_t)).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(embed_checked(&self.embed_tokens, input_ids, None, self.config.vocab_size)?.2)
    }

    /// As [`forward_hooked`](Self::forward_hooked) from embeddings rather than ids
    /// (transformers' `inputs_embeds`): `inputs_embeds: [batch, seq, hidden]` in the model's
    /// dtype. With `inputs_embeds` requiring grad, the backward runs through every block even
    /// when nothing in the model trains (transformers' `enable_input_require_grads`).
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        let h = self.hidden_states_embeds(inputs_embeds, attention_mask, train, hook)?;
        self.logits(&h, train)
    }

    /// As [`hidden_states`](Self::hidden_states) from embeddings (see
    /// [`forward_embeds`](Self::forward_embeds)).
    pub fn hidden_states_embeds(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        self.check_embeds(inputs_embeds)?;
        let size = inputs_embeds.size();
        let (b, s) = (size[0], size[1]);
        super::check_mask(attention_mask, b, s)?;
        self.decode(b, s, inputs_embeds.shallow_clone(), attention_mask, train, hook)
    }

    /// `inputs_embeds` is `[batch, seq, hidden]` in the model's dtype and on its device.
    fn check_embeds(&self, inputs_embeds: &Tensor) -> Result<()> {
        let size = inputs_embeds.size();
        let d = self.config.hidden_size;
        let weight = self.embed_tokens.weight();
        if size.len() != 3 || size[2] != d {
            return Err(Error::ShapeMismatch {
                name: "inputs_embeds".into(),
                expected: vec![-1, -1, d],
                actual: size,
            });
        }
        if inputs_embeds.kind() != weight.kind() {
            return Err(Error::DtypeMismatch {
                name: "inputs_embeds".into(),
                expected: format!("{:?}, the model's dtype", weight.kind()),
                actual: inputs_embeds.kind(),
            });
        }
        if inputs_embeds.device() != weight.device() {
            return Err(Error::DeviceMismatch {
                name: "inputs_embeds".into(),
                expected: weight.device(),
                actual: inputs_embeds.device(),
            });
        }
        Ok(())
    }

    fn decode(
        &self,
        b: i64,
        s: i64,
        mut h: Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        let ctx = self.decode_context(b, s, attention_mask)?;
        // The pre-norm residual stream: each residual add is fused into the norm after it
        // (`add_rms_norm`), except after a block a hook edits. `pending` is the MLP output not
        // yet added to `h`.
        let mut pending: Option<Tensor> = None;
        for i in 0..self.layers.len() {
            (h, pending) = self.block(i, &h, pending, &ctx, train, hook)?;
        }
        Ok(self.norm_of(&h, pending, &self.norm)?.1.into_tensor())
    }

    /// What every block of a forward shares: the RoPE tables and the padding mask.
    fn decode_context(
        &self,
        b: i64,
        s: i64,
        attention_mask: Option<&Tensor>,
    ) -> Result<DecodeContext> {
        let c = &self.config;
        let device = self.embed_tokens.weight().device();
        let kind = self.embed_tokens.weight().kind();
        // RoPE tables in f32, cast to the activations' dtype (as transformers)
        let (cos, sin) = ops::rotary_tables(s, c.head_dim(), c.theta(), kind, device)?;

        // Without padding, causal attention needs no mask tensor: SDPA's `is_causal` with native
        // grouped-query heads (`enable_gqa`) runs the flash kernel on CUDA, as transformers' sdpa
        // path does. With padding: an additive mask [b, 1, s, s] (lowest value where j > i or key
        // j is padding) and K/V repeated per query head.
        let mask = match attention_mask {
            None => None,
            Some(m) => {
                let lowest = match kind {
                    Kind::Half => -65504.0,
                    Kind::BFloat16 => -3.3895313892515355e38,
                    Kind::Double => f64::MIN,
                    _ => f32::MIN as f64,
                };
                let idx = Tensor::arange(s, (Kind::Int64, device));
                let blocked = idx.unsqueeze(0).gt_tensor(&idx.unsqueeze(1)).view([1, 1, s, s]);
                let pad = m.to_device(device).eq(0).view([b, 1, 1, s]);
                let blocked = blocked.logical_or(&pad);
                Some(Tensor::zeros([1], (kind, device)).masked_fill(&blocked, lowest))
            }
        };
        Ok(DecodeContext { b, s, cos, sin, mask })
    }

    /// `h + pending` (where a block's MLP output is still to be added) and the norm of that
    /// sum, as a [`Recomputable`](ops::Recomputable): the LoRA nodes it feeds replay it.
    fn norm_of(
        &self,
        h: &Tensor,
        pending: Option<Tensor>,
        w: &Tensor,
    ) -> Result<(Tensor, ops::Recomputable)> {
        let eps = self.config.rms_norm_eps;
        match pending {
            Some(d) => ops::add_rms_norm_recomputable(h, &d, w, eps),
            None => Ok((h.shallow_clone(), ops::rms_norm_recomputable(h, w, eps)?)),
        }
    }

    /// Block `i` on the residual stream `h` + `pending`: the stream after the block's attention
    /// residual and the block's MLP output not yet added to it, or (after a block the hook
    /// edits) the edited stream and `None`.
    fn block(
        &self,
        i: usize,
        h: &Tensor,
        pending: Option<Tensor>,
        ctx: &DecodeContext,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let l = &self.layers[i];
        let (b, s) = (ctx.b, ctx.s);
        let (heads, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let (h, n) = self.norm_of(h, pending, &l.input_layernorm)?;
        // one node for the three projections of `n` where they are LoRA layers; the norm's and
        // SwiGLU's outputs feed the LoRA nodes as `Recomputable`s, replayed in the backward
        let qkv = lora::forward_recomputable(&[&l.q_proj, &l.k_proj, &l.v_proj], &n, train)?;
        drop(n);
        // rotated in the projections' layout [b, s, heads, hd], then heads first for SDPA
        let (q, k) = ops::apply_rotary(
            &qkv[0].view([b, s, heads, hd]),
            Some(&qkv[1].view([b, s, kv, hd])),
            &ctx.cos,
            &ctx.sin,
        )?;
        let q = q.transpose(1, 2);
        let Some(k) = k else {
            return Err(Error::config("num_key_value_heads", "k came back unrotated"));
        };
        let k = k.transpose(1, 2);
        let v = qkv[2].view([b, s, kv, hd]).transpose(1, 2);
        let scale = 1.0 / (hd as f64).sqrt();
        let attn = match &ctx.mask {
            None => Tensor::f_scaled_dot_product_attention::<Tensor>(
                &q,
                &k,
                &v,
                None,
                0.0,
                s > 1,
                scale,
                kv != heads,
            )?,
            Some(mask) => {
                let (k, v) = if kv == heads {
                    (k, v)
                } else {
                    let rep = heads / kv;
                    (
                        k.repeat_interleave_self_int(rep, 1, None),
                        v.repeat_interleave_self_int(rep, 1, None),
                    )
                };
                Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    Some(mask),
                    0.0,
                    false,
                    scale,
                    false,
                )?
            }
        };
        let attn = attn.transpose(1, 2).reshape([b, s, heads * hd]);
        let o = l.o_proj.f_forward_t(&attn, train)?;
        let (h, m) = self.norm_of(&h, Some(o), &l.post_attention_layernorm)?;
        let gate_up = lora::forward_recomputable(&[&l.gate_proj, &l.up_proj], &m, train)?;
        drop(m);
        let gated = ops::swiglu_recomputable(&gate_up[0], &gate_up[1])?;
        let d = lora::forward_recomputable(&[&l.down_proj], &gated, train)?.remove(0);
        Ok(match hook {
            Some(hook) if hook.edits_block(i as i64) => {
                (hook.after_block(i as i64, &h.f_add(&d)?, train)?, None)
            }
            _ => (h, Some(d)),
        })
    }

    /// A training step's forward and backward of [`causal_lm_loss`](Self::causal_lm_loss)
    /// with activation checkpointing per decoder block
    /// ([`checkpoint::backward_checkpointed`](crate::checkpoint::backward_checkpointed)): only
    /// each block's input `[batch, seq, hidden]` is kept from the forward, and each block is run
    /// again when its gradient is due. Gradients accumulate into `.grad` as `loss.backward()`
    /// would accumulate them; returns the loss, detached. Costs one more forward of every block;
    /// saves all their activations but one block's (figures in `docs/PERFORMANCE.md`).
    ///
    /// # Errors
    /// Those of [`hidden_states`](Self::hidden_states), and `InvalidConfig` where a LoRA layer
    /// draws dropout in training or the hook draws random numbers
    /// ([`ResidualHook::draws_random`]): the recomputation would draw another mask.
    pub fn causal_lm_backward_checkpointed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        let (b, s, h) =
            embed_checked(&self.embed_tokens, input_ids, attention_mask, self.config.vocab_size)?;
        self.checkpointed(b, s, &h, attention_mask, labels, hook)
    }

    /// As [`causal_lm_backward_checkpointed`](Self::causal_lm_backward_checkpointed) from
    /// embeddings (checked as in [`hidden_states_embeds`](Self::hidden_states_embeds)); their
    /// gradient reaches `inputs_embeds` where it requires grad.
    pub fn causal_lm_backward_checkpointed_embeds(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        self.check_embeds(inputs_embeds)?;
        let size = inputs_embeds.size();
        super::check_mask(attention_mask, size[0], size[1])?;
        self.checkpointed(size[0], size[1], inputs_embeds, attention_mask, labels, hook)
    }

    fn checkpointed(
        &self,
        b: i64,
        s: i64,
        h: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        for (i, l) in self.layers.iter().enumerate() {
            let linears = [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ];
            if linears.iter().any(|m| m.draws_dropout(true)) {
                return Err(Error::config(
                    "lora_dropout",
                    format!(
                        "block {i} draws LoRA dropout in training; a checkpointed step \
                         recomputes each block and needs it deterministic (set lora_dropout to 0)"
                    ),
                ));
            }
        }
        if hook.is_some_and(|h| h.draws_random(true)) {
            return Err(Error::config(
                "hook",
                "the residual hook draws random numbers in training (dropout); a checkpointed \
                 step recomputes each block and needs it deterministic",
            ));
        }
        let ctx = self.decode_context(b, s, attention_mask)?;
        let blocks: Vec<Box<crate::checkpoint::Segment<'_>>> = (0..self.layers.len())
            .map(|i| {
                let ctx = &ctx;
                Box::new(move |x: &Tensor| -> Result<Tensor> {
                    let (h, pending) = self.block(i, x, None, ctx, true, hook)?;
                    Ok(match pending {
                        Some(d) => h.f_add(&d)?,
                        None => h,
                    })
                }) as Box<crate::checkpoint::Segment<'_>>
            })
            .collect();
        let segments: Vec<&crate::checkpoint::Segment<'_>> = blocks.iter().map(|b| &**b).collect();
        let loss = |x: &Tensor| {
            let n = self.norm_of(x, None, &self.norm)?.1.into_tensor();
            self.causal_lm_loss(&n, labels, true)
        };
        crate::checkpoint::backward_checkpointed(h, &segments, &loss)
    }
}

/// See [`Llama::decode_context`].
struct DecodeContext {
    b: i64,
    s: i64,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

impl ModuleT for Llama {
    /// Logits for `input_ids` without a padding mask.
    ///
    /// # Panics
    /// On input that [`Llama::forward_t`] refuses, with its error's message.
    fn forward_t(&self, input_ids: &Tensor, train: bool) -> Tensor {
        match Llama::forward_t(self, input_ids, None, train) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }
}

/// The safetensors files of a Hugging Face model directory: `model.safetensors`, or the shards
/// listed in `model.safetensors.index.json`.
pub fn weight_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = io::read_config(&index)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::CorruptFile { file: index.clone(), reason: e.to_string() })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        Error::CorruptFile { file: index.clone(), reason: "no `weight_map` object".into() }
    })?;
    let mut files = Vec::with_capacity(map.len());
    for (tensor, v) in map {
        let f = v.as_str().ok_or_else(|| Error::CorruptFile {
            file: index.clone(),
            reason: format!("the shard of `{tensor}` is not a file name"),
        })?;
        files.push(io::join_inside(dir, f, &index)?);
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Loads a Hugging Face Llama directory's weights (single or sharded safetensors) into `vs`,
/// strictly: every variable must be found with its shape, and every tensor of the files must
/// be a variable (except `rotary_emb.inv_freq` buffers, and `lm_head.weight` when tied).
///
/// A bitsandbytes 4-bit checkpoint ([`LlamaConfig::quantization`]) loads with each quantized
/// weight ([`Bnb4bitWeight`], its state checked) dequantized into its variable's dtype; every
/// part of the state must belong to a variable. A model built with a 4-bit
/// `quantization_config` holds its 4-bit layers outside `vs`: load it with
/// [`Llama::load_weights`].
pub fn load_weights(vs: &nn::VarStore, dir: impl AsRef<Path>, config: &LlamaConfig) -> Result<()> {
    let files = weight_files(&dir)?;
    let tied = config.tie_word_embeddings;
    let ignore =
        |name: &str| name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight");
    if config.quantization()?.is_none() {
        return io::load_into_var_store(vs, &files, ignore);
    }
    load_checkpoint(vs, &files, ignore, &[])
}

/// [`load_weights`] of a bitsandbytes 4-bit checkpoint, or of any checkpoint into a model with
/// 4-bit layers (`quantized`: the layers and their weights' names).
fn load_checkpoint(
    vs: &nn::VarStore,
    files: &[PathBuf],
    ignore: impl Fn(&str) -> bool,
    quantized: &[(String, &QuantLinear)],
) -> Result<()> {
    let mut all = std::collections::BTreeMap::new();
    for file in files {
        for (name, t) in io::read_safetensors(file)?.tensors {
            if all.insert(name.clone(), (t, file.clone())).is_some() {
                return Err(Error::CorruptFile {
                    file: file.clone(),
                    reason: format!("tensor `{name}` appears in more than one file"),
                });
            }
        }
    }
    let lookup = |k: &str| all.get(k).map(|(t, _)| t.shallow_clone());
    let first = files.first().cloned().unwrap_or_default();
    let mut used = std::collections::BTreeSet::new();
    // every value formed and checked before any variable or layer is written
    let mut layer_values = Vec::new();
    for (name, layer) in quantized {
        let dest = layer.weight();
        let w = if Bnb4bitWeight::is_quantized(name, &lookup) {
            let prefix = format!("{name}.");
            used.extend(all.keys().filter(|k| k.starts_with(&prefix)).cloned());
            Bnb4bitWeight::from_state(name, &lookup)?
        } else {
            let Some((t, _)) = all.get(name) else {
                return Err(Error::MissingTensor { name: name.clone(), file: first });
            };
            if t.size() != dest.shape() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: dest.shape().to_vec(),
                    actual: t.size(),
                });
            }
            // quantize on load, where the layer lives
            let t = t.f_to_device(layer.device())?;
            let nested = dest.nested().is_some();
            Bnb4bitWeight::quantize(&t, dest.quant_type(), dest.blocksize(), nested)?
        };
        if !dest.same_layout(&w) {
            return Err(Error::Quantization {
                name: name.clone(),
                reason: format!(
                    "the checkpoint's weight is {} blocks of {} (nested: {:?}); the layer's {} \
                     blocks of {} (nested: {:?})",
                    w.quant_type().name(),
                    w.blocksize(),
                    w.nested().map(|n| n.blocksize),
                    dest.quant_type().name(),
                    dest.blocksize(),
                    dest.nested().map(|n| n.blocksize)
                ),
            });
        }
        used.insert(name.clone());
        layer_values.push((layer, name, w));
    }
    let mut values = Vec::new();
    for (name, var) in vs.variables() {
        let value = if Bnb4bitWeight::is_quantized(&name, &lookup) {
            let w = Bnb4bitWeight::from_state(&name, &lookup)?;
            let prefix = format!("{name}.");
            used.extend(all.keys().filter(|k| k.starts_with(&prefix)).cloned());
            w.dequantize_to(var.kind())?
        } else {
            let Some((t, _)) = all.get(&name) else {
                return Err(Error::MissingTensor { name, file: first });
            };
            t.shallow_clone()
        };
        io::check_loadable(&name, &var, &value)?;
        used.insert(name);
        values.push((var, value));
    }
    for (name, (_, file)) in &all {
        if !used.contains(name) && !ignore(name) {
            return Err(Error::UnexpectedTensor { name: name.clone(), file: file.clone() });
        }
    }
    let _guard = tch::no_grad_guard();
    for (var, value) in values {
        let mut dst = var.shallow_clone();
        dst.f_copy_(&value.f_to_device(dst.device())?.f_to_kind(dst.kind())?)?;
    }
    for (layer, name, w) in layer_values {
        layer.load(name, &w)?;
    }
    Ok(())
}

/// A 4-bit linear layer at `path` (its bias, if any, a variable there), wrapped by `lora` when
/// it targets the path.
fn quant_linear(
    path: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    bias: bool,
    q: &Bnb4bitConfig,
    lora: Option<&LoraBuilder>,
) -> Result<MaybeLoraLinear> {
    let bias = if bias {
        crate::vars::check_dims(path, &[out_dim])?;
        Some(path.f_zeros_no_train("bias", &[out_dim])?)
    } else {
        None
    };
    let layer = QuantLinear::zeros(out_dim, in_dim, bias, q, path.kind(), path.device())?;
    match lora {
        Some(b) => b.wrap(&lora::path_name(path), layer),
        None => Ok(MaybeLoraLinear::Plain(layer.into())),
    }
}
