//! Model operations fused for speed and memory, as building blocks for any model graph: the
//! linear cross-entropy of a language-model head ([`linear_cross_entropy`], [`causal_lm_loss`]),
//! which never holds the full `[tokens, vocab]` logits, and a Llama block's pointwise parts:
//! [`rms_norm`] (with the residual add before it: [`add_rms_norm`]), [`swiglu`] and the rotary
//! embedding ([`apply_rotary`], [`rotary_tables`]). The norm and SwiGLU also come as
//! [`Recomputable`] outputs, which a LoRA node downstream replays in its backward instead of
//! keeping ([`lora::forward_recomputable`](crate::lora::forward_recomputable)).
//!
//! Each op has one meaning whatever runs it: on CUDA bf16 an autograd node of the crate's C++
//! over run-time compiled kernels (one launch each way, rounding where the composed bf16 ops
//! round), elsewhere the same formula in composed libtorch ops; the tests check one against the
//! other, and the composed ops against f64 math.

mod activation;
mod cross_entropy;
mod norm;
mod recompute;
mod rotary;

#[doc(hidden)]
pub use activation::swiglu_composed;
pub use activation::{swiglu, swiglu_recomputable};
#[doc(hidden)]
pub use cross_entropy::composed as linear_cross_entropy_composed;
pub use cross_entropy::{
    causal_lm_loss, linear_cross_entropy, shifted_labels, LinearCrossEntropy, Reduction,
    HEAD_GRAD_CHUNK_ROWS,
};
#[doc(hidden)]
pub use norm::rms_norm_composed;
pub use norm::{add_rms_norm, add_rms_norm_recomputable, rms_norm, rms_norm_recomputable};
pub use recompute::{recompute_enabled, set_recompute, Recomputable};
pub(crate) use recompute::{Recipe, RecipeKind};
#[doc(hidden)]
pub use rotary::apply_rotary_composed;
pub use rotary::{apply_rotary, rotary_tables};

use tch::Tensor;

use crate::{Error, Result};

fn check_float(name: &str, t: &Tensor) -> Result<()> {
    if !t.is_floating_point() {
        return Err(Error::DtypeMismatch {
            name: name.into(),
            expected: "a floating-point kind".into(),
            actual: t.kind(),
        });
    }
    Ok(())
}

/// `t` has `like`'s shape, kind and device (an operand that pairs with another element-wise).
fn check_like(name: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.size() != like.size() {
        return Err(Error::ShapeMismatch {
            name: name.into(),
            expected: like.size(),
            actual: t.size(),
        });
    }
    check_same_kind(name, t, like)?;
    check_device(name, t, like)
}

fn check_same_kind(name: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.kind() != like.kind() {
        return Err(Error::DtypeMismatch {
            name: name.into(),
            expected: format!("{:?}", like.kind()),
            actual: t.kind(),
        });
    }
    Ok(())
}

fn check_device(name: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.device() != like.device() {
        return Err(Error::DeviceMismatch {
            name: name.into(),
            expected: like.device(),
            actual: t.device(),
        });
    }
    Ok(())
}
