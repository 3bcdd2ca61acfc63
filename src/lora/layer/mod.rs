//! The LoRA layer types and the one contract they share.
//!
//! Every adapted layer — [`LoraLinear`] (with DoRA as its variant, `dora.rs`), [`LoraEmbedding`],
//! [`LoraConv2d`] and a `modules_to_save` copy ([`ModuleCopy`]) — implements the crate-private,
//! object-safe [`LoraLayer`]: its bookkeeping (the [`Adapter`] supertrait), its merge state (one
//! [`MergeState`] for weight and bias, `merge.rs`) and what the adapter registry does to every
//! layer alike (merge, unmerge, enable, initialise from the loaded base). [`Attach`] adds what
//! only a concrete type can say: the frozen base its adapters share, and how to put a new
//! adapter on it. The named adapters of one layer live in a [`LoraStack`] (`stack.rs`).
//!
//! Both traits are `pub` in this private module: sealed, so that the public [`LoraStack`] can
//! name them in its bounds while no code outside the crate can name or implement them.

mod base;
mod conv2d;
mod copy;
mod dora;
mod embedding;
mod forward;
#[cfg(tch_peft_csrc)]
pub(crate) mod fused;
mod init;
mod linear;
mod merge;
mod stack;

use tch::{nn, Kind, Tensor};

pub use base::LinearBase;
pub(crate) use conv2d::ConvBase;
pub use conv2d::{Conv2dConfig, LoraConv2d};
pub use copy::ModuleCopy;
pub(crate) use copy::{CopyBase, CopyKind};
pub use embedding::LoraEmbedding;
pub use forward::{custom_cuda_kernels_available, fused_kernel_available, set_custom_cuda_kernels};
pub use linear::LoraLinear;
pub(crate) use merge::{all_finite, compute_kind, MergeState};
pub use stack::LoraStack;

use super::config::LoraConfig;
use crate::adapter::Adapter;
use crate::{Error, Result};

/// What the adapter registry does to every LoRA layer, whatever its type (object safe: the
/// registry holds `&dyn LoraLayer`s of mixed types). `is_merged`, `is_enabled` and enabling come
/// from the layer's [`MergeState`].
pub trait LoraLayer: Adapter {
    /// The layer's enabled flag and merge state (shared by its handles).
    fn merge_state(&self) -> &MergeState;
    /// Merges this adapter into the base tensors (`safe`: refusing non-finite values).
    fn merge_layer(&self, safe: bool) -> Result<()>;
    /// Restores the base tensors bit-exactly.
    fn unmerge_layer(&self) -> Result<()>;
    /// Runs the initialisation that needs the loaded base weight (DoRA, PiSSA, OLoRA, a module
    /// copy); a no-op where there is none.
    fn init_from_base(&self) -> Result<()>;
    /// Marks that initialisation done (a trained adapter was loaded) or pending.
    fn set_base_ready(&self, ready: bool);
    /// Handles on the adapter's low-rank tensors (shared storage); `None` for a module copy.
    fn factors(&self) -> Option<Factors>;

    /// Whether the adapter is folded into the base tensors.
    fn merged(&self) -> bool {
        self.merge_state().is_merged()
    }
    /// Whether it was merged for good (`LoraLinear::into_merged_linear`): its update is part of
    /// the base from then on, and its stack drops it.
    fn merged_for_good(&self) -> bool {
        self.merge_state().is_merged_for_good()
    }
    /// Whether its branch runs in the forward.
    fn enabled(&self) -> bool {
        self.merge_state().is_enabled()
    }
    /// Enables or disables it; disabling a merged layer unmerges it first (as PEFT).
    fn enable(&self, enabled: bool) -> Result<()> {
        if !enabled && self.merged() {
            self.unmerge_layer()?;
        }
        self.merge_state().store_enabled(enabled);
        Ok(())
    }
}

/// What only a concrete layer type can say: the frozen base its adapters share, and how a new
/// adapter is attached to it.
pub trait Attach: LoraLayer + Sized {
    /// The frozen base the adapters of one stack share.
    type Base: std::fmt::Debug;
    /// A second handle on the same layer (shared tensors and state).
    fn share(&self) -> Self;
    /// A second handle on the base.
    fn share_base(base: &Self::Base) -> Self::Base;
    /// A new adapter on `base`, its variables under `p`, sharing the stack's base `lock`.
    fn attach(
        base: &Self::Base,
        lock: &merge::BaseLock,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self>;
    /// `(rows, cols)` whose minimum bounds the rank.
    fn rank_bound(base: &Self::Base) -> (i64, i64);
    /// The first variable an adapter of this type would register under `p`, if it exists.
    fn registered(p: &nn::Path) -> Option<String>;
}

/// An adapter's tensors on one layer, whatever its type: `A: [r, …]` and `B: [out, r, …]`
/// (linear `[r, in]`/`[out, r]`, embedding `[r, V]`/`[d, r]`, convolution `[r, in, kh, kw]`/
/// `[out, r, 1, 1]`), so that `B.reshape(out, r) · A.reshape(r, −1)` is the update up to its
/// layout.
#[derive(Debug)]
pub struct Factors {
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
    pub(crate) scaling: f64,
    pub(crate) magnitude: Option<Tensor>,
    pub(crate) lora_b_bias: Option<Tensor>,
}

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// `p`'s components joined with dots: the module path.
pub(crate) fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// Registers a trainable variable under `p / sub / name`, refusing to overwrite (tch would
/// silently rename it `name__N`).
pub(crate) fn add_var(p: &nn::Path, sub: &str, name: &str, t: Tensor) -> Result<Tensor> {
    let sp = p / sub;
    if sp.get(name).is_some() {
        return Err(Error::DuplicateParameter(sp.path(name)));
    }
    Ok(sp.add(name, t, true))
}
