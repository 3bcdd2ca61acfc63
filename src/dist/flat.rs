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
    /// `Distributed`, on every rank, when any rank has another count, names, shapes or dtypes
    /// than rank 0 (naming the first tensor that differs) or a tensor off the group's devices;
    /// and the collectives' errors.
    pub fn new(group: &'g ProcessGroup, params: Vec<(String, Tensor)>) -> Result<Self> {
        agree_and_broadcast(group, &params, 0, &[], None)?;
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

/// What a rank's check against rank 0 found.
fn verdict(group: &ProcessGroup, problem: Option<String>) -> Result<()> {
    // every rank learns how many ranks found a problem, so that all of them return together
    let bad = Tensor::from_slice(&[i64::from(problem.is_some())]);
    group.all_reduce(&[&bad], ReduceOp::Sum)?;
    let n = bad.int64_value(&[0]);
    match problem {
        Some(p) => Err(bad_err(p)),
        None if n > 0 => Err(bad_err(format!(
            "{n} rank(s) disagree with rank 0 (their errors name what differs); rank {} agrees",
            group.rank()
        ))),
        None => Ok(()),
    }
}

fn bad_err(reason: String) -> crate::Error {
    bad("data parallel", reason)
}

/// FNV-1a of a name, as an `i64` slot.
fn name_hash(name: &str) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    h as i64
}

/// Checks that every rank has `params` of the same count, names, dtypes and shapes as rank 0,
/// for the same kind of wrapper with the same `extra` values (options), and no `local` problem
/// of its own; then overwrites them with rank 0's values. A problem on any rank is an error on
/// every rank (after two small collectives), never a rank left waiting.
pub(crate) fn agree_and_broadcast(
    group: &ProcessGroup,
    params: &[(String, Tensor)],
    wrapper: i64,
    extra: &[i64],
    local: Option<String>,
) -> Result<()> {
    const EXTRA: usize = 8;
    const SLOTS: usize = 11; // name hash, dtype, rank, 8 dims
    let mut problem = local;
    for (name, t) in params {
        if problem.is_some() {
            break;
        }
        if let Err(e) = group.check_device(|| format!("`{name}`"), t.device()) {
            problem = Some(e.to_string());
        } else if t.dim() > SLOTS - 3 {
            problem = Some(format!("`{name}` has {} dimensions", t.dim()));
        }
    }
    // 1. the header: wrapper, count, options (fixed size, whatever the rank was given)
    let mut head = vec![0i64; 2 + EXTRA];
    head[0] = wrapper;
    head[1] = params.len() as i64;
    for (slot, v) in head[2..].iter_mut().zip(extra.iter().chain(std::iter::repeat(&-1))) {
        *slot = *v;
    }
    if extra.len() > EXTRA {
        problem.get_or_insert_with(|| format!("{} option slots", extra.len()));
    }
    let rank0 = Tensor::from_slice(&head);
    group.broadcast(&[&rank0], 0)?;
    let rank0: Vec<i64> = Vec::<i64>::try_from(&rank0)?;
    if problem.is_none() && rank0[0] != head[0] {
        problem = Some(format!("rank {} made another wrapper than rank 0", group.rank()));
    } else if problem.is_none() && rank0[2..] != head[2..] {
        problem = Some(format!("rank {} was given other options than rank 0", group.rank()));
    } else if problem.is_none() && rank0[1] != head[1] {
        problem = Some(format!(
            "rank {} has {} tensors, rank 0 {}",
            group.rank(),
            params.len(),
            rank0[1]
        ));
    }
    verdict(group, problem)?;
    // 2. per tensor (the counts agree now): its name, dtype and shape
    let mut sig = vec![-1i64; params.len() * SLOTS];
    for (i, (name, t)) in params.iter().enumerate() {
        let size = t.size();
        sig[i * SLOTS] = name_hash(name);
        sig[i * SLOTS + 1] = t.kind() as i64;
        sig[i * SLOTS + 2] = size.len() as i64;
        sig[i * SLOTS + 3..i * SLOTS + 3 + size.len()].copy_from_slice(&size);
    }
    let rank0 = Tensor::from_slice(&sig);
    group.broadcast(&[&rank0], 0)?;
    let rank0: Vec<i64> = Vec::<i64>::try_from(&rank0)?;
    let problem = params.iter().enumerate().find_map(|(i, (name, t))| {
        let (mine, theirs) = (&sig[i * SLOTS..(i + 1) * SLOTS], &rank0[i * SLOTS..(i + 1) * SLOTS]);
        (mine != theirs).then(|| {
            let what = if mine[0] != theirs[0] { "another name" } else { "another shape or dtype" };
            format!(
                "tensor {i}, `{name}`, is {:?} {:?} on rank {}; rank 0 has {what} there",
                t.kind(),
                t.size(),
                group.rank()
            )
        })
    });
    verdict(group, problem)?;
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
