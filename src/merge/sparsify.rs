//! The sparsification and sign-consensus steps that adapter combination (PEFT's
//! `add_weighted_adapter`, [`crate::lora::TaskMerge`]) and checkpoint merging (mergekit's TIES,
//! DARE and their kin, [`crate::merge::merge_tensor`]) share, written once:
//!
//! * magnitude pruning: keep the `k` entries of largest `|t|`;
//! * DARE's random drop: a Bernoulli(`density`) keep-mask (the callers rescale by `1/density`
//!   or to the L1 norm, as their reference does);
//! * TIES's sign election over tensors stacked on dim 0: `majority = +1` where the election
//!   value is ≥ 0 (ties go positive), else −1, and a mask of the entries that agree with it
//!   (zeros never agree).
//!
//! The references differ in what they elect from (PEFT: the unweighted pruned tensors; mergekit:
//! the weighted deltas) and how they average afterwards; the callers keep those differences.

use tch::{Kind, Tensor};

use crate::Result;

/// How TIES-style merges elect the sign of each entry (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the values (`"total"`, the default; mergekit's only rule).
    #[default]
    Total,
    /// The sign held by more tensors (`"frequency"`).
    Frequency,
}

/// How the entries of largest magnitude are picked: the references use different ops, which
/// can break ties between equal magnitudes (common in bf16) differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ranking {
    /// `torch.topk` (PEFT's `magnitude_based_pruning`).
    TopK,
    /// `torch.argsort(descending=True)[:k]` (mergekit's `sparsify.magnitude`).
    ArgSort,
}

/// A mask of `t`'s shape and dtype with 1 at the `k` entries of largest magnitude (ranked in
/// `score_kind`, picked as `ranking` says), 0 elsewhere; `k` is clamped to `[0, numel]`.
pub(crate) fn magnitude_mask(
    t: &Tensor,
    k: i64,
    score_kind: Kind,
    ranking: Ranking,
) -> Result<Tensor> {
    let n = t.numel() as i64;
    let flat = t.f_reshape([-1])?;
    let mask = flat.f_zeros_like()?;
    let k = k.clamp(0, n);
    if k == 0 {
        return Ok(mask.f_reshape(t.size())?);
    }
    let scores = flat.f_abs()?.f_to_kind(score_kind)?;
    let idx = match ranking {
        Ranking::TopK => scores.f_topk(k, 0, true, true)?.1,
        Ranking::ArgSort => scores.f_argsort(0, true)?.f_narrow(0, 0, k)?,
    };
    Ok(mask.f_index_fill(0, &idx, 1.0)?.f_reshape(t.size())?)
}

/// A Bernoulli keep-mask of `t`'s shape on its device, each entry 1 with probability `density`,
/// in `kind`.
pub(crate) fn random_mask(t: &Tensor, density: f64, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_full(t.size(), density, (kind, t.device()))?.f_bernoulli()?)
}

/// TIES's sign election over `x` (tensors stacked on dim 0): the mask (in `x`'s dtype) of the
/// entries whose sign is the majority's.
pub(crate) fn sign_consensus_mask(x: &Tensor, rule: MajoritySign) -> Result<Tensor> {
    let kind = x.kind();
    let signs = x.f_sign()?;
    let election = match rule {
        MajoritySign::Total => x.f_sum_dim_intlist(0, false, kind)?,
        MajoritySign::Frequency => signs.f_sum_dim_intlist(0, false, kind)?,
    };
    let majority = election.f_ge(0.0)?.f_to_kind(kind)?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?;
    Ok(signs.f_eq_tensor(&majority)?.f_to_kind(kind)?)
}

/// DELLA's keep-mask of `rows` (≥ 2 dims; ranked along dim 1) in `kind`: entry `j` of a row
/// is kept with probability `density − ε + 2ε·(rank_j − 1)/(n − 1)`, its rank by magnitude
/// (1 the smallest) — mergekit's `della_magprune`, op for op, so that the same generator state
/// draws the same mask.
pub(crate) fn della_mask(rows: &Tensor, density: f64, epsilon: f64, kind: Kind) -> Result<Tensor> {
    let order = rows.f_abs()?.f_argsort(1, false)?;
    let ranks = order.f_argsort(1, false)?.f_to_kind(kind)?.f_add_scalar(1)?;
    let (min, _) = ranks.f_min_dim(1, true)?;
    let (max, _) = ranks.f_max_dim(1, true)?;
    let norm = ranks.f_sub(&min)?.f_div(&max.f_sub(&min)?)?.f_clamp(0.0, 1.0)?;
    let probs = norm.f_mul_scalar(2)?.f_mul_scalar(epsilon)?.f_add_scalar(density - epsilon)?;
    Ok(probs.f_bernoulli()?.f_to_kind(kind)?)
}
