//! The crate's one FFI room: every `extern "C"` entry point of the C++ compiled by `build.rs`
//! (`csrc/`, whose whole ABI `csrc/tch_peft.h` declares), the C-string and C-error helpers, and a
//! safe function per entry point. Nothing outside this module writes `unsafe`.
//!
//! Tensors cross as the `at::Tensor*` handles that `tch` uses for [`C_tensor`]: borrowed for the
//! duration of a call, or new owned handles the C++ side allocates (taken over with
//! [`Tensor::from_ptr`]). Every entry point catches its C++ exceptions; errors come back as a
//! malloc'ed message that is freed here, exactly once.
//!
//! The module exists only where the C++ was compiled (`cfg(tch_peft_csrc)`: libtorch's headers
//! were found; not in a `doc-only` build); callers keep a composed-op fallback for the rest.

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

mod ffi {
    use std::ffi::c_char;

    use torch_sys::C_tensor;

    extern "C" {
        // csrc/lora_linear.cpp
        #[allow(clippy::too_many_arguments)]
        pub fn tch_peft_lora_group(
            x: *const C_tensor,
            n: usize,
            ws: *const *const C_tensor,
            biases: *const *const C_tensor,
            a_s: *const *const C_tensor,
            bs: *const *const C_tensor,
            ms: *const *const C_tensor,
            w_sqs: *const *const C_tensor,
            scalings: *const f64,
            recipe: i32,
            from: *const *const C_tensor,
            n_from: usize,
            eps: f64,
            versions: *const i64,
            qs: *const *const C_tensor,
            q_counts: *const i64,
            q_dims: *const i64,
            q_offsets: *const f64,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_free_error(error: *mut c_char);
        // csrc/quant_linear.cpp
        pub fn tch_peft_linear_4bit(
            x: *const C_tensor,
            bias: *const C_tensor,
            q: *const *const C_tensor,
            n_q: usize,
            dims: *const i64,
            offset: f64,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_dequantize_4bit(
            q: *const *const C_tensor,
            n_q: usize,
            dims: *const i64,
            offset: f64,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        // csrc/linear_cross_entropy.cpp
        #[allow(clippy::too_many_arguments)]
        pub fn tch_peft_linear_cross_entropy(
            h: *const C_tensor,
            w: *const C_tensor,
            bias: *const C_tensor,
            labels: *const C_tensor,
            ignore_index: i64,
            chunk: i64,
            mean: i32,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_grad_enabled() -> i32;
        pub fn tch_peft_tensor_version(t: *const C_tensor) -> i64;
        pub fn tch_peft_backward_with_grad(
            y: *const C_tensor,
            grad: *const C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        // csrc/model_ops.cpp
        pub fn tch_peft_rms_norm(
            x: *const C_tensor,
            w: *const C_tensor,
            eps: f64,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        #[allow(clippy::too_many_arguments)]
        pub fn tch_peft_add_rms_norm(
            x: *const C_tensor,
            res: *const C_tensor,
            w: *const C_tensor,
            eps: f64,
            out_sum: *mut *mut C_tensor,
            out_y: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_swiglu(
            g: *const C_tensor,
            u: *const C_tensor,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_rope(
            q: *const C_tensor,
            k: *const C_tensor,
            cos: *const C_tensor,
            sin: *const C_tensor,
            out_q: *mut *mut C_tensor,
            out_k: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        // csrc/cuda_kernels.cpp
        pub fn tch_peft_custom_kernels_available() -> i32;
        pub fn tch_peft_set_custom_kernels(on: i32);
        // csrc/optim.cpp
        #[allow(clippy::too_many_arguments)]
        pub fn tch_peft_fused_adamw(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            exp_avgs: *const *mut C_tensor,
            exp_avg_sqs: *const *mut C_tensor,
            steps: *const *mut C_tensor,
            n: i64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_grads_to_none(params: *const *mut C_tensor, n: i64);
        // csrc/memory.cpp
        pub fn tch_peft_cuda_allocated(device: i32, peak: i32) -> i64;
        pub fn tch_peft_cuda_reset_peak(device: i32) -> i32;
        // csrc/profiler.cpp
        pub fn tch_peft_profiler_start(error: *mut *mut c_char) -> i32;
        pub fn tch_peft_profiler_stop(error: *mut *mut c_char) -> *mut c_char;
    }
}

/// A malloc'ed NUL-terminated string from the C++ side (an error message, the profiler's text),
/// freed here.
///
/// # Safety
/// `p` is non-null, came from the C++ side and is not freed yet.
unsafe fn take_c_string(p: *mut c_char) -> String {
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    ffi::tch_peft_free_error(p);
    s
}

/// The error a C entry point reported: its message, or "`what` failed" without one.
///
/// # Safety
/// `error` is null or a message from the C++ side not freed yet.
unsafe fn take_error(error: *mut c_char, what: &str) -> tch::TchError {
    tch::TchError::Torch(if error.is_null() {
        format!("{what} failed")
    } else {
        take_c_string(error)
    })
}

/// The handle of an optional tensor (null for `None`).
fn handle(t: Option<&Tensor>) -> *const C_tensor {
    t.map_or(std::ptr::null(), Tensor::as_ptr)
}

/// The mutable handle the C++ side expects for a tensor it updates in place (tch's handles are
/// the same pointer either way).
fn handle_mut(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// The version counter of `t` (bumped by every in-place change).
pub(crate) fn tensor_version(t: &Tensor) -> i64 {
    // SAFETY: reads a counter of a live handle.
    unsafe { ffi::tch_peft_tensor_version(t.as_ptr()) }
}

/// `y.backward(grad)`: autograd from `y` with upstream gradient `grad` (shapes checked by the
/// caller), accumulating into the leaves' `.grad`.
pub(crate) fn backward_with_grad(y: &Tensor, grad: &Tensor) -> Result<(), tch::TchError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: both handles are live for the call.
    unsafe {
        if ffi::tch_peft_backward_with_grad(y.as_ptr(), grad.as_ptr(), &mut error) != 0 {
            return Err(take_error(error, "tch_peft_backward_with_grad"));
        }
    }
    Ok(())
}

/// Whether autograd records operations on this thread (false inside `tch::no_grad`).
pub(crate) fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag; cannot fail.
    unsafe { ffi::tch_peft_grad_enabled() != 0 }
}

/// Whether the run-time compiled CUDA kernels (LoRA and DoRA) load on the current device
/// (compiling them).
pub(crate) fn custom_kernels_available() -> bool {
    // SAFETY: no arguments; the C++ side catches its exceptions (no device, a failed compile or
    // load: 0).
    unsafe { ffi::tch_peft_custom_kernels_available() != 0 }
}

/// Switches those kernels on or off for the process.
pub(crate) fn set_custom_kernels(on: bool) {
    // SAFETY: stores a flag.
    unsafe { ffi::tch_peft_set_custom_kernels(i32::from(on)) }
}

/// One LoRA or DoRA layer of a [`lora_group`] call: base weight, optional bias, A, B, scaling
/// and, for DoRA, its magnitude part.
pub(crate) struct GroupMember<'a> {
    pub w: MemberWeight<'a>,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
    pub dora: Option<DoraMember<'a>>,
}

/// A group member's base weight: a float tensor, or a 4-bit weight's parts (codes, absmax,
/// quant_map[, nested absmax, nested map]), dims (out, in, blocksize, nested blocksize) and
/// nested offset, which the node dequantizes in its forward and again in its backward.
pub(crate) enum MemberWeight<'a> {
    Dense(&'a Tensor),
    Quant { parts: Vec<Tensor>, dims: [i64; 4], offset: f64 },
}

/// A DoRA member's magnitude `m` ([out]) and `‖W_i‖²` per row in the compute kind (f32, f64 for
/// an f64 base).
pub(crate) struct DoraMember<'a> {
    pub m: &'a Tensor,
    pub w_sq: Tensor,
}

/// `x Wᵢᵀ + bᵢ + sᵢ·(x Aᵢᵀ) Bᵢᵀ` for every member (DoRA members:
/// `m/‖W + s·BA‖_row ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias`, the norm detached as in PEFT), as the one
/// autograd node of `csrc/lora_linear.cpp` on the shared 2-D input `x`: one output per member.
/// With a `recipe` (how the op that produced `x` replays it, see [`crate::ops::Recomputable`])
/// the node keeps that recipe's tensors instead of `x`. Inputs must have been checked by the
/// caller.
pub(crate) fn lora_group(
    x: &Tensor,
    members: &[GroupMember<'_>],
    recipe: Option<&crate::ops::Recipe>,
) -> Result<Vec<Tensor>, tch::TchError> {
    let n = members.len();
    let ws: Vec<_> = members
        .iter()
        .map(|m| match &m.w {
            MemberWeight::Dense(w) => w.as_ptr(),
            MemberWeight::Quant { .. } => std::ptr::null(),
        })
        .collect();
    let (mut qs, mut q_counts, mut q_dims, mut q_offsets) = (vec![], vec![], vec![], vec![]);
    for m in members {
        match &m.w {
            MemberWeight::Dense(_) => {
                q_counts.push(0i64);
                q_dims.extend([0i64; 4]);
                q_offsets.push(0.0);
            }
            MemberWeight::Quant { parts, dims, offset } => {
                qs.extend(parts.iter().map(Tensor::as_ptr));
                q_counts.push(parts.len() as i64);
                q_dims.extend(dims);
                q_offsets.push(*offset);
            }
        }
    }
    let biases: Vec<_> = members.iter().map(|m| handle(m.bias)).collect();
    let a_s: Vec<_> = members.iter().map(|m| m.a.as_ptr()).collect();
    let bs: Vec<_> = members.iter().map(|m| m.b.as_ptr()).collect();
    let ms: Vec<_> = members.iter().map(|m| handle(m.dora.as_ref().map(|d| d.m))).collect();
    let w_sqs: Vec<_> = members.iter().map(|m| handle(m.dora.as_ref().map(|d| &d.w_sq))).collect();
    let scalings: Vec<f64> = members.iter().map(|m| m.scaling).collect();
    let (code, from, eps, versions) = match recipe {
        None => (0, vec![], 0.0, std::ptr::null()),
        Some(r) => {
            let (code, from, eps) = match &r.kind {
                crate::ops::RecipeKind::RmsNorm { src, weight, eps } => {
                    (1, vec![src.as_ptr(), weight.as_ptr()], *eps)
                }
                crate::ops::RecipeKind::SwiGlu { gate, up } => {
                    (2, vec![gate.as_ptr(), up.as_ptr()], 0.0)
                }
            };
            (code, from, eps, r.versions.as_ptr())
        }
    };
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); n];
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the arrays hold `n` live handles (or nulls for absent biases and magnitudes; a
    // magnitude and its ‖W‖² come together; null weights for 4-bit members), `from` its live
    // handles and `versions` (when not null) `from.len() + 1` values, `qs` the 4-bit members'
    // parts (`q_counts` per member, `q_dims` 4 and `q_offsets` 1 value per member), borrowed
    // for the call; on success the C++ side writes `n` new owned handles into `out`.
    unsafe {
        let rc = ffi::tch_peft_lora_group(
            x.as_ptr(),
            n,
            ws.as_ptr(),
            biases.as_ptr(),
            a_s.as_ptr(),
            bs.as_ptr(),
            ms.as_ptr(),
            w_sqs.as_ptr(),
            scalings.as_ptr(),
            code,
            from.as_ptr(),
            from.len(),
            eps,
            versions,
            qs.as_ptr(),
            q_counts.as_ptr(),
            q_dims.as_ptr(),
            q_offsets.as_ptr(),
            out.as_mut_ptr(),
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_lora_group"));
        }
        Ok(out.into_iter().map(|p| Tensor::from_ptr(p)).collect())
    }
}

/// The frozen 4-bit linear node (`csrc/quant_linear.cpp`): `x · deq(W)ᵀ + bias`, keeping only
/// the quantized parts `q` (codes, absmax, quant_map[, nested_absmax, nested_map]) for the
/// backward; `dims` = out, in, blocksize, nested blocksize. Checked by the caller.
pub(crate) fn linear_4bit(
    x: &Tensor,
    bias: Option<&Tensor>,
    q: &[&Tensor],
    dims: [i64; 4],
    offset: f64,
) -> Result<Tensor, tch::TchError> {
    let handles: Vec<_> = q.iter().map(|t| t.as_ptr()).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call (the bias null when absent), `dims` holds 4
    // values; on success the C++ side writes one new owned handle into `out`.
    unsafe {
        let rc = ffi::tch_peft_linear_4bit(
            x.as_ptr(),
            handle(bias),
            handles.as_ptr(),
            handles.len(),
            dims.as_ptr(),
            offset,
            &mut out,
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_linear_4bit"));
        }
        Ok(Tensor::from_ptr(out))
    }
}

/// The 4-bit dequantization kernel (`csrc/quant_linear.cpp`) to bf16, `None` where it does not
/// apply; arguments as [`linear_4bit`].
pub(crate) fn dequantize_4bit(
    q: &[&Tensor],
    dims: [i64; 4],
    offset: f64,
) -> Result<Option<Tensor>, tch::TchError> {
    let handles: Vec<_> = q.iter().map(|t| t.as_ptr()).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call, `dims` holds 4 values; on 0 the C++ side
    // wrote one new owned handle into `out`.
    unsafe {
        match ffi::tch_peft_dequantize_4bit(
            handles.as_ptr(),
            handles.len(),
            dims.as_ptr(),
            offset,
            &mut out,
            &mut error,
        ) {
            0 => Ok(Some(Tensor::from_ptr(out))),
            2 => Ok(None),
            _ => Err(take_error(error, "tch_peft_dequantize_4bit")),
        }
    }
}

/// The fused linear cross-entropy node (`csrc/linear_cross_entropy.cpp`): the loss of
/// `h Wᵀ + b` against `labels`, `chunk` rows at a time; shapes, kinds, devices and label
/// ranges checked by the caller.
pub(crate) fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    labels: &Tensor,
    ignore_index: i64,
    chunk: i64,
    mean: bool,
) -> Result<Tensor, tch::TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call (the bias null when absent); on success the
    // C++ side writes one new owned handle into `out`.
    unsafe {
        let rc = ffi::tch_peft_linear_cross_entropy(
            h.as_ptr(),
            w.as_ptr(),
            handle(bias),
            labels.as_ptr(),
            ignore_index,
            chunk,
            mean as i32,
            &mut out,
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_linear_cross_entropy"));
        }
        Ok(Tensor::from_ptr(out))
    }
}

/// RMSNorm's CUDA node (`csrc/model_ops.cpp`), `None` where its kernels do not take `x`, `w`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>, tch::TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call; on 0 the C++ side wrote one owned handle.
    unsafe {
        match ffi::tch_peft_rms_norm(x.as_ptr(), w.as_ptr(), eps, &mut out, &mut error) {
            0 => Ok(Some(Tensor::from_ptr(out))),
            2 => Ok(None),
            _ => Err(take_error(error, "tch_peft_rms_norm")),
        }
    }
}

/// The fused residual add and RMSNorm (`csrc/model_ops.cpp`): `(x + res, rms_norm(x + res))`,
/// `None` where its kernels do not take the inputs.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    res: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>, tch::TchError> {
    let mut sum: *mut C_tensor = std::ptr::null_mut();
    let mut y: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call; on 0 the C++ side wrote two owned handles.
    unsafe {
        match ffi::tch_peft_add_rms_norm(
            x.as_ptr(),
            res.as_ptr(),
            w.as_ptr(),
            eps,
            &mut sum,
            &mut y,
            &mut error,
        ) {
            0 => Ok(Some((Tensor::from_ptr(sum), Tensor::from_ptr(y)))),
            2 => Ok(None),
            _ => Err(take_error(error, "tch_peft_add_rms_norm")),
        }
    }
}

/// SwiGLU's CUDA node (`csrc/model_ops.cpp`), `None` where its kernel does not take `g`, `u`.
pub(crate) fn swiglu(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>, tch::TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call; on 0 the C++ side wrote one owned handle.
    unsafe {
        match ffi::tch_peft_swiglu(g.as_ptr(), u.as_ptr(), &mut out, &mut error) {
            0 => Ok(Some(Tensor::from_ptr(out))),
            2 => Ok(None),
            _ => Err(take_error(error, "tch_peft_swiglu")),
        }
    }
}

/// The rotary embedding's CUDA node (`csrc/model_ops.cpp`) for `q` and optionally `k`, `None`
/// where its kernel does not take them.
pub(crate) fn rope(
    q: &Tensor,
    k: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Option<Tensor>)>, tch::TchError> {
    let mut out_q: *mut C_tensor = std::ptr::null_mut();
    let mut out_k: *mut C_tensor = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the handles are live for the call (k null when absent); on 0 the C++ side wrote
    // an owned handle to `out_q` and, when k was given, to `out_k`.
    unsafe {
        let rc = ffi::tch_peft_rope(
            q.as_ptr(),
            handle(k),
            cos.as_ptr(),
            sin.as_ptr(),
            &mut out_q,
            &mut out_k,
            &mut error,
        );
        match rc {
            0 => Ok(Some((
                Tensor::from_ptr(out_q),
                (!out_k.is_null()).then(|| Tensor::from_ptr(out_k)),
            ))),
            2 => Ok(None),
            _ => Err(take_error(error, "tch_peft_rope")),
        }
    }
}

/// AdamW's hyper-parameters for [`fused_adamw`].
pub(crate) struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One step of ATen's multi-tensor `_fused_adamw_` (in place) over parameters given as
/// `[param, grad, exp_avg, exp_avg_sq, step]` (the step an f32 scalar on the parameters' device,
/// incremented by the call), all of one device and dtype.
pub(crate) fn fused_adamw(t: &[[&Tensor; 5]], h: &AdamWHyper) -> Result<(), tch::TchError> {
    let list = |i: usize| t.iter().map(|p| handle_mut(p[i])).collect::<Vec<_>>();
    let (params, grads, m, v, steps) = (list(0), list(1), list(2), list(3), list(4));
    let n =
        i64::try_from(t.len()).map_err(|_| tch::TchError::Torch("too many parameters".into()))?;
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: five arrays of `n` live tensor handles borrowed for the call; the C++ side catches
    // every exception and reports it through `error`.
    unsafe {
        let rc = ffi::tch_peft_fused_adamw(
            params.as_ptr(),
            grads.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            steps.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_fused_adamw"));
        }
    }
    Ok(())
}

/// Drops the gradients of `params` (PyTorch's `zero_grad(set_to_none=True)`).
pub(crate) fn grads_to_none<'a>(params: impl IntoIterator<Item = &'a Tensor>) {
    let ptrs: Vec<_> = params.into_iter().map(handle_mut).collect();
    let n = i64::try_from(ptrs.len()).unwrap_or(i64::MAX);
    // SAFETY: live tensor handles borrowed for the call; the C++ side only resets their gradient
    // fields and cannot throw.
    unsafe { ffi::tch_peft_grads_to_none(ptrs.as_ptr(), n) }
}

/// Bytes allocated by the CUDA caching allocator of `device`: the peak since the last reset, or
/// the current value; `None` where unavailable.
pub(crate) fn cuda_allocated(device: usize, peak: bool) -> Option<u64> {
    let device = i32::try_from(device).ok()?;
    // SAFETY: a plain C function that catches every C++ exception and returns -1 on failure.
    let v = unsafe { ffi::tch_peft_cuda_allocated(device, i32::from(peak)) };
    u64::try_from(v).ok()
}

/// Resets the CUDA caching allocator's peak statistics of `device`; whether it could.
pub(crate) fn cuda_reset_peak(device: usize) -> bool {
    let Ok(device) = i32::try_from(device) else { return false };
    // SAFETY: a plain C function that catches every C++ exception.
    unsafe { ffi::tch_peft_cuda_reset_peak(device) == 0 }
}

/// Starts libtorch's Kineto profiler (CPU ops and CUDA activity).
pub(crate) fn profiler_start() -> Result<(), tch::TchError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: catches every C++ exception; an error message is taken over (and freed) once.
    unsafe {
        if ffi::tch_peft_profiler_start(&mut error) != 0 {
            return Err(take_error(error, "starting the profiler"));
        }
    }
    Ok(())
}

/// Stops the profiler; its text (`span\t<ns>` then `count\tns\tname` lines).
pub(crate) fn profiler_stop() -> Result<String, tch::TchError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: catches every C++ exception; the returned text or the error message is taken over
    // (and freed) once.
    unsafe {
        let p = ffi::tch_peft_profiler_stop(&mut error);
        if p.is_null() {
            return Err(take_error(error, "stopping the profiler"));
        }
        Ok(take_c_string(p))
    }
}

#[cfg(tch_peft_dist)]
mod dist;
#[cfg(tch_peft_dist)]
pub(crate) use dist::{group_new, GroupHandle, ReducerHandle, ReducerOptions};
