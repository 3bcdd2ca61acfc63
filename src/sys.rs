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
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> i32;
        pub fn tch_peft_free_error(error: *mut c_char);
        pub fn tch_peft_grad_enabled() -> i32;
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

/// The arguments of one [`lora_group`] call, one entry per member layer (all slices of one
/// length): base weights, optional biases, A and B, optional DoRA magnitudes with their cached
/// `‖W_i‖²`, scalings.
pub(crate) struct LoraGroupArgs<'a> {
    pub ws: Vec<&'a Tensor>,
    pub biases: Vec<Option<&'a Tensor>>,
    pub a_s: Vec<&'a Tensor>,
    pub bs: Vec<&'a Tensor>,
    pub ms: Vec<Option<&'a Tensor>>,
    pub w_sqs: Vec<Option<&'a Tensor>>,
    pub scalings: Vec<f64>,
}

/// The group autograd node of `csrc/lora_linear.cpp` on the 2-D input `x`: one output per member.
/// Panics if the argument lists differ in length (a bug of the caller, not an input error).
pub(crate) fn lora_group(
    x: &Tensor,
    args: &LoraGroupArgs<'_>,
) -> Result<Vec<Tensor>, tch::TchError> {
    let n = args.ws.len();
    assert!(
        [args.biases.len(), args.a_s.len(), args.bs.len(), args.ms.len(), args.w_sqs.len()]
            .iter()
            .chain(&[args.scalings.len()])
            .all(|&l| l == n),
        "lora_group: argument lists of different lengths"
    );
    // a magnitude without its ‖W‖² (or the other way round) would be read as a null handle
    assert!(args.ms.iter().zip(&args.w_sqs).all(|(m, w)| m.is_some() == w.is_some()));
    let ws: Vec<_> = args.ws.iter().map(|t| t.as_ptr()).collect();
    let biases: Vec<_> = args.biases.iter().map(|t| handle(*t)).collect();
    let a_s: Vec<_> = args.a_s.iter().map(|t| t.as_ptr()).collect();
    let bs: Vec<_> = args.bs.iter().map(|t| t.as_ptr()).collect();
    let ms: Vec<_> = args.ms.iter().map(|t| handle(*t)).collect();
    let w_sqs: Vec<_> = args.w_sqs.iter().map(|t| handle(*t)).collect();
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); n];
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the arrays hold `n` live handles (or nulls for absent biases and magnitudes)
    // borrowed for the call; on success the C++ side writes `n` new owned handles into `out`.
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
            args.scalings.as_ptr(),
            out.as_mut_ptr(),
            &mut error,
        );
        if rc != 0 {
            return Err(take_error(error, "tch_peft_lora_group"));
        }
        Ok(out.into_iter().map(|p| Tensor::from_ptr(p)).collect())
    }
}

/// The tensors of one [`fused_adamw`] call, one entry per parameter (all of one length).
pub(crate) struct AdamWTensors<'a> {
    pub params: Vec<&'a Tensor>,
    pub grads: Vec<&'a Tensor>,
    pub exp_avgs: Vec<&'a Tensor>,
    pub exp_avg_sqs: Vec<&'a Tensor>,
    /// f32 scalars on the parameters' device, incremented by the call.
    pub steps: Vec<&'a Tensor>,
}

/// AdamW's hyper-parameters for [`fused_adamw`].
pub(crate) struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One step of ATen's multi-tensor `_fused_adamw_` over `t` (in place). Panics if the lists
/// differ in length (a bug of the caller).
pub(crate) fn fused_adamw(t: &AdamWTensors<'_>, h: &AdamWHyper) -> Result<(), tch::TchError> {
    let n = t.params.len();
    assert!(
        [t.grads.len(), t.exp_avgs.len(), t.exp_avg_sqs.len(), t.steps.len()]
            .iter()
            .all(|&l| l == n),
        "fused_adamw: tensor lists of different lengths"
    );
    let list = |v: &[&Tensor]| v.iter().map(|t| handle_mut(t)).collect::<Vec<_>>();
    let (params, grads) = (list(&t.params), list(&t.grads));
    let (m, v, steps) = (list(&t.exp_avgs), list(&t.exp_avg_sqs), list(&t.steps));
    let n = i64::try_from(n).map_err(|_| tch::TchError::Torch("too many parameters".into()))?;
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
pub(crate) fn grads_to_none(params: &[&Tensor]) {
    let ptrs: Vec<_> = params.iter().map(|t| handle_mut(t)).collect();
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
