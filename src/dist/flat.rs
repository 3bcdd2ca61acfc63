//! The flat path: one all-reduce per dtype after the backward.

use tch::Tensor;

use super::group::{bad, ProcessGroup, ReduceOp};
use crate::Result;

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
        agree_and_broadcast(group, &params, &[])?;
        Ok(DataParallel { group, params })
    }

    /// Over the trainable variables of `vs`, in name order.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_var_store(group: &'g ProcessGroup, vs: &tch::nn::VarStore) -> Result<Self> {
        Self::new(group, trainable(vs))
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
        for grads in by_kind(&self.params, |t| Some(t.grad())) {
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

/// The trainable variables of `vs` (those that require grad), in name order.
pub(crate) fn trainable(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// Checks that every rank has `params` of the same count, dtypes and shapes as rank 0 (and the
/// same `extra` values: options), then overwrites them with rank 0's values.
pub(crate) fn agree_and_broadcast(
    group: &ProcessGroup,
    params: &[(String, Tensor)],
    extra: &[i64],
) -> Result<()> {
    for (name, t) in params {
        group.check_device(|| format!("`{name}`"), t.device())?;
    }

    // rank 0's signature against ours: count, then per tensor its dtype and up to 8 dims
    const SLOTS: usize = 10;
    let mut head = vec![params.len() as i64];
    head.extend_from_slice(extra);
    let count = Tensor::from_slice(&head);
    let theirs = count.copy();
    group.broadcast(&[&theirs], 0)?;
    if Vec::<i64>::try_from(&theirs)?[1..] != head[1..] {
        return Err(bad(
            "data parallel",
            format!("rank {} was given other options than rank 0", group.rank()),
        ));
    }
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
            return Err(bad("data parallel", format!("`{name}` has {} dimensions", size.len())));
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
    for ts in by_kind(params, |t| Some(t.shallow_clone())) {
        let refs: Vec<&Tensor> = ts.iter().collect();
        group.broadcast(&refs, 0)?;
    }
    Ok(())
}

/// The tensors, grouped by dtype (each group in order), mapped by `f` (skipped where `None`).
fn by_kind(params: &[(String, Tensor)], f: impl Fn(&Tensor) -> Option<Tensor>) -> Vec<Vec<Tensor>> {
    let mut kinds: Vec<tch::Kind> = Vec::new();
    let mut groups: Vec<Vec<Tensor>> = Vec::new();
    for (_, t) in params {
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
