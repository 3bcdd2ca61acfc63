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
mod dist_ffi {
    use std::ffi::c_char;

    use torch_sys::C_tensor;

    /// `tch_peft_group` (csrc/dist_gloo.cpp): opaque.
    #[repr(C)]
    pub struct Group {
        _private: [u8; 0],
    }

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn tch_peft_group_new(
            host: *const c_char,
            port: i32,
            file: *const c_char,
            rank: i32,
            size: i32,
            timeout_ms: i64,
            is_server: i32,
            device_host: *const c_char,
            out: *mut *mut Group,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_group_free(g: *mut Group);
        pub fn tch_peft_group_all_reduce(
            g: *mut Group,
            ts: *const *const C_tensor,
            n: usize,
            op: i32,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_group_broadcast(
            g: *mut Group,
            ts: *const *const C_tensor,
            n: usize,
            root: i32,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_group_barrier(g: *mut Group, error: *mut *mut c_char) -> i32;
        #[cfg(tch_peft_nccl)]
        pub fn tch_peft_group_add_nccl(g: *mut Group, device: i32, error: *mut *mut c_char) -> i32;
        #[allow(clippy::too_many_arguments)]
        pub fn tch_peft_reducer_new(
            g: *mut Group,
            params: *const *const C_tensor,
            n: usize,
            names: *const *const c_char,
            bucket_cap_bytes: i64,
            first_bucket_cap_bytes: i64,
            find_unused: i32,
            grad_as_bucket_view: i32,
            static_graph: i32,
            bf16_compress: i32,
            out: *mut *mut Reducer,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_reducer_free(r: *mut Reducer);
        pub fn tch_peft_reducer_pre_forward(
            r: *mut Reducer,
            sync: i32,
            rebuilt: *mut i32,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_reducer_post_forward(
            r: *mut Reducer,
            outs: *const *const C_tensor,
            n: usize,
            sync: i32,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_reducer_buckets(
            r: *mut Reducer,
            cap: usize,
            params: *mut i64,
            numels: *mut i64,
            count: *mut usize,
            error: *mut *mut c_char,
        ) -> i32;
    }

    /// `tch_peft_reducer` (csrc/dist_reducer.cpp): opaque.
    #[repr(C)]
    pub struct Reducer {
        _private: [u8; 0],
    }
}

/// An owned c10d gloo process group (`csrc/dist_gloo.cpp`), freed on drop.
#[cfg(tch_peft_dist)]
#[derive(Debug)]
pub(crate) struct GroupHandle(std::ptr::NonNull<dist_ffi::Group>);

// SAFETY: c10d process groups are used from any thread (their collectives are queued to gloo's
// own threads); the handle is only freed once, on drop.
#[cfg(tch_peft_dist)]
unsafe impl Send for GroupHandle {}
#[cfg(tch_peft_dist)]
unsafe impl Sync for GroupHandle {}

#[cfg(tch_peft_dist)]
impl Drop for GroupHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tch_peft_group_new and is freed only here.
        unsafe { dist_ffi::tch_peft_group_free(self.0.as_ptr()) }
    }
}

/// A gloo group of `size` ranks (see `tch_peft_group_new` in `csrc/tch_peft.h`).
#[cfg(tch_peft_dist)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_new(
    host: &str,
    port: u16,
    file: Option<&str>,
    rank: i32,
    size: i32,
    timeout_ms: i64,
    is_server: bool,
    device_host: &str,
) -> Result<GroupHandle, tch::TchError> {
    let c = |s: &str| {
        std::ffi::CString::new(s).map_err(|_| tch::TchError::Torch(format!("{s:?} holds a NUL")))
    };
    let (host, device_host) = (c(host)?, c(device_host)?);
    let file = file.map(c).transpose()?;
    let mut out: *mut dist_ffi::Group = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the strings live for the call; on success the C++ side writes a new group.
    unsafe {
        let rc = dist_ffi::tch_peft_group_new(
            host.as_ptr(),
            i32::from(port),
            file.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            rank,
            size,
            timeout_ms,
            i32::from(is_server),
            device_host.as_ptr(),
            &mut out,
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_group_new"));
        }
        std::ptr::NonNull::new(out)
            .map(GroupHandle)
            .ok_or_else(|| tch::TchError::Torch("tch_peft_group_new gave no group".into()))
    }
}

#[cfg(tch_peft_dist)]
impl GroupHandle {
    /// In place: the sum (or, with `average`, the mean) over ranks of each tensor, all of them
    /// as one flat buffer. Tensors checked by the caller (CPU, one dtype).
    pub(crate) fn all_reduce(&self, ts: &[&Tensor], average: bool) -> Result<(), tch::TchError> {
        let handles: Vec<_> = ts.iter().map(|t| t.as_ptr()).collect();
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the group is live and the handles are borrowed for the call.
        unsafe {
            let rc = dist_ffi::tch_peft_group_all_reduce(
                self.0.as_ptr(),
                handles.as_ptr(),
                handles.len(),
                i32::from(average),
                &mut error,
            );
            if rc != 0 {
                return Err(take_error(error, "tch_peft_group_all_reduce"));
            }
        }
        Ok(())
    }

    /// In place: rank `root`'s values of the tensors on every rank.
    pub(crate) fn broadcast(&self, ts: &[&Tensor], root: i32) -> Result<(), tch::TchError> {
        let handles: Vec<_> = ts.iter().map(|t| t.as_ptr()).collect();
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: as all_reduce.
        unsafe {
            let rc = dist_ffi::tch_peft_group_broadcast(
                self.0.as_ptr(),
                handles.as_ptr(),
                handles.len(),
                root,
                &mut error,
            );
            if rc != 0 {
                return Err(take_error(error, "tch_peft_group_broadcast"));
            }
        }
        Ok(())
    }

    /// Adds NCCL on CUDA device `device` (every rank, each its own device).
    #[cfg(tch_peft_nccl)]
    pub(crate) fn add_nccl(&self, device: i32) -> Result<(), tch::TchError> {
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the group is live.
        unsafe {
            if dist_ffi::tch_peft_group_add_nccl(self.0.as_ptr(), device, &mut error) != 0 {
                return Err(take_error(error, "tch_peft_group_add_nccl"));
            }
        }
        Ok(())
    }

    /// Waits for every rank.
    pub(crate) fn barrier(&self) -> Result<(), tch::TchError> {
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the group is live.
        unsafe {
            if dist_ffi::tch_peft_group_barrier(self.0.as_ptr(), &mut error) != 0 {
                return Err(take_error(error, "tch_peft_group_barrier"));
            }
        }
        Ok(())
    }
}

/// DDP's options as `tch_peft_reducer_new` takes them.
#[cfg(tch_peft_dist)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReducerOptions {
    pub bucket_cap_bytes: i64,
    pub first_bucket_cap_bytes: i64,
    pub find_unused: bool,
    pub gradient_as_bucket_view: bool,
    pub static_graph: bool,
    pub bf16_compress: bool,
}

/// An owned c10d Reducer (`csrc/dist_reducer.cpp`) over a group, freed on drop (which removes
/// its hooks from the parameters). It must not outlive the group it was made over: the Rust
/// owner borrows the group.
#[cfg(tch_peft_dist)]
#[derive(Debug)]
pub(crate) struct ReducerHandle(std::ptr::NonNull<dist_ffi::Reducer>);

// SAFETY: the Reducer locks its own state (its hooks run on autograd's threads); freed once.
#[cfg(tch_peft_dist)]
unsafe impl Send for ReducerHandle {}

#[cfg(tch_peft_dist)]
impl Drop for ReducerHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tch_peft_reducer_new and is freed only here.
        unsafe { dist_ffi::tch_peft_reducer_free(self.0.as_ptr()) }
    }
}

#[cfg(tch_peft_dist)]
impl ReducerHandle {
    /// A Reducer over `params` (leaves that require grad, one name each).
    pub(crate) fn new(
        group: &GroupHandle,
        params: &[&Tensor],
        names: &[&str],
        o: ReducerOptions,
    ) -> Result<Self, tch::TchError> {
        if names.len() != params.len() {
            return Err(tch::TchError::Torch(format!(
                "{} names for {} parameters",
                names.len(),
                params.len()
            )));
        }
        let names: Vec<std::ffi::CString> = names
            .iter()
            .map(|n| std::ffi::CString::new(n.replace('\0', "?")).expect("NULs replaced"))
            .collect();
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let handles: Vec<_> = params.iter().map(|t| t.as_ptr()).collect();
        let mut out: *mut dist_ffi::Reducer = std::ptr::null_mut();
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the group is live; the handles and names are borrowed for the call.
        unsafe {
            let rc = dist_ffi::tch_peft_reducer_new(
                group.0.as_ptr(),
                handles.as_ptr(),
                handles.len(),
                name_ptrs.as_ptr(),
                o.bucket_cap_bytes,
                o.first_bucket_cap_bytes,
                i32::from(o.find_unused),
                i32::from(o.gradient_as_bucket_view),
                i32::from(o.static_graph),
                i32::from(o.bf16_compress),
                &mut out,
                &mut error,
            );
            if rc != 0 {
                return Err(take_error(error, "tch_peft_reducer_new"));
            }
            std::ptr::NonNull::new(out)
                .map(ReducerHandle)
                .ok_or_else(|| tch::TchError::Torch("tch_peft_reducer_new gave no reducer".into()))
        }
    }

    /// DDP's `_pre_forward`: whether the buckets were rebuilt now.
    pub(crate) fn pre_forward(&mut self, sync: bool) -> Result<bool, tch::TchError> {
        let mut rebuilt = 0i32;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the reducer is live.
        unsafe {
            let rc = dist_ffi::tch_peft_reducer_pre_forward(
                self.0.as_ptr(),
                i32::from(sync),
                &mut rebuilt,
                &mut error,
            );
            if rc != 0 {
                return Err(take_error(error, "tch_peft_reducer_pre_forward"));
            }
        }
        Ok(rebuilt != 0)
    }

    /// DDP's `_post_forward` on the forward's outputs.
    pub(crate) fn post_forward(
        &mut self,
        outs: &[&Tensor],
        sync: bool,
    ) -> Result<(), tch::TchError> {
        let handles: Vec<_> = outs.iter().map(|t| t.as_ptr()).collect();
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the reducer is live; the handles are borrowed for the call.
        unsafe {
            let rc = dist_ffi::tch_peft_reducer_post_forward(
                self.0.as_ptr(),
                handles.as_ptr(),
                handles.len(),
                i32::from(sync),
                &mut error,
            );
            if rc != 0 {
                return Err(take_error(error, "tch_peft_reducer_post_forward"));
            }
        }
        Ok(())
    }

    /// Per bucket: (parameters, elements).
    pub(crate) fn buckets(&self) -> Result<Vec<(usize, usize)>, tch::TchError> {
        let mut cap = 64usize;
        loop {
            let (mut params, mut numels) = (vec![0i64; cap], vec![0i64; cap]);
            let mut count = 0usize;
            let mut error: *mut c_char = std::ptr::null_mut();
            // SAFETY: the reducer is live; both arrays hold `cap` values.
            unsafe {
                let rc = dist_ffi::tch_peft_reducer_buckets(
                    self.0.as_ptr(),
                    cap,
                    params.as_mut_ptr(),
                    numels.as_mut_ptr(),
                    &mut count,
                    &mut error,
                );
                if rc != 0 {
                    return Err(take_error(error, "tch_peft_reducer_buckets"));
                }
            }
            if count <= cap {
                return Ok(params
                    .iter()
                    .zip(&numels)
                    .take(count)
                    .map(|(&p, &n)| (p as usize, n as usize))
                    .collect());
            }
            cap = count;
        }
    }
}
