//! [`LoraStack`]: the named LoRA adapters of one layer, sharing its base weight (PEFT keeps them
//! in per-name dicts on one layer; tch has no module tree, so the stack is what the model holds).

use std::sync::{Arc, Mutex, MutexGuard};

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::config::LoraConfig;
use super::conv2d::{conv_input, Conv2dConfig, LoraConv2d};
use super::copy::{CopyBase, CopyKind, ModuleCopy};
use super::embedding::LoraEmbedding;
use super::linear::{check_linear_input, LoraLinear};
use crate::adapter::Adapter;
use crate::{Error, Result};

/// What a stack needs from a LoRA layer type: the merge/enable surface, a second handle, and how
/// to attach a new adapter to the same base. Implemented by [`LoraLinear`], [`LoraEmbedding`]
/// and [`LoraConv2d`] (sealed: the trait lives in a private module).
pub trait StackLayer: Adapter + Sized {
    /// The frozen base the adapters of one stack share.
    type Base: std::fmt::Debug;

    fn module(&self) -> &str;
    fn share(&self) -> Self;
    fn merge_layer(&self, safe: bool) -> Result<()>;
    fn unmerge_layer(&self) -> Result<()>;
    fn merged(&self) -> bool;
    fn enabled(&self) -> bool;
    fn enable(&self, enabled: bool) -> Result<()>;
    /// Runs the initialisation that needs the loaded base weight (DoRA, PiSSA, OLoRA).
    fn init_from_base(&self) -> Result<()>;
    /// Marks that initialisation done (a trained adapter was loaded) or pending.
    fn set_base_ready(&self, ready: bool);
    fn share_base(base: &Self::Base) -> Self::Base;
    /// A new adapter on `base`, its variables under `p`.
    fn attach(base: &Self::Base, p: &nn::Path, module: &str, config: &LoraConfig) -> Result<Self>;
    /// `(rows, cols)` whose minimum bounds the rank.
    fn rank_bound(base: &Self::Base) -> (i64, i64);
    /// Handles on the adapter's low-rank tensors (shared storage); `None` for a module copy.
    fn factors(&self) -> Option<Factors>;
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

macro_rules! impl_stack_layer_common {
    () => {
        fn module(&self) -> &str {
            Self::module(self)
        }
        fn share(&self) -> Self {
            Self::share(self)
        }
        fn merge_layer(&self, safe: bool) -> Result<()> {
            if safe {
                self.safe_merge()
            } else {
                self.merge()
            }
        }
        fn unmerge_layer(&self) -> Result<()> {
            self.unmerge()
        }
        fn merged(&self) -> bool {
            self.is_merged()
        }
        fn enabled(&self) -> bool {
            self.is_enabled()
        }
        fn enable(&self, enabled: bool) -> Result<()> {
            self.set_enabled(enabled)
        }
    };
}

impl StackLayer for LoraLinear {
    type Base = nn::Linear;
    impl_stack_layer_common!();
    fn init_from_base(&self) -> Result<()> {
        self.init_from_base_weights()
    }
    fn set_base_ready(&self, ready: bool) {
        self.set_base_init_done(ready)
    }
    fn share_base(b: &nn::Linear) -> nn::Linear {
        nn::Linear { ws: b.ws.shallow_clone(), bs: b.bs.as_ref().map(Tensor::shallow_clone) }
    }
    fn attach(b: &nn::Linear, p: &nn::Path, module: &str, config: &LoraConfig) -> Result<Self> {
        let layer = LoraLinear::with_module_name(Self::share_base(b), p, module, config)?;
        Ok(layer)
    }
    fn rank_bound(b: &nn::Linear) -> (i64, i64) {
        (b.ws.size()[1], b.ws.size()[0])
    }
    fn registered(p: &nn::Path) -> Option<String> {
        let a = p / "lora_A";
        a.get("weight").map(|_| a.path("weight"))
    }
    fn factors(&self) -> Option<Factors> {
        Some(Factors {
            a: self.lora_a().shallow_clone(),
            b: self.lora_b().shallow_clone(),
            scaling: self.scaling(),
            magnitude: self.magnitude().map(Tensor::shallow_clone),
            lora_b_bias: self.lora_b_bias().map(Tensor::shallow_clone),
        })
    }
}

impl StackLayer for LoraEmbedding {
    type Base = Tensor;
    impl_stack_layer_common!();
    fn init_from_base(&self) -> Result<()> {
        self.init_from_base_weights()
    }
    fn set_base_ready(&self, ready: bool) {
        self.set_base_init_done(ready)
    }
    fn share_base(w: &Tensor) -> Tensor {
        w.shallow_clone()
    }
    fn attach(w: &Tensor, p: &nn::Path, module: &str, config: &LoraConfig) -> Result<Self> {
        LoraEmbedding::new(w.shallow_clone(), p, module, config)
    }
    fn rank_bound(w: &Tensor) -> (i64, i64) {
        (w.size()[0], w.size()[1])
    }
    fn registered(p: &nn::Path) -> Option<String> {
        p.get("lora_embedding_A").map(|_| p.path("lora_embedding_A"))
    }
    fn factors(&self) -> Option<Factors> {
        Some(Factors {
            a: self.lora_a().shallow_clone(),
            b: self.lora_b().shallow_clone(),
            scaling: self.scaling(),
            magnitude: self.magnitude().map(Tensor::shallow_clone),
            lora_b_bias: None,
        })
    }
}

/// A convolution's weight, bias and config: what a new adapter on it needs.
#[derive(Debug)]
pub struct ConvBase {
    pub(crate) ws: Tensor,
    pub(crate) bs: Option<Tensor>,
    pub(crate) conv: Conv2dConfig,
}

impl StackLayer for LoraConv2d {
    type Base = ConvBase;
    impl_stack_layer_common!();
    fn init_from_base(&self) -> Result<()> {
        Ok(())
    }
    fn set_base_ready(&self, _ready: bool) {}
    fn share_base(b: &ConvBase) -> ConvBase {
        ConvBase {
            ws: b.ws.shallow_clone(),
            bs: b.bs.as_ref().map(Tensor::shallow_clone),
            conv: b.conv,
        }
    }
    fn attach(b: &ConvBase, p: &nn::Path, module: &str, config: &LoraConfig) -> Result<Self> {
        let bs = b.bs.as_ref().map(Tensor::shallow_clone);
        LoraConv2d::from_parts(b.ws.shallow_clone(), bs, b.conv, p, module, config)
    }
    fn rank_bound(b: &ConvBase) -> (i64, i64) {
        let s = b.ws.size();
        (s[1..].iter().product(), s[0])
    }
    fn registered(p: &nn::Path) -> Option<String> {
        let a = p / "lora_A";
        a.get("weight").map(|_| a.path("weight"))
    }
    fn factors(&self) -> Option<Factors> {
        Some(Factors {
            a: self.lora_a().shallow_clone(),
            b: self.lora_b().shallow_clone(),
            scaling: self.scaling(),
            magnitude: None,
            lora_b_bias: None,
        })
    }
}

impl StackLayer for ModuleCopy {
    type Base = CopyBase;
    impl_stack_layer_common!();
    fn init_from_base(&self) -> Result<()> {
        self.init_from_base_weights()
    }
    fn set_base_ready(&self, ready: bool) {
        self.set_ready(ready)
    }
    fn share_base(b: &CopyBase) -> CopyBase {
        b.share()
    }
    fn attach(b: &CopyBase, p: &nn::Path, module: &str, _config: &LoraConfig) -> Result<Self> {
        ModuleCopy::new(b, p, module)
    }
    fn rank_bound(_b: &CopyBase) -> (i64, i64) {
        (i64::MAX, i64::MAX)
    }
    fn factors(&self) -> Option<Factors> {
        None
    }
    fn registered(p: &nn::Path) -> Option<String> {
        p.get("weight").map(|_| p.path("weight"))
    }
}

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
/// A model built with [`LoraBuilder`](super::LoraBuilder) holds one stack per adapted layer;
/// [`LoraAdapter`](super::LoraAdapter) holds handles on the same stacks and is where adapters
/// are added, activated, merged, deleted and saved. Clones are handles on the same stack.
#[derive(Debug)]
pub struct LoraStack<L: StackLayer> {
    module: String,
    base: L::Base,
    state: Arc<Mutex<StackState<L>>>,
}

impl<L: StackLayer> Clone for LoraStack<L> {
    fn clone(&self) -> Self {
        LoraStack {
            module: self.module.clone(),
            base: L::share_base(&self.base),
            state: Arc::clone(&self.state),
        }
    }
}

impl<L: StackLayer> LoraStack<L> {
    /// A stack over `base` with no adapter yet.
    pub(crate) fn new(module: &str, base: L::Base) -> Self {
        LoraStack {
            module: module.to_string(),
            base,
            state: Arc::new(Mutex::new(StackState { slots: Vec::new(), merged: Vec::new() })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StackState<L>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

impl<L: StackLayer> LoraStack<L> {
    /// Runs `f` over every adapter of the layer.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, &L) -> Result<()>) -> Result<()> {
        self.lock().slots.iter().try_for_each(|(n, l)| f(n, l))
    }
}

impl LoraStack<LoraLinear> {
    /// The base layer (with the merged adapters folded in while merged).
    pub fn base_linear(&self) -> &nn::Linear {
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
        let base = &self.base;
        check_linear_input(&base.ws, &self.module, xs)?;
        let live: Vec<&LoraLinear> =
            st.slots.iter().map(|(_, l)| l).filter(|l| l.is_enabled() && !l.is_merged()).collect();
        // the bias: the trained copy (`bias = "lora_only"`) of the first live adapter with one
        let bias = live.iter().find_map(|l| l.trained_bias()).or(base.bs.as_ref());
        let bias = bias.map(|b| b.f_to_kind(xs.kind())).transpose()?;
        let (out, inp) = (base.ws.size()[0], base.ws.size()[1]);
        let mut out_shape = xs.size();
        *out_shape.last_mut().expect("checked non-empty") = out;
        let x2 = xs.f_reshape([-1, inp])?;
        let mut y = x2.f_linear(&base.ws, bias.as_ref())?;
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
