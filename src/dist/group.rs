use std::path::PathBuf;
use std::time::Duration;

use tch::Tensor;

use crate::{Error, Result};

/// `Error::Distributed` naming `what`.
pub(crate) fn bad(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Distributed { what: what.into(), reason: reason.into() }
}

/// How the ranks find each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// A TCP store at `host:port`, hosted by rank 0 unless `agent_store` (torchrun's agent hosts
    /// it: every rank is a client).
    Tcp {
        /// The store's host (`MASTER_ADDR`).
        host: String,
        /// Its port (`MASTER_PORT`).
        port: u16,
        /// Every rank a client (`TORCHELASTIC_USE_AGENT_STORE`).
        agent_store: bool,
    },
    /// A file store: a file every rank can reach (a temporary directory on one machine, a shared
    /// file system across machines). gloo then connects through the machine's default address,
    /// or the interfaces `GLOO_SOCKET_IFNAME` names (`lo` keeps one machine on loopback).
    File(PathBuf),
}

/// The reduction of [`ProcessGroup::all_reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The mean over ranks (the sum divided by the world size).
    Average,
}

/// A process group of `world_size` ranks: gloo for CPU tensors, and NCCL for the tensors of one
/// CUDA device once [`add_nccl`](Self::add_nccl) (or [`from_env`](Self::from_env) on a machine
/// with CUDA) has added it. Dropping it shuts its backends down.
///
/// ```no_run
/// # fn main() -> tch_peft::Result<()> {
/// use std::time::Duration;
/// use tch::{Kind, Tensor};
/// use tch_peft::dist::{ProcessGroup, ReduceOp};
/// // under `torchrun --nproc-per-node 2 …`
/// let group = ProcessGroup::from_env(Duration::from_secs(60))?;
/// let t = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
/// group.all_reduce(&[&t], ReduceOp::Sum)?;
/// assert_eq!(t.double_value(&[0]), group.world_size() as f64);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ProcessGroup {
    #[cfg(tch_peft_dist)]
    pub(crate) handle: crate::sys::GroupHandle,
    rank: usize,
    world_size: usize,
    rendezvous: Rendezvous,
    cuda: Option<usize>,
}

impl ProcessGroup {
    /// The group `torchrun` (or any launcher) describes in the environment: `RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, and `TORCHELASTIC_USE_AGENT_STORE`; where
    /// CUDA is available and this build has NCCL, NCCL on device `LOCAL_RANK` (0 when unset) is
    /// added, as `torch.distributed.init_process_group()` adds it ([`device`](Self::device)).
    ///
    /// # Errors
    /// `Distributed` naming a missing or malformed variable, or the rendezvous that failed.
    pub fn from_env(timeout: Duration) -> Result<Self> {
        let mut group = Self::from_env_cpu(timeout)?;
        if nccl_available() && tch::Cuda::is_available() {
            let local = match std::env::var("LOCAL_RANK") {
                Ok(v) => v.parse().map_err(|_| {
                    bad("environment", format!("`LOCAL_RANK`={v:?} is not a count"))
                })?,
                Err(_) => 0,
            };
            group.add_nccl(local)?;
        }
        Ok(group)
    }

    /// As [`from_env`](Self::from_env), gloo only (CPU tensors) even where CUDA is available.
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_env_cpu(timeout: Duration) -> Result<Self> {
        let var =
            |k: &str| std::env::var(k).map_err(|_| bad("environment", format!("`{k}` is not set")));
        let num = |k: &str| -> Result<usize> {
            let v = var(k)?;
            v.parse().map_err(|_| bad("environment", format!("`{k}`={v:?} is not a count")))
        };
        let (rank, world) = (num("RANK")?, num("WORLD_SIZE")?);
        let host = var("MASTER_ADDR")?;
        let port = var("MASTER_PORT")?;
        let port = port
            .parse()
            .map_err(|_| bad("environment", format!("`MASTER_PORT`={port:?} is not a port")))?;
        let agent_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Self::new(Rendezvous::Tcp { host, port, agent_store }, rank, world, timeout)
    }

    /// Rank `rank` of a group of `world_size`, meeting through `rendezvous`; every wait (the
    /// rendezvous, each collective) bounded by `timeout`.
    ///
    /// # Errors
    /// `Distributed` for a rank outside the group, a zero or too large timeout, or a
    /// rendezvous that fails or times out (naming the store); `Unsupported` in a build without
    /// the c10d binding.
    pub fn new(
        rendezvous: Rendezvous,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if world_size == 0 || world_size > 1 << 16 || rank >= world_size {
            return Err(bad("group", format!("rank {rank} of a world of {world_size}")));
        }
        let timeout_ms = i64::try_from(timeout.as_millis())
            .ok()
            .filter(|&t| t > 0 && t <= 1 << 40)
            .ok_or_else(|| bad("group", format!("timeout {timeout:?}")))?;
        #[cfg(tch_peft_dist)]
        {
            let (host, port, file, server) = match &rendezvous {
                Rendezvous::Tcp { host, port, agent_store } => {
                    (host.clone(), *port, None, rank == 0 && !*agent_store)
                }
                Rendezvous::File(p) => {
                    let s = p
                        .to_str()
                        .ok_or_else(|| bad("file store", format!("{p:?} is not UTF-8")))?;
                    ("127.0.0.1".to_string(), 0, Some(s.to_string()), false)
                }
            };
            let device_host = gloo_device(file.is_none().then_some(host.as_str()));
            let handle = crate::sys::group_new(
                &host,
                port,
                file.as_deref(),
                rank as i32,
                world_size as i32,
                timeout_ms,
                server,
                &device_host,
            )
            .map_err(|e| {
                bad(format!("rendezvous at {rendezvous:?} (rank {rank})"), e.to_string())
            })?;
            Ok(ProcessGroup { handle, rank, world_size, rendezvous, cuda: None })
        }
        #[cfg(not(tch_peft_dist))]
        {
            let _ = timeout_ms;
            let _ = (rendezvous, rank, world_size);
            Err(Error::Unsupported {
                field: "dist".into(),
                reason: "this build has no c10d binding (libtorch's headers were not found)".into(),
            })
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// How the group met.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rendezvous
    }

    /// Adds NCCL for the tensors of CUDA device `device` (each rank its own; every rank of the
    /// group must call it, right after the group is made). Collectives on tensors of that device
    /// then go through NCCL; CPU tensors still through gloo.
    ///
    /// # Errors
    /// `Unsupported` in a build without NCCL's headers; `Distributed` when the group has NCCL
    /// already, CUDA has no such device, or the communicator cannot be made within the timeout.
    pub fn add_nccl(&mut self, device: usize) -> Result<()> {
        if !nccl_available() {
            return Err(Error::Unsupported {
                field: "dist NCCL".into(),
                reason: "this build has no NCCL process group (NCCL's, CUDA's or CCCL's headers \
                         were not found; scripts/torch-env.sh installs them)"
                    .into(),
            });
        }
        let devices = tch::Cuda::device_count().max(0) as usize;
        if device >= devices {
            return Err(bad("NCCL", format!("CUDA device {device} of {devices}")));
        }
        if self.cuda.is_some() {
            return Err(bad("NCCL", "the group has an NCCL backend already"));
        }
        #[cfg(tch_peft_nccl)]
        {
            let rank = self.rank;
            self.handle
                .add_nccl(device as i32)
                .map_err(|e| bad(format!("NCCL on cuda:{device} (rank {rank})"), e.to_string()))?;
            self.cuda = Some(device);
        }
        Ok(())
    }

    /// Where this rank's model belongs: its NCCL device, else the CPU.
    pub fn device(&self) -> tch::Device {
        self.cuda.map_or(tch::Device::Cpu, tch::Device::Cuda)
    }

    /// Whether collectives on tensors of `device` can run here (`name` names the tensor).
    pub(crate) fn check_device(
        &self,
        name: impl FnOnce() -> String,
        device: tch::Device,
    ) -> Result<()> {
        if device == tch::Device::Cpu || Some(device) == self.cuda.map(tch::Device::Cuda) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch { name: name(), expected: self.device(), actual: device })
        }
    }

    fn check(&self, what: &str, ts: &[&Tensor]) -> Result<()> {
        let Some(first) = ts.first() else { return Ok(()) };
        for (i, t) in ts.iter().enumerate() {
            self.check_device(|| format!("tensor {i} of {what}"), t.device())?;
            if t.device() != first.device() {
                return Err(Error::DeviceMismatch {
                    name: format!("tensor {i} of {what}"),
                    expected: first.device(),
                    actual: t.device(),
                });
            }
            if t.kind() != first.kind() {
                return Err(Error::DtypeMismatch {
                    name: format!("tensor {i} of {what}"),
                    expected: format!("{:?}, the first tensor's", first.kind()),
                    actual: t.kind(),
                });
            }
        }
        Ok(())
    }

    /// Reduces `tensors` in place over every rank (as one flat buffer: one collective).
    ///
    /// Ranks must issue their collectives in the same order: from several threads, order them
    /// yourself.
    ///
    /// # Errors
    /// `DeviceMismatch`/`DtypeMismatch` for tensors of mixed devices or dtypes, or on a CUDA
    /// device without NCCL;
    /// `Distributed` when the collective fails or times out.
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        self.check("all_reduce", tensors)?;
        if let Some(t) =
            tensors.first().filter(|t| op == ReduceOp::Average && !t.is_floating_point())
        {
            return Err(Error::DtypeMismatch {
                name: "the tensors of all_reduce(Average)".into(),
                expected: "a floating-point dtype (a mean of integers does not fit them)".into(),
                actual: t.kind(),
            });
        }
        let _guard = tch::no_grad_guard();
        #[cfg(tch_peft_dist)]
        return self
            .handle
            .all_reduce(tensors, op == ReduceOp::Average)
            .map_err(|e| bad(format!("all_reduce (rank {})", self.rank), e.to_string()));
        #[cfg(not(tch_peft_dist))]
        {
            let _ = op;
            unreachable!("no group exists without the binding")
        }
    }

    /// Overwrites `tensors` on every rank with rank `root`'s values.
    ///
    /// # Errors
    /// As [`all_reduce`](Self::all_reduce); `Distributed` for a root outside the group.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        self.check("broadcast", tensors)?;
        if root >= self.world_size {
            return Err(bad("broadcast", format!("root {root} of a world of {}", self.world_size)));
        }
        let _guard = tch::no_grad_guard();
        #[cfg(tch_peft_dist)]
        return self
            .handle
            .broadcast(tensors, root as i32)
            .map_err(|e| bad(format!("broadcast (rank {})", self.rank), e.to_string()));
        #[cfg(not(tch_peft_dist))]
        unreachable!("no group exists without the binding")
    }

    /// Waits until every rank has called it.
    ///
    /// # Errors
    /// `Distributed` when a rank does not arrive within the timeout.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(tch_peft_dist)]
        return self
            .handle
            .barrier()
            .map_err(|e| bad(format!("barrier (rank {})", self.rank), e.to_string()));
        #[cfg(not(tch_peft_dist))]
        unreachable!("no group exists without the binding")
    }
}

/// Whether this build has c10d's NCCL process group.
pub fn nccl_available() -> bool {
    cfg!(tch_peft_nccl)
}

/// The gloo device's spec for `tch_peft_group_new`: the interfaces `GLOO_SOCKET_IFNAME` names (as
/// PyTorch), else loopback for a loopback TCP store, else the machine's default device (its
/// hostname's address; a file store's ranks on several machines need the real address).
fn gloo_device(tcp_host: Option<&str>) -> String {
    if let Some(names) = std::env::var("GLOO_SOCKET_IFNAME").ok().filter(|v| !v.trim().is_empty()) {
        return format!("if:{}", names.trim());
    }
    match tcp_host {
        Some(h) if is_loopback(h) => "127.0.0.1".into(),
        _ => String::new(),
    }
}

/// `localhost`, `127.x.y.z` or `::1`.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
