//! The c10d binding's ABI (`csrc/dist_gloo.cpp`, `csrc/dist_nccl.cpp`, `csrc/dist_reducer.cpp`;
//! declared in `csrc/tch_peft.h`): owned handles for a process group and a Reducer.

use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use super::take_error;

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
#[derive(Debug)]
pub(crate) struct GroupHandle(std::ptr::NonNull<dist_ffi::Group>);

// SAFETY: c10d process groups are used from any thread (their collectives are queued to gloo's
// own threads); the handle is only freed once, on drop.
unsafe impl Send for GroupHandle {}
unsafe impl Sync for GroupHandle {}

impl Drop for GroupHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tch_peft_group_new and is freed only here.
        unsafe { dist_ffi::tch_peft_group_free(self.0.as_ptr()) }
    }
}

/// Calls an entry point that returns 0, or 1 with `*error` set; `what` names it in the error.
///
/// # Safety
/// `f` makes that one call, with pointers valid for it.
unsafe fn call(what: &str, f: impl FnOnce(*mut *mut c_char) -> i32) -> Result<(), tch::TchError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    if f(&mut error) != 0 {
        return Err(take_error(error, what));
    }
    Ok(())
}

/// The tensors' handles, borrowed for one call.
fn handles(ts: &[&Tensor]) -> Vec<*const C_tensor> {
    ts.iter().map(|t| t.as_ptr()).collect()
}

/// A gloo group of `size` ranks (see `tch_peft_group_new` in `csrc/tch_peft.h`).
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
    // SAFETY: the strings live for the call; on success the C++ side writes a new group.
    unsafe {
        call("tch_peft_group_new", |e| {
            dist_ffi::tch_peft_group_new(
                host.as_ptr(),
                i32::from(port),
                file.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
                rank,
                size,
                timeout_ms,
                i32::from(is_server),
                device_host.as_ptr(),
                &mut out,
                e,
            )
        })?;
    }
    std::ptr::NonNull::new(out)
        .map(GroupHandle)
        .ok_or_else(|| tch::TchError::Torch("tch_peft_group_new gave no group".into()))
}

impl GroupHandle {
    /// In place: the sum (or, with `average`, the mean) over ranks of each tensor, all of them
    /// as one flat buffer. Tensors checked by the caller (CPU, one dtype).
    pub(crate) fn all_reduce(&self, ts: &[&Tensor], average: bool) -> Result<(), tch::TchError> {
        let hs = handles(ts);
        // SAFETY: the group is live and the handles are borrowed for the call.
        unsafe {
            call("tch_peft_group_all_reduce", |e| {
                let op = i32::from(average);
                dist_ffi::tch_peft_group_all_reduce(self.0.as_ptr(), hs.as_ptr(), hs.len(), op, e)
            })
        }
    }

    /// In place: rank `root`'s values of the tensors on every rank.
    pub(crate) fn broadcast(&self, ts: &[&Tensor], root: i32) -> Result<(), tch::TchError> {
        let hs = handles(ts);
        // SAFETY: as all_reduce.
        unsafe {
            call("tch_peft_group_broadcast", |e| {
                dist_ffi::tch_peft_group_broadcast(self.0.as_ptr(), hs.as_ptr(), hs.len(), root, e)
            })
        }
    }

    /// Adds NCCL on CUDA device `device` (every rank, each its own device).
    #[cfg(tch_peft_nccl)]
    pub(crate) fn add_nccl(&self, device: i32) -> Result<(), tch::TchError> {
        // SAFETY: the group is live.
        unsafe {
            call("tch_peft_group_add_nccl", |e| {
                dist_ffi::tch_peft_group_add_nccl(self.0.as_ptr(), device, e)
            })
        }
    }

    /// Waits for every rank.
    pub(crate) fn barrier(&self) -> Result<(), tch::TchError> {
        // SAFETY: the group is live.
        unsafe {
            call("tch_peft_group_barrier", |e| dist_ffi::tch_peft_group_barrier(self.0.as_ptr(), e))
        }
    }
}

/// DDP's options as `tch_peft_reducer_new` takes them.
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
#[derive(Debug)]
pub(crate) struct ReducerHandle(std::ptr::NonNull<dist_ffi::Reducer>);

// SAFETY: the Reducer locks its own state (its hooks run on autograd's threads); freed once.
unsafe impl Send for ReducerHandle {}

impl Drop for ReducerHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tch_peft_reducer_new and is freed only here.
        unsafe { dist_ffi::tch_peft_reducer_free(self.0.as_ptr()) }
    }
}

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
        let hs = handles(params);
        let mut out: *mut dist_ffi::Reducer = std::ptr::null_mut();
        // SAFETY: the group is live; the handles and names are borrowed for the call.
        unsafe {
            call("tch_peft_reducer_new", |e| {
                dist_ffi::tch_peft_reducer_new(
                    group.0.as_ptr(),
                    hs.as_ptr(),
                    hs.len(),
                    name_ptrs.as_ptr(),
                    o.bucket_cap_bytes,
                    o.first_bucket_cap_bytes,
                    i32::from(o.find_unused),
                    i32::from(o.gradient_as_bucket_view),
                    i32::from(o.static_graph),
                    i32::from(o.bf16_compress),
                    &mut out,
                    e,
                )
            })?;
        }
        std::ptr::NonNull::new(out)
            .map(ReducerHandle)
            .ok_or_else(|| tch::TchError::Torch("tch_peft_reducer_new gave no reducer".into()))
    }

    /// DDP's `_pre_forward`: whether the buckets were rebuilt now.
    pub(crate) fn pre_forward(&mut self, sync: bool) -> Result<bool, tch::TchError> {
        let mut rebuilt = 0i32;
        // SAFETY: the reducer is live.
        unsafe {
            call("tch_peft_reducer_pre_forward", |e| {
                let sync = i32::from(sync);
                dist_ffi::tch_peft_reducer_pre_forward(self.0.as_ptr(), sync, &mut rebuilt, e)
            })?;
        }
        Ok(rebuilt != 0)
    }

    /// DDP's `_post_forward` on the forward's outputs.
    pub(crate) fn post_forward(
        &mut self,
        outs: &[&Tensor],
        sync: bool,
    ) -> Result<(), tch::TchError> {
        let hs = handles(outs);
        // SAFETY: the reducer is live; the handles are borrowed for the call.
        unsafe {
            call("tch_peft_reducer_post_forward", |e| {
                let (r, sync) = (self.0.as_ptr(), i32::from(sync));
                dist_ffi::tch_peft_reducer_post_forward(r, hs.as_ptr(), hs.len(), sync, e)
            })
        }
    }

    /// Per bucket: (parameters, elements).
    pub(crate) fn buckets(&self) -> Result<Vec<(usize, usize)>, tch::TchError> {
        let mut cap = 64usize;
        loop {
            let (mut params, mut numels) = (vec![0i64; cap], vec![0i64; cap]);
            let mut count = 0usize;
            // SAFETY: the reducer is live; both arrays hold `cap` values.
            unsafe {
                call("tch_peft_reducer_buckets", |e| {
                    let (p, n) = (params.as_mut_ptr(), numels.as_mut_ptr());
                    dist_ffi::tch_peft_reducer_buckets(self.0.as_ptr(), cap, p, n, &mut count, e)
                })?;
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
