//! mergekit's YAML configuration: method, base, `models` or `slices` (with `layer_range` and
//! per-source parameters), global parameters, `dtype`/`out_dtype`, tokenizer source;
//! parameters as scalars, gradients over depth, or `{filter, value}` conditionals.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::methods::MergeMethod;
use super::params::KNOWN_PARAMETERS;
use crate::{Error, Result};

/// A parameter as mergekit accepts it (`config.py: evaluate_setting`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A gradient: values spread evenly over depth and interpolated linearly
    /// (`t = layer / (layers − 1)` within the slice; tensors outside the blocks use `t = 0`).
    Gradient(Vec<f64>),
    /// The first `{filter, value}` whose filter is absent, `"*"`, or a substring of the tensor
    /// name.
    Conditional(Vec<Conditional>),
    /// A single `{filter, value}` (as a one-entry [`Setting::Conditional`]).
    Filtered(Conditional),
}

/// One `{filter, value}` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conditional {
    /// A substring of the tensor name (absent or `"*"`: any).
    #[serde(default)]
    pub filter: Option<String>,
    /// The value (itself a setting).
    pub value: Box<Setting>,
}

impl Conditional {
    fn applies(&self, tensor: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) => f == "*" || (!tensor.is_empty() && tensor.contains(f.as_str())),
        }
    }
}

impl Setting {
    /// The number for `tensor` at depth `t ∈ [0, 1]` (clamped into it; NaN counts as 0);
    /// `None` when no conditional applies.
    pub fn number(&self, tensor: &str, t: f64) -> Option<f64> {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        match self {
            Setting::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Setting::Number(x) => Some(*x),
            Setting::Gradient(v) if v.is_empty() => None,
            Setting::Gradient(v) => {
                let scaled = t * (v.len() - 1) as f64;
                let i0 = (scaled as usize).min(v.len() - 1);
                let i1 = (i0 + 1).min(v.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * v[i0] + frac * v[i1])
            }
            Setting::Conditional(c) => {
                c.iter().find(|c| c.applies(tensor)).and_then(|c| c.value.number(tensor, t))
            }
            Setting::Filtered(c) => c.applies(tensor).then(|| c.value.number(tensor, t)).flatten(),
        }
    }

    /// Errors unless every number in the setting is finite (`field` names it).
    pub fn check_finite(&self, field: &str) -> Result<()> {
        let bad = |x: f64| Error::config(field, format!("{x} is not a finite number"));
        match self {
            Setting::Bool(_) => Ok(()),
            Setting::Number(x) if !x.is_finite() => Err(bad(*x)),
            Setting::Number(_) => Ok(()),
            Setting::Gradient(v) => {
                v.iter().find(|x| !x.is_finite()).map_or(Ok(()), |x| Err(bad(*x)))
            }
            Setting::Conditional(c) => c.iter().try_for_each(|c| c.value.check_finite(field)),
            Setting::Filtered(c) => c.value.check_finite(field),
        }
    }

    /// The boolean for `tensor` (a number is true when non-zero).
    pub fn boolean(&self, tensor: &str, t: f64) -> Option<bool> {
        match self {
            Setting::Bool(b) => Some(*b),
            other => other.number(tensor, t).map(|x| x != 0.0),
        }
    }
}

/// Named parameters (`weight`, `density`, `t`, …).
pub type Parameters = BTreeMap<String, Setting>;

/// One input model of the `models:` form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// A local directory with `config.json` and `*.safetensors` (sharded or not).
    pub model: PathBuf,
    /// Its parameters (`weight`, `density`, …).
    #[serde(default)]
    pub parameters: Parameters,
}

/// One source of an output slice: layers `layer_range[0] .. layer_range[1]` of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSource {
    /// A local model directory.
    pub model: PathBuf,
    /// The half-open range of its layers this slice takes.
    pub layer_range: [i64; 2],
    /// Parameters of this source (over the slice's and the global ones).
    #[serde(default)]
    pub parameters: Parameters,
}

/// One output slice: its layers merged from the sources' layer ranges (all of one length), in
/// order after the previous slices' layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSlice {
    /// The inputs (the base, when the method uses one, among them).
    pub sources: Vec<SliceSource>,
    /// This slice's base (default: the config's `base_model`).
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// Parameters of this slice (over the global ones).
    #[serde(default)]
    pub parameters: Parameters,
}

/// Where the output's tokenizer comes from (`tokenizer_source`, or `tokenizer.source`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerSource {
    /// The base model's tokenizer.
    Base,
    /// mergekit's union of all the inputs' vocabularies (refused: it permutes the embeddings).
    Union,
    /// The tokenizer of the named model (a path).
    #[serde(untagged)]
    Model(PathBuf),
}

/// mergekit's `tokenizer:` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// The source (`base`, `union` or a model).
    pub source: TokenizerSource,
    /// Tokens to add or force (refused when not empty: they change the vocabulary).
    #[serde(default)]
    pub tokens: BTreeMap<String, serde_json::Value>,
    /// Padding of the vocabulary (refused: it changes the embeddings' shape).
    #[serde(default)]
    pub pad_to_multiple_of: Option<i64>,
}

/// A mergekit merge configuration: exactly one of `models` and `slices`. Fields this crate does
/// not run (`modules`, `chat_template`, `residual_weight`, …) are refused by name.
///
/// With `models`, every model contributes all its layers, and a `base_model` not listed among
/// them is added as an input (mergekit's normalisation); with `slices`, each slice lists its
/// sources, the base among them.
///
/// ```
/// use tch_peft::merge::{MergeConfig, MergeMethod};
/// let cfg = MergeConfig::from_yaml(
///     "slices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n      - {model: b, layer_range: [0, 4]}\n\
///      merge_method: slerp\nbase_model: a\nparameters:\n  t: [0, 0.5, 1]\n",
/// )?;
/// assert_eq!(cfg.merge_method, MergeMethod::Slerp);
/// assert_eq!(cfg.slices[0].sources[1].layer_range, [0, 4]);
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// The method.
    pub merge_method: MergeMethod,
    /// The base model directory (required by the task-vector methods, SLERP and Model Stock).
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// The input models (the `models:` form).
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// The output slices (the `slices:` form).
    #[serde(default)]
    pub slices: Vec<OutputSlice>,
    /// Method-wide parameters, and defaults for the per-model ones.
    #[serde(default)]
    pub parameters: Parameters,
    /// The dtype the inputs are cast to before merging (`float32`, `float16`, `bfloat16`,
    /// `float64`); default: the inputs' (promoted).
    #[serde(default)]
    pub dtype: Option<String>,
    /// The dtype of the written tensors; default: `dtype`, else the merged tensors'.
    #[serde(default)]
    pub out_dtype: Option<String>,
    /// The tokenizer to write with the output (default: the base's or first model's files).
    #[serde(default)]
    pub tokenizer_source: Option<TokenizerSource>,
    /// mergekit's `tokenizer:` block (only `source`).
    #[serde(default)]
    pub tokenizer: Option<TokenizerConfig>,
    /// Seeds libtorch's generator before merging, so that DARE's and DELLA's masks are
    /// reproducible (mergekit's `--random-seed`).
    #[serde(default)]
    pub random_seed: Option<i64>,
}

impl MergeConfig {
    /// Parses YAML, refusing unknown fields and parameters with errors naming them.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg: MergeConfig = serde_yaml_ng::from_str(text)
            .map_err(|e| Error::config("merge config", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a YAML file and resolves its relative model paths against the file's folder
    /// (as mergekit resolves them against the working directory, where its users run it).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut cfg = Self::from_yaml(&crate::io::read_config(path)?)?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(cfg)
    }

    /// Joins every relative model path (base, models, slice sources and bases, tokenizer
    /// source) onto `root`.
    pub fn resolve_paths(&mut self, root: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = root.join(&*p);
            }
        };
        self.base_model.iter_mut().for_each(join);
        self.models.iter_mut().for_each(|m| join(&mut m.model));
        for s in &mut self.slices {
            s.base_model.iter_mut().for_each(join);
            s.sources.iter_mut().for_each(|src| join(&mut src.model));
        }
        let mut source = |s: &mut TokenizerSource| {
            if let TokenizerSource::Model(p) = s {
                join(p);
            }
        };
        self.tokenizer_source.iter_mut().for_each(&mut source);
        if let Some(t) = &mut self.tokenizer {
            source(&mut t.source);
        }
    }

    /// Every parameter block with a name for errors: global, per model, per slice and source.
    fn parameter_blocks(&self) -> Vec<(String, &Parameters)> {
        let mut v = vec![("parameters".to_string(), &self.parameters)];
        for m in &self.models {
            v.push((format!("models[{}].parameters", m.model.display()), &m.parameters));
        }
        for (i, s) in self.slices.iter().enumerate() {
            v.push((format!("slices[{i}].parameters"), &s.parameters));
            for src in &s.sources {
                v.push((
                    format!("slices[{i}].sources[{}].parameters", src.model.display()),
                    &src.parameters,
                ));
            }
        }
        v
    }

    /// Checks the structure (one of `models`/`slices`, layer ranges), that every parameter is
    /// one mergekit knows and every number is finite, and what the method needs.
    pub fn validate(&self) -> Result<()> {
        for (block, params) in self.parameter_blocks() {
            for (k, v) in params {
                v.check_finite(&format!("{block}.{k}"))?;
                if !KNOWN_PARAMETERS.contains(&k.as_str()) {
                    return Err(Error::Unsupported {
                        field: format!("{block}.{k}"),
                        reason: "not a parameter of any merge method".into(),
                    });
                }
            }
        }
        match (self.models.is_empty(), self.slices.is_empty()) {
            (true, true) => return Err(Error::config("models", "no model to merge")),
            (false, false) => {
                return Err(Error::config(
                    "slices",
                    "give either `models` or `slices`, not both (as mergekit requires)",
                ))
            }
            _ => {}
        }
        for (i, s) in self.slices.iter().enumerate() {
            if s.sources.is_empty() {
                return Err(Error::config(format!("slices[{i}].sources"), "no source"));
            }
            let len = |src: &SliceSource| src.layer_range[1].checked_sub(src.layer_range[0]);
            for src in &s.sources {
                let [a, b] = src.layer_range;
                if a < 0 || b < a {
                    return Err(Error::config(
                        format!("slices[{i}].sources[{}].layer_range", src.model.display()),
                        format!("[{a}, {b}] is not a range of layers"),
                    ));
                }
            }
            if s.sources.iter().any(|src| len(src) != len(&s.sources[0])) {
                return Err(Error::config(
                    format!("slices[{i}].sources"),
                    "all sources of a slice must span the same number of layers",
                ));
            }
        }
        if self.tokenizer_source.is_some() && self.tokenizer.is_some() {
            return Err(Error::config(
                "tokenizer",
                "give either `tokenizer_source` or `tokenizer`, not both",
            ));
        }
        if let Some(t) = &self.tokenizer {
            if !t.tokens.is_empty() || t.pad_to_multiple_of.is_some() {
                return Err(Error::Unsupported {
                    field: "tokenizer.tokens".into(),
                    reason: "adding tokens or padding the vocabulary changes the embeddings; \
                             only `tokenizer.source` is supported"
                        .into(),
                });
            }
        }
        if matches!(self.tokenizer_source(), Some(TokenizerSource::Union)) {
            return Err(Error::Unsupported {
                field: "tokenizer_source".into(),
                reason: "`union` builds a new vocabulary and permutes the embeddings; use \
                         `base` or a model whose tokenizer all inputs share"
                    .into(),
            });
        }
        if matches!(self.tokenizer_source(), Some(TokenizerSource::Base))
            && self.base_model.is_none()
        {
            return Err(Error::config("tokenizer_source", "`base` needs a `base_model`"));
        }
        for (field, name) in [("dtype", &self.dtype), ("out_dtype", &self.out_dtype)] {
            if let Some(n) = name {
                super::stream::kind_from_name(n).map_err(|e| match e {
                    Error::InvalidConfig { reason, .. } => Error::config(field, reason),
                    other => other,
                })?;
            }
        }
        super::plan::check_structure(self)
    }

    /// The tokenizer source, from `tokenizer_source` or `tokenizer.source`.
    pub fn tokenizer_source(&self) -> Option<&TokenizerSource> {
        self.tokenizer_source.as_ref().or(self.tokenizer.as_ref().map(|t| &t.source))
    }
}
