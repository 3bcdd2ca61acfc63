//! Attaching LoRA to a model the caller builds ([`LoraBuilder`]): layers that are plain or hold a
//! [`LoraStack`] of named adapters, as the configs' targets decide.

use std::sync::Mutex;

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::adapters::{check_adapter_name, module_path, LoraAdapter, DEFAULT_ADAPTER_NAME};
use super::config::LoraConfig;
use super::layer::{
    path_name, Attach, Conv2dConfig, ConvBase, CopyBase, CopyKind, LoraConv2d, LoraEmbedding,
    LoraLinear, LoraStack, ModuleCopy,
};
use crate::target::Targets;
use crate::{Error, Result};

/// A linear layer that is LoRA-adapted or not, as the configs' targets decided at build time.
#[derive(Debug)]
pub enum MaybeLoraLinear {
    /// Not targeted: the plain base layer.
    Plain(nn::Linear),
    /// Targeted: the base layer with its named LoRA adapters.
    Lora(LoraStack<LoraLinear>),
    /// Listed in `modules_to_save`: the base layer and its trainable copies.
    Copy {
        /// The frozen base layer.
        base: nn::Linear,
        /// The adapters' copies.
        copies: LoraStack<ModuleCopy>,
    },
}

impl MaybeLoraLinear {
    /// A handle on the layer's first LoRA adapter, if this layer was targeted.
    pub fn as_lora(&self) -> Option<LoraLinear> {
        self.as_stack().and_then(LoraStack::first)
    }

    /// The layer's adapters, if it was targeted.
    pub fn as_stack(&self) -> Option<&LoraStack<LoraLinear>> {
        match self {
            MaybeLoraLinear::Lora(s) => Some(s),
            MaybeLoraLinear::Plain(_) | MaybeLoraLinear::Copy { .. } => None,
        }
    }

    /// The base layer.
    pub fn base(&self) -> &nn::Linear {
        match self {
            MaybeLoraLinear::Plain(l) | MaybeLoraLinear::Copy { base: l, .. } => l,
            MaybeLoraLinear::Lora(s) => s.base_linear(),
        }
    }

    /// Forward with input checks (see [`LoraLinear::f_forward_t`]).
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            MaybeLoraLinear::Plain(l) => {
                let in_features = l.ws.size()[1];
                if xs.size().last() != Some(&in_features) {
                    return Err(Error::ShapeMismatch {
                        name: "input of linear layer".into(),
                        expected: vec![-1, in_features],
                        actual: xs.size(),
                    });
                }
                Ok(xs.f_linear(&l.ws, l.bs.as_ref())?)
            }
            MaybeLoraLinear::Lora(s) => s.f_forward_t(xs, train),
            MaybeLoraLinear::Copy { copies, .. } => copies.f_forward(xs),
        }
    }
}

/// The outputs of several linear layers on the same input — `layers[i].f_forward_t(xs, train)`
/// for each `i`, with the same values and gradients — computed together where that is cheaper:
/// the layers that would each run the fused LoRA or DoRA node (one enabled, unmerged adapter, no
/// active dropout) run as one node that reads `xs` once for all their `x·Aᵀ` products and once
/// for all their A gradients, and sums their input gradients inside the GEMMs. The usual
/// callers are an attention block's q/k/v projections and a gated MLP's gate/up projections.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_peft::lora::{forward_shared, LoraBuilder, LoraConfig};
///
/// let (base, adapters) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
/// let builder = LoraBuilder::new(&adapters.root(), LoraConfig::for_targets(["q", "k", "v"]))?;
/// let lin = |name: &str, o: i64| builder.linear(&(base.root() / name), 16, o, Default::default());
/// let (q, k, v) = (lin("q", 16)?, lin("k", 8)?, lin("v", 8)?);
/// let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
/// let ys = forward_shared(&[&q, &k, &v], &x, true)?;
/// assert_eq!(ys[1].size(), [2, 5, 8]);
/// assert!(ys[0].allclose(&q.f_forward_t(&x, true)?, 1e-5, 1e-5, false));
/// # Ok::<(), tch_peft::Error>(())
/// ```
pub fn forward_shared(
    layers: &[&MaybeLoraLinear],
    xs: &Tensor,
    train: bool,
) -> Result<Vec<Tensor>> {
    #[cfg(tch_peft_csrc)]
    {
        // the single fused-path adapter of each layer that has one, with its bias
        let mut fused: Vec<Option<(LoraLinear, Option<Tensor>)>> = Vec::new();
        for l in layers {
            let member = match l.as_stack().and_then(LoraStack::only) {
                Some(layer) => layer.fused_group_bias(xs, train)?.map(|bias| (layer, bias)),
                None => None,
            };
            fused.push(member);
        }
        if fused.iter().filter(|m| m.is_some()).count() >= 2 {
            let in_features = *xs.size().last().expect("checked by the layers");
            let x2 = xs.f_reshape([-1, in_features])?;
            // inference: the factors' cached casts (no cast kernels)
            let factors = fused
                .iter()
                .flatten()
                .map(|(l, _)| l.inference_factors(xs.kind()))
                .collect::<Result<Vec<_>>>()?;
            let members = fused
                .iter()
                .flatten()
                .zip(&factors)
                .map(|((l, bias), f)| l.group_member(bias.as_ref(), f.as_ref()))
                .collect::<Result<Vec<_>>>()?;
            let mut ys = super::layer::fused::lora_group(&x2, &members)?.into_iter();
            let mut out = Vec::with_capacity(layers.len());
            for (l, m) in layers.iter().zip(&fused) {
                out.push(match m {
                    Some((layer, _)) => {
                        let mut shape = xs.size();
                        *shape.last_mut().expect("non-empty") = layer.out_features();
                        ys.next().expect("one output per member").f_reshape(shape)?
                    }
                    None => l.f_forward_t(xs, train)?,
                });
            }
            return Ok(out);
        }
    }
    layers.iter().map(|l| l.f_forward_t(xs, train)).collect()
}

impl ModuleT for MaybeLoraLinear {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            MaybeLoraLinear::Plain(l) => xs.linear(&l.ws, l.bs.as_ref()),
            MaybeLoraLinear::Lora(s) => s.forward_t(xs, train),
            MaybeLoraLinear::Copy { copies, .. } => copies.forward_t(xs, train),
        }
    }
}

/// A 2-D convolution that is LoRA-adapted or not, as the configs' targets decided.
#[derive(Debug)]
pub enum MaybeLoraConv2d {
    /// Not targeted: the plain convolution.
    Plain(nn::Conv2D),
    /// Targeted: the convolution with its named LoRA adapters.
    Lora(LoraStack<LoraConv2d>),
}

impl MaybeLoraConv2d {
    /// A handle on the layer's first LoRA adapter, if this layer was targeted.
    pub fn as_lora(&self) -> Option<LoraConv2d> {
        match self {
            MaybeLoraConv2d::Lora(s) => s.first(),
            MaybeLoraConv2d::Plain(_) => None,
        }
    }
}

impl ModuleT for MaybeLoraConv2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            MaybeLoraConv2d::Plain(c) => xs.apply(c),
            MaybeLoraConv2d::Lora(s) => s.forward_t(xs, train),
        }
    }
}

/// An embedding table that is LoRA-adapted or not, as the configs' targets decided.
#[derive(Debug)]
pub enum MaybeLoraEmbedding {
    /// Not targeted: the plain table `[V, d]`.
    Plain(Tensor),
    /// Targeted: the table with its named LoRA adapters.
    Lora(LoraStack<LoraEmbedding>),
    /// Listed in `modules_to_save`: the table and its trainable copies.
    Copy(LoraStack<ModuleCopy>),
}

impl MaybeLoraEmbedding {
    /// The base table `[V, d]` (merged values while an adapter is merged).
    pub fn weight(&self) -> &Tensor {
        match self {
            MaybeLoraEmbedding::Plain(w) => w,
            MaybeLoraEmbedding::Lora(s) => s.weight(),
            MaybeLoraEmbedding::Copy(s) => s.base_weight(),
        }
    }

    /// A handle on the layer's first LoRA adapter, if this table was targeted.
    pub fn as_lora(&self) -> Option<LoraEmbedding> {
        match self {
            MaybeLoraEmbedding::Lora(s) => s.first(),
            MaybeLoraEmbedding::Plain(_) | MaybeLoraEmbedding::Copy(_) => None,
        }
    }

    /// Embeddings of `ids`; an index outside `[0, V)` is an error (on the CPU; on CUDA it is a
    /// device-side assert, so check indices first there).
    pub fn f_forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            MaybeLoraEmbedding::Plain(w) => Ok(Tensor::f_embedding(w, ids, -1, false, false)?),
            MaybeLoraEmbedding::Lora(s) => s.f_forward(ids),
            MaybeLoraEmbedding::Copy(s) => s.f_forward(ids),
        }
    }
}

/// One adapter declared on a builder.
#[derive(Debug)]
struct Declared<'a> {
    name: String,
    root: nn::Path<'a>,
    config: LoraConfig,
    targets: Targets,
}

/// Build-time targeting: a model calls [`LoraBuilder::linear`] where it would call
/// `nn::linear`, and gets a plain or LoRA layer according to the config's `target_modules`
/// matched against the layer's path — PEFT's `get_peft_model` for a graph tch cannot walk.
///
/// Adapter variables go to the adapter root given at construction, under the same path as the
/// base layer (the two-store pattern: the base store stays frozen and loads strictly, the
/// optimizer sees only the adapter store).
///
/// Several named adapters: declare them with [`with_adapter`](Self::with_adapter) (each with its
/// own root) before building the model; a layer any of them targets gets a slot for each adapter
/// that targets it. More adapters can be added later with
/// [`LoraAdapter::add_adapter`](super::LoraAdapter::add_adapter), on the layers built adapted.
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use tch_peft::lora::{LoraBuilder, LoraConfig};
///
/// let base_vs = nn::VarStore::new(Device::Cpu);
/// let adapter_vs = nn::VarStore::new(Device::Cpu);
/// let lora = LoraBuilder::new(&adapter_vs.root(), LoraConfig::for_targets(["q_proj"]))?;
/// let p = base_vs.root() / "layers" / 0;
/// let q = lora.linear(&(&p / "q_proj"), 32, 32, Default::default())?; // adapted
/// let k = lora.linear(&(&p / "k_proj"), 32, 32, Default::default())?; // plain
/// let adapter = lora.finish()?;
/// assert!(q.as_lora().is_some() && k.as_lora().is_none());
/// assert_eq!(adapter.modules(), ["layers.0.q_proj"]);
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug)]
pub struct LoraBuilder<'a> {
    declared: Vec<Declared<'a>>,
    linears: Mutex<Vec<LoraStack<LoraLinear>>>,
    embeddings: Mutex<Vec<LoraStack<LoraEmbedding>>>,
    convs: Mutex<Vec<LoraStack<LoraConv2d>>>,
    copies: Mutex<Vec<LoraStack<ModuleCopy>>>,
    plain: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'a> LoraBuilder<'a> {
    /// A builder for the adapter named `"default"`, registering adapter variables under `root`.
    /// Validates the config; `target_modules` must be set.
    pub fn new(root: &nn::Path<'a>, config: LoraConfig) -> Result<Self> {
        Self::named(root, DEFAULT_ADAPTER_NAME, config)
    }

    /// A builder for a named adapter.
    pub fn named(root: &nn::Path<'a>, name: &str, config: LoraConfig) -> Result<Self> {
        let b = LoraBuilder {
            declared: Vec::new(),
            linears: Mutex::new(Vec::new()),
            embeddings: Mutex::new(Vec::new()),
            convs: Mutex::new(Vec::new()),
            copies: Mutex::new(Vec::new()),
            plain: Mutex::new(Vec::new()),
        };
        b.with_adapter(name, root, config)
    }

    /// Declares one more named adapter, its variables under `root` (which must differ from the
    /// other adapters' roots, e.g. a second store or `root / name`). Only the first declared
    /// adapter is active after [`finish`](Self::finish); see
    /// [`LoraAdapter::set_active`](super::LoraAdapter::set_active).
    pub fn with_adapter(
        mut self,
        name: &str,
        root: &nn::Path<'a>,
        config: LoraConfig,
    ) -> Result<Self> {
        check_adapter_name(name)?;
        if self.declared.iter().any(|d| d.name == name) {
            return Err(Error::config("adapter_name", format!("`{name}` is declared twice")));
        }
        config.validate()?;
        let targets = config.targets()?;
        self.declared.push(Declared { name: name.into(), root: root.clone(), config, targets });
        Ok(self)
    }

    /// The config of the first declared adapter.
    pub fn config(&self) -> &LoraConfig {
        &self.declared[0].config
    }

    /// The declared adapters that target `module` with LoRA (every declared target set sees the
    /// name, so that unmatched targets are reported by `finish`; a module an adapter copies in
    /// full is not its LoRA target, as in PEFT).
    fn targeting(&self, module: &str) -> Vec<&Declared<'a>> {
        let hits: Vec<bool> = self.declared.iter().map(|d| d.targets.matches(module)).collect();
        self.declared
            .iter()
            .zip(hits)
            .filter(|(d, h)| *h && !d.config.saves_module(module))
            .map(|(d, _)| d)
            .collect()
    }

    /// For a module some declared adapter lists in `modules_to_save`: the stack of copies, or
    /// an error when another adapter targets it with LoRA. `None` when no adapter copies it.
    fn copies_for(
        &self,
        module: &str,
        kind: CopyKind,
        ws: &Tensor,
        bs: Option<&Tensor>,
    ) -> Result<Option<LoraStack<ModuleCopy>>> {
        let saving: Vec<&Declared<'a>> =
            self.declared.iter().filter(|d| d.config.saves_module(module)).collect();
        if saving.is_empty() {
            return Ok(None);
        }
        if let Some(d) = self.targeting(module).first() {
            return Err(Error::Unsupported {
                field: "modules_to_save".into(),
                reason: format!(
                    "`{module}` is a LoRA target of adapter `{}` and copied in full by `{}`; a \
                     module can be one or the other",
                    d.name, saving[0].name
                ),
            });
        }
        let base = CopyBase { kind, ws: ws.shallow_clone(), bs: bs.map(Tensor::shallow_clone) };
        let decl: Vec<&Declared<'a>> = saving;
        let stack = self.stack::<ModuleCopy>(module, base, &decl)?;
        lock(&self.copies).push(stack.clone());
        Ok(Some(stack))
    }

    /// A stack over `base` with a slot for every adapter in `decl`; the base-dependent
    /// initialisation waits for the pre-trained weights (see
    /// [`LoraAdapter::init_from_base_weights`](super::LoraAdapter::init_from_base_weights)).
    fn stack<L: Attach>(
        &self,
        module: &str,
        base: L::Base,
        decl: &[&Declared<'a>],
    ) -> Result<LoraStack<L>> {
        let stack = LoraStack::new(module, base);
        for d in decl {
            let layer = L::attach(stack.base(), &module_path(&d.root, module), module, &d.config)?;
            layer.set_base_ready(false);
            stack.push(&d.name, layer);
        }
        Ok(stack)
    }

    /// Builds `nn::linear(base_path, in_dim, out_dim, c)` and wraps it with LoRA when the
    /// config targets `base_path`'s dotted name.
    pub fn linear(
        &self,
        base_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        c: nn::LinearConfig,
    ) -> Result<MaybeLoraLinear> {
        let base = nn::linear(base_path, in_dim, out_dim, c);
        self.wrap(&path_name(base_path), base)
    }

    /// Wraps an existing layer named `module` when the config targets it. Either way the base
    /// layer's weight and bias stop requiring grad (PEFT freezes everything but the adapters;
    /// freeze the rest of the base store yourself, e.g. `base_vs.freeze()`).
    pub fn wrap(&self, module: &str, base: nn::Linear) -> Result<MaybeLoraLinear> {
        let _ = base.ws.set_requires_grad(false);
        if let Some(bs) = &base.bs {
            let _ = bs.set_requires_grad(false);
        }
        if let Some(copies) =
            self.copies_for(module, CopyKind::Linear, &base.ws, base.bs.as_ref())?
        {
            return Ok(MaybeLoraLinear::Copy { base, copies });
        }
        let decl = self.targeting(module);
        if decl.is_empty() {
            lock(&self.plain).push(module.into());
            return Ok(MaybeLoraLinear::Plain(base));
        }
        let stack = self.stack::<LoraLinear>(module, base, &decl)?;
        lock(&self.linears).push(stack.clone());
        Ok(MaybeLoraLinear::Lora(stack))
    }

    /// Creates a GPT-2 style `Conv1D` layer (`base_path/weight: [in_dim, out_dim]`,
    /// `base_path/bias: [out_dim]`, `y = x W + b`) and wraps it with LoRA when the config targets
    /// `base_path` (see [`LoraLinear::from_conv1d`]). The plain layer is returned as an
    /// `nn::Linear` whose weight is the transposed view of the stored one.
    pub fn conv1d(
        &self,
        base_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
    ) -> Result<MaybeLoraLinear> {
        let weight =
            base_path.var("weight", &[in_dim, out_dim], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let bias = base_path.zeros("bias", &[out_dim]);
        // freeze the stored weight itself, then view it as the [out, in] weight of a linear layer
        let _ = weight.set_requires_grad(false);
        let _ = bias.set_requires_grad(false);
        self.wrap(&path_name(base_path), nn::Linear { ws: weight.f_tr()?, bs: Some(bias) })
    }

    /// Builds `nn::conv2d(base_path, in_dim, out_dim, ksize, c)` and wraps it with LoRA when the
    /// config targets `base_path` (see [`LoraConv2d`]).
    pub fn conv2d(
        &self,
        base_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        ksize: i64,
        c: nn::ConvConfig,
    ) -> Result<MaybeLoraConv2d> {
        let base = nn::conv2d(base_path, in_dim, out_dim, ksize, c);
        let module = path_name(base_path);
        let _ = base.ws.set_requires_grad(false);
        if let Some(bs) = &base.bs {
            let _ = bs.set_requires_grad(false);
        }
        let decl = self.targeting(&module);
        if decl.is_empty() {
            lock(&self.plain).push(module);
            return Ok(MaybeLoraConv2d::Plain(base));
        }
        let conv = Conv2dConfig {
            stride: [c.stride; 2],
            padding: [c.padding; 2],
            dilation: [c.dilation; 2],
            groups: c.groups,
            bias: c.bias,
            ws_init: c.ws_init,
            bs_init: c.bs_init,
            padding_mode: c.padding_mode,
        };
        let base = ConvBase { ws: base.ws, bs: base.bs, conv };
        let stack = self.stack::<LoraConv2d>(&module, base, &decl)?;
        lock(&self.convs).push(stack.clone());
        Ok(MaybeLoraConv2d::Lora(stack))
    }

    /// Creates the table `base_path/weight: [num, dim]` (initialised as `nn::embedding` does) and
    /// wraps it with LoRA when the config targets `base_path`'s dotted name.
    pub fn embedding(
        &self,
        base_path: &nn::Path,
        num: i64,
        dim: i64,
        c: nn::EmbeddingConfig,
    ) -> Result<MaybeLoraEmbedding> {
        let weight = nn::embedding(base_path, num, dim, c).ws;
        self.wrap_embedding(&path_name(base_path), weight)
    }

    /// Wraps an existing table `[V, d]` named `module` when the config targets it. Either way
    /// the table stops requiring grad.
    pub fn wrap_embedding(&self, module: &str, weight: Tensor) -> Result<MaybeLoraEmbedding> {
        let _ = weight.set_requires_grad(false);
        if let Some(copies) = self.copies_for(module, CopyKind::Embedding, &weight, None)? {
            return Ok(MaybeLoraEmbedding::Copy(copies));
        }
        let decl = self.targeting(module);
        if decl.is_empty() {
            lock(&self.plain).push(module.into());
            return Ok(MaybeLoraEmbedding::Plain(weight));
        }
        let stack = self.stack::<LoraEmbedding>(module, weight, &decl)?;
        lock(&self.embeddings).push(stack.clone());
        Ok(MaybeLoraEmbedding::Lora(stack))
    }

    /// Ends the build: errors when a listed target (or layer index) of any declared adapter
    /// matched no layer, and returns the handle on every adapted layer, with the first declared
    /// adapter active.
    pub fn finish(self) -> Result<LoraAdapter> {
        let copies = self.copies.into_inner().unwrap_or_else(|e| e.into_inner());
        for d in &self.declared {
            d.targets.check_all_matched()?;
            d.config.check_saved_matched(copies.iter().map(|s| s.module()))?;
        }
        let adapters: Vec<(String, LoraConfig)> =
            self.declared.into_iter().map(|d| (d.name, d.config)).collect();
        LoraAdapter::from_parts(
            adapters,
            self.linears.into_inner().unwrap_or_else(|e| e.into_inner()),
            self.embeddings.into_inner().unwrap_or_else(|e| e.into_inner()),
            self.convs.into_inner().unwrap_or_else(|e| e.into_inner()),
            copies,
            self.plain.into_inner().unwrap_or_else(|e| e.into_inner()),
        )
    }
}

/// Builds a plain `nn::linear`, or a LoRA layer when `lora` is given and targets the path: the
/// one-line change a model makes to accept an optional LoRA config.
///
/// With a builder, the base layer's weight and bias stop requiring grad whether the layer is
/// targeted or not (PEFT freezes the whole base model; [`LoraBuilder::wrap`]); without one the
/// layer is a plain trainable `nn::linear`.
pub fn linear(
    base_path: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    c: nn::LinearConfig,
    lora: Option<&LoraBuilder>,
) -> Result<MaybeLoraLinear> {
    match lora {
        Some(b) => b.linear(base_path, in_dim, out_dim, c),
        None => Ok(MaybeLoraLinear::Plain(nn::linear(base_path, in_dim, out_dim, c))),
    }
}

/// An embedding table that is LoRA-adapted when `lora` targets the path: the embedding twin of
/// [`linear`].
pub fn embedding(
    base_path: &nn::Path,
    num: i64,
    dim: i64,
    c: nn::EmbeddingConfig,
    lora: Option<&LoraBuilder>,
) -> Result<MaybeLoraEmbedding> {
    match lora {
        Some(b) => b.embedding(base_path, num, dim, c),
        None => Ok(MaybeLoraEmbedding::Plain(nn::embedding(base_path, num, dim, c).ws)),
    }
}
