//! The fused LoRA and DoRA Linear autograd nodes (`csrc/lora_linear.cpp`), reached through a
//! small C ABI.
//!
//! tch cannot define a custom backward pass from Rust, so these are C++ compiled by `build.rs`
//! against the same libtorch. One node serves one layer or several sharing an input, LoRA and
//! DoRA alike: it writes the input gradient once, `dx = g·(W + s·BA)`, instead of `g·W`, a
//! full-size `s·(gB)·A` and their sum, and is one autograd node instead of about ten
//! dispatched ops per layer (its bandwidth-bound passes — a group's low-rank outputs, DoRA's
//! weight-side part and magnitude reduction — run as NVRTC kernels on CUDA,
//! `csrc/cuda_kernels.cpp`). Without it (a `doc-only` build, or headers not found) the layer
//! falls back to composing tch ops, which compute the same values.

use tch::Tensor;

use crate::sys;

/// One LoRA or DoRA layer of a [`lora_group`] call: base weight, optional bias, A, B, scaling
/// and, for DoRA, its magnitude part.
pub(crate) struct GroupMember<'a> {
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
    pub dora: Option<DoraMember<'a>>,
}

/// A DoRA member's magnitude `m` ([out]) and `‖W_i‖²` per row in the compute kind (f32, f64 for
/// an f64 base).
pub(crate) struct DoraMember<'a> {
    pub m: &'a Tensor,
    pub w_sq: Tensor,
}

/// `x Wᵢᵀ + bᵢ + sᵢ·(x Aᵢᵀ) Bᵢᵀ` for every member (DoRA members:
/// `m/‖W + s·BA‖_row ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias`, the norm detached as in PEFT), as one
/// autograd node that reads the shared 2-D input `x` once for all the `x Aᵢᵀ` and once for all
/// the A gradients, and accumulates the input gradients inside the GEMMs. Inputs must have been
/// checked by the caller.
pub(crate) fn lora_group(
    x: &Tensor,
    members: &[GroupMember<'_>],
) -> Result<Vec<Tensor>, tch::TchError> {
    let args = sys::LoraGroupArgs {
        ws: members.iter().map(|m| m.w).collect(),
        biases: members.iter().map(|m| m.bias).collect(),
        a_s: members.iter().map(|m| m.a).collect(),
        bs: members.iter().map(|m| m.b).collect(),
        ms: members.iter().map(|m| m.dora.as_ref().map(|d| d.m)).collect(),
        w_sqs: members.iter().map(|m| m.dora.as_ref().map(|d| &d.w_sq)).collect(),
        scalings: members.iter().map(|m| m.scaling).collect(),
    };
    sys::lora_group(x, &args)
}
