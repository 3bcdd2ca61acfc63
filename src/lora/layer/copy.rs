//! [`ModuleCopy`]: a trainable copy of a whole linear layer or embedding table, per adapter
//! (PEFT's `modules_to_save`, e.g. a classification head trained in full next to LoRA).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn;
use tch::Tensor;

use super::merge::{snapshot, BaseLock, MergeState};
use super::{Attach, Factors, LoraLayer};
use crate::adapter::{Adapter, AdapterKind, Applicable};
use crate::lora::config::LoraConfig;
use crate::{Error, Result};

/// What kind of module is copied (decides the forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// `y = x Wᵀ + b`.
    Linear,
    /// `y = W[ids]`.
    Embedding,
}

/// The frozen module a copy shadows.
#[derive(Debug)]
pub struct CopyBase {
    pub(crate) kind: CopyKind,
    pub(crate) ws: Tensor,
    pub(crate) bs: Option<Tensor>,
}

impl CopyBase {
    pub(crate) fn share(&self) -> CopyBase {
        CopyBase {
            kind: self.kind,
            ws: self.ws.shallow_clone(),
            bs: self.bs.as_ref().map(Tensor::shallow_clone),
        }
    }
}

#[derive(Debug)]
struct CopyState {
    merge: MergeState,
    ready: AtomicBool,
}

/// One adapter's trainable copy of a module listed in `modules_to_save`: while the adapter is
/// active the model computes with the copy instead of the frozen module. Its tensors are saved
/// under the module's own names (`<module>.weight`, `<module>.bias`), as PEFT does. The copy
/// starts as the pre-trained module: it is taken by
/// [`LoraAdapter::init_from_base_weights`](crate::lora::LoraAdapter::init_from_base_weights) once
/// the base weights are loaded (or loaded with a trained adapter). Merging writes the copy into
/// the base module (PEFT's `merge_and_unload` keeps the copy); unmerging restores the original
/// bit-exactly.
#[derive(Debug)]
pub struct ModuleCopy {
    base: CopyBase,
    weight: Tensor,
    bias: Option<Tensor>,
    module: String,
    state: Arc<CopyState>,
}

impl ModuleCopy {
    /// A copy of `base` named `module`, its variables `p/weight` (and `p/bias`), trainable.
    pub(crate) fn new(base: &CopyBase, p: &nn::Path, module: &str) -> Result<Self> {
        for name in ["weight", "bias"] {
            if p.get(name).is_some() {
                return Err(Error::DuplicateParameter(p.path(name)));
            }
        }
        let copy = |t: &Tensor| tch::no_grad(|| snapshot(t));
        let weight = p.add("weight", copy(&base.ws)?, true);
        let bias = base.bs.as_ref().map(|b| Ok::<_, Error>(p.add("bias", copy(b)?, true)));
        Ok(ModuleCopy {
            base: base.share(),
            weight,
            bias: bias.transpose()?,
            module: module.into(),
            state: Arc::new(CopyState { merge: MergeState::new(), ready: AtomicBool::new(false) }),
        })
    }

    pub(crate) fn share(&self) -> ModuleCopy {
        ModuleCopy {
            base: self.base.share(),
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            module: self.module.clone(),
            state: Arc::clone(&self.state),
        }
    }

    /// The module path.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The trainable weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The trainable bias, if the module has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether the copy is used (its adapter is active).
    pub fn is_enabled(&self) -> bool {
        self.state.merge.is_enabled()
    }

    /// Uses the copy or not (disabling a merged copy unmerges it first).
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        LoraLayer::enable(self, enabled)
    }

    /// Whether the copy is written into the base module.
    pub fn is_merged(&self) -> bool {
        self.state.merge.is_merged()
    }

    /// Takes the copy from the (loaded) base module.
    pub fn init_from_base_weights(&self) -> Result<()> {
        if self.is_merged() {
            return Err(Error::MergeState { module: self.module.clone(), state: "already merged" });
        }
        let _guard = tch::no_grad_guard();
        self.weight.shallow_clone().f_copy_(&self.base.ws)?;
        if let (Some(c), Some(b)) = (&self.bias, &self.base.bs) {
            c.shallow_clone().f_copy_(b)?;
        }
        self.set_ready(true);
        Ok(())
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.state.ready.store(ready, Ordering::Release);
    }

    pub(crate) fn check_ready(&self) -> Result<()> {
        if !self.state.ready.load(Ordering::Acquire) {
            return Err(Error::Uninitialized {
                module: self.module.clone(),
                what: "the trainable copy of `modules_to_save`",
                hint: "call `init_from_base_weights()` after loading the base weights, or load a trained adapter",
            });
        }
        Ok(())
    }

    fn merge_impl(&self, safe: bool) -> Result<()> {
        self.check_ready()?;
        let (w, b) = (&self.base.ws, self.base.bs.as_ref());
        self.state.merge.merge(&self.module, w, b, safe, || {
            Ok((self.weight.shallow_clone(), self.bias.as_ref().map(Tensor::shallow_clone)))
        })
    }

    /// Writes the copy into the base module, keeping the original.
    pub fn merge(&self) -> Result<()> {
        self.merge_impl(false)
    }

    /// As [`merge`](Self::merge), refusing non-finite values.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_impl(true)
    }

    /// Restores the original base module bit-exactly.
    pub fn unmerge(&self) -> Result<()> {
        self.state.merge.unmerge(&self.module, &self.base.ws, self.base.bs.as_ref())
    }

    /// The copy's forward: `x Wᵀ + b` for a linear layer, `W[ids]` for a table.
    pub(crate) fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.check_ready()?;
        Ok(match self.base.kind {
            CopyKind::Linear => xs.f_linear(&self.weight, self.bias.as_ref())?,
            CopyKind::Embedding => Tensor::f_embedding(&self.weight, xs, -1, false, false)?,
        })
    }
}

impl Adapter for ModuleCopy {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Lora
    }

    fn name(&self) -> &str {
        &self.module
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![(format!("{}.weight", self.module), self.weight.shallow_clone())];
        if let Some(b) = &self.bias {
            v.push((format!("{}.bias", self.module), b.shallow_clone()));
        }
        v
    }
}

impl Applicable for ModuleCopy {
    fn apply(&mut self) -> Result<()> {
        self.merge()
    }

    fn revert(&mut self) -> Result<()> {
        self.unmerge()
    }

    fn is_applied(&self) -> bool {
        self.is_merged()
    }
}

impl LoraLayer for ModuleCopy {
    fn merge_state(&self) -> &MergeState {
        &self.state.merge
    }
    fn merge_layer(&self, safe: bool) -> Result<()> {
        self.merge_impl(safe)
    }
    fn unmerge_layer(&self) -> Result<()> {
        self.unmerge()
    }
    fn init_from_base(&self) -> Result<()> {
        self.init_from_base_weights()
    }
    fn set_base_ready(&self, ready: bool) {
        self.set_ready(ready)
    }
    fn factors(&self) -> Option<Factors> {
        None
    }
}

impl Attach for ModuleCopy {
    type Base = CopyBase;
    fn share(&self) -> Self {
        ModuleCopy::share(self)
    }
    fn share_base(b: &CopyBase) -> CopyBase {
        b.share()
    }
    fn attach(
        b: &CopyBase,
        lock: &BaseLock,
        p: &nn::Path,
        module: &str,
        _config: &LoraConfig,
    ) -> Result<Self> {
        let copy = ModuleCopy::new(b, p, module)?;
        copy.state.merge.adopt_base_lock(module, lock)?;
        Ok(copy)
    }
    fn rank_bound(_b: &CopyBase) -> (i64, i64) {
        (i64::MAX, i64::MAX)
    }
    fn registered(p: &nn::Path) -> Option<String> {
        p.get("weight").map(|_| p.path("weight"))
    }
}
