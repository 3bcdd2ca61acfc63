//! Merge bookkeeping shared by the LoRA layers ([`MergeState`]): the enabled flag, the kept
//! original, and the merge arithmetic (in f32, or f64 for an f64 base; the original restored
//! bit-exactly).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tch::{Kind, Tensor};

use crate::quant::{Bnb4bitWeight, QuantLinear};
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

/// `weight + delta`, computed in f32 (f64 for an f64 weight) and stored in the weight's dtype.
pub(crate) fn add_in_compute_kind(weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let compute = compute_kind(weight.kind());
    Ok(weight.f_to_kind(compute)?.f_add(&delta.f_to_kind(compute)?)?.f_to_kind(weight.kind())?)
}

/// The base weight a merge writes: a float tensor, or a 4-bit layer's weight (the merged float
/// weight is quantized again into the layer's layout, as PEFT does on a bitsandbytes base).
#[derive(Clone, Copy)]
pub(crate) enum WeightRef<'a> {
    Dense(&'a Tensor),
    Quant(&'a QuantLinear),
}

impl<'a> From<&'a Tensor> for WeightRef<'a> {
    fn from(t: &'a Tensor) -> Self {
        WeightRef::Dense(t)
    }
}

/// A pre-merge weight kept for the unmerge.
#[derive(Debug)]
enum KeptWeight {
    Dense(Tensor),
    /// The 4-bit weight's parts (with its nested offset), copied.
    Quant(Bnb4bitWeight),
}

impl WeightRef<'_> {
    fn snapshot(self) -> Result<KeptWeight> {
        Ok(match self {
            WeightRef::Dense(t) => KeptWeight::Dense(merge_snapshot(t)?),
            WeightRef::Quant(q) => KeptWeight::Quant(q.weight().map_parts(merge_snapshot)?),
        })
    }

    /// Writes the merged float weight `w`: copied in, or quantized into the layer's layout.
    fn write(self, w: &Tensor) -> Result<()> {
        match self {
            WeightRef::Dense(t) => {
                t.shallow_clone().f_copy_(w)?;
            }
            WeightRef::Quant(q) => {
                let old = q.weight();
                let nested = old.nested().is_some();
                let new = Bnb4bitWeight::quantize(w, old.quant_type(), old.blocksize(), nested)?;
                q.load("merged weight", &new)?;
            }
        }
        Ok(())
    }

    fn restore(self, kept: &KeptWeight) -> Result<()> {
        match (self, kept) {
            (WeightRef::Dense(t), KeptWeight::Dense(k)) => {
                t.shallow_clone().f_copy_(k)?;
            }
            (WeightRef::Quant(q), KeptWeight::Quant(k)) => q.load("kept weight", k)?,
            _ => unreachable!("a layer's base does not change kind"),
        }
        Ok(())
    }
}

/// What a layer keeps while merged.
#[derive(Debug)]
enum Kept {
    /// Not merged.
    Nothing,
    /// Merged: the base weight and bias as they were, for a bit-exact unmerge.
    Original(KeptWeight, Option<Tensor>),
    /// Merged for good (`into_merged_linear`): nothing to restore.
    NoOriginal,
}

/// The lock every handle on one base weight shares, across the adapters of a stack: forwards
/// hold it for reading while they read the base weight, and whatever writes the base weight
/// (merge, unmerge, merging for good, PiSSA/OLoRA initialisation) holds it for writing, so a
/// forward on another thread sees the weight wholly merged or wholly unmerged.
#[derive(Debug, Clone, Default)]
pub struct BaseLock(Arc<RwLock<()>>);

impl BaseLock {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether two handles share this lock (one base weight).
    pub(crate) fn same(&self, other: &BaseLock) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct MergeInner {
    /// The base weight's lock: the stack's, or the layer's own when it has no stack.
    base: OnceLock<BaseLock>,
    enabled: AtomicBool,
    /// `kept`'s variant ([`Kept::tag`]), for the forward's and the stacks' lock-free checks;
    /// written only together with `kept`, under its lock.
    state: AtomicU8,
    kept: Mutex<Kept>,
}

impl Kept {
    /// 0 not merged, 1 merged with the original kept, 2 merged for good.
    fn tag(&self) -> u8 {
        match self {
            Kept::Nothing => 0,
            Kept::Original(..) => 1,
            Kept::NoOriginal => 2,
        }
    }
}

/// The enabled flag and the merge state every LoRA layer type shares (linear, embedding,
/// convolution, a module copy): one implementation of merging a new weight (and bias) into the
/// base tensors with the originals kept, of the bit-exact unmerge, and of merging for good.
/// Clones share the state (they belong to handles on the same layer).
#[derive(Debug, Clone)]
pub struct MergeState(Arc<MergeInner>);

impl MergeState {
    pub(crate) fn new() -> Self {
        MergeState(Arc::new(MergeInner {
            base: OnceLock::new(),
            enabled: AtomicBool::new(true),
            state: AtomicU8::new(0),
            kept: Mutex::new(Kept::Nothing),
        }))
    }

    /// The base weight's lock (see [`BaseLock`]).
    pub(crate) fn base_lock(&self) -> &BaseLock {
        self.0.base.get_or_init(BaseLock::default)
    }

    /// Makes `lock` this layer's base lock: a layer attached to a stack shares the stack's.
    /// Only a new layer, whose lock nothing has used yet, can adopt one.
    pub(crate) fn adopt_base_lock(&self, module: &str, lock: &BaseLock) -> Result<()> {
        self.0.base.set(lock.clone()).map_err(|_| Error::MergeState {
            module: module.into(),
            state: "already in use (only a new adapter can join a layer)",
        })
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Acquire)
    }

    pub(crate) fn store_enabled(&self, enabled: bool) {
        self.0.enabled.store(enabled, Ordering::Release);
    }

    pub(crate) fn is_merged(&self) -> bool {
        self.0.state.load(Ordering::Acquire) != 0
    }

    /// Whether the layer was merged for good (no original to restore).
    pub(crate) fn is_merged_for_good(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == 2
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces what is kept (the caller holds the lock) and its lock-free mirror.
    fn set(&self, kept: &mut Kept, new: Kept) {
        self.0.state.store(new.tag(), Ordering::Release);
        *kept = new;
    }

    /// Writes `merged()`'s weight (and bias, where both exist) into `weight` (and `bias`),
    /// keeping the originals (in host memory for tensors on an accelerator). Refuses when
    /// already merged; with `safe`, refuses non-finite values and writes nothing.
    pub(crate) fn merge<'w>(
        &self,
        module: &str,
        weight: impl Into<WeightRef<'w>>,
        bias: Option<&Tensor>,
        safe: bool,
        merged: impl FnOnce() -> Result<(Tensor, Option<Tensor>)>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let _base = self.base_lock().write();
        let mut kept = self.lock();
        if !matches!(*kept, Kept::Nothing) {
            return Err(Error::MergeState { module: module.into(), state: "already merged" });
        }
        let (w, b) = merged()?;
        if safe && !(all_finite(&w)? && b.as_ref().map_or(Ok(true), all_finite)?) {
            return Err(Error::NonFiniteMerge { module: module.into() });
        }
        let weight = weight.into();
        let saved_w = weight.snapshot()?;
        let saved_b = match (bias, &b) {
            (Some(bias), Some(_)) => Some(merge_snapshot(bias)?),
            _ => None,
        };
        if let Err(e) = weight.write(&w) {
            weight.restore(&saved_w)?;
            return Err(e);
        }
        if let (Some(bias), Some(b)) = (bias, &b) {
            if let Err(e) = bias.shallow_clone().f_copy_(b) {
                // leave the layer as it was: unmerged, the original weight back
                weight.restore(&saved_w)?;
                return Err(e.into());
            }
        }
        self.set(&mut kept, Kept::Original(saved_w, saved_b));
        Ok(())
    }

    /// Restores the kept originals bit-exactly.
    pub(crate) fn unmerge<'w>(
        &self,
        module: &str,
        weight: impl Into<WeightRef<'w>>,
        bias: Option<&Tensor>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let _base = self.base_lock().write();
        let mut kept = self.lock();
        let (saved_w, saved_b) = match &*kept {
            Kept::Original(w, b) => (w, b),
            Kept::NoOriginal => {
                let state = "merged for good by `into_merged_linear` (no original kept)";
                return Err(Error::MergeState { module: module.into(), state });
            }
            Kept::Nothing => {
                return Err(Error::MergeState { module: module.into(), state: "not merged" })
            }
        };
        // on failure the layer stays merged, its original kept
        weight.into().restore(saved_w)?;
        if let (Some(bias), Some(sb)) = (bias, saved_b) {
            bias.shallow_clone().f_copy_(sb)?;
        }
        self.set(&mut kept, Kept::Nothing);
        Ok(())
    }

    /// Merges for good: writes `merged()` when not merged yet, and drops any kept original, so
    /// that every handle sees the layer merged and none can unmerge.
    pub(crate) fn merge_for_good<'w>(
        &self,
        weight: impl Into<WeightRef<'w>>,
        bias: Option<&Tensor>,
        merged: impl FnOnce() -> Result<(Tensor, Option<Tensor>)>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let _base = self.base_lock().write();
        let mut kept = self.lock();
        if matches!(*kept, Kept::Nothing) {
            let (w, b) = merged()?;
            // the bias first (small: its copy is the only one kept), then the weight
            let mut saved_b = None;
            if let (Some(bias), Some(b)) = (bias, &b) {
                saved_b = Some(snapshot(bias)?);
                bias.shallow_clone().f_copy_(b)?;
            }
            if let Err(e) = weight.into().write(&w) {
                if let (Some(bias), Some(sb)) = (bias, &saved_b) {
                    bias.shallow_clone().f_copy_(sb)?;
                }
                return Err(e);
            }
        }
        self.set(&mut kept, Kept::NoOriginal);
        Ok(())
    }
}
