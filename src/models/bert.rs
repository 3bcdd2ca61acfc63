//! A BERT encoder with Hugging Face `BertModel` names (e.g. all-MiniLM-L6-v2), built through
//! [`LoraBuilder`] so that any LoRA config applies, with a
//! [`ResidualHook`] after every layer for ReFT, and mean pooling.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use super::llama::weight_files;
use super::{embed_checked, ResidualHook};
use crate::io;
use crate::lora::{self, LoraBuilder, MaybeLoraEmbedding, MaybeLoraLinear};
use crate::{Error, Result};

/// The `config.json` fields of a BERT encoder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// Number of layers.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Feed-forward size.
    pub intermediate_size: i64,
    /// Position table size.
    pub max_position_embeddings: i64,
    /// Token type table size.
    #[serde(default = "two")]
    pub type_vocab_size: i64,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states (training).
    #[serde(default = "p01")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (training).
    #[serde(default = "p01")]
    pub attention_probs_dropout_prob: f64,
    /// `gelu` (erf) is the only activation supported.
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn two() -> i64 {
    2
}
fn eps() -> f64 {
    1e-12
}
fn p01() -> f64 {
    0.1
}
fn gelu() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Reads `config.json` from a model directory (or the file).
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = crate::io::read_config(&file)?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| Error::CorruptFile { file: file.clone(), reason: e.to_string() })?;
        cfg.validate()?;
        if path.is_dir() {
            super::check_against_weights(path, cfg.num_parameters()?, weight_files(path))?;
        }
        Ok(cfg)
    }

    /// The number of parameters the config describes (embeddings with their norm, every layer,
    /// the pooler).
    pub fn num_parameters(&self) -> Result<i64> {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let tables = self.vocab_size + self.max_position_embeddings + self.type_vocab_size;
        let layer = super::count_parameters(&[(d, 4 * d + 4), (d, 2 * i), (i + d, 1), (d, 4)]);
        layer
            .and_then(|l| {
                super::count_parameters(&[(l, self.num_hidden_layers), (tables, d), (d, d + 3)])
            })
            .ok_or_else(|| {
                Error::config(
                    "num_hidden_layers",
                    format!("the model has more than {} parameters", super::MAX_PARAMETERS),
                )
            })
    }

    /// Checks sizes (see [`LlamaConfig::validate`](super::LlamaConfig::validate) for the
    /// limits) and the supported options.
    pub fn validate(&self) -> Result<()> {
        use super::{check_size, MAX_COUNT, MAX_VOCAB, MAX_WIDTH};
        check_size("vocab_size", self.vocab_size, MAX_VOCAB)?;
        check_size("hidden_size", self.hidden_size, MAX_WIDTH)?;
        check_size("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        check_size("max_position_embeddings", self.max_position_embeddings, MAX_WIDTH)?;
        check_size("type_vocab_size", self.type_vocab_size, MAX_WIDTH)?;
        check_size("num_hidden_layers", self.num_hidden_layers, MAX_COUNT)?;
        check_size("num_attention_heads", self.num_attention_heads, MAX_COUNT)?;
        if self.hidden_act != "gelu" {
            return Err(Error::Unsupported {
                field: "hidden_act".into(),
                reason: self.hidden_act.clone(),
            });
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config("num_attention_heads", "must divide hidden_size"));
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(field, format!("{p} is not in [0, 1)")));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(Error::config("layer_norm_eps", "must be a finite number ≥ 0"));
        }
        self.num_parameters()?;
        Ok(())
    }
}

#[derive(Debug)]
struct Layer {
    query: MaybeLoraLinear,
    key: MaybeLoraLinear,
    value: MaybeLoraLinear,
    attn_out: MaybeLoraLinear,
    attn_norm: nn::LayerNorm,
    intermediate: MaybeLoraLinear,
    output: MaybeLoraLinear,
    out_norm: nn::LayerNorm,
}

/// A BERT encoder (`BertModel`): embeddings, `num_hidden_layers` post-norm layers, pooler.
#[derive(Debug)]
pub struct Bert {
    config: BertConfig,
    word: MaybeLoraEmbedding,
    position: Tensor,
    token_type: Tensor,
    emb_norm: nn::LayerNorm,
    layers: Vec<Layer>,
    pooler: MaybeLoraLinear,
}

fn frozen_norm(p: nn::Path, d: i64, eps: f64) -> nn::LayerNorm {
    let ln = nn::layer_norm(p, vec![d], nn::LayerNormConfig { eps, ..Default::default() });
    if let Some(w) = &ln.ws {
        let _ = w.set_requires_grad(false);
    }
    if let Some(b) = &ln.bs {
        let _ = b.set_requires_grad(false);
    }
    ln
}

impl Bert {
    /// Builds the encoder under `p` (variable names as transformers' `BertModel`), its linear
    /// layers and word embeddings through `lora` when given.
    pub fn new(p: &nn::Path, config: &BertConfig, lora: Option<&LoraBuilder>) -> Result<Self> {
        config.validate()?;
        let c = config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let e = p / "embeddings";
        let word =
            lora::embedding(&(&e / "word_embeddings"), c.vocab_size, d, Default::default(), lora)?;
        let position = (&e / "position_embeddings").f_var(
            "weight",
            &[c.max_position_embeddings, d],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        )?;
        let token_type = (&e / "token_type_embeddings").f_var(
            "weight",
            &[c.type_vocab_size, d],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        )?;
        let emb_norm = frozen_norm(&e / "LayerNorm", d, eps);
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let l = p / "encoder" / "layer" / i;
            let a = &l / "attention";
            let lin = |path: nn::Path, i: i64, o: i64| {
                lora::linear(&path, i, o, Default::default(), lora)
            };
            layers.push(Layer {
                query: lin(&a / "self" / "query", d, d)?,
                key: lin(&a / "self" / "key", d, d)?,
                value: lin(&a / "self" / "value", d, d)?,
                attn_out: lin(&a / "output" / "dense", d, d)?,
                attn_norm: frozen_norm(&a / "output" / "LayerNorm", d, eps),
                intermediate: lin(&l / "intermediate" / "dense", d, c.intermediate_size)?,
                output: lin(&l / "output" / "dense", c.intermediate_size, d)?,
                out_norm: frozen_norm(&l / "output" / "LayerNorm", d, eps),
            });
        }
        let pooler = lora::linear(&(p / "pooler" / "dense"), d, d, Default::default(), lora)?;
        let _ = position.set_requires_grad(false);
        let _ = token_type.set_requires_grad(false);
        Ok(Bert { config: c.clone(), word, position, token_type, emb_norm, layers, pooler })
    }

    /// The config.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The last hidden states `[batch, seq, hidden]` for `input_ids: [batch, seq]` (i64) and an
    /// optional `attention_mask` (1 = token, 0 = padding; padded keys are masked), token type 0.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_hooked(input_ids, attention_mask, train, None)
    }

    /// As [`forward_t`](Self::forward_t), calling `hook` on the hidden states after every layer
    /// (ReFT attaches here).
    pub fn forward_hooked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        hook: Option<&dyn ResidualHook>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let seq = input_ids.size().get(1).copied().unwrap_or(0);
        if seq > c.max_position_embeddings {
            return Err(Error::ShapeMismatch {
                name: "input_ids (sequence length)".into(),
                expected: vec![-1, c.max_position_embeddings],
                actual: input_ids.size(),
            });
        }
        let (b, s, words) = embed_checked(&self.word, input_ids, attention_mask, c.vocab_size)?;
        let device = self.word.weight().device();
        let kind = self.word.weight().kind();
        let pos = self.position.narrow(0, 0, s).unsqueeze(0);
        let tt = self.token_type.get(0).view([1, 1, -1]);
        let mut h = (words + pos + tt).apply(&self.emb_norm).dropout(c.hidden_dropout_prob, train);
        let lowest = if kind == Kind::Double { f64::MIN } else { f32::MIN as f64 };
        let mask = attention_mask.map(|m| {
            let pad = m.to_device(device).eq(0).view([b, 1, 1, s]);
            Tensor::zeros([1], (kind, device)).masked_fill(&pad, lowest)
        });
        let heads = c.num_attention_heads;
        let hd = c.hidden_size / heads;
        for (i, l) in self.layers.iter().enumerate() {
            let split = |t: Tensor| t.view([b, s, heads, hd]).transpose(1, 2);
            let qkv = crate::lora::forward_shared(&[&l.query, &l.key, &l.value], &h, train)?;
            let [q, k, v] = [&qkv[0], &qkv[1], &qkv[2]].map(|t| split(t.shallow_clone()));
            let p = if train { c.attention_probs_dropout_prob } else { 0.0 };
            let ctx = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                mask.as_ref(),
                p,
                false,
                1.0 / (hd as f64).sqrt(),
                false,
            )?;
            let ctx = ctx.transpose(1, 2).reshape([b, s, c.hidden_size]);
            let attn = l.attn_out.f_forward_t(&ctx, train)?.dropout(c.hidden_dropout_prob, train);
            let a = (attn + &h).apply(&l.attn_norm);
            let inter = l.intermediate.f_forward_t(&a, train)?.gelu("none");
            let o = l.output.f_forward_t(&inter, train)?.dropout(c.hidden_dropout_prob, train);
            h = (o + a).apply(&l.out_norm);
            if let Some(hook) = hook {
                h = hook.after_block(i as i64, &h, train)?;
            }
        }
        Ok(h)
    }

    /// The pooler output `tanh(W h[:, 0] + b)` (BERT's `[CLS]` pooling).
    pub fn pooled(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.pooler.f_forward_t(&hidden.select(1, 0), train)?.tanh())
    }
}

/// Mean pooling over the tokens of each row (sentence-transformers' pooling for MiniLM):
/// `Σ_t mask·h / max(Σ_t mask, 1e-9)`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let m = attention_mask.to_device(hidden.device()).to_kind(hidden.kind()).unsqueeze(-1);
    (hidden * &m).sum_dim_intlist(1, false, hidden.kind())
        / m.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1e-9)
}

/// Loads a BERT checkpoint directory (`model.safetensors` or shards) into the model's store,
/// strictly; transformers' `embeddings.position_ids` buffer is skipped.
pub fn load_weights(vs: &nn::VarStore, dir: impl AsRef<Path>) -> Result<()> {
    let files = weight_files(&dir)?;
    io::load_into_var_store(vs, &files, |name| name.ends_with("position_ids"))
}

impl ModuleT for Bert {
    /// Last hidden states without a padding mask.
    ///
    /// # Panics
    /// On input ids that do not fit the model (see [`Bert::forward_t`]).
    fn forward_t(&self, input_ids: &Tensor, train: bool) -> Tensor {
        Bert::forward_t(self, input_ids, None, train).unwrap_or_else(|e| panic!("{e}"))
    }
}
