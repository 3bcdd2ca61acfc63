//! Data-parallel training on PyTorch's own distributed engine, c10d: a process group with gloo
//! for CPU tensors (in `libtorch_cpu`; `csrc/dist_gloo.cpp`) and NCCL for CUDA tensors (in
//! `libtorch_cuda`; `csrc/dist_nccl.cpp`, where NCCL's headers were found at build time),
//! rendezvous through a TCP or a file store or the environment `torchrun` sets, and DDP's
//! `Reducer` (`csrc/dist_reducer.cpp`).
//!
//! ```text
//! one process per rank:  ProcessGroup::from_env(timeout)   RANK, WORLD_SIZE, MASTER_ADDR, …
//!   DistributedDataParallel::new(&group, params, options)  rank 0's values everywhere
//!   ddp.forward(|| loss)?.backward()     buckets all-reduced while the backward runs
//!   DataParallel::sync_gradients()       or: one flat all-reduce after the backward
//! ```
//!
//! Every wait is bounded by the group's timeout: a rank that never arrives is an
//! [`Error::Distributed`](crate::Error::Distributed) naming the store, not a hang (on CUDA, as
//! in PyTorch, NCCL's watchdog enforces it). Tensors are reduced in buckets or as one flat
//! buffer, never one collective per tensor.
//! `docs/DISTRIBUTED.md` says how to launch with `torchrun`.

mod ddp;
mod flat;
mod group;

pub use ddp::{Bucket, DdpOptions, DistributedDataParallel, GradCompression};
pub use flat::DataParallel;
pub use group::{nccl_available, ProcessGroup, ReduceOp, Rendezvous};

use crate::Result;

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
