//! RMSNorm as transformers' Llama computes it, one fused node per call on CUDA bf16.
//!
//! ```text
//! r = 1 / sqrt(mean_j x_j² + ε)      (f32; f64 for f64 inputs)
//! y = w ⊙ cast(x · r)                 (cast back to x's kind, then scaled by the weight)
//! ```
//!
//! Backward, with `x̂ = x·r` and `dn = dy ⊙ w`: `dx = r·(dn − x̂·mean_j(dn ⊙ x̂))`,
//! `dw = Σ_rows dy ⊙ cast(x̂)`.
//!
//! On CUDA with bf16 `x` and `w` (contiguous, width a multiple of 8 up to 8192) one kernel
//! forms `y` and saves only `x` and the f32 `r` per row; the backward is one kernel (the weight's
//! gradient from f32 partial sums per block). Anything else composes libtorch ops, which save an
//! f32 copy of `x` and more.

use tch::{Kind, Tensor};

use super::Recomputable;
use crate::{Error, Result};

/// RMSNorm of `x` `[..., H]` with weight `[H]` and `eps`, as transformers' `LlamaRMSNorm`.
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
/// let y = tch_peft::ops::rms_norm(&x, &Tensor::ones([8], (Kind::Float, Device::Cpu)), 1e-6)?;
/// let mean_sq = y.square().mean_dim(-1, false, Kind::Float);
/// assert!(mean_sq.allclose(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu)), 1e-4, 1e-4, false));
/// # Ok(()) }
/// ```
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(rms_norm_recomputable(x, weight, eps)?.into_tensor())
}

/// [`rms_norm`] as a [`Recomputable`]: where the CUDA kernel ran, a LoRA node fed the output
/// replays the norm from `x` (which the norm's node keeps) instead of keeping the output too.
pub fn rms_norm_recomputable(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Recomputable> {
    check(x, weight, eps)?;
    #[cfg(tch_peft_csrc)]
    if x.device().is_cuda() {
        if let Some(y) = crate::sys::rms_norm(x, weight, eps)? {
            let recipe = super::RecipeKind::RmsNorm {
                src: x.shallow_clone(),
                weight: weight.shallow_clone(),
                eps,
            };
            return Ok(Recomputable::with_recipe(y, recipe));
        }
    }
    Ok(Recomputable::plain(rms_norm_composed(x, weight, eps)?))
}

/// The residual add of a pre-norm block and the next norm: `s = x + residual` and
/// [`rms_norm`]`(s, weight, eps)`, returned as `(s, normed)`.
///
/// On CUDA bf16 (the shapes [`rms_norm`]'s kernel takes, `residual` of `x`'s shape) one kernel
/// forms both, `s` rounded to bf16 as the add would round it; its backward gives `x` and
/// `residual` the norm's input gradient plus the gradient reaching `s` directly, in the one
/// kernel. Elsewhere: the add, then [`rms_norm`].
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// let opts = (Kind::Float, Device::Cpu);
/// let (x, r, w) = (Tensor::randn([2, 8], opts), Tensor::randn([2, 8], opts), Tensor::ones([8], opts));
/// let (s, n) = tch_peft::ops::add_rms_norm(&x, &r, &w, 1e-6)?;
/// assert!(s.allclose(&(&x + &r), 0.0, 0.0, false));
/// assert!(n.allclose(&tch_peft::ops::rms_norm(&s, &w, 1e-6)?, 1e-6, 1e-6, false));
/// # Ok(()) }
/// ```
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (s, n) = add_rms_norm_recomputable(x, residual, weight, eps)?;
    Ok((s, n.into_tensor()))
}

/// [`add_rms_norm`] with the norm as a [`Recomputable`] (replayed from `s`, which the node
/// keeps).
pub fn add_rms_norm_recomputable(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Recomputable)> {
    check(x, weight, eps)?;
    super::check_like("residual", residual, x)?;
    #[cfg(tch_peft_csrc)]
    if x.device().is_cuda() {
        if let Some((s, n)) = crate::sys::add_rms_norm(x, residual, weight, eps)? {
            let recipe = super::RecipeKind::RmsNorm {
                src: s.shallow_clone(),
                weight: weight.shallow_clone(),
                eps,
            };
            return Ok((s, Recomputable::with_recipe(n, recipe)));
        }
    }
    let s = x.f_add(residual)?;
    let n = rms_norm_recomputable(&s, weight, eps)?;
    Ok((s, n))
}

/// The arguments' checks shared by [`rms_norm`] and [`add_rms_norm`].
fn check(x: &Tensor, weight: &Tensor, eps: f64) -> Result<()> {
    let h = match x.size().last() {
        Some(&h) => h,
        None => {
            return Err(Error::ShapeMismatch {
                name: "x".into(),
                expected: vec![-1],
                actual: x.size(),
            })
        }
    };
    if weight.size() != [h] {
        return Err(Error::ShapeMismatch {
            name: "weight".into(),
            expected: vec![h],
            actual: weight.size(),
        });
    }
    super::check_float("x", x)?;
    super::check_float("weight", weight)?;
    super::check_device("weight", weight, x)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidConfig {
            field: "eps".into(),
            reason: format!("{eps} is not a finite number ≥ 0"),
        });
    }
    Ok(())
}

/// [`rms_norm`] in composed libtorch ops (the reference of the tests).
#[doc(hidden)]
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = x.kind();
    // f32 for the 16-bit kinds (transformers' upcast), f64 kept
    let work = if kind == Kind::Double { Kind::Double } else { Kind::Float };
    let xf = x.f_to_kind(work)?;
    let var = xf.f_square()?.f_mean_dim(-1, true, work)?;
    Ok(weight.f_mul(&xf.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?.f_to_kind(kind)?)?)
}
