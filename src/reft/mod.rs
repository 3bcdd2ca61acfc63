//! ReFT: representation fine-tuning (Wu et al. 2024, <https://arxiv.org/abs/2404.03592>) —
//! low-rank interventions on a frozen model's hidden states at chosen layers and token
//! positions, with pyreft 0.1's formulas, position rules and state-dict names.
//!
//! * [`InterventionKind`], [`InterventionConfig`], the [`Intervention`] trait and
//!   [`LowRankIntervention`]: LoReFT `h + Rᵀ(W h + b − R h)`, NoReFT, DiReFT, pyreft's
//!   orthogonal DiReFT, ConsReFT, LoBiReFT.
//! * [`orthogonal`]: how `R` keeps orthonormal rows (a QR retraction after each step by
//!   default, [`ReftModel::step`]; or CholeskyQR2 in every forward).
//! * [`Positions`]: `f{p}+l{s}` with pyreft's `n/2` truncation, tied or untied.
//! * [`ReftModel`]: the interventions of a model, applied through a
//!   [`ResidualHook`](crate::models::ResidualHook); save/load with the whole config; import of
//!   pyvene save directories.
//!
//! The mapping to pyreft, its quirks and the file formats: `docs/reft.md`.

mod intervention;
mod model;
pub mod orthogonal;
mod positions;

pub use intervention::{
    Activation, Intervention, InterventionConfig, InterventionKind, LowRankIntervention,
    MAX_EMBED_DIM,
};
pub use model::{
    AllLayers, ReftConfig, ReftHook, ReftLayers, ReftModel, REFT_CONFIG_NAME, REFT_WEIGHTS_NAME,
};
pub use orthogonal::Orthogonality;
pub use positions::{Positions, MAX_POSITIONS};
