//! Data-parallel training on PyTorch's own distributed engine: a c10d process group over gloo
//! (in `libtorch_cpu`; `csrc/dist_gloo.cpp`), rendezvous through a TCP or a file store, the
//! environment `torchrun` sets, and the collectives data-parallel adapters need.
//!
//! ```text
//! one process per rank:   ProcessGroup::from_env(timeout)      RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//!   group.broadcast(&params, 0)        every rank starts from rank 0's values
//!   loss.backward(); group.all_reduce(&grads, ReduceOp::Average)   one flat buffer, one collective
//! ```
//!
//! Every wait is bounded by the group's timeout: a rank that never arrives is an
//! [`Error::Distributed`] naming the store, not a hang. Tensors are CPU tensors of one dtype
//! (gloo); they are reduced as one flat buffer, never one collective per tensor.

use std::path::PathBuf;
use std::time::Duration;

use tch::Tensor;

use crate::{Error, Result};

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
    /// file system across machines).
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

/// A process group of `world_size` ranks over gloo.
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
    handle: crate::sys::GroupHandle,
    rank: usize,
    world_size: usize,
    rendezvous: Rendezvous,
}

fn bad(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Distributed { what: what.into(), reason: reason.into() }
}

impl ProcessGroup {
    /// The group `torchrun` (or any launcher) describes in the environment: `RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, and `TORCHELASTIC_USE_AGENT_STORE`.
    ///
    /// # Errors
    /// `Distributed` naming a missing or malformed variable, or the rendezvous that failed.
    pub fn from_env(timeout: Duration) -> Result<Self> {
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
            let device_host = if file.is_some() { "127.0.0.1".to_string() } else { host.clone() };
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
            Ok(ProcessGroup { handle, rank, world_size, rendezvous })
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

    fn check(&self, what: &str, ts: &[&Tensor]) -> Result<()> {
        let Some(first) = ts.first() else { return Ok(()) };
        for (i, t) in ts.iter().enumerate() {
            if t.device() != tch::Device::Cpu {
                return Err(Error::DeviceMismatch {
                    name: format!("tensor {i} of {what}"),
                    expected: tch::Device::Cpu,
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
    /// # Errors
    /// `DeviceMismatch`/`DtypeMismatch` for tensors off the CPU or of mixed dtypes;
    /// `Distributed` when the collective fails or times out.
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        self.check("all_reduce", tensors)?;
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

/// Data parallelism over the trainable tensors of any method (LoRA, DoRA, ReFT, a freeze plan's
/// unfrozen weights, full fine-tuning): every rank starts from rank 0's values, and after each
/// backward [`sync_gradients`](Self::sync_gradients) replaces every gradient with its mean over
/// ranks in one collective per dtype (a flat buffer, never one per tensor), so that the same
/// optimizer step follows on every rank.
///
/// ```no_run
/// # fn main() -> tch_peft::Result<()> {
/// # use std::time::Duration;
/// use tch_peft::dist::{DataParallel, ProcessGroup};
/// let group = ProcessGroup::from_env(Duration::from_secs(300))?;
/// let adapters = tch::nn::VarStore::new(tch::Device::Cpu);
/// // … build the model and its adapters in `adapters` …
/// let dp = DataParallel::from_var_store(&group, &adapters)?; // rank 0's values everywhere
/// // each step: loss on this rank's shard, backward, then
/// dp.sync_gradients()?; // the gradient of the mean loss over all ranks' batches
/// // optimizer.step() on every rank
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DataParallel<'g> {
    group: &'g ProcessGroup,
    params: Vec<(String, Tensor)>,
}

impl<'g> DataParallel<'g> {
    /// Over `params` (named; the same names, shapes and dtypes on every rank, in the same
    /// order): checked across ranks, then overwritten with rank 0's values.
    ///
    /// # Errors
    /// `Distributed` naming the first tensor whose shape or dtype differs from rank 0's (or a
    /// different count), and the collectives' errors.
    pub fn new(group: &'g ProcessGroup, params: Vec<(String, Tensor)>) -> Result<Self> {
        // rank 0's signature against ours: count, then per tensor its dtype and up to 8 dims
        const SLOTS: usize = 10;
        let count = Tensor::from_slice(&[params.len() as i64]);
        let theirs = count.copy();
        group.broadcast(&[&theirs], 0)?;
        if theirs.int64_value(&[0]) != params.len() as i64 {
            return Err(bad(
                "data parallel",
                format!(
                    "rank {} has {} tensors, rank 0 {}",
                    group.rank(),
                    params.len(),
                    theirs.int64_value(&[0])
                ),
            ));
        }
        let mut sig = vec![-1i64; params.len() * SLOTS];
        for (i, (name, t)) in params.iter().enumerate() {
            let size = t.size();
            if size.len() > SLOTS - 2 {
                return Err(bad(
                    "data parallel",
                    format!("`{name}` has {} dimensions", size.len()),
                ));
            }
            sig[i * SLOTS] = t.kind() as i64;
            sig[i * SLOTS + 1] = size.len() as i64;
            sig[i * SLOTS + 2..i * SLOTS + 2 + size.len()].copy_from_slice(&size);
        }
        let mine = Tensor::from_slice(&sig);
        let rank0 = mine.copy();
        group.broadcast(&[&rank0], 0)?;
        let rank0: Vec<i64> = Vec::<i64>::try_from(&rank0)?;
        for (i, (name, t)) in params.iter().enumerate() {
            if rank0[i * SLOTS..(i + 1) * SLOTS] != sig[i * SLOTS..(i + 1) * SLOTS] {
                return Err(bad(
                    "data parallel",
                    format!(
                        "`{name}` is {:?} {:?} on rank {}, another shape or dtype on rank 0",
                        t.kind(),
                        t.size(),
                        group.rank()
                    ),
                ));
            }
        }
        let dp = DataParallel { group, params };
        for ts in dp.by_kind(|t| Some(t.shallow_clone())) {
            let refs: Vec<&Tensor> = ts.iter().collect();
            group.broadcast(&refs, 0)?;
        }
        Ok(dp)
    }

    /// Over the trainable variables of `vs`, in name order.
    pub fn from_var_store(group: &'g ProcessGroup, vs: &tch::nn::VarStore) -> Result<Self> {
        let mut params: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(group, params)
    }

    /// The tensors, grouped by dtype (each group in order), mapped by `f` (skipped where `None`).
    fn by_kind(&self, f: impl Fn(&Tensor) -> Option<Tensor>) -> Vec<Vec<Tensor>> {
        let mut kinds: Vec<tch::Kind> = Vec::new();
        let mut groups: Vec<Vec<Tensor>> = Vec::new();
        for (_, t) in &self.params {
            let Some(x) = f(t) else { continue };
            match kinds.iter().position(|k| *k == x.kind()) {
                Some(i) => groups[i].push(x),
                None => {
                    kinds.push(x.kind());
                    groups.push(vec![x]);
                }
            }
        }
        groups
    }

    /// Replaces every gradient with its mean over ranks: one all-reduce per dtype.
    ///
    /// # Errors
    /// `Distributed` naming a tensor without a gradient on this rank (every rank must have run a
    /// backward that reached every tensor), and the collective's errors.
    pub fn sync_gradients(&self) -> Result<()> {
        if let Some((name, _)) = self.params.iter().find(|(_, t)| !t.grad().defined()) {
            return Err(bad(
                "sync_gradients",
                format!("`{name}` has no gradient on rank {}", self.group.rank()),
            ));
        }
        for grads in self.by_kind(|t| Some(t.grad())) {
            let refs: Vec<&Tensor> = grads.iter().collect();
            self.group.all_reduce(&refs, ReduceOp::Average)?;
        }
        Ok(())
    }

    /// The tensors kept in step.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }
}

/// This rank's share of `items`: every `world_size`-th one from index `rank` (the same order on
/// every rank, so the shards are disjoint and cover everything).
pub fn shard<T: Clone>(items: &[T], rank: usize, world_size: usize) -> Vec<T> {
    items.iter().skip(rank).step_by(world_size.max(1)).cloned().collect()
}

/// Runs `f` on rank 0 only (a save, say), then waits for every rank: the others go on only
/// once rank 0 is done.
///
/// # Errors
/// `f`'s error on rank 0 (after the barrier, so that the other ranks are not left waiting), and
/// the barrier's.
pub fn on_rank0<R>(group: &ProcessGroup, f: impl FnOnce() -> Result<R>) -> Result<Option<R>> {
    let r = if group.rank() == 0 { Some(f()) } else { None };
    group.barrier()?;
    r.transpose()
}
