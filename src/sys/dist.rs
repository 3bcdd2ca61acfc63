//! The c10d binding's ABI (`csrc/dist_gloo.cpp`, `csrc/dist_nccl.cpp`, `csrc/dist_reducer.cpp`;
//! declared in `csrc/tch_peft.h`): owned handles for a process group and a Reducer.

use std::ffi::c_char;

use tch::Tensor;

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
