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

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn tch_peft_lora_group(
        x: *const C_tensor,
        n: usize,
        ws: *const *const C_tensor,
        biases: *const *const C_tensor,
        a_s: *const *const C_tensor,
        bs: *const *const C_tensor,
        ms: *const *const C_tensor,
        w_sqs: *const *const C_tensor,
        scalings: *const f64,
        out: *mut *mut C_tensor,
        error: *mut *mut c_char,
    ) -> i32;
    fn tch_peft_free_error(error: *mut c_char);
    fn tch_peft_custom_kernels_available() -> i32;
    fn tch_peft_set_custom_kernels(on: i32);
    fn tch_peft_grad_enabled() -> i32;
}

/// Whether autograd records operations on this thread (false inside `tch::no_grad`).
pub(crate) fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag; cannot fail.
    unsafe { tch_peft_grad_enabled() != 0 }
}

/// Whether the run-time compiled CUDA kernels (LoRA and DoRA) load on the current device
/// (compiling them).
pub(crate) fn custom_kernels_available() -> bool {
    // SAFETY: no arguments; the C++ side catches its exceptions (no device, a failed compile or
    // load: 0).
    unsafe { tch_peft_custom_kernels_available() != 0 }
}

/// Switches those kernels on or off for the process.
pub(crate) fn set_custom_kernels(on: bool) {
    // SAFETY: stores a flag.
    unsafe { tch_peft_set_custom_kernels(i32::from(on)) }
}

/// A malloc'ed NUL-terminated string from the C++ side (an error message, the profiler's text),
/// freed here.
///
/// # Safety
/// `p` is non-null, came from the C++ side and is not freed yet.
pub(crate) unsafe fn take_c_string(p: *mut c_char) -> String {
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    tch_peft_free_error(p);
    s
}

/// The error a C entry point reported: its message, or "`what` failed" without one.
///
/// # Safety
/// `error` is null or a message from the C++ side not freed yet.
pub(crate) unsafe fn take_error(error: *mut c_char, what: &str) -> tch::TchError {
    tch::TchError::Torch(if error.is_null() {
        format!("{what} failed")
    } else {
        take_c_string(error)
    })
}

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
    let handle = |t: Option<&Tensor>| t.map_or(std::ptr::null(), Tensor::as_ptr);
    let ws: Vec<*const C_tensor> = members.iter().map(|m| m.w.as_ptr()).collect();
    let biases: Vec<*const C_tensor> = members.iter().map(|m| handle(m.bias)).collect();
    let a_s: Vec<*const C_tensor> = members.iter().map(|m| m.a.as_ptr()).collect();
    let bs: Vec<*const C_tensor> = members.iter().map(|m| m.b.as_ptr()).collect();
    let ms: Vec<*const C_tensor> =
        members.iter().map(|m| handle(m.dora.as_ref().map(|d| d.m))).collect();
    let w_sqs: Vec<*const C_tensor> =
        members.iter().map(|m| handle(m.dora.as_ref().map(|d| &d.w_sq))).collect();
    let scalings: Vec<f64> = members.iter().map(|m| m.scaling).collect();
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); members.len()];
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the arrays hold `members.len()` live handles (or nulls for absent biases and
    // magnitudes) borrowed for the call; on success the C++ side writes that many new owned
    // handles into `out`.
    unsafe {
        let rc = tch_peft_lora_group(
            x.as_ptr(),
            members.len(),
            ws.as_ptr(),
            biases.as_ptr(),
            a_s.as_ptr(),
            bs.as_ptr(),
            ms.as_ptr(),
            w_sqs.as_ptr(),
            scalings.as_ptr(),
            out.as_mut_ptr(),
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_lora_group"));
        }
        Ok(out.into_iter().map(|p| Tensor::from_ptr(p)).collect())
    }
}
