//! [`LinearBase`]: the frozen layer under a [`LoraLinear`](super::LoraLinear) — a float
//! `nn::Linear` or a 4-bit [`QuantLinear`] (QLoRA).

use tch::{nn, Device, Kind, Tensor};

use crate::quant::QuantLinear;
use crate::Result;

/// The frozen base of a LoRA linear layer: a float `nn::Linear` (`y = x Wᵀ + b`), or a 4-bit
/// [`QuantLinear`] (`y = x · deq(W)ᵀ + b`, QLoRA), which keeps its codes and forms `deq(W)` in
/// the input's dtype when it computes.
#[derive(Debug)]
pub enum LinearBase {
    /// A float layer.
    Dense(nn::Linear),
    /// A 4-bit layer.
    Quant(QuantLinear),
}

impl From<nn::Linear> for LinearBase {
    fn from(l: nn::Linear) -> Self {
        LinearBase::Dense(l)
    }
}

impl From<QuantLinear> for LinearBase {
    fn from(l: QuantLinear) -> Self {
        LinearBase::Quant(l)
    }
}

impl LinearBase {
    /// The float layer, if the base is one.
    pub fn dense(&self) -> Option<&nn::Linear> {
        match self {
            LinearBase::Dense(l) => Some(l),
            LinearBase::Quant(_) => None,
        }
    }

    /// The 4-bit layer, if the base is one.
    pub fn quantized(&self) -> Option<&QuantLinear> {
        match self {
            LinearBase::Quant(q) => Some(q),
            LinearBase::Dense(_) => None,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        match self {
            LinearBase::Dense(l) => l.ws.size().get(1).copied().unwrap_or(0),
            LinearBase::Quant(q) => q.in_features(),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        match self {
            LinearBase::Dense(l) => l.ws.size().first().copied().unwrap_or(0),
            LinearBase::Quant(q) => q.out_features(),
        }
    }

    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            LinearBase::Dense(l) => l.bs.as_ref(),
            LinearBase::Quant(q) => q.bias(),
        }
    }

    /// The device of the weight.
    pub fn device(&self) -> Device {
        match self {
            LinearBase::Dense(l) => l.ws.device(),
            LinearBase::Quant(q) => q.device(),
        }
    }

    /// The weight in `kind`: the float weight itself (a shallow handle, whatever `kind`; its
    /// own dtype), or the 4-bit weight dequantized to `kind` (a new tensor).
    pub fn weight(&self, kind: Kind) -> Result<Tensor> {
        match self {
            LinearBase::Dense(l) => Ok(l.ws.shallow_clone()),
            LinearBase::Quant(q) => q.dense_weight(kind),
        }
    }

    /// A second handle on the same tensors.
    pub(crate) fn share(&self) -> Self {
        match self {
            LinearBase::Dense(l) => LinearBase::Dense(nn::Linear {
                ws: l.ws.shallow_clone(),
                bs: l.bs.as_ref().map(Tensor::shallow_clone),
            }),
            LinearBase::Quant(q) => LinearBase::Quant(q.share()),
        }
    }

    /// `x Wᵀ + bias` with the given bias (cast to the input's dtype by the caller for a float
    /// base), on a checked input.
    pub(crate) fn forward_with_bias(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            LinearBase::Dense(l) => Ok(xs.f_linear(&l.ws, bias)?),
            LinearBase::Quant(q) => q.forward_with_bias(xs, bias),
        }
    }

    /// Checks an input of the layer named `module`: last dimension, dtype (the weight's for a
    /// float base; f32, f16 or bf16 for a 4-bit one), device.
    pub(crate) fn check_input(&self, module: &str, xs: &Tensor) -> Result<()> {
        match self {
            LinearBase::Dense(l) => super::forward::check_linear_input(&l.ws, module, xs),
            LinearBase::Quant(q) => q.check_input(&format!("input of `{module}`"), xs),
        }
    }
}
