//! A frozen linear layer whose weight stays 4-bit.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use tch::{Device, Kind, Tensor};

use super::{Bnb4bitConfig, Bnb4bitWeight};
use crate::{Error, Result};

/// A frozen linear layer over a [`Bnb4bitWeight`]: `y = x · deq(W)ᵀ + b`, with `deq(W)` formed in
/// the input's dtype (f32, f16 or bf16) for each forward, as bitsandbytes' `Linear4bit` does
/// with `compute_dtype` equal to the input's. Nothing about the layer trains; the input's
/// gradient flows through `deq(W)`, which the backward forms again from the codes (as
/// bitsandbytes' `MatMul4Bit` does): between forward and backward the layer holds neither the
/// dense weight nor its input (the autograd node of `csrc/quant_linear.cpp`; composed ops, which
/// keep the dense weight, in a `doc-only` build).
///
/// Handles made by [`share`](Self::share) (a LoRA layer's base is one) see the same tensors: a
/// checkpoint loaded into one with [`load`](Self::load) is what all of them compute with.
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// use tch_peft::quant::{Bnb4bitWeight, QuantLinear, QuantType};
/// let w = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
/// let layer = QuantLinear::new(Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true)?, None)?;
/// let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
/// let y = layer.f_forward(&x)?;
/// assert!(y.allclose(&x.matmul(&layer.weight().dequantize()?.tr()), 1e-5, 1e-5, false));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct QuantLinear {
    /// The tensors (their nested offset unused: `offset` is the current one).
    weight: Bnb4bitWeight,
    /// The nested offset's f32 bits, shared by every handle (a load rewrites it).
    offset: Arc<AtomicU32>,
    /// Held for writing by [`load`](Self::load), for reading by the layer's own forward, so
    /// that a forward on another handle sees the old weight or the new one, never a mix.
    lock: Arc<RwLock<()>>,
    bias: Option<Tensor>,
}

impl QuantLinear {
    /// The layer over `weight` (`[out, in]`), with an optional `bias` (`[out]`, on the weight's
    /// device; used as it is, not copied, and no longer requiring grad).
    pub fn new(weight: Bnb4bitWeight, bias: Option<Tensor>) -> Result<Self> {
        let shape = weight.shape().to_vec();
        if shape.len() != 2 {
            return Err(Error::ShapeMismatch {
                name: "quantized linear weight".into(),
                expected: vec![-1, -1],
                actual: shape,
            });
        }
        if let Some(b) = &bias {
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
            if !crate::lora::is_float(b.kind()) {
                return Err(Error::DtypeMismatch {
                    name: "quantized linear bias".into(),
                    expected: "a floating-point kind".into(),
                    actual: b.kind(),
                });
            }
            let _ = b.f_set_requires_grad(false).map_err(|_| Error::Unsupported {
                field: "quantized linear bias".into(),
                reason: "the bias is computed by autograd (not a leaf): pass a detached tensor"
                    .into(),
            })?;
        }
        let offset = weight.nested().map_or(0.0, |n| n.offset);
        Ok(QuantLinear {
            weight,
            offset: Arc::new(AtomicU32::new(offset.to_bits())),
            lock: Arc::default(),
            bias,
        })
    }

    /// A layer of `out × in` whose codes are all zero (it computes zeros, plus the bias) in the
    /// layout `config` describes, on `device`: what a model builds before its checkpoint is
    /// [`load`](Self::load)ed into it. `dtype` is the float dtype recorded with the weight
    /// (what [`Bnb4bitWeight::dequantize`] returns, `dtype` in the saved `quant_state`).
    pub fn zeros(
        out_features: i64,
        in_features: i64,
        bias: Option<Tensor>,
        config: &Bnb4bitConfig,
        dtype: Kind,
        device: Device,
    ) -> Result<Self> {
        let w = Bnb4bitWeight::zeros(
            &[out_features, in_features],
            config.quant_type,
            config.blocksize,
            config.double_quant,
            dtype,
            device,
        )?;
        Self::new(w, bias)
    }

    /// A second handle on the same layer (same tensors, same offset).
    pub fn share(&self) -> Self {
        QuantLinear {
            weight: self.weight.shallow_with_offset(self.current_offset()),
            offset: Arc::clone(&self.offset),
            lock: Arc::clone(&self.lock),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
        }
    }

    fn current_offset(&self) -> f32 {
        f32::from_bits(self.offset.load(Ordering::Acquire))
    }

    /// Writes `weight` (checked: same quantization type, shape, block sizes and double
    /// quantization as this layer's) into the layer's tensors in place, for every handle.
    /// A forward of this layer on another thread waits (a LoRA layer over it is synchronised
    /// by its own merge lock, which loading does not take: load before training or serving).
    ///
    /// # Errors
    /// [`Error::Quantization`] naming `name` when the layouts differ.
    pub fn load(&self, name: &str, weight: &Bnb4bitWeight) -> Result<()> {
        if !self.weight.same_layout(weight) {
            let layout = |w: &Bnb4bitWeight| {
                format!(
                    "{} {:?}, blocksize {}, nested {:?}",
                    w.quant_type().name(),
                    w.shape(),
                    w.blocksize(),
                    w.nested().map(|n| n.blocksize)
                )
            };
            return Err(Error::Quantization {
                name: name.into(),
                reason: format!(
                    "the checkpoint's weight is {}; the layer is {}",
                    layout(weight),
                    layout(&self.weight)
                ),
            });
        }
        let _write = self.lock.write().unwrap_or_else(|e| e.into_inner());
        self.weight.copy_parts_from(weight)?;
        let offset = weight.nested().map_or(0.0, |n| n.offset);
        self.offset.store(offset.to_bits(), Ordering::Release);
        Ok(())
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.weight.shape()[1]
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        self.weight.shape()[0]
    }

    /// The quantized weight: a handle on the layer's tensors with the current nested offset
    /// (valid until the next [`load`](Self::load) or merge into the layer, which rewrites the
    /// tensors; copy it to keep it).
    pub fn weight(&self) -> Bnb4bitWeight {
        self.weight.shallow_with_offset(self.current_offset())
    }

    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The device the codes are on.
    pub fn device(&self) -> Device {
        self.weight.device()
    }

    /// The weight dequantized to `kind` (`[out, in]`, not requiring grad).
    pub fn dense_weight(&self, kind: Kind) -> Result<Tensor> {
        self.weight().dequantize_to(kind)
    }

    /// The parts, dims and offset the C++ nodes take (see [`Bnb4bitWeight`]'s `node_parts`).
    pub(crate) fn node_parts(&self) -> (Vec<Tensor>, [i64; 4], f64) {
        let (parts, dims, _) = self.weight.node_parts();
        (parts, dims, f64::from(self.current_offset()))
    }

    /// A key that changes whenever the weight's values may have: the codes' storage and
    /// version counter (a load or a merge writes them in place).
    pub(crate) fn version_key(&self) -> Result<(usize, i64)> {
        let codes = self.weight.codes();
        Ok((codes.data_ptr() as usize, codes.f_internal_version()?))
    }

    /// Checks an input against the layer: last dimension, a float dtype the layer computes in,
    /// device.
    pub(crate) fn check_input(&self, name: &str, xs: &Tensor) -> Result<()> {
        let in_features = self.in_features();
        if xs.size().last() != Some(&in_features) {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: vec![-1, in_features],
                actual: xs.size(),
            });
        }
        if !matches!(xs.kind(), Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::DtypeMismatch {
                name: name.into(),
                expected: "f32, f16 or bf16 (a 4-bit layer computes in its input's dtype)".into(),
                actual: xs.kind(),
            });
        }
        if xs.device() != self.device() {
            return Err(Error::DeviceMismatch {
                name: name.into(),
                expected: self.device(),
                actual: xs.device(),
            });
        }
        Ok(())
    }

    /// `xs · deq(W)ᵀ + b` for `xs: [..., in]` (f32, f16 or bf16) on the weight's device.
    ///
    /// # Errors
    /// `ShapeMismatch`, `DtypeMismatch` or `DeviceMismatch` naming the input.
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.check_input("input of quantized linear layer", xs)?;
        let _read = self.lock.read().unwrap_or_else(|e| e.into_inner());
        self.forward_with_bias(xs, self.bias.as_ref())
    }

    /// The forward with `bias` in place of the layer's (a LoRA layer's trained copy), on a
    /// checked input.
    pub(crate) fn forward_with_bias(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let bias = match bias {
            Some(b) if b.kind() != xs.kind() => Some(b.f_to_kind(xs.kind())?),
            Some(b) => Some(b.shallow_clone()),
            None => None,
        };
        #[cfg(tch_peft_csrc)]
        {
            let (parts, dims, offset) = self.node_parts();
            let q: Vec<&Tensor> = parts.iter().collect();
            Ok(crate::sys::linear_4bit(xs, bias.as_ref(), &q, dims, offset)?)
        }
        #[cfg(not(tch_peft_csrc))]
        {
            let w = self.dense_weight(xs.kind())?;
            Ok(xs.f_linear(&w, bias.as_ref())?)
        }
    }

    /// As [`f_forward`](Self::f_forward), always through composed libtorch ops: the dense
    /// weight is formed once and autograd keeps it for the input gradient (the reference the
    /// node is tested against).
    #[doc(hidden)]
    pub fn f_forward_composed(&self, xs: &Tensor) -> Result<Tensor> {
        self.check_input("input of quantized linear layer", xs)?;
        let w = self.dense_weight(xs.kind())?;
        let bias = self.bias.as_ref().map(|b| b.f_to_kind(xs.kind())).transpose()?;
        Ok(xs.f_linear(&w, bias.as_ref())?)
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

    /// Bytes the layer's weight holds on its device (codes, absmax, tables).
    pub fn storage_bytes(&self) -> u64 {
        self.weight.storage_bytes()
    }
}
