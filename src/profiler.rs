//! Device-kernel times of a piece of work, from libtorch's Kineto profiler (the one behind
//! `torch.profiler`): every kernel, copy and memset the GPU ran, aggregated by name. tch has no
//! binding for it; `csrc/profiler.cpp` is the shim.
//!
//! The sum of kernel times against the wall time of the same work says whether the GPU was
//! busy (compute- or memory-bound) or waiting for the host to launch work (launch-bound).
//!
//! ```no_run
//! use tch::{Device, Kind, Tensor};
//! let x = Tensor::randn([4096, 4096], (Kind::BFloat16, Device::Cuda(0)));
//! let (_, profile) = tch_peft::profiler::profile_device(|| x.matmul(&x))?;
//! println!("GPU busy {:?} in {} launches", profile.busy(), profile.launches());
//! for k in profile.kernels.iter().take(5) {
//!     println!("{:>8.3} ms {:>5}× {}", k.total.as_secs_f64() * 1e3, k.count, k.name);
//! }
//! # Ok::<(), tch_peft::Error>(())
//! ```

use std::time::Duration;

use crate::{Error, Result};

/// One device activity name (a kernel, `Memcpy …`, `Memset …`) and its totals.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelStat {
    /// The kernel name as the profiler reports it (demangled).
    pub name: String,
    /// How many times it ran.
    pub count: u64,
    /// Its summed device time.
    pub total: Duration,
}

/// What the device ran during [`profile_device`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceProfile {
    /// From the first device activity's start to the last one's end.
    pub span: Duration,
    /// Per name, the largest total first.
    pub kernels: Vec<KernelStat>,
}

impl DeviceProfile {
    /// The summed device time of every activity (overlapping streams count twice).
    pub fn busy(&self) -> Duration {
        self.kernels.iter().map(|k| k.total).sum()
    }

    /// The number of device activities.
    pub fn launches(&self) -> u64 {
        self.kernels.iter().map(|k| k.count).sum()
    }

    fn parse(text: &str) -> Result<Self> {
        let bad = |line: &str| {
            Error::Tch(tch::TchError::Torch(format!("unexpected profiler line `{line}`")))
        };
        let mut profile = DeviceProfile::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, '\t');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("span"), Some(ns), None) => {
                    profile.span = Duration::from_nanos(ns.parse().map_err(|_| bad(line))?);
                }
                (Some(count), Some(ns), Some(name)) => profile.kernels.push(KernelStat {
                    name: name.to_string(),
                    count: count.parse().map_err(|_| bad(line))?,
                    total: Duration::from_nanos(ns.parse().map_err(|_| bad(line))?),
                }),
                _ => return Err(bad(line)),
            }
        }
        profile.kernels.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
        Ok(profile)
    }
}

/// Runs `f` under the profiler and returns its result with what the device ran meanwhile.
/// Synchronise the device inside `f` (e.g. `tch::Cuda::synchronize`) so that its work is done
/// before the profiler stops. Without a CUDA device the profiler is not started and the profile
/// is empty.
///
/// Errors: the profiler could not start (another one is active) or stop; a build without the
/// C++ shim (`Error::Unsupported`).
pub fn profile_device<T>(f: impl FnOnce() -> T) -> Result<(T, DeviceProfile)> {
    #[cfg(tch_peft_csrc)]
    {
        if !tch::Cuda::is_available() {
            // no device to observe (and Kineto would complain on stderr)
            return Ok((f(), DeviceProfile::default()));
        }
        crate::sys::profiler_start()?;
        let out = f();
        let text = crate::sys::profiler_stop()?;
        Ok((out, DeviceProfile::parse(&text)?))
    }
    #[cfg(not(tch_peft_csrc))]
    {
        let _ = f;
        Err(Error::Unsupported {
            field: "profiler".into(),
            reason: "this build has no profiler shim (build.rs compiles it when libtorch's \
                     headers are found)"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sorts_the_shim_output() {
        let p = DeviceProfile::parse("span\t5000\n2\t1000\tgemm\n3\t3000\tcopy a\tb\n").unwrap();
        assert_eq!(p.span, Duration::from_nanos(5000));
        assert_eq!(p.kernels[0].name, "copy a\tb");
        assert_eq!(p.busy(), Duration::from_nanos(4000));
        assert_eq!(p.launches(), 5);
        assert!(DeviceProfile::parse("garbage").is_err());
    }

    #[test]
    fn profiles_a_cpu_run_without_device_activity() {
        let (v, p) = profile_device(|| 2 + 2).unwrap();
        assert_eq!(v, 4);
        assert!(p.kernels.is_empty());
    }
}
