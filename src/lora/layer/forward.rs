//! [`LoraLinear`]'s forward: the composed ops, the fused autograd node (`fused.rs`, LoRA and
//! DoRA alike, one layer or a group sharing an input), the input checks, and the switches of the
//! node's run-time compiled CUDA kernels.

use std::sync::atomic::Ordering;

use tch::nn::ModuleT;
use tch::{Kind, Tensor};

use super::linear::LoraLinear;
use crate::{Error, Result};

/// Whether this build carries the fused LoRA Linear autograd node (`csrc/lora_linear.cpp`,
/// compiled by `build.rs` against libtorch's headers). Without it, layers compose tch ops,
/// which compute the same values with more memory traffic in the backward pass.
pub fn fused_kernel_available() -> bool {
    cfg!(tch_peft_csrc)
}

/// Whether the fused nodes' run-time compiled CUDA kernels run on the current CUDA device: a
/// LoRA group's low-rank outputs `s·(x Aᵀ) Bᵀ (+ bias)` (tensor-core MMAs, one launch for every
/// layer of a group, written at up to ~4 TB/s on an H200 where cuBLAS's thin GEMMs reach ~3.1;
/// the base GEMM then accumulates into them), and DoRA's two bandwidth-bound passes — the
/// weight-side part (the norm `‖W + s·BA‖_row` from two small GEMMs, the scale `G`, `G·W`,
/// `G·B`, `1/m`: one pass over `W` instead of ~10 launches) and the magnitude gradient's column
/// reduction `Σ_rows g_y ⊙ y`. They are compiled with NVRTC (the one the PyTorch wheels ship) on
/// first use, for bf16 layers on GPUs of compute capability 8.0 or newer (the LoRA kernel for
/// ranks that are a multiple of 8 up to 32 and output widths that are a multiple of 8). Where
/// they do not run (no CUDA build, no GPU or NVRTC, other dtypes or shapes, switched off) the
/// node uses libtorch's ops, which compute the same values up to f32 rounding (the kernels'
/// summation order is fixed, so they are deterministic).
///
/// Compiles the kernels for the current device if that has not happened yet.
///
/// ```
/// // false on a machine without a CUDA GPU (or with the kernels switched off)
/// let _ = tch_peft::lora::custom_cuda_kernels_available();
/// ```
pub fn custom_cuda_kernels_available() -> bool {
    #[cfg(tch_peft_csrc)]
    {
        crate::sys::custom_kernels_available()
    }
    #[cfg(not(tch_peft_csrc))]
    {
        false
    }
}

/// Switches the fused nodes' run-time compiled CUDA kernels ([`custom_cuda_kernels_available`])
/// on or off for the whole process (on by default; `TCH_PEFT_CUSTOM_KERNELS=0` in the
/// environment starts with them off). Off, the fused LoRA and DoRA nodes and the model ops of
/// [`crate::ops`] (RMSNorm with or without the fused residual add, SwiGLU, RoPE, the linear
/// cross-entropy's bf16 softmax) use libtorch's ops only.
pub fn set_custom_cuda_kernels(on: bool) {
    #[cfg(tch_peft_csrc)]
    crate::sys::set_custom_kernels(on);
    #[cfg(not(tch_peft_csrc))]
    let _ = on;
}

impl LoraLinear {
    fn check_input(&self, xs: &Tensor) -> Result<()> {
        self.base.check_input(&self.module, xs)
    }

    /// When this layer's forward on `xs` would be the fused (LoRA or DoRA) node (enabled,
    /// unmerged, no active dropout, no `lora_bias`, fused on), the bias it would add (cast to
    /// the input's dtype); `None` when it takes another path. Checks the input first.
    #[cfg(tch_peft_csrc)]
    pub(crate) fn fused_group_bias(
        &self,
        xs: &Tensor,
        train: bool,
    ) -> Result<Option<Option<Tensor>>> {
        self.check_input(xs)?;
        let eligible = self.is_enabled() && !self.is_merged() && self.takes_fused_node(train);
        if !eligible {
            return Ok(None);
        }
        self.check_base_init()?;
        Ok(Some(self.input_bias(xs.kind())?))
    }

    /// Whether a forward with `train` draws a dropout mask.
    pub(crate) fn draws_dropout(&self, train: bool) -> bool {
        train && self.dropout > 0.0 && self.is_enabled() && !self.is_merged()
    }

    /// Whether an unmerged forward runs the fused (LoRA or DoRA) node: no active dropout, no
    /// `lora_bias`, fused not switched off.
    #[cfg(tch_peft_csrc)]
    fn takes_fused_node(&self, train: bool) -> bool {
        !(train && self.dropout > 0.0)
            && self.lora_b_bias.is_none()
            && self.state.fused.load(Ordering::Relaxed)
    }

    /// The bias the forward adds, in the activations' dtype: a trained f32 bias copy
    /// (`bias = "lora_only"`) on a bf16/f16 base is cast down.
    fn input_bias(&self, kind: Kind) -> Result<Option<Tensor>> {
        Ok(match self.effective_bias() {
            Some(b) if b.kind() != kind => Some(b.f_to_kind(kind)?),
            Some(b) => Some(b.shallow_clone()),
            None => None,
        })
    }

    /// The base weight, A, B and scaling (and for DoRA the magnitude and `‖W_i‖²`), for the
    /// group node; `factors` replaces A and B of a LoRA layer (their cached casts in inference,
    /// see [`LoraLinear::inference_factors`]).
    #[cfg(tch_peft_csrc)]
    pub(crate) fn group_member<'a>(
        &'a self,
        bias: Option<&'a Tensor>,
        factors: Option<&'a (Tensor, Tensor)>,
    ) -> Result<super::fused::GroupMember<'a>> {
        let (a, b) = factors.map_or((&self.lora_a, &self.lora_b), |(a, b)| (a, b));
        let dora = match &self.magnitude {
            Some(m) => Some(super::fused::DoraMember { m, w_sq: self.dora_row_sq_cached()? }),
            None => None,
        };
        let w = match &self.base {
            super::base::LinearBase::Dense(l) => super::fused::MemberWeight::Dense(&l.ws),
            super::base::LinearBase::Quant(q) => {
                let (parts, dims, offset) = q.node_parts();
                super::fused::MemberWeight::Quant { parts, dims, offset }
            }
        };
        Ok(super::fused::GroupMember { w, bias, a, b, scaling: self.scaling, dora })
    }

    /// Without autograd (inference), A and B of a LoRA layer cast to `kind` and cached until
    /// they change; `None` when autograd records, no cast is needed or the layer is DoRA (whose
    /// norm wants the f32 factors).
    #[cfg(tch_peft_csrc)]
    pub(crate) fn inference_factors(&self, kind: Kind) -> Result<Option<(Tensor, Tensor)>> {
        if crate::sys::grad_enabled() || self.lora_a.kind() == kind || self.magnitude.is_some() {
            return Ok(None);
        }
        Ok(Some(self.cast_factors(kind)?))
    }

    /// The trained copy of the base bias (`bias = "lora_only"`), if any.
    /// The base weight's lock (see [`BaseLock`](super::merge::BaseLock)).
    pub(crate) fn base_lock(&self) -> &super::merge::BaseLock {
        self.state.merge.base_lock()
    }

    pub(crate) fn trained_bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Adds this adapter's branch to `y`, the base output `x Wᵀ + b` on the flattened input
    /// `x2: [N, in]` (the multi-adapter forward sums the active adapters this way). DoRA adds
    /// `(g − 1)·(x_d Wᵀ) + g·s·(x_d Aᵀ) Bᵀ`, as PEFT does for each DoRA adapter.
    /// (The caller holds the base lock for reading.)
    pub(crate) fn f_add_delta(&self, x2: &Tensor, mut y: Tensor, train: bool) -> Result<Tensor> {
        self.check_base_init()?;
        let dropout = train && self.dropout > 0.0;
        let xd = if dropout { x2.f_dropout(self.dropout, true)? } else { x2.shallow_clone() };
        // The branch runs in the base dtype, as under torch.autocast: the f32 factors are cast
        // (they are small: [r, in] and [out, r]) rather than the [N, in] activations, and their
        // gradients come back in f32 through the cast.
        let kind = y.kind();
        let cast =
            |t: &Tensor| if t.kind() == kind { Ok(t.shallow_clone()) } else { t.f_to_kind(kind) };
        let (a, b) = (cast(&self.lora_a)?, cast(&self.lora_b)?);
        let mut h = xd.f_mm(&a.f_tr()?)?;
        if self.scaling != 1.0 {
            h = h.f_mul_scalar(self.scaling)?;
        }
        if let Some(m) = &self.magnitude {
            return self.dora_add_delta(m, &xd, &h, &b, y);
        }
        let _ = y.f_addmm_(&h, &b.f_tr()?)?;
        if let Some(bb) = &self.lora_b_bias {
            // lora_B(h) includes its bias: s·(h Bᵀ + b_B)
            let _ = y.f_add_(&bb.f_mul_scalar(self.scaling)?.f_to_kind(kind)?)?;
        }
        Ok(y)
    }

    /// Forward with every input check done before libtorch is called: the last dimension must
    /// be `in_features`, and dtype and device must match the base weight.
    ///
    /// Safe beside merges on other threads: the base weight is read under the lock all adapters
    /// of the layer share, so the output is the merged or the unmerged one.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(xs)?;
        let _base = self.state.merge.base_lock().read();
        let bias = self.input_bias(xs.kind())?;
        let bias = bias.as_ref();
        if !self.is_enabled() {
            return self.base.forward_with_bias(xs, bias);
        }
        if self.is_merged() {
            // the merged layer is the base layer alone (merged bias included)
            let bias = self.base.bias().map(|b| b.f_to_kind(xs.kind())).transpose()?;
            return self.base.forward_with_bias(xs, bias.as_ref());
        }
        let mut out_shape = xs.size();
        *out_shape.last_mut().expect("checked non-empty") = self.out_features;
        self.check_base_init()?;
        let x2 = xs.f_reshape([-1, self.in_features])?;
        let dropout = train && self.dropout > 0.0;
        // The fused node (the group node with this layer alone, LoRA or DoRA): in training its
        // backward; in eval one kernel fewer than the composed ops (the scaling rides on the
        // accumulating GEMM).
        #[cfg(tch_peft_csrc)]
        if self.takes_fused_node(train) {
            // without autograd (inference), LoRA factors' casts are reused until they change
            let cached = self.inference_factors(x2.kind())?;
            let member = self.group_member(bias, cached.as_ref())?;
            let y = super::fused::lora_group(&x2, &[member], None)?.remove(0);
            return Ok(y.f_reshape(out_shape)?);
        }
        if let Some(m) = &self.magnitude {
            let y = self.dora_forward(&x2, m, bias, dropout)?;
            return Ok(y.f_reshape(out_shape)?);
        }
        let y = self.base.forward_with_bias(&x2, bias)?;
        Ok(self.f_add_delta(&x2, y, train)?.f_reshape(out_shape)?)
    }
}

/// Checks an input of a linear layer with weight `ws` against it: last dimension, dtype, device.
pub(crate) fn check_linear_input(ws: &Tensor, module: &str, xs: &Tensor) -> Result<()> {
    let size = xs.size();
    let in_features = ws.size()[1];
    if size.last() != Some(&in_features) {
        return Err(Error::ShapeMismatch {
            name: format!("input of `{module}`"),
            expected: vec![-1, in_features],
            actual: size,
        });
    }
    if xs.kind() != ws.kind() {
        return Err(Error::DtypeMismatch {
            name: format!("input of `{module}`"),
            expected: format!("{:?} (the base weight's kind)", ws.kind()),
            actual: xs.kind(),
        });
    }
    if xs.device() != ws.device() {
        return Err(Error::DeviceMismatch {
            name: format!("input of `{module}`"),
            expected: ws.device(),
            actual: xs.device(),
        });
    }
    Ok(())
}

impl ModuleT for LoraLinear {
    /// # Panics
    /// On an input whose last dimension, dtype or device does not fit the layer, with the
    /// message of the typed error [`LoraLinear::f_forward_t`] returns.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(y) => y,
            Err(e) => panic!("{e}"),
        }
    }
}
