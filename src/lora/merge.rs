//! Merge bookkeeping shared by the LoRA layers: the kept original, the enabled flag, and the
//! merge arithmetic (in f32, or f64 for an f64 base; the original restored bit-exactly).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Whether every value is finite (one host sync; merge paths only).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.int64_value(&[]) != 0)
}

/// A copy of `t` with its own storage (the original kept while merged).
pub(crate) fn snapshot(t: &Tensor) -> Result<Tensor> {
    let mut c = t.f_zeros_like()?;
    c.f_copy_(t)?;
    Ok(c)
}

/// The pre-merge copy a merge keeps for a bit-exact unmerge: in host memory for a tensor on an
/// accelerator (a merge is for inference, where device memory is what counts; the unmerge
/// copies it back), else a plain copy.
pub(crate) fn merge_snapshot(t: &Tensor) -> Result<Tensor> {
    if t.device() == tch::Device::Cpu {
        snapshot(t)
    } else {
        Ok(t.f_to_device(tch::Device::Cpu)?)
    }
}

/// The kind merges compute in: f64 for an f64 base, else f32.
pub(crate) fn compute_kind(base: Kind) -> Kind {
    if base == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Enabled flag and kept original of a layer whose merge writes one weight tensor. Clones share
/// the state (they are handles on the same layer).
#[derive(Debug, Clone)]
pub(crate) struct WeightMerge {
    enabled: Arc<AtomicBool>,
    original: Arc<Mutex<Option<Tensor>>>,
}

impl WeightMerge {
    pub(crate) fn new() -> Self {
        WeightMerge { enabled: Arc::new(AtomicBool::new(true)), original: Default::default() }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Disabling a merged layer unmerges it first (as PEFT).
    pub(crate) fn set_enabled(&self, enabled: bool, weight: &Tensor, module: &str) -> Result<()> {
        if !enabled && self.is_merged() {
            self.unmerge(weight, module)?;
        }
        self.enabled.store(enabled, Ordering::Release);
        Ok(())
    }

    pub(crate) fn is_merged(&self) -> bool {
        self.original.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// `weight ← weight + delta` (computed in f32/f64, stored in the weight's dtype), keeping the
    /// original; with `safe`, refuses non-finite results and writes nothing.
    pub(crate) fn merge(
        &self,
        weight: &Tensor,
        delta: &Tensor,
        safe: bool,
        module: &str,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut original = self.original.lock().unwrap_or_else(|e| e.into_inner());
        if original.is_some() {
            return Err(Error::MergeState { module: module.into(), state: "already merged" });
        }
        let compute = compute_kind(weight.kind());
        let merged = weight
            .f_to_kind(compute)?
            .f_add(&delta.f_to_kind(compute)?)?
            .f_to_kind(weight.kind())?;
        if safe && !all_finite(&merged)? {
            return Err(Error::NonFiniteMerge { module: module.into() });
        }
        let saved = merge_snapshot(weight)?;
        weight.shallow_clone().f_copy_(&merged)?;
        *original = Some(saved);
        Ok(())
    }

    /// Restores the kept original bit-exactly.
    pub(crate) fn unmerge(&self, weight: &Tensor, module: &str) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut original = self.original.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = original.take() else {
            return Err(Error::MergeState { module: module.into(), state: "not merged" });
        };
        if let Err(e) = weight.shallow_clone().f_copy_(&saved) {
            *original = Some(saved);
            return Err(e.into());
        }
        Ok(())
    }
}
