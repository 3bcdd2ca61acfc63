//! mergekit's YAML configuration: method, base, models with parameters, global parameters,
//! dtype; parameters as scalars, gradients over depth, or `{filter, value}` conditionals.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::methods::{GlobalParams, MergeMethod, ModelParams};
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
    /// (`t = layer / (layers − 1)`; tensors outside the blocks use `t = 0`).
    Gradient(Vec<f64>),
    /// The first `{filter, value}` whose filter is absent, `"*"`, or a substring of the tensor
    /// name.
    Conditional(Vec<Conditional>),
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
            Setting::Conditional(c) => c
                .iter()
                .find(|c| match &c.filter {
                    None => true,
                    Some(f) => f == "*" || tensor.contains(f.as_str()),
                })
                .and_then(|c| c.value.number(tensor, t)),
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

/// One input model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// A local directory with `config.json` and `*.safetensors` (sharded or not).
    pub model: PathBuf,
    /// Its parameters (`weight`, `density`, `gamma`).
    #[serde(default)]
    pub parameters: BTreeMap<String, Setting>,
}

/// A mergekit merge configuration (the subset this crate runs; other fields are refused by
/// name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// The method.
    pub merge_method: MergeMethod,
    /// The base model directory (required by all methods but `linear`).
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// The input models.
    pub models: Vec<ModelEntry>,
    /// Method-wide parameters (`normalize`, `rescale`, `lambda`, `t`, `filter_wise`, and
    /// defaults for the per-model ones).
    #[serde(default)]
    pub parameters: BTreeMap<String, Setting>,
    /// The output dtype (`float32`, `float16`, `bfloat16`, `float64`); default the base's.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Seeds libtorch's generator before merging, so that DARE's masks are reproducible
    /// (mergekit's `--random-seed`).
    #[serde(default)]
    pub random_seed: Option<i64>,
}

const MODEL_KEYS: [&str; 3] = ["weight", "density", "gamma"];
const GLOBAL_KEYS: [&str; 7] =
    ["normalize", "rescale", "lambda", "t", "filter_wise", "int8_mask", "inverse_density"];

impl MergeConfig {
    /// Parses YAML, refusing unknown fields and parameters with errors naming them.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg: MergeConfig = serde_yaml_ng::from_str(text)
            .map_err(|e| Error::config("merge config", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the parameter names, that every number is finite, and what the method needs.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in &self.parameters {
            v.check_finite(&format!("parameters.{k}"))?;
        }
        for m in &self.models {
            for (k, v) in &m.parameters {
                v.check_finite(&format!("models[{}].parameters.{k}", m.model.display()))?;
            }
        }
        for k in self.parameters.keys() {
            if !GLOBAL_KEYS.contains(&k.as_str()) && !MODEL_KEYS.contains(&k.as_str()) {
                return Err(Error::Unsupported {
                    field: format!("parameters.{k}"),
                    reason: "not a parameter of the supported methods".into(),
                });
            }
        }
        for m in &self.models {
            for k in m.parameters.keys() {
                if !MODEL_KEYS.contains(&k.as_str()) {
                    return Err(Error::Unsupported {
                        field: format!("models[{}].parameters.{k}", m.model.display()),
                        reason: "not a per-model parameter of the supported methods".into(),
                    });
                }
            }
        }
        if self.merge_method.needs_base() && self.base_model.is_none() {
            return Err(Error::config(
                "base_model",
                format!("{:?} needs a base model", self.merge_method),
            ));
        }
        if self.models.is_empty() {
            return Err(Error::config("models", "no model to merge"));
        }
        Ok(())
    }

    /// The per-model parameters of model `i` for `tensor` at depth `t` (per-model values over
    /// global ones over defaults). Errors when a weighted method lacks `weight`.
    pub fn model_params(&self, i: usize, tensor: &str, t: f64) -> Result<ModelParams> {
        let get = |k: &str| {
            self.models[i]
                .parameters
                .get(k)
                .or(self.parameters.get(k))
                .and_then(|s| s.number(tensor, t))
        };
        let d = ModelParams::default();
        let weight = match get("weight") {
            Some(w) => w,
            None if matches!(self.merge_method, MergeMethod::Slerp | MergeMethod::ModelStock) => {
                1.0
            }
            None => {
                return Err(Error::config(
                    "weight",
                    format!(
                        "model `{}` has no weight for `{tensor}`",
                        self.models[i].model.display()
                    ),
                ))
            }
        };
        Ok(ModelParams {
            weight,
            density: get("density").unwrap_or(d.density),
            gamma: get("gamma").unwrap_or(d.gamma),
        })
    }

    /// The method-wide parameters for `tensor` at depth `t`.
    pub fn global_params(&self, tensor: &str, t: f64) -> GlobalParams {
        let p = |k: &str| self.parameters.get(k);
        GlobalParams {
            normalize: p("normalize").and_then(|s| s.boolean(tensor, t)),
            rescale: p("rescale").and_then(|s| s.boolean(tensor, t)),
            lambda: p("lambda").and_then(|s| s.number(tensor, t)).unwrap_or(1.0),
            t: p("t").and_then(|s| s.number(tensor, t)),
            filter_wise: p("filter_wise").and_then(|s| s.boolean(tensor, t)).unwrap_or(false),
            inverse_density: p("inverse_density")
                .and_then(|s| s.boolean(tensor, t))
                .unwrap_or(false),
        }
    }
}
