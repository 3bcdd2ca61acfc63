//! [`LoraConfig`]: PEFT's `LoraConfig` fields, names and defaults, serialisable as PEFT's
//! `adapter_config.json`.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::target::{LayerIndices, LayersPattern, TargetModules, Targets};
use crate::{Error, Result};

/// How `lora_A` and `lora_B` start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `true` (default): `A ~ U(±1/√in)` (PyTorch's `kaiming_uniform_(a=√5)`), `B = 0`, so the
    /// adapted layer starts equal to the base layer.
    #[default]
    Kaiming,
    /// `"gaussian"`: `A ~ N(0, 1/r)` (standard deviation `1/r`, as PEFT), `B = 0`.
    Gaussian,
    /// `false`: both factors get `nn.Linear`'s default init, so the layer does **not** start equal
    /// to the base layer (PEFT keeps this for debugging).
    Random,
    /// `"orthogonal"`: A and B from complementary rows of a random orthogonal `r×r` matrix
    /// (`A = (G₁ Q[0::2])ᵀ/10`, `B = (G₂ᵀ Q[1::2])/10`), so `BA = 0` with both factors non-zero.
    /// Needs an even `r`. Linear layers.
    Orthogonal,
    /// `"pissa"` (Meng et al. 2024): from the SVD `W = U S Vᵀ`, `A = √(S_r/s)·V_rᵀ`,
    /// `B = U_r·√(S_r/s)`, and the base weight keeps the residual `W − s·BA`, so the layer starts
    /// equal to the base. It needs the pre-trained weight: see
    /// [`LoraAdapter::init_from_base_weights`](super::LoraAdapter::init_from_base_weights).
    /// Linear layers.
    Pissa,
    /// `"pissa_niter_K"`: PiSSA from a fast randomized SVD (`K` subspace iterations, as PEFT's
    /// `torch.svd_lowrank(W, r, niter=K)`). The factors approximate PiSSA's and differ from run
    /// to run; the base keeps `W − s·BA` exactly, so the layer still starts equal to the base.
    PissaNiter(u32),
    /// `"olora"` (Büyükakyüz 2024): from the QR decomposition `W = QR`, `A = R[:r]`, `B = Q[:, :r]`,
    /// and the base weight keeps `W − s·BA`. Needs the pre-trained weight, as PiSSA. Linear
    /// layers.
    Olora,
}

impl LoraInit {
    /// Whether the init derives the factors from the base weight (and rewrites it).
    pub fn uses_base_weight(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora)
    }
}

impl Serialize for LoraInit {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LoraInit::Kaiming => s.serialize_bool(true),
            LoraInit::Gaussian => s.serialize_str("gaussian"),
            LoraInit::Random => s.serialize_bool(false),
            LoraInit::Orthogonal => s.serialize_str("orthogonal"),
            LoraInit::Pissa => s.serialize_str("pissa"),
            LoraInit::PissaNiter(k) => s.serialize_str(&format!("pissa_niter_{k}")),
            LoraInit::Olora => s.serialize_str("olora"),
        }
    }
}

impl<'de> Deserialize<'de> for LoraInit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(LoraInit::Kaiming),
            Raw::Bool(false) => Ok(LoraInit::Random),
            Raw::Str(s) if s == "gaussian" => Ok(LoraInit::Gaussian),
            Raw::Str(s) if s == "orthogonal" => Ok(LoraInit::Orthogonal),
            Raw::Str(s) if s == "pissa" => Ok(LoraInit::Pissa),
            Raw::Str(s) if s == "olora" => Ok(LoraInit::Olora),
            Raw::Str(s) if s.strip_prefix("pissa_niter_").is_some_and(|k| k.parse::<u32>().is_ok()) => {
                Ok(LoraInit::PissaNiter(s["pissa_niter_".len()..].parse().expect("checked")))
            }
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "init_lora_weights `{s}` is not supported (expected true, false, \"gaussian\", \"orthogonal\", \"pissa\", \"pissa_niter_K\" or \"olora\")"
            ))),
        }
    }
}

/// The most subspace iterations `pissa_niter_K` may ask for (PEFT's examples use 4 to 16).
pub const MAX_PISSA_NITER: u32 = 1024;

/// Which biases train (PEFT's `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trains (default).
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// The biases of LoRA-adapted layers train: each adapted layer gets a trainable copy of its
    /// base bias in the adapter store, saved as `<module>.base_layer.bias` as PEFT saves it.
    LoraOnly,
}

/// The configuration of a LoRA adapter, with Hugging Face PEFT's field names and defaults.
///
/// Serialises to (and reads from) the LoRA fields of PEFT's `adapter_config.json`; unknown keys
/// are ignored and missing keys take PEFT's defaults, so configs from older and newer PEFT
/// versions load.
///
/// ```
/// use tch_peft::lora::LoraConfig;
/// use tch_peft::target::TargetModules;
/// let cfg = LoraConfig {
///     r: 16,
///     lora_alpha: 32.0,
///     target_modules: Some(TargetModules::list(["q_proj", "v_proj"])),
///     ..Default::default()
/// };
/// cfg.validate()?;
/// assert_eq!(cfg.scaling_for("model.layers.0.self_attn.q_proj")?, 2.0);
/// let json = serde_json::to_string(&cfg)?;
/// assert_eq!(serde_json::from_str::<LoraConfig>(&json)?, cfg);
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank of the update (default 8). Must be ≥ 1 and ≤ min(in, out) of each adapted layer.
    pub r: i64,
    /// Scaling numerator (default 8): the update is scaled by `lora_alpha / r`
    /// (or `lora_alpha / √r` with `use_rslora`).
    #[serde(serialize_with = "int_if_integral")]
    pub lora_alpha: f64,
    /// Dropout on the adapter branch's input, in training only (default 0: no dropout kernel).
    pub lora_dropout: f64,
    /// Rank-stabilised scaling `lora_alpha / √r` (Kalajdzievski 2023) instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// How the factors start; see [`LoraInit`].
    pub init_lora_weights: LoraInit,
    /// Which modules to adapt; see [`crate::target`].
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted, even when `target_modules` selects them.
    pub exclude_modules: Option<TargetModules>,
    /// Only adapt modules of these layer indices.
    pub layers_to_transform: Option<LayerIndices>,
    /// The path component before the layer index (`"layers"`, `"h"`), with `layers_to_transform`.
    pub layers_pattern: Option<LayersPattern>,
    /// Which biases train; see [`LoraBias`].
    pub bias: LoraBias,
    /// Per-module rank overrides: the first key `p` with `(.*\.)?(p)$` matching the module name.
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module `lora_alpha` overrides, matched as `rank_pattern`.
    #[serde(serialize_with = "map_int_if_integral")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// The base weights are stored `[in, out]` (GPT-2's `Conv1D`). As in PEFT the layer type
    /// decides: [`LoraLinear::from_conv1d`](super::LoraLinear::from_conv1d) and
    /// [`LoraBuilder::conv1d`](super::LoraBuilder::conv1d) handle such weights; the flag is kept
    /// for the config file.
    pub fan_in_fan_out: bool,
    /// DoRA (Liu et al. 2024): the adapted weight is split into a trainable per-row magnitude
    /// `lora_magnitude_vector` and the direction `(W + s·BA) / ‖W + s·BA‖_row` (the norm
    /// detached, as PEFT). Linear layers only.
    pub use_dora: bool,
    /// A trainable bias on `lora_B` (`<module>.lora_B.bias: [out]`, zero-initialised): the
    /// branch adds `s·(x Aᵀ Bᵀ + b_B)`; merging adds `s·b_B` to the layer's bias. Linear layers.
    pub lora_bias: bool,
    /// Modules trained in full and saved with the adapter (PEFT's `modules_to_save`, e.g. a
    /// classification head): a module whose name equals an entry or ends with `.` + entry gets
    /// a trainable copy per adapter (linear layers and embedding tables; see
    /// [`ModuleCopy`](super::ModuleCopy)). Such modules are not LoRA targets.
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's `task_type` (default none): which `PeftModel` class Python builds when it loads
    /// the adapter (`CAUSAL_LM` gives `PeftModelForCausalLM`, whose `generate` works).
    /// Informational here: it changes nothing in Rust.
    pub task_type: Option<TaskType>,
}

/// PEFT's `TaskType`, as written in `adapter_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum TaskType {
    /// Sequence classification (`SEQ_CLS`).
    SeqCls,
    /// Sequence-to-sequence language modelling (`SEQ_2_SEQ_LM`).
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    /// Causal language modelling (`CAUSAL_LM`).
    CausalLm,
    /// Token classification (`TOKEN_CLS`).
    TokenCls,
    /// Extractive question answering (`QUESTION_ANS`).
    QuestionAns,
    /// Feature extraction / embeddings (`FEATURE_EXTRACTION`).
    FeatureExtraction,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            init_lora_weights: LoraInit::Kaiming,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            bias: LoraBias::None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            fan_in_fan_out: false,
            use_dora: false,
            lora_bias: false,
            modules_to_save: None,
            task_type: None,
        }
    }
}

/// `Some(i)` when `v` is a whole number: PEFT writes integral alphas as JSON integers.
fn integral(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

fn int_if_integral<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    match integral(*v) {
        Some(i) => s.serialize_i64(i),
        None => s.serialize_f64(*v),
    }
}

fn map_int_if_integral<S: Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        match integral(*v) {
            Some(i) => map.serialize_entry(k, &i)?,
            None => map.serialize_entry(k, v)?,
        }
    }
    map.end()
}

fn pattern_regex(field: &str, p: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).map_err(|source| Error::InvalidRegex {
        field: field.into(),
        pattern: p.into(),
        source,
    })
}

impl LoraConfig {
    /// Whether `module` is listed in `modules_to_save` (equal, or a `.`-suffix).
    pub fn saves_module(&self, module: &str) -> bool {
        self.modules_to_save
            .as_ref()
            .is_some_and(|v| v.iter().any(|m| module == m || module.ends_with(&format!(".{m}"))))
    }

    /// Errors when an entry of `modules_to_save` matches none of `modules`.
    pub(crate) fn check_saved_matched<'m>(
        &self,
        modules: impl Iterator<Item = &'m str> + Clone,
    ) -> Result<()> {
        for m in self.modules_to_save.iter().flatten() {
            let hit = modules.clone().any(|k| k == m || k.ends_with(&format!(".{m}")));
            if !hit {
                return Err(Error::UnmatchedTarget {
                    field: "modules_to_save".into(),
                    target: m.clone(),
                    checked: modules.clone().count(),
                });
            }
        }
        Ok(())
    }

    /// A default config targeting the given modules.
    pub fn for_targets<I, S>(targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        LoraConfig { target_modules: Some(TargetModules::list(targets)), ..Default::default() }
    }

    /// Checks every field that can be checked without the model: `r ≥ 1`, finite `lora_alpha`,
    /// `0 ≤ lora_dropout < 1`, the patterns compile, PEFT's invalid combinations, and the fields
    /// this version does not implement.
    pub fn validate(&self) -> Result<()> {
        check_rank("r", self.r)?;
        check_alpha("lora_alpha", self.lora_alpha)?;
        if !(self.lora_dropout.is_finite() && (0.0..1.0).contains(&self.lora_dropout)) {
            return Err(Error::config(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.lora_dropout),
            ));
        }
        for (p, &r) in &self.rank_pattern {
            pattern_regex("rank_pattern", p)?;
            check_rank(&format!("rank_pattern.{p}"), r)?;
        }
        for (p, &a) in &self.alpha_pattern {
            pattern_regex("alpha_pattern", p)?;
            check_alpha(&format!("alpha_pattern.{p}"), a)?;
        }
        if self.target_modules.is_some() {
            // compiles the regexes and checks the layer-selection combinations
            self.targets()?;
        }
        let unsupported = |field: &str, reason: &str| Error::Unsupported {
            field: field.into(),
            reason: reason.into(),
        };
        if let LoraInit::PissaNiter(k) = self.init_lora_weights {
            if k > MAX_PISSA_NITER {
                return Err(Error::config(
                    "init_lora_weights",
                    format!("pissa_niter_{k}: more than {MAX_PISSA_NITER} subspace iterations"),
                ));
            }
        }
        if self.use_dora && self.lora_bias {
            return Err(Error::config("lora_bias", "cannot be combined with `use_dora` (as PEFT)"));
        }
        if self.init_lora_weights == LoraInit::Orthogonal {
            if let Some((p, r)) = std::iter::once((&String::from("r"), &self.r))
                .chain(&self.rank_pattern)
                .find(|(_, r)| *r % 2 != 0)
            {
                return Err(Error::config(
                    if p == "r" { "r".to_string() } else { format!("rank_pattern.{p}") },
                    format!("orthogonal init needs an even rank, got {r}"),
                ));
            }
        }
        if self.lora_bias && !matches!(self.init_lora_weights, LoraInit::Kaiming | LoraInit::Random)
        {
            return Err(Error::config(
                "lora_bias",
                "only with `init_lora_weights` true or false (as PEFT)",
            ));
        }
        if self.bias == LoraBias::All {
            return Err(unsupported(
                "bias",
                "`all` is not implemented yet; use `none` or `lora_only`",
            ));
        }
        Ok(())
    }

    /// The compiled target selection of this config.
    pub fn targets(&self) -> Result<Targets> {
        Targets::new(
            self.target_modules.as_ref(),
            self.exclude_modules.as_ref(),
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )
    }

    /// The rank for a module, after `rank_pattern`.
    pub fn rank_for(&self, module: &str) -> Result<i64> {
        for (p, &r) in &self.rank_pattern {
            if pattern_regex("rank_pattern", p)?.is_match(module) {
                return Ok(r);
            }
        }
        Ok(self.r)
    }

    /// `lora_alpha` for a module, after `alpha_pattern`.
    pub fn alpha_for(&self, module: &str) -> Result<f64> {
        for (p, &a) in &self.alpha_pattern {
            if pattern_regex("alpha_pattern", p)?.is_match(module) {
                return Ok(a);
            }
        }
        Ok(self.lora_alpha)
    }

    /// The scaling `s` of a module: `alpha/r`, or `alpha/√r` with `use_rslora`.
    pub fn scaling_for(&self, module: &str) -> Result<f64> {
        Ok(scaling(self.alpha_for(module)?, self.rank_for(module)?, self.use_rslora))
    }
}

/// LoRA's scaling factor: `alpha / r`, or `alpha / √r` (rsLoRA).
pub fn scaling(alpha: f64, r: i64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

fn check_rank(field: &str, r: i64) -> Result<()> {
    if r < 1 {
        return Err(Error::config(field, format!("rank {r} must be at least 1")));
    }
    Ok(())
}

fn check_alpha(field: &str, a: f64) -> Result<()> {
    if !a.is_finite() {
        return Err(Error::config(field, format!("{a} is not finite")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_peft_defaults() {
        let c = LoraConfig::default();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(c.init_lora_weights, LoraInit::Kaiming);
        assert_eq!(c.bias, LoraBias::None);
        assert!(!c.use_rslora);
    }

    #[test]
    fn reads_a_peft_0_21_adapter_config_ignoring_unknown_keys() {
        // Dump of PEFT 0.21.2 (PEFT-ANCHORS.md §1.10), trimmed of nothing LoRA-relevant.
        let json = r#"{"alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
          "auto_mapping": null, "base_model_name_or_path": null, "bias": "none", "corda_config": null,
          "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null,
          "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
          "kasa_config": null, "layer_replication": null, "layers_pattern": null,
          "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
          "lora_dropout": 0.05, "megatron_config": null, "megatron_core": "megatron.core",
          "modules_to_save": null, "peft_type": "LORA", "peft_version": "0.21.2",
          "qalora_group_size": 16, "r": 4, "rank_pattern": {}, "revision": null,
          "target_modules": ["embed_tokens", "q_proj", "v_proj"], "task_type": "CAUSAL_LM",
          "use_dora": false, "use_rslora": false}"#;
        let c: LoraConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.r, 4);
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.lora_dropout, 0.05);
        assert_eq!(
            c.target_modules,
            Some(TargetModules::list(["embed_tokens", "q_proj", "v_proj"]))
        );
        c.validate().unwrap();
    }

    #[test]
    fn reads_an_old_minimal_config_with_defaults() {
        let c: LoraConfig = serde_json::from_str(
            r#"{"r": 16, "target_modules": "model.*(q|v)_proj", "fan_in_fan_out": false}"#,
        )
        .unwrap();
        assert_eq!(c.r, 16);
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.init_lora_weights, LoraInit::Kaiming);
        let g: LoraConfig = serde_json::from_str(r#"{"init_lora_weights": "gaussian"}"#).unwrap();
        assert_eq!(g.init_lora_weights, LoraInit::Gaussian);
        assert!(serde_json::from_str::<LoraConfig>(r#"{"init_lora_weights": "loftq"}"#).is_err());
    }

    #[test]
    fn writes_integral_alpha_as_an_integer() {
        let v = serde_json::to_value(LoraConfig::default()).unwrap();
        assert_eq!(v["lora_alpha"], serde_json::json!(8));
        assert_eq!(v["init_lora_weights"], serde_json::json!(true));
        assert_eq!(v["bias"], serde_json::json!("none"));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let field_of = |c: LoraConfig| match c.validate().unwrap_err() {
            Error::InvalidConfig { field, .. } | Error::Unsupported { field, .. } => field,
            e => panic!("unexpected {e}"),
        };
        assert_eq!(field_of(LoraConfig { r: 0, ..Default::default() }), "r");
        assert_eq!(
            field_of(LoraConfig { lora_alpha: f64::NAN, ..Default::default() }),
            "lora_alpha"
        );
        assert_eq!(
            field_of(LoraConfig { lora_dropout: 1.0, ..Default::default() }),
            "lora_dropout"
        );
        assert_eq!(
            field_of(LoraConfig { lora_dropout: -0.1, ..Default::default() }),
            "lora_dropout"
        );
        let gaussian_bias = LoraConfig {
            lora_bias: true,
            init_lora_weights: LoraInit::Gaussian,
            ..Default::default()
        };
        assert_eq!(field_of(gaussian_bias), "lora_bias");
        assert_eq!(
            field_of(LoraConfig { use_dora: true, lora_bias: true, ..Default::default() }),
            "lora_bias"
        );
        let mut rp = LoraConfig::default();
        rp.rank_pattern.insert("q_proj".into(), 0);
        assert_eq!(field_of(rp), "rank_pattern.q_proj");
    }

    #[test]
    fn rank_and_alpha_patterns_and_rslora_scaling() {
        let mut c = LoraConfig { r: 8, lora_alpha: 16.0, ..Default::default() };
        c.rank_pattern.insert("q_proj".into(), 4);
        c.alpha_pattern.insert(r"layers\.1\.self_attn\.v_proj".into(), 2.0);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj").unwrap(), 4);
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj").unwrap(), 8);
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj").unwrap(), 4.0);
        assert_eq!(c.scaling_for("model.layers.1.self_attn.v_proj").unwrap(), 0.25);
        c.use_rslora = true;
        assert_eq!(c.scaling_for("model.layers.0.self_attn.k_proj").unwrap(), 16.0 / 8f64.sqrt());
        assert_eq!(scaling(16.0, 4, true), 8.0);
    }
}
