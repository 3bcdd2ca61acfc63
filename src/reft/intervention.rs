//! The [`Intervention`] trait and pyreft's six low-rank interventions.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

use super::orthogonal::{orthonormalize, random_orthonormal, Orthogonality};
use crate::{Error, Result};

/// Which intervention (pyreft's class names in brackets). `R: [r, d]` has orthonormal rows
/// (stored as `Rᵀ: [d, r]`, pyreft's `rotate_layer`), `W: [r, d]`, `b: [r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterventionKind {
    /// LoReFT (`LoreftIntervention`): `h + Rᵀ(act(W h + b) − R h)`; `2dr + r` parameters.
    #[serde(rename = "loreft")]
    LoReft,
    /// NoReFT (`NoreftIntervention`): `h + W₂ᵀ(act(W₁ h + b₁) − (W₂ h + b₂))`, no orthogonality
    /// (`b₂` only with `add_bias`).
    #[serde(rename = "noreft")]
    NoReft,
    /// The paper's DiReFT (`NodireftIntervention`): `h + W₂ᵀ act(W₁ h + b₁)` — no orthogonality,
    /// no difference (`W₂`'s bias, with `add_bias`, is a parameter the formula does not use, as
    /// in pyreft).
    #[serde(rename = "direft")]
    DiReft,
    /// pyreft's `DireftIntervention`: `h + Rᵀ act(W h + b)`, with the orthonormal `R`.
    #[serde(rename = "direft_orthogonal")]
    DiReftOrthogonal,
    /// ConsReFT (`ConsreftIntervention`): `h + Rᵀ(b − R h)`, a constant source `b: [r]`; no
    /// dropout (as pyreft).
    #[serde(rename = "consreft")]
    ConsReft,
    /// LoBiReFT (`LobireftIntervention`): `h + Rᵀ b`.
    #[serde(rename = "lobireft")]
    LobiReft,
}

impl InterventionKind {
    /// Whether the kind has the orthonormal `R`.
    pub fn is_orthogonal(self) -> bool {
        matches!(
            self,
            InterventionKind::LoReft
                | InterventionKind::DiReftOrthogonal
                | InterventionKind::ConsReft
                | InterventionKind::LobiReft
        )
    }

    /// pyreft's class name.
    pub fn pyreft_class(self) -> &'static str {
        match self {
            InterventionKind::LoReft => "LoreftIntervention",
            InterventionKind::NoReft => "NoreftIntervention",
            InterventionKind::DiReft => "NodireftIntervention",
            InterventionKind::DiReftOrthogonal => "DireftIntervention",
            InterventionKind::ConsReft => "ConsreftIntervention",
            InterventionKind::LobiReft => "LobireftIntervention",
        }
    }

    /// The kind of a pyreft class name (`"LoreftIntervention"`, or pyvene's
    /// `"<class 'pyreft.interventions.LoreftIntervention'>"`).
    pub fn from_pyreft_class(name: &str) -> Result<Self> {
        let all = [
            InterventionKind::LoReft,
            InterventionKind::NoReft,
            InterventionKind::DiReft,
            InterventionKind::DiReftOrthogonal,
            InterventionKind::ConsReft,
            InterventionKind::LobiReft,
        ];
        let short = name.rsplit('.').next().unwrap_or(name).trim_end_matches("'>");
        all.into_iter().find(|k| k.pyreft_class() == short).ok_or_else(|| Error::Unsupported {
            field: "intervention_types".into(),
            reason: format!("`{name}` is not one of pyreft's six low-rank interventions"),
        })
    }
}

/// The activation applied to the learned source `W h + b` (transformers' `ACT2FN` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The identity (pyreft's default).
    #[default]
    Linear,
    /// `max(0, x)`.
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// `tanh`.
    Tanh,
    /// `x·σ(x)` (`"silu"`/`"swish"`).
    Silu,
    /// `σ(x)`.
    Sigmoid,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Linear => x.shallow_clone(),
            Activation::Relu => x.f_relu()?,
            Activation::Gelu => x.f_gelu("none")?,
            Activation::Tanh => x.f_tanh()?,
            Activation::Silu => x.f_silu()?,
            Activation::Sigmoid => x.f_sigmoid()?,
        })
    }
}

/// The hyper-parameters of one intervention.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InterventionConfig {
    /// Which intervention.
    pub kind: InterventionKind,
    /// Hidden size `d`.
    pub embed_dim: i64,
    /// Rank `r` (`1 ≤ r ≤ d`).
    pub low_rank_dimension: i64,
    /// Dropout on the intervened hidden state (pyreft drops the whole output `h + Δ`, in
    /// training only). Default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Activation on the learned source. Default linear.
    #[serde(default)]
    pub act_fn: Activation,
    /// A bias on NoReFT's/DiReFT's `W₂` (pyreft's `add_bias`). Default false.
    #[serde(default)]
    pub add_bias: bool,
    /// How `R` stays orthonormal (orthogonal kinds): a QR retraction after each step (default;
    /// see [`ReftModel::step`](super::ReftModel::step)) or CholeskyQR2 in every forward.
    #[serde(default)]
    pub orthogonality: Orthogonality,
}

impl InterventionConfig {
    /// A config with pyreft's defaults (no dropout, linear activation, no extra bias).
    pub fn new(kind: InterventionKind, embed_dim: i64, low_rank_dimension: i64) -> Self {
        InterventionConfig {
            kind,
            embed_dim,
            low_rank_dimension,
            dropout: 0.0,
            act_fn: Activation::Linear,
            add_bias: false,
            orthogonality: Orthogonality::Retraction,
        }
    }

    /// Checks ranks and probabilities.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_EMBED_DIM).contains(&self.embed_dim) {
            return Err(Error::config(
                "embed_dim",
                format!("{} is not in 1..={MAX_EMBED_DIM}", self.embed_dim),
            ));
        }
        if self.low_rank_dimension < 1 || self.low_rank_dimension > self.embed_dim {
            return Err(Error::config(
                "low_rank_dimension",
                format!(
                    "{} is not in [1, embed_dim = {}]",
                    self.low_rank_dimension, self.embed_dim
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", format!("{} is not in [0, 1)", self.dropout)));
        }
        Ok(())
    }

    /// The number of trainable parameters: `2dr + r` for LoReFT, NoReFT, DiReFT (plus `r` for
    /// `add_bias`), `dr + r` for ConsReFT and LoBiReFT.
    pub fn num_params(&self) -> i64 {
        let (d, r) = (self.embed_dim, self.low_rank_dimension);
        match self.kind {
            InterventionKind::LoReft | InterventionKind::DiReftOrthogonal => 2 * d * r + r,
            InterventionKind::NoReft | InterventionKind::DiReft => {
                2 * d * r + r + if self.add_bias { r } else { 0 }
            }
            InterventionKind::ConsReft | InterventionKind::LobiReft => d * r + r,
        }
    }
}

/// The widest hidden state an intervention config may declare (`embed_dim`): 2¹⁷.
pub const MAX_EMBED_DIM: i64 = 1 << 17;

/// A representation intervention: maps hidden states `[…, d]` (the gathered intervened
/// positions) to edited states of the same shape.
pub trait Intervention: std::fmt::Debug + Send {
    /// The config it was built with.
    fn config(&self) -> &InterventionConfig;

    /// The edited states, checked: the last dimension must be `d` and the input floating.
    fn f_forward_t(&self, h: &Tensor, train: bool) -> Result<Tensor>;

    /// The edit `forward(h) − h` (what is added back at the intervened positions), in `h`'s
    /// dtype. The default subtracts; implementations compute it directly when they can.
    fn f_delta_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.f_forward_t(h, train)?.f_sub(h)?)
    }

    /// The trainable variables with pyreft's state-dict names (`rotate_layer` holds the raw
    /// parameter `V` here, not `Rᵀ`; see [`Intervention::state_dict_pyreft`]).
    fn variables(&self) -> Vec<(String, Tensor)>;

    /// The state dict with pyreft's names and values: `rotate_layer` is the materialised
    /// `Rᵀ: [d, r]`; LoReFT's `learned_source` appears as `weight`/`bias` (its custom
    /// `state_dict`), the others as `learned_source.weight`, `proj_layer.weight`, … .
    fn state_dict_pyreft(&self) -> Result<Vec<(String, Tensor)>>;

    /// Loads a pyreft state dict (as [`state_dict_pyreft`](Self::state_dict_pyreft) writes it),
    /// strictly: every tensor present with its shape and a floating-point dtype, nothing else;
    /// nothing is written unless all of it checks.
    fn load_pyreft(&self, tensors: &HashMap<String, Tensor>, file: &std::path::Path) -> Result<()>;

    /// The checks of [`load_pyreft`](Self::load_pyreft) without writing anything: a model
    /// loading several interventions checks them all before loading any.
    fn check_pyreft(&self, tensors: &HashMap<String, Tensor>, file: &std::path::Path)
        -> Result<()>;
}

/// The low-rank intervention of any [`InterventionKind`].
#[derive(Debug)]
pub struct LowRankIntervention {
    config: InterventionConfig,
    /// Unconstrained `V: [d, r]`; `Rᵀ = orthonormalize(V)` (orthogonal kinds).
    rotate: Option<Tensor>,
    /// `W₂: [r, d]` (+ bias) of NoReFT/DiReFT.
    proj: Option<(Tensor, Option<Tensor>)>,
    /// `W: [r, d]`, `b: [r]` (learned source; for ConsReFT/LoBiReFT only `b`).
    source_w: Option<Tensor>,
    source_b: Tensor,
}

fn add(p: &nn::Path, name: &str, t: Tensor) -> Result<Tensor> {
    if p.get(name).is_some() {
        return Err(Error::DuplicateParameter(p.path(name)));
    }
    Ok(p.add(name, t, true))
}

impl LowRankIntervention {
    /// Whether a forward with `train` draws a dropout mask (as `forward` decides).
    pub(crate) fn draws_dropout(&self, train: bool) -> bool {
        train && self.config.dropout > 0.0 && self.config.kind != InterventionKind::ConsReft
    }

    /// A new intervention with its variables under `p`, initialised as pyreft does: `R`
    /// orthonormal (`orthogonal_`), the linear layers as `nn.Linear` (`U(±1/√d)`), the constant
    /// sources of ConsReFT/LoBiReFT `U(0, 1)`. Parameters are f32 (pyreft defaults its linear
    /// layers to bf16; give the dtype by converting the store).
    pub fn new(p: &nn::Path, config: InterventionConfig) -> Result<Self> {
        config.validate()?;
        let (d, r) = (config.embed_dim, config.low_rank_dimension);
        let opts = (Kind::Float, p.device());
        let bound = 1.0 / (d as f64).sqrt();
        let uniform = |shape: &[i64], lo: f64, hi: f64| -> Result<Tensor> {
            Ok(tch::no_grad(|| Tensor::f_empty(shape, opts)?.f_uniform_(lo, hi))?)
        };
        let kind = config.kind;
        let rotate = if kind.is_orthogonal() {
            let q = tch::no_grad(|| random_orthonormal(d, r, opts))?;
            Some(add(p, "rotate_layer", q)?)
        } else {
            None
        };
        let proj = if matches!(kind, InterventionKind::NoReft | InterventionKind::DiReft) {
            let pp = p / "proj_layer";
            let w = add(&pp, "weight", uniform(&[r, d], -bound, bound)?)?;
            let b = if config.add_bias {
                Some(add(&pp, "bias", uniform(&[r], -bound, bound)?)?)
            } else {
                None
            };
            Some((w, b))
        } else {
            None
        };
        let (source_w, source_b) = match kind {
            InterventionKind::ConsReft | InterventionKind::LobiReft => {
                (None, add(p, "learned_source", uniform(&[r], 0.0, 1.0)?)?)
            }
            _ => {
                let sp = p / "learned_source";
                let w = add(&sp, "weight", uniform(&[r, d], -bound, bound)?)?;
                (Some(w), add(&sp, "bias", uniform(&[r], -bound, bound)?)?)
            }
        };
        Ok(LowRankIntervention { config, rotate, proj, source_w, source_b })
    }

    /// `Rᵀ: [d, r]`, when the kind has it: the variable itself with
    /// [`Orthogonality::Retraction`] (orthonormal after each [`retract`](Self::retract)), its
    /// CholeskyQR2 factor with [`Orthogonality::Parametrized`] (differentiable in `V`).
    pub fn rotation(&self) -> Result<Option<Tensor>> {
        match self.config.orthogonality {
            Orthogonality::Retraction => Ok(self.rotate.as_ref().map(Tensor::shallow_clone)),
            Orthogonality::Parametrized => self.rotate.as_ref().map(orthonormalize).transpose(),
        }
    }

    /// Loads a file holding one intervention's pyreft state dict: safetensors (by extension) or
    /// a `torch.save` pickle (pyvene's `intkey_*.bin`), strictly (see
    /// [`Intervention::load_pyreft`]).
    pub fn load_pyreft_file(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors: HashMap<String, Tensor> =
            if path.extension().is_some_and(|e| e == "safetensors") {
                crate::io::read_safetensors(path)?.tensors.into_iter().collect()
            } else {
                crate::io::read_torch_dict(path)?.into_iter().collect()
            };
        self.load_pyreft(&tensors, path)
    }

    /// The rotation variable `V: [d, r]`, when the kind has it.
    pub fn rotation_variable(&self) -> Option<&Tensor> {
        self.rotate.as_ref()
    }

    /// Puts `R` back on the manifold after an optimizer step ([`Orthogonality::Retraction`];
    /// a no-op otherwise).
    pub fn retract(&self) -> Result<()> {
        match (&self.rotate, self.config.orthogonality) {
            (Some(v), Orthogonality::Retraction) => super::orthogonal::retract(v),
            _ => Ok(()),
        }
    }

    fn check(&self, h: &Tensor) -> Result<()> {
        let d = self.config.embed_dim;
        if h.size().last() != Some(&d) {
            return Err(Error::ShapeMismatch {
                name: format!("hidden states of a {:?} intervention", self.config.kind),
                expected: vec![-1, d],
                actual: h.size(),
            });
        }
        if !crate::lora::is_float(h.kind()) {
            return Err(Error::DtypeMismatch {
                name: "hidden states".into(),
                expected: "a floating-point kind".into(),
                actual: h.kind(),
            });
        }
        Ok(())
    }

    /// The edit `Δ` with `h + Δ` the intervened state, in the parameters' dtype.
    fn delta(&self, h: &Tensor) -> Result<Tensor> {
        let kind = self.source_b.kind();
        let x = h.f_to_kind(kind)?;
        let act = self.config.act_fn;
        let source = || -> Result<Tensor> {
            let w = self.source_w.as_ref().expect("kinds with a learned linear source");
            act.apply(&x.f_linear(w, Some(&self.source_b))?)
        };
        Ok(match self.config.kind {
            InterventionKind::LoReft => {
                let rt = self.rotation()?.expect("orthogonal");
                source()?.f_sub(&x.f_matmul(&rt)?)?.f_matmul(&rt.f_tr()?)?
            }
            InterventionKind::DiReftOrthogonal => {
                let rt = self.rotation()?.expect("orthogonal");
                source()?.f_matmul(&rt.f_tr()?)?
            }
            InterventionKind::ConsReft => {
                let rt = self.rotation()?.expect("orthogonal");
                self.source_b.f_sub(&x.f_matmul(&rt)?)?.f_matmul(&rt.f_tr()?)?
            }
            InterventionKind::LobiReft => {
                let rt = self.rotation()?.expect("orthogonal");
                // Rᵀ b, the same for every position
                rt.f_mv(&self.source_b)?.f_expand_as(&x)?
            }
            InterventionKind::NoReft => {
                let (w2, b2) = self.proj.as_ref().expect("NoReFT has proj_layer");
                source()?.f_sub(&x.f_linear(w2, b2.as_ref())?)?.f_matmul(w2)?
            }
            InterventionKind::DiReft => {
                let (w2, _) = self.proj.as_ref().expect("DiReFT has proj_layer");
                source()?.f_matmul(w2)?
            }
        })
    }

    /// pyreft's plain `state_dict()` as well as its custom one: torch's orthogonal
    /// parametrisation (`rotate_layer.parametrizations.weight.original` and `….0.base`) becomes
    /// the materialised `rotate_layer`, and the scalar buffers `embed_dim`/`interchange_dim` are
    /// checked and dropped.
    fn normalize(
        &self,
        tensors: &HashMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<HashMap<String, Tensor>> {
        let mut t: HashMap<String, Tensor> =
            tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        const ORIG: &str = "rotate_layer.parametrizations.weight.original";
        const BASE: &str = "rotate_layer.parametrizations.weight.0.base";
        if let Some(orig) = t.remove(ORIG) {
            let base = t.remove(BASE).ok_or_else(|| Error::MissingTensor {
                name: BASE.into(),
                file: file.to_path_buf(),
            })?;
            let d = self.config.embed_dim;
            if base.size() != [d, d] || orig.size().first() != Some(&d) {
                return Err(Error::ShapeMismatch {
                    name: ORIG.into(),
                    expected: vec![d, self.config.low_rank_dimension],
                    actual: orig.size(),
                });
            }
            let q = super::orthogonal::from_torch_householder(
                &orig.f_to_kind(Kind::Double)?,
                &base.f_to_kind(Kind::Double)?,
            )?;
            t.insert("rotate_layer".into(), q);
        }
        for scalar in ["embed_dim", "interchange_dim"] {
            if let Some(v) = t.remove(scalar) {
                let ok = v.numel() == 1
                    && (scalar != "embed_dim"
                        || v.f_to_kind(Kind::Int64)?.f_int64_value(&[])? == self.config.embed_dim);
                if !ok {
                    return Err(Error::ShapeMismatch {
                        name: scalar.into(),
                        expected: vec![self.config.embed_dim],
                        actual: v.size(),
                    });
                }
            }
        }
        Ok(t)
    }

    /// `(variable name, source)` for every variable, checked: present, shaped as the variable,
    /// floating-point; nothing else in the file.
    fn checked_pairs(
        &self,
        tensors: &HashMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<Vec<(String, Tensor)>> {
        let tensors = self.normalize(tensors, file)?;
        let own = self.state_dict_pyreft()?;
        let mut pairs = Vec::new();
        for (name, like) in &own {
            let src = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: file.to_path_buf(),
            })?;
            if src.size() != like.size() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: like.size(),
                    actual: src.size(),
                });
            }
            if !crate::lora::is_float(src.kind()) {
                return Err(Error::DtypeMismatch {
                    name: name.clone(),
                    expected: "a floating-point kind".into(),
                    actual: src.kind(),
                });
            }
            pairs.push((name.clone(), src.shallow_clone()));
        }
        if let Some(extra) = tensors.keys().filter(|k| !own.iter().any(|(n, _)| n == *k)).min() {
            return Err(Error::UnexpectedTensor { name: extra.clone(), file: file.to_path_buf() });
        }
        Ok(pairs)
    }

    fn pyreft_names(&self) -> Vec<(String, Option<&Tensor>)> {
        let mut v: Vec<(String, Option<&Tensor>)> = Vec::new();
        let lo = self.config.kind == InterventionKind::LoReft;
        if let Some(w) = &self.source_w {
            let prefix = if lo { "" } else { "learned_source." };
            v.push((format!("{prefix}weight"), Some(w)));
            v.push((format!("{prefix}bias"), Some(&self.source_b)));
        } else {
            v.push(("learned_source".into(), Some(&self.source_b)));
        }
        if let Some((w, b)) = &self.proj {
            v.push(("proj_layer.weight".into(), Some(w)));
            if let Some(b) = b {
                v.push(("proj_layer.bias".into(), Some(b)));
            }
        }
        if self.rotate.is_some() {
            // materialised Rᵀ, not the variable
            v.push(("rotate_layer".into(), None));
        }
        v
    }
}

impl Intervention for LowRankIntervention {
    fn config(&self) -> &InterventionConfig {
        &self.config
    }

    fn f_forward_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        self.check(h)?;
        let out = h.f_add(&self.delta(h)?.f_to_kind(h.kind())?)?;
        let p = self.config.dropout;
        if train && p > 0.0 && self.config.kind != InterventionKind::ConsReft {
            return Ok(out.f_dropout(p, true)?);
        }
        Ok(out)
    }

    fn f_delta_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let dropout =
            train && self.config.dropout > 0.0 && self.config.kind != InterventionKind::ConsReft;
        if dropout {
            // dropout acts on the whole output h + Δ (pyreft)
            return Ok(self.f_forward_t(h, train)?.f_sub(h)?);
        }
        self.check(h)?;
        Ok(self.delta(h)?.f_to_kind(h.kind())?)
    }

    fn variables(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .pyreft_names()
            .into_iter()
            .filter_map(|(n, t)| t.map(|t| (n, t.shallow_clone())))
            .collect();
        if let Some(r) = &self.rotate {
            v.push(("rotate_layer".into(), r.shallow_clone()));
        }
        v
    }

    fn state_dict_pyreft(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (n, t) in self.pyreft_names() {
            let t = match t {
                Some(t) => t.detach(),
                None => tch::no_grad(|| self.rotation())?.expect("rotate").detach(),
            };
            out.push((n, t));
        }
        Ok(out)
    }

    fn check_pyreft(
        &self,
        tensors: &HashMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<()> {
        self.checked_pairs(tensors, file).map(drop)
    }

    fn load_pyreft(&self, tensors: &HashMap<String, Tensor>, file: &std::path::Path) -> Result<()> {
        let pairs = self.checked_pairs(tensors, file)?;
        let vars: HashMap<String, Tensor> = self.variables().into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (name, src) in pairs {
            // `rotate_layer` is Rᵀ, already orthonormal: V = Rᵀ reproduces it
            let mut dst = vars[&name].shallow_clone();
            dst.f_copy_(&src.f_to_kind(dst.kind())?.f_to_device(dst.device())?)?;
        }
        Ok(())
    }
}
