//! Attaching LoRA to a model the caller builds ([`LoraBuilder`]): it hands out the layers of
//! `model_layers.rs`, plain or holding a [`LoraStack`] of named adapters, as the configs'
//! targets decide.

use std::sync::Mutex;

use tch::nn;
use tch::Tensor;

use super::adapters::{check_adapter_name, module_path, LoraAdapter, DEFAULT_ADAPTER_NAME};
use super::config::LoraConfig;
use super::layer::{
    path_name, Attach, Conv2dConfig, ConvBase, CopyBase, CopyKind, LinearBase, LoraConv2d,
    LoraEmbedding, LoraLinear, LoraStack, ModuleCopy,
};
use super::model_layers::{MaybeLoraConv2d, MaybeLoraEmbedding, MaybeLoraLinear};
use crate::target::Targets;
use crate::{Error, Result};

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
            let layer = L::attach(
                stack.base(),
                stack.base_lock(),
                &module_path(&d.root, module),
                module,
                &d.config,
            )?;
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
        let base = crate::vars::try_linear(base_path, in_dim, out_dim, c)?;
        self.wrap(&path_name(base_path), base)
    }

    /// Wraps an existing layer named `module` when the config targets it. Either way the base
    /// layer's weight and bias stop requiring grad (PEFT freezes everything but the adapters;
    /// freeze the rest of the base store yourself, e.g. `base_vs.freeze()`).
    ///
    /// A 4-bit base ([`QuantLinear`](crate::quant::QuantLinear)) takes LoRA and DoRA adapters
    /// (QLoRA) but not `modules_to_save` (a trainable copy of a 4-bit weight is a float one:
    /// keep such a module in float).
    pub fn wrap(&self, module: &str, base: impl Into<LinearBase>) -> Result<MaybeLoraLinear> {
        let base = base.into();
        if let Some(bs) = base.bias() {
            let _ = bs.set_requires_grad(false);
        }
        let base = match base {
            LinearBase::Dense(base) => {
                let _ = base.ws.set_requires_grad(false);
                if let Some(copies) =
                    self.copies_for(module, CopyKind::Linear, &base.ws, base.bs.as_ref())?
                {
                    return Ok(MaybeLoraLinear::Copy { base, copies });
                }
                LinearBase::Dense(base)
            }
            LinearBase::Quant(q) => {
                if self.declared.iter().any(|d| d.config.saves_module(module)) {
                    return Err(Error::Unsupported {
                        field: "modules_to_save".into(),
                        reason: format!("`{module}` is 4-bit; keep it in float to train a copy"),
                    });
                }
                LinearBase::Quant(q)
            }
        };
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
        crate::vars::check_dims(base_path, &[in_dim, out_dim])?;
        let weight = base_path.f_var(
            "weight",
            &[in_dim, out_dim],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        )?;
        let bias = base_path.f_zeros("bias", &[out_dim])?;
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
        let weight = crate::vars::try_embedding(base_path, num, dim, c)?;
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
        None => Ok(MaybeLoraLinear::Plain(
            crate::vars::try_linear(base_path, in_dim, out_dim, c)?.into(),
        )),
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
        None => Ok(MaybeLoraEmbedding::Plain(crate::vars::try_embedding(base_path, num, dim, c)?)),
    }
}
