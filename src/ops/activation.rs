//! SwiGLU, the gated activation of Llama's MLP, one fused node per call on CUDA bf16.
//!
//! ```text
//! y = silu(g) ⊙ u,   silu(g) = g·σ(g)
//! dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))),   du = dy ⊙ silu(g)
//! ```
//!
//! On CUDA with bf16 contiguous `g`, `u` (width a multiple of 8) one kernel each way, rounding
//! `silu(g)` to bf16 before the product as the composed ops do, and saving only `g` and `u` (the
//! composed ops also keep `silu(g)`).

use tch::Tensor;

use crate::Result;

/// `silu(gate) ⊙ up` for `gate` and `up` of one shape, kind and device.
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// let g = Tensor::from_slice(&[0.0f32, 1.0]);
/// let y = tch_peft::ops::swiglu(&g, &Tensor::from_slice(&[3.0f32, 2.0]))?;
/// let silu_1 = 1.0 / (1.0 + (-1.0f64).exp());
/// assert!((y.double_value(&[1]) - 2.0 * silu_1).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(swiglu_recomputable(gate, up)?.into_tensor())
}

/// [`swiglu`] as a [`Recomputable`](super::Recomputable): where the CUDA kernel ran, a LoRA
/// node fed the output replays it from `gate` and `up` (which SwiGLU's node keeps) instead of
/// keeping the output too.
pub fn swiglu_recomputable(gate: &Tensor, up: &Tensor) -> Result<super::Recomputable> {
    super::check_like("up", up, gate)?;
    super::check_float("gate", gate)?;
    #[cfg(tch_peft_csrc)]
    if gate.device().is_cuda() {
        if let Some(y) = crate::sys::swiglu(gate, up)? {
            let recipe =
                super::RecipeKind::SwiGlu { gate: gate.shallow_clone(), up: up.shallow_clone() };
            return Ok(super::Recomputable::with_recipe(y, recipe));
        }
    }
    Ok(super::Recomputable::plain(swiglu_composed(gate, up)?))
}

/// [`swiglu`] in composed libtorch ops (the reference of the tests).
#[doc(hidden)]
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.f_silu()?.f_mul(up)?)
}
