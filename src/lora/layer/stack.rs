//! [`LoraStack`]: the named LoRA adapters of one layer, sharing its base weight (PEFT keeps them
//! in per-name dicts on one layer; tch has no module tree, so the stack is what the model holds).

use std::sync::{Arc, Mutex, MutexGuard};

use tch::nn::ModuleT;
use tch::Tensor;

use super::conv2d::{conv_input, LoraConv2d};
use super::copy::{CopyKind, ModuleCopy};
use super::embedding::LoraEmbedding;
use super::forward::check_linear_input;
use super::linear::LoraLinear;
use super::merge::BaseLock;
use super::Attach;
use crate::{Error, Result};

#[derive(Debug)]
struct StackState<L> {
    slots: Vec<(String, L)>,
    /// Names in the order they were merged (unmerged in reverse, each restoring its snapshot).
    merged: Vec<String>,
}

/// The named LoRA adapters of one layer. They share the base weight; the forward adds every
/// enabled, unmerged adapter's branch to the base output (PEFT sums its active adapters), and
/// merged adapters are in the base weight already.
///
/// A model built with [`LoraBuilder`](crate::lora::LoraBuilder) holds one stack per adapted layer;
/// [`LoraAdapter`](crate::lora::LoraAdapter) holds handles on the same stacks and is where adapters
/// are added, activated, merged, deleted and saved. Clones are handles on the same stack.
#[derive(Debug)]
pub struct LoraStack<L: Attach> {
    module: String,
    base: L::Base,
    /// Shared by every adapter of the layer: forwards read the base under it, merges write.
    base_lock: BaseLock,
    state: Arc<Mutex<StackState<L>>>,
}

impl<L: Attach> Clone for LoraStack<L> {
    fn clone(&self) -> Self {
        LoraStack {
            module: self.module.clone(),
            base: L::share_base(&self.base),
            base_lock: self.base_lock.clone(),
            state: Arc::clone(&self.state),
        }
    }
}

impl<L: Attach> LoraStack<L> {
    /// A stack over `base` with no adapter yet.
    pub(crate) fn new(module: &str, base: L::Base) -> Self {
        LoraStack {
            module: module.to_string(),
            base,
            base_lock: BaseLock::default(),
            state: Arc::new(Mutex::new(StackState { slots: Vec::new(), merged: Vec::new() })),
        }
    }

    /// The stack's state, without the adapters merged into the base for good through one of
    /// their handles (`LoraLinear::into_merged_linear`): those are part of the base now, as
    /// after [`merge_and_unload`](Self::merge_and_unload).
    fn lock(&self) -> MutexGuard<'_, StackState<L>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.slots.iter().any(|(_, l)| l.merged_for_good()) {
            let StackState { slots, merged } = &mut *st;
            slots.retain(|(_, l)| !l.merged_for_good());
            merged.retain(|n| slots.iter().any(|(s, _)| s == n));
        }
        st
    }

    /// The lock an adapter attached to this layer shares.
    pub(crate) fn base_lock(&self) -> &BaseLock {
        &self.base_lock
    }

    /// The module path of the layer.
    pub fn module(&self) -> &str {
        &self.module
    }

    pub(crate) fn base(&self) -> &L::Base {
        &self.base
    }

    /// The adapter names on this layer, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.lock().slots.iter().map(|(n, _)| n.clone()).collect()
    }

    /// A handle on the adapter `name` of this layer.
    pub fn get(&self, name: &str) -> Option<L> {
        self.lock().slots.iter().find(|(n, _)| n == name).map(|(_, l)| l.share())
    }

    /// A handle on the first adapter of this layer.
    pub fn first(&self) -> Option<L> {
        self.lock().slots.first().map(|(_, l)| l.share())
    }

    /// A handle on the layer's adapter when it has exactly one.
    pub(crate) fn only(&self) -> Option<L> {
        match self.lock().slots.as_slice() {
            [(_, l)] => Some(l.share()),
            _ => None,
        }
    }

    /// The names merged into the base weight, in merge order.
    pub fn merged_adapters(&self) -> Vec<String> {
        self.lock().merged.clone()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.lock().slots.iter().any(|(n, _)| n == name)
    }

    pub(crate) fn push(&self, name: &str, layer: L) {
        self.lock().slots.push((name.to_string(), layer));
    }

    /// Removes the adapter `name` (refused while it is merged); returns it if it was here.
    pub(crate) fn remove(&self, name: &str) -> Result<Option<L>> {
        let mut st = self.lock();
        if st.merged.iter().any(|n| n == name) {
            return Err(Error::MergeState { module: self.module.clone(), state: "already merged" });
        }
        Ok(st.slots.iter().position(|(n, _)| n == name).map(|i| st.slots.remove(i).1))
    }

    /// Merges the named adapters present on this layer, in the given order (already merged ones
    /// are skipped). On failure the ones merged by this call are unmerged again.
    pub(crate) fn merge(&self, names: &[String], safe: bool) -> Result<()> {
        Self::merge_locked(&mut self.lock(), names, safe)
    }

    fn merge_locked(st: &mut StackState<L>, names: &[String], safe: bool) -> Result<()> {
        let before = st.merged.len();
        for name in names {
            if st.merged.contains(name) {
                continue;
            }
            let Some(layer) = st.slots.iter().find(|(n, _)| n == name).map(|(_, l)| l.share())
            else {
                continue;
            };
            if let Err(e) = layer.merge_layer(safe) {
                Self::unmerge_down_to(st, before)?;
                return Err(e);
            }
            st.merged.push(name.clone());
        }
        Ok(())
    }

    fn unmerge_down_to(st: &mut StackState<L>, keep: usize) -> Result<()> {
        while st.merged.len() > keep {
            let name = st.merged.last().expect("non-empty").clone();
            if let Some((_, l)) = st.slots.iter().find(|(n, _)| *n == name) {
                l.unmerge_layer()?;
            }
            st.merged.pop();
        }
        Ok(())
    }

    /// Merges the named adapters present on this layer (in order, on top of any already merged)
    /// and then drops every adapter of the layer, with the saved pre-merge weights: the base
    /// keeps the merged values for good. Returns the dropped adapters' tensors. On failure the
    /// layer is left as it was.
    pub(crate) fn merge_and_unload(&self, names: &[String]) -> Result<Vec<(String, Tensor)>> {
        let mut st = self.lock();
        Self::merge_locked(&mut st, names, false)?;
        st.merged.clear();
        let dropped = st.slots.drain(..).flat_map(|(_, l)| l.named_tensors()).collect();
        Ok(dropped)
    }

    /// Unmerges every merged adapter, last merged first, restoring the base bit-exactly.
    pub(crate) fn unmerge_all(&self) -> Result<()> {
        Self::unmerge_down_to(&mut self.lock(), 0)
    }

    /// Enables exactly the adapters in `names` (unmerging everything first).
    pub(crate) fn set_active(&self, names: &[String]) -> Result<()> {
        self.unmerge_all()?;
        for (n, l) in &self.lock().slots {
            l.enable(names.contains(n))?;
        }
        Ok(())
    }
}

impl<L: Attach> LoraStack<L> {
    /// Runs `f` over every adapter of the layer.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, &L) -> Result<()>) -> Result<()> {
        self.lock().slots.iter().try_for_each(|(n, l)| f(n, l))
    }
}

impl LoraStack<LoraLinear> {
    /// The base layer (with the merged adapters folded in while merged).
    pub fn base_linear(&self) -> &super::base::LinearBase {
        &self.base
    }

    /// Forward: the base output plus the branch of every enabled, unmerged adapter; the input is
    /// checked first (see [`LoraLinear::f_forward_t`]). With one adapter this is that layer's own
    /// forward (the fused training path included).
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let st = self.lock();
        if let [(_, only)] = st.slots.as_slice() {
            return only.f_forward_t(xs, train);
        }
        let _base = self.base_lock.read();
        let base = &self.base;
        base.check_input(&self.module, xs)?;
        let live: Vec<&LoraLinear> =
            st.slots.iter().map(|(_, l)| l).filter(|l| l.is_enabled() && !l.is_merged()).collect();
        // the bias: the trained copy (`bias = "lora_only"`) of the first live adapter with one
        let bias = live.iter().find_map(|l| l.trained_bias()).or(base.bias());
        let bias = bias.map(|b| b.f_to_kind(xs.kind())).transpose()?;
        let (out, inp) = (base.out_features(), base.in_features());
        let mut out_shape = xs.size();
        *out_shape.last_mut().expect("checked non-empty") = out;
        let x2 = xs.f_reshape([-1, inp])?;
        let mut y = base.forward_with_bias(&x2, bias.as_ref())?;
        for l in live {
            y = l.f_add_delta(&x2, y, train)?;
        }
        Ok(y.f_reshape(out_shape)?)
    }
}

impl ModuleT for LoraStack<LoraLinear> {
    /// # Panics
    /// On an input that does not fit the layer, with the message of the typed error
    /// [`LoraStack::f_forward_t`] returns.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl LoraStack<LoraEmbedding> {
    /// The base table `[V, d]` (merged values while an adapter is merged).
    pub fn weight(&self) -> &Tensor {
        &self.base
    }

    /// Embeddings of `ids` plus every enabled, unmerged adapter's delta.
    pub fn f_forward(&self, ids: &Tensor) -> Result<Tensor> {
        let st = self.lock();
        if let [(_, only)] = st.slots.as_slice() {
            return only.f_forward(ids);
        }
        let _base = self.base_lock.read();
        let mut y = Tensor::f_embedding(&self.base, ids, -1, false, false)?;
        for (_, l) in &st.slots {
            if l.is_enabled() && !l.is_merged() {
                y = l.f_add_delta(ids, y)?;
            }
        }
        Ok(y)
    }
}

impl LoraStack<LoraConv2d> {
    /// Forward of `xs: [batch, in, h, w]` plus every enabled, unmerged adapter's branch.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let st = self.lock();
        if let [(_, only)] = st.slots.as_slice() {
            return only.f_forward_t(xs, train);
        }
        let _base = self.base_lock.read();
        let b = &self.base;
        let (xs, padding) = conv_input(&b.ws, &b.conv, &self.module, xs)?;
        let c = &b.conv;
        let mut y = xs.f_conv2d(&b.ws, b.bs.as_ref(), c.stride, padding, c.dilation, 1)?;
        for (_, l) in &st.slots {
            if l.is_enabled() && !l.is_merged() {
                y = l.f_add_delta(&xs, padding, y)?;
            }
        }
        Ok(y)
    }
}

impl ModuleT for LoraStack<LoraConv2d> {
    /// # Panics
    /// On an input that does not fit the layer, with the message of the typed error
    /// [`LoraStack::f_forward_t`] returns.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl LoraStack<ModuleCopy> {
    /// The frozen module's weight (the merged copy while merged).
    pub fn base_weight(&self) -> &Tensor {
        &self.base.ws
    }

    /// Forward with the first enabled, unmerged copy, else with the base module (a linear
    /// layer's `x Wᵀ + b` or a table's `W[ids]`).
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let st = self.lock();
        let _base = self.base_lock.read();
        let b = &self.base;
        if b.kind == CopyKind::Linear {
            check_linear_input(&b.ws, &self.module, xs)?;
        }
        if let Some((_, c)) = st.slots.iter().find(|(_, c)| c.is_enabled() && !c.is_merged()) {
            return c.f_forward(xs);
        }
        Ok(match b.kind {
            CopyKind::Linear => xs.f_linear(&b.ws, b.bs.as_ref())?,
            CopyKind::Embedding => Tensor::f_embedding(&b.ws, xs, -1, false, false)?,
        })
    }
}

impl ModuleT for LoraStack<ModuleCopy> {
    /// # Panics
    /// On an input that does not fit the module, with the message of the typed error
    /// [`LoraStack::f_forward`] returns.
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.f_forward(xs).unwrap_or_else(|e| panic!("{e}"))
    }
}
