//! Peak memory of a piece of work: the process's peak resident set on the CPU (Linux), the
//! device caching allocator's peak of allocated bytes on CUDA (what PyTorch's
//! `torch.cuda.max_memory_allocated` reports).
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! let device = Device::Cpu;
//! tch_peft::memory::reset_peak(device);
//! let t = Tensor::zeros([1 << 20], (Kind::Float, device)) + 1.0;
//! if let Some(peak) = tch_peft::memory::peak_bytes(device) {
//!     assert!(peak >= 4 << 20, "the 4 MiB tensor is resident"); // Linux only
//! }
//! # drop(t);
//! ```

use tch::Device;

/// Starts a new peak: on the CPU the kernel's high-water mark of this process (writes `5` to
/// `/proc/self/clear_refs`, Linux), on CUDA the allocator's peak statistics. Does nothing
/// where neither is available.
pub fn reset_peak(device: Device) {
    match device {
        Device::Cuda(i) => {
            #[cfg(tch_peft_csrc)]
            if tch::Cuda::is_available() {
                let _ = crate::sys::cuda_reset_peak(i);
            }
            #[cfg(not(tch_peft_csrc))]
            let _ = i;
        }
        _ => {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
    }
}

/// The peak since the last [`reset_peak`] (or the process start): the peak resident set in
/// bytes on the CPU (`VmHWM`), the peak of bytes allocated by the caching allocator on CUDA.
/// `None` where it cannot be read.
pub fn peak_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => cuda_stat(i, true),
        _ => status_kib("VmHWM:").map(|k| k * 1024),
    }
}

/// Memory in use now: resident set on the CPU (`VmRSS`), bytes allocated by the caching
/// allocator on CUDA.
pub fn current_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => cuda_stat(i, false),
        _ => status_kib("VmRSS:").map(|k| k * 1024),
    }
}

fn status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(tch_peft_csrc)]
fn cuda_stat(device: usize, peak: bool) -> Option<u64> {
    if !tch::Cuda::is_available() {
        return None;
    }
    crate::sys::cuda_allocated(device, peak)
}

#[cfg(not(tch_peft_csrc))]
fn cuda_stat(_device: usize, _peak: bool) -> Option<u64> {
    None
}
