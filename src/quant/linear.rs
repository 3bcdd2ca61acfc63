//! A frozen linear layer whose weight stays 4-bit.

use tch::{Kind, Tensor};

use super::Bnb4bitWeight;
use crate::{Error, Result};

/// A frozen linear layer over a [`Bnb4bitWeight`]: `y = x · deq(W)ᵀ + b`, with `deq(W)` formed in
/// the compute dtype for each forward (bitsandbytes' `Linear4bit` with `compute_dtype`). Nothing
/// about the layer trains; the input's gradient flows through `deq(W)`, which the backward forms
/// again from the codes (as bitsandbytes' `MatMul4Bit` does): between forward and backward the
/// layer holds neither the dense weight nor its input (the autograd node of
/// `csrc/quant_linear.cpp`; composed ops, which keep the dense weight, in a `doc-only` build).
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// use tch_peft::quant::{Bnb4bitWeight, QuantLinear, QuantType};
/// let w = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
/// let layer = QuantLinear::new(Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true)?, None, Kind::Float)?;
/// let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
/// let y = layer.f_forward(&x)?;
/// assert!(y.allclose(&x.matmul(&layer.weight().dequantize()?.tr()), 1e-5, 1e-5, false));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct QuantLinear {
    weight: Bnb4bitWeight,
    bias: Option<Tensor>,
    compute_kind: Kind,
}

impl QuantLinear {
    /// The layer over `weight` (`[out, in]`), with an optional `bias` (`[out]`, cast to
    /// `compute_kind` and detached), computing in `compute_kind` (f32, f16 or bf16).
    pub fn new(weight: Bnb4bitWeight, bias: Option<Tensor>, compute_kind: Kind) -> Result<Self> {
        let shape = weight.shape().to_vec();
        if shape.len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "quantized linear weight".into(),
                expected: vec![-1, -1],
                actual: shape,
            });
        }
        if !matches!(compute_kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::DtypeMismatch {
                name: "compute dtype of a quantized linear layer".into(),
                expected: "f32, f16 or bf16".into(),
                actual: compute_kind,
            });
        }
        let bias = match bias {
            Some(b) => {
                if b.size() != [shape[0]] {
                    return Err(Error::ShapeMismatch {
                        name: "quantized linear bias".into(),
                        expected: vec![shape[0]],
                        actual: b.size(),
                    });
                }
                if b.device() != weight.device() {
                    return Err(Error::DeviceMismatch {
                        name: "quantized linear bias".into(),
                        expected: weight.device(),
                        actual: b.device(),
                    });
                }
                Some(b.f_to_kind(compute_kind)?.detach())
            }
            None => None,
        };
        Ok(QuantLinear { weight, bias, compute_kind })
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.weight.shape()[1]
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        self.weight.shape()[0]
    }

    /// The quantized weight.
    pub fn weight(&self) -> &Bnb4bitWeight {
        &self.weight
    }

    /// The bias, in the compute dtype.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The dtype the forward computes in.
    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// The weight dequantized to the compute dtype (`[out, in]`, not requiring grad).
    pub fn dense_weight(&self) -> Result<Tensor> {
        self.weight.dequantize_to(self.compute_kind)
    }

    /// `xs · deq(W)ᵀ + b` for `xs: [..., in]` in the compute dtype on the weight's device.
    ///
    /// # Errors
    /// `ShapeMismatch`, `DtypeMismatch` or `DeviceMismatch` naming the input.
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let in_features = self.in_features();
        if xs.size().last() != Some(&in_features) {
            return Err(Error::ShapeMismatch {
                name: "input of quantized linear layer".into(),
                expected: vec![-1, in_features],
                actual: xs.size(),
            });
        }
        if xs.kind() != self.compute_kind {
            return Err(Error::DtypeMismatch {
                name: "input of quantized linear layer".into(),
                expected: format!("{:?}, the compute dtype", self.compute_kind),
                actual: xs.kind(),
            });
        }
        if xs.device() != self.weight.device() {
            return Err(Error::DeviceMismatch {
                name: "input of quantized linear layer".into(),
                expected: self.weight.device(),
                actual: xs.device(),
            });
        }
        #[cfg(tch_peft_csrc)]
        {
            let (parts, dims, offset) = self.weight.node_parts();
            let q: Vec<&Tensor> = parts.iter().collect();
            Ok(crate::sys::linear_4bit(xs, self.bias.as_ref(), &q, dims, offset)?)
        }
        #[cfg(not(tch_peft_csrc))]
        {
            let w = self.dense_weight()?;
            Ok(xs.f_linear(&w, self.bias.as_ref())?)
        }
    }

    /// As [`f_forward`](Self::f_forward), always through composed libtorch ops: the dense
    /// weight is formed once and autograd keeps it for the input gradient (the reference the
    /// node is tested against).
    #[doc(hidden)]
    pub fn f_forward_composed(&self, xs: &Tensor) -> Result<Tensor> {
        let w = self.dense_weight()?;
        Ok(xs.f_linear(&w, self.bias.as_ref())?)
    }

    /// The parameter count a float layer of this shape has (`out · in`, plus the bias).
    pub fn num_parameters(&self) -> i64 {
        self.weight.numel() + self.bias.as_ref().map_or(0, |b| b.numel() as i64)
    }

    /// The parameter count bitsandbytes' `Params4bit` reports to `model.num_parameters()`: the
    /// packed bytes, `⌈out · in / 2⌉` (PEFT's `print_trainable_parameters` doubles it back),
    /// plus the bias.
    pub fn num_parameters_bnb(&self) -> i64 {
        self.weight.codes().numel() as i64 + self.bias.as_ref().map_or(0, |b| b.numel() as i64)
    }
}
