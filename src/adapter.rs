//! The [`Adapter`] trait: the bookkeeping contract every method of this crate implements, and the
//! trainable-parameter report.
//!
//! An adapter is something that changes what a pre-trained model computes while leaving most of
//! its weights alone. The four families of this crate do that in different ways, so the trait is
//! not a forward pass (layers that have one, such as [`LoraLinear`](crate::lora::LoraLinear),
//! implement `tch::nn::ModuleT` separately). It says:
//!
//! * **what it is**: [`kind`](Adapter::kind) and [`name`](Adapter::name);
//! * **which tensors it owns and trains**: [`named_tensors`](Adapter::named_tensors),
//!   [`trainable_tensors`](Adapter::trainable_tensors) and the parameter counts;
//! * **its state for saving**: [`state_dict`](Adapter::state_dict), keyed by the names the
//!   on-disk format uses.
//!
//! What can be folded into a model's own variables and taken out again (merging LoRA, a freeze
//! plan, writing an interpolated checkpoint) also implements the narrower [`Applicable`]:
//! [`apply`](Applicable::apply) / [`revert`](Applicable::revert). ReFT does not: an
//! intervention edits hidden states at chosen positions, there is no weight to fold it into.
//!
//! How each family maps onto them:
//!
//! | family | owns | trains | [`Applicable`]: `apply` / `revert` |
//! |---|---|---|---|
//! | LoRA ([`LoraLinear`](crate::lora::LoraLinear), [`LoraAdapter`](crate::lora::LoraAdapter); kind DoRA with `use_dora`) | `lora_A`, `lora_B` (DoRA: and the magnitude) per module | all of them | merge `W ← W + s·BA` / unmerge, restoring the saved original bit-exactly |
//! | ReFT (LoReFT, DiReFT, ...) | `R`, `W`, `b` per intervention | all of them | not implemented |
//! | Freezing (a freeze plan over a `VarStore`) | nothing new: it names the model's own variables | the variables left unfrozen | freeze the selected variables / unfreeze them |
//! | Weight interpolation ([`WiseFt`](crate::merge::WiseFt)) | the endpoint checkpoints θ₀, θ₁ | nothing | write `θ(α) = (1−α)θ₀ + αθ₁` into the model / restore what it held |
//!
//! Both traits are object safe, so adapters of different families can sit in one
//! `Vec<Box<dyn Adapter>>` (or `Vec<Box<dyn Applicable>>`).

use std::fmt;

use tch::nn::VarStore;
use tch::Tensor;

use crate::Result;

/// The method family an adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AdapterKind {
    /// Low-rank adaptation of weights (`W + s·BA`), including rsLoRA scaling.
    Lora,
    /// Weight-decomposed LoRA (magnitude and direction).
    Dora,
    /// A representation intervention (LoReFT and kin).
    Reft,
    /// A freeze plan over a model's variables.
    Freeze,
    /// Weight interpolation or merging of whole checkpoints.
    Interpolation,
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            AdapterKind::Lora => "LoRA",
            AdapterKind::Dora => "DoRA",
            AdapterKind::Reft => "ReFT",
            AdapterKind::Freeze => "freeze",
            AdapterKind::Interpolation => "interpolation",
        };
        f.write_str(s)
    }
}

/// The bookkeeping contract shared by LoRA, ReFT, freezing and weight interpolation.
///
/// See the [module documentation](self) for how each family maps onto it.
pub trait Adapter {
    /// The method family.
    fn kind(&self) -> AdapterKind;

    /// The adapter's name: the adapted module's path for a single layer, the adapter name
    /// (PEFT's `"default"`) for a model-level adapter.
    fn name(&self) -> &str;

    /// Every tensor the adapter owns, with its full name (e.g.
    /// `model.layers.0.self_attn.q_proj.lora_A.weight`). The tensors are shallow clones: they
    /// share storage with the adapter.
    fn named_tensors(&self) -> Vec<(String, Tensor)>;

    /// The owned tensors that currently receive gradients (`requires_grad`).
    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_tensors().into_iter().filter(|(_, t)| t.requires_grad()).collect()
    }

    /// Number of scalar parameters the adapter owns.
    fn num_parameters(&self) -> i64 {
        self.named_tensors().iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Number of scalar parameters that currently receive gradients.
    fn num_trainable_parameters(&self) -> i64 {
        self.trainable_tensors().iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// The tensors to save, keyed by their on-disk names (for LoRA, PEFT's names without the
    /// `base_model.model.` prefix, which the file layer adds).
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.named_tensors()
    }
}

/// What can be applied to a model's own variables and reverted exactly: merging LoRA into the
/// base weights, a freeze plan, writing an interpolated checkpoint. See the [module
/// documentation](self).
pub trait Applicable: Adapter {
    /// Applies the adapter to the model's own variables: merge for LoRA (the same as its
    /// inherent `merge`), freeze for a freeze plan, write `θ(α)` for interpolation. Applying a
    /// layer, a freeze plan or an interpolation that is already applied is an
    /// [`Error::MergeState`](crate::Error::MergeState); a [`LoraAdapter`](crate::lora::LoraAdapter)
    /// merges those of its active adapters that are not merged yet.
    fn apply(&mut self) -> Result<()>;

    /// Undoes [`apply`](Applicable::apply), restoring the variables exactly as they were.
    fn revert(&mut self) -> Result<()>;

    /// Whether the adapter is currently applied (for a model-level LoRA adapter: every active
    /// adapter merged in every layer that hosts it).
    fn is_applied(&self) -> bool;
}

/// One row of a [`ParamReport`]: a variable, its shape and whether it trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    /// The variable's full name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its number of scalars.
    pub numel: i64,
    /// Whether it currently receives gradients.
    pub trainable: bool,
}

/// Trainable versus total parameters, printed in PEFT's format.
///
/// ```
/// use tch_peft::ParamReport;
/// let report = ParamReport::from_counts(3_328, 26_016);
/// assert_eq!(
///     report.to_string(),
///     "trainable params: 3,328 || all params: 26,016 || trainable%: 12.7921"
/// );
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamReport {
    /// Per-variable rows, sorted by name (empty when built from counts).
    pub entries: Vec<ParamEntry>,
    /// Number of trainable scalars.
    pub trainable: i64,
    /// Number of scalars in all.
    pub total: i64,
}

impl ParamReport {
    /// A report from bare counts.
    pub fn from_counts(trainable: i64, total: i64) -> Self {
        ParamReport { entries: Vec::new(), trainable, total }
    }

    /// A report over every variable of the given stores (e.g. the frozen base store and the
    /// adapter store). A variable counts as trainable when it requires grad now, so a frozen
    /// store counts as frozen even though tch still lists its variables as "trainable".
    pub fn from_var_stores(stores: &[&VarStore]) -> Self {
        let mut entries = Vec::new();
        for vs in stores {
            for (name, t) in vs.variables() {
                let numel = t.numel() as i64;
                entries.push(ParamEntry {
                    name,
                    shape: t.size(),
                    numel,
                    trainable: t.requires_grad(),
                });
            }
        }
        Self::from_entries(entries)
    }

    /// This report with the weights of 4-bit layers (held outside any store; `(weight name,
    /// layer)`, as [`Llama::quantized_layers`](crate::models::llama::Llama::quantized_layers)
    /// lists them) added as frozen rows of their float size, `out · in`: what PEFT's
    /// `print_trainable_parameters` counts for bitsandbytes' 4-bit weights (it doubles their
    /// packed byte count back; [`QuantLinear::num_parameters_bnb`](crate::quant::QuantLinear::num_parameters_bnb)
    /// is the packed count transformers' `num_parameters()` reports).
    pub fn with_quantized(self, layers: &[(String, &crate::quant::QuantLinear)]) -> Self {
        let mut entries = self.entries;
        for (name, l) in layers {
            let (o, i) = (l.out_features(), l.in_features());
            entries.push(ParamEntry {
                name: name.clone(),
                shape: vec![o, i],
                numel: o * i,
                trainable: false,
            });
        }
        Self::from_entries(entries)
    }

    /// A report over named tensors (as returned by [`Adapter::named_tensors`]).
    pub fn from_named_tensors(tensors: &[(String, Tensor)]) -> Self {
        let entries = tensors
            .iter()
            .map(|(name, t)| ParamEntry {
                name: name.clone(),
                shape: t.size(),
                numel: t.numel() as i64,
                trainable: t.requires_grad(),
            })
            .collect();
        Self::from_entries(entries)
    }

    fn from_entries(mut entries: Vec<ParamEntry>) -> Self {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let total = entries.iter().map(|e| e.numel).sum();
        let trainable = entries.iter().filter(|e| e.trainable).map(|e| e.numel).sum();
        ParamReport { entries, trainable, total }
    }

    /// Percentage of trainable parameters (0 when there are none at all).
    pub fn trainable_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }

    /// A multi-line table: one row per variable, then the one-line summary.
    pub fn table(&self) -> String {
        let width = self.entries.iter().map(|e| e.name.len()).max().unwrap_or(4).max(4);
        let mut out = format!("{:<width$}  {:>14}  {:>12}  trainable\n", "name", "shape", "params");
        for e in &self.entries {
            let shape = format!("{:?}", e.shape);
            out.push_str(&format!(
                "{:<width$}  {:>14}  {:>12}  {}\n",
                e.name,
                shape,
                thousands(e.numel),
                if e.trainable { "yes" } else { "no" }
            ));
        }
        out.push_str(&self.to_string());
        out
    }
}

impl fmt::Display for ParamReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.total),
            self.trainable_percent()
        )
    }
}

/// Formats an integer with `,` thousands separators, as Python's `{:,d}` (`1234567` →
/// `"1,234,567"`).
pub(crate) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_matches_python_format() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(26_016), "26,016");
        assert_eq!(thousands(1_234_567_890), "1,234,567,890");
        assert_eq!(thousands(-1234), "-1,234");
    }

    #[test]
    fn report_matches_peft_print_trainable_parameters() {
        // PEFT 0.21.2 `print_trainable_parameters`, measured (PEFT-ANCHORS.md §1.11).
        let r = ParamReport::from_counts(3328, 26016);
        assert_eq!(
            r.to_string(),
            "trainable params: 3,328 || all params: 26,016 || trainable%: 12.7921"
        );
    }

    #[test]
    fn empty_report_has_zero_percent() {
        assert_eq!(
            ParamReport::default().to_string(),
            "trainable params: 0 || all params: 0 || trainable%: 0.0000"
        );
    }
}
