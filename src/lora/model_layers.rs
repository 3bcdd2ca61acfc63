//! The layers a model holds after building through a [`LoraBuilder`](super::LoraBuilder): plain,
//! LoRA-adapted (a [`LoraStack`]) or a `modules_to_save` copy, as the targets decided; and
//! [`forward_shared`], which runs layers that share an input as one fused node.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::layer::{LinearBase, LoraConv2d, LoraEmbedding, LoraLinear, LoraStack, ModuleCopy};
use crate::{Error, Result};

/// A linear layer that is LoRA-adapted or not, as the configs' targets decided at build time.
#[derive(Debug)]
pub enum MaybeLoraLinear {
    /// Not targeted: the plain base layer (float or 4-bit).
    Plain(LinearBase),
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

    /// The base layer, when it is a float one (a 4-bit base: [`quantized_base`](Self::quantized_base)).
    pub fn base(&self) -> Option<&nn::Linear> {
        match self {
            MaybeLoraLinear::Plain(l) => l.dense(),
            MaybeLoraLinear::Copy { base: l, .. } => Some(l),
            MaybeLoraLinear::Lora(s) => s.base_linear().dense(),
        }
    }

    /// The 4-bit base layer, when the base is one.
    pub fn quantized_base(&self) -> Option<&crate::quant::QuantLinear> {
        match self {
            MaybeLoraLinear::Plain(l) => l.quantized(),
            MaybeLoraLinear::Copy { .. } => None,
            MaybeLoraLinear::Lora(s) => s.base_linear().quantized(),
        }
    }

    /// Whether a forward with `train` draws a dropout mask (an enabled, unmerged adapter with
    /// `lora_dropout` > 0 in training).
    pub(crate) fn draws_dropout(&self, train: bool) -> bool {
        let mut any = false;
        if let MaybeLoraLinear::Lora(s) = self {
            let _ = s.for_each(|_, l| {
                any |= l.draws_dropout(train);
                Ok(())
            });
        }
        any
    }

    /// Forward with input checks (see [`LoraLinear::f_forward_t`]).
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            MaybeLoraLinear::Plain(LinearBase::Dense(l)) => {
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
            MaybeLoraLinear::Plain(LinearBase::Quant(q)) => q.f_forward(xs),
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
    shared(layers, xs, None, train)
}

/// [`forward_shared`] on an op's [`Recomputable`](crate::ops::Recomputable) output (an RMSNorm's or a SwiGLU's): where
/// the output carries its recipe, the fused node keeps the recipe's tensors, which the op's own
/// node holds anyway, instead of the `[N, in]` input, and replays the op's kernel in its
/// backward, bit for bit. Same values and gradients as [`forward_shared`] on the tensor; one
/// layer alone takes the fused node too.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_peft::lora::{forward_recomputable, LoraBuilder, LoraConfig};
///
/// let (base, adapters) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
/// let builder = LoraBuilder::new(&adapters.root(), LoraConfig::for_targets(["down"]))?;
/// let down = builder.linear(&(base.root() / "down"), 16, 8, Default::default())?;
/// let (g, u) = (Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)), Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)));
/// let gated = tch_peft::ops::swiglu_recomputable(&g, &u)?;
/// let y = forward_recomputable(&[&down], &gated, true)?.remove(0);
/// assert!(y.allclose(&down.f_forward_t(gated.tensor(), true)?, 1e-6, 1e-6, false));
/// # Ok::<(), tch_peft::Error>(())
/// ```
pub fn forward_recomputable(
    layers: &[&MaybeLoraLinear],
    xs: &crate::ops::Recomputable,
    train: bool,
) -> Result<Vec<Tensor>> {
    shared(layers, xs.tensor(), xs.recipe(), train)
}

fn shared(
    layers: &[&MaybeLoraLinear],
    xs: &Tensor,
    recipe: Option<&crate::ops::Recipe>,
    train: bool,
) -> Result<Vec<Tensor>> {
    #[cfg(not(tch_peft_csrc))]
    let _ = recipe;
    #[cfg(tch_peft_csrc)]
    {
        // the single adapter of each layer that has one, its base weight locked for reading
        // from the state check to the kernel (a merge on another thread waits)
        let only: Vec<Option<LoraLinear>> =
            layers.iter().map(|l| l.as_stack().and_then(LoraStack::only)).collect();
        // once per base weight (a layer listed twice would read-lock twice on this thread)
        let mut bases: Vec<_> = only
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let l = l.as_ref()?;
                let seen = only[..i].iter().flatten().any(|o| o.base_lock().same(l.base_lock()));
                (!seen).then(|| l.base_lock().read())
            })
            .collect();
        // those that take the fused path, with their bias; the others' own forwards lock them
        let mut fused: Vec<Option<(&LoraLinear, Option<Tensor>)>> = Vec::new();
        for (layer, base) in only.iter().zip(bases.iter_mut()) {
            let member = match layer {
                Some(layer) => layer.fused_group_bias(xs, train)?.map(|bias| (layer, bias)),
                None => None,
            };
            if member.is_none() {
                *base = None;
            }
            fused.push(member);
        }
        // one node for two or more; for one alone where it saves the input
        let count = fused.iter().filter(|m| m.is_some()).count();
        if count >= 2 || (count == 1 && recipe.is_some()) {
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
            let mut ys = super::layer::fused::lora_group(&x2, &members, recipe)?.into_iter();
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
        drop(bases);
    }
    layers.iter().map(|l| l.f_forward_t(xs, train)).collect()
}

impl ModuleT for MaybeLoraLinear {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            MaybeLoraLinear::Plain(LinearBase::Dense(l)) => xs.linear(&l.ws, l.bs.as_ref()),
            MaybeLoraLinear::Plain(LinearBase::Quant(q)) => {
                q.f_forward(xs).unwrap_or_else(|e| panic!("{e}"))
            }
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
