//! The cross-entropy of a linear head, fused: the loss a language model trains on, without the
//! `[tokens, vocab]` logits held in memory (for a Llama-3 head at 8192 tokens those are 4.2 GB
//! in f32, and as much again for their gradient).
//!
//! ```text
//! loss = Σ_{i : yᵢ ≠ ignore} (logsumexp_v zᵢᵥ − zᵢ,yᵢ) / d        z = h Wᵀ + b
//! ```
//!
//! with `d` the number of rows not ignored ([`Reduction::Mean`], torch's and transformers'
//! default) or 1 ([`Reduction::Sum`]). The logits are formed in the head's dtype and reduced in
//! f32, as transformers' `ForCausalLMLoss` upcasts them.
//!
//! How: rows go in chunks; for each chunk the logits, their softmax and the gradients of `h`,
//! `W` and `b` (those that need one) are formed at once and the chunk's logits dropped (the
//! method of Liger's fused linear cross-entropy). The backward only scales the saved gradients
//! by the upstream one. Without the crate's C++ (a `doc-only` build) the same loss comes from
//! composed ops over the full logits.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// How the per-token losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Their mean over the rows not ignored (NaN when every row is ignored, as torch's).
    Mean,
    /// Their sum.
    Sum,
}

/// Options of [`linear_cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearCrossEntropy {
    /// Label of rows left out of the loss (transformers: -100).
    pub ignore_index: i64,
    /// How the per-token losses are reduced.
    pub reduction: Reduction,
    /// Rows per chunk; `None` picks Liger's size: the power of two at or above
    /// `tokens / ⌈vocab / hidden⌉`, so that a chunk's logits are about the size of the hidden
    /// states — but at least [`HEAD_GRAD_CHUNK_ROWS`] rows (or all of them) when a CUDA
    /// bf16/f16 head's weight takes a gradient, whose f32 accumulator `[vocab, hidden]` is read
    /// and written once per chunk.
    pub chunk_rows: Option<i64>,
}

/// The fewest rows per chunk [`LinearCrossEntropy::chunk_rows`]'s default takes when the head's
/// weight trains: each chunk adds its `gᵀ·h` into the f32 `[V, H]` gradient, and below about
/// this many rows that read-and-write costs more than the chunk's GEMM (`docs/PERFORMANCE.md`
/// has the H200 figures).
pub const HEAD_GRAD_CHUNK_ROWS: i64 = 2048;

impl Default for LinearCrossEntropy {
    fn default() -> Self {
        LinearCrossEntropy { ignore_index: -100, reduction: Reduction::Mean, chunk_rows: None }
    }
}

/// The cross-entropy of `hidden · weightᵀ (+ bias)` against `labels`, without the full logits.
///
/// `hidden` `[N, H]` (floating point), `weight` `[V, H]` and `bias` `[V]` of the same kind and
/// device, `labels` `[N]` int64 on that device, each in `[0, V)` or `ignore_index`. Returns an
/// f32 scalar that backpropagates into `hidden`, `weight` and `bias` (those that require a
/// gradient). Shapes, kinds, devices and label ranges are checked (typed errors; the label check
/// reads one flag back from the device).
///
/// ```no_run
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// use tch_peft::ops::{linear_cross_entropy, LinearCrossEntropy};
/// let h = Tensor::randn([16, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let head = Tensor::randn([1000, 64], (Kind::Float, Device::Cpu));
/// let labels = Tensor::randint(1000, [16], (Kind::Int64, Device::Cpu));
/// let loss = linear_cross_entropy(&h, &head, None, &labels, &LinearCrossEntropy::default())?;
/// loss.backward();
/// # Ok(()) }
/// ```
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &Tensor,
    opts: &LinearCrossEntropy,
) -> Result<Tensor> {
    let (n, h) = match hidden.size()[..] {
        [n, h] => (n, h),
        _ => return Err(shape("hidden", vec![-1, -1], hidden)),
    };
    let v = match weight.size()[..] {
        [v, wh] if wh == h && v >= 1 => v,
        _ => return Err(shape("weight", vec![-1, h], weight)),
    };
    if !hidden.is_floating_point() {
        return Err(Error::DtypeMismatch {
            name: "hidden".into(),
            expected: "a floating-point kind".into(),
            actual: hidden.kind(),
        });
    }
    let same = |name: &str, t: &Tensor| -> Result<()> {
        if t.kind() != hidden.kind() {
            return Err(Error::DtypeMismatch {
                name: name.into(),
                expected: format!("{:?} (the hidden states' kind)", hidden.kind()),
                actual: t.kind(),
            });
        }
        if t.device() != hidden.device() {
            return Err(Error::DeviceMismatch {
                name: name.into(),
                expected: hidden.device(),
                actual: t.device(),
            });
        }
        Ok(())
    };
    same("weight", weight)?;
    if let Some(b) = bias {
        same("bias", b)?;
        if b.size() != [v] {
            return Err(shape("bias", vec![v], b));
        }
    }
    if labels.size() != [n] {
        return Err(shape("labels", vec![n], labels));
    }
    check_int64_labels(labels)?;
    if labels.device() != hidden.device() {
        return Err(Error::DeviceMismatch {
            name: "labels".into(),
            expected: hidden.device(),
            actual: labels.device(),
        });
    }
    let outside = labels
        .f_ne(opts.ignore_index)?
        .f_logical_and(&labels.f_lt(0)?.f_logical_or(&labels.f_ge(v)?)?)?
        .f_any()?;
    if outside.f_int64_value(&[])? != 0 {
        return Err(Error::TokenOutOfRange { input: "labels", vocab_size: v });
    }
    let chunk = match opts.chunk_rows {
        Some(c) if c >= 1 => c,
        Some(c) => {
            return Err(Error::InvalidConfig {
                field: "chunk_rows".into(),
                reason: format!("{c} is not a positive number of rows"),
            })
        }
        None => {
            let factor = (v + h - 1) / h.max(1);
            let rows = ((n + factor - 1) / factor.max(1)).clamp(1, 1 << 40);
            let rows = (rows as u64).next_power_of_two() as i64;
            if head_trains(weight) {
                rows.max(HEAD_GRAD_CHUNK_ROWS)
            } else {
                rows
            }
        }
    };
    fused_or_composed(hidden, weight, bias, labels, opts, chunk)
}

/// Whether the loss will backpropagate into a CUDA bf16/f16 head's weight (the case where the
/// dW accumulation's traffic is what a small chunk costs; elsewhere a chunk is an f32 copy, and
/// a larger one only costs memory).
fn head_trains(weight: &Tensor) -> bool {
    if !(weight.device().is_cuda() && matches!(weight.kind(), Kind::BFloat16 | Kind::Half)) {
        return false;
    }
    #[cfg(tch_peft_csrc)]
    let grad_mode = crate::sys::grad_enabled();
    #[cfg(not(tch_peft_csrc))]
    let grad_mode = true;
    grad_mode && weight.requires_grad()
}

/// The crate's node where its C++ was compiled, else [`composed`].
fn fused_or_composed(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &Tensor,
    opts: &LinearCrossEntropy,
    chunk: i64,
) -> Result<Tensor> {
    #[cfg(tch_peft_csrc)]
    {
        let mean = opts.reduction == Reduction::Mean;
        let ignore = opts.ignore_index;
        Ok(crate::sys::linear_cross_entropy(hidden, weight, bias, labels, ignore, chunk, mean)?)
    }
    #[cfg(not(tch_peft_csrc))]
    {
        let _ = chunk;
        composed(hidden, weight, bias, labels, opts)
    }
}

/// The same loss over the full logits, in composed ops (the reference of the tests, and the
/// path without the crate's C++).
#[doc(hidden)]
pub fn composed(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &Tensor,
    opts: &LinearCrossEntropy,
) -> Result<Tensor> {
    let mut logits = hidden.f_matmul(&weight.f_tr()?)?;
    if let Some(b) = bias {
        logits = logits.f_add(b)?;
    }
    let reduction = match opts.reduction {
        Reduction::Mean => tch::Reduction::Mean,
        Reduction::Sum => tch::Reduction::Sum,
    };
    Ok(logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
        labels,
        None,
        reduction,
        opts.ignore_index,
        0.0,
    )?)
}

/// A causal language model's loss as transformers' `ForCausalLMLoss` computes it: position `t`
/// predicts label `t + 1` (labels shifted left, the last position of each sequence ignored),
/// over the head `weight` (`bias`), through [`linear_cross_entropy`].
///
/// `hidden` `[B, T, H]` (the final norm's output), `labels` `[B, T]` int64 (usually the input
/// ids, with `ignore_index` on padding).
pub fn causal_lm_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &Tensor,
    opts: &LinearCrossEntropy,
) -> Result<Tensor> {
    let (b, t, h) = match hidden.size()[..] {
        [b, t, h] => (b, t, h),
        _ => return Err(shape("hidden", vec![-1, -1, -1], hidden)),
    };
    let shifted = shifted_labels(labels, vec![b, t], opts)?;
    linear_cross_entropy(&hidden.f_reshape([-1, h])?, weight, bias, &shifted, opts)
}

/// The labels `[B·T]` a causal LM's positions predict: `labels` `[B, T]` (int64, checked to be
/// `batch_seq`) shifted left by one, `opts.ignore_index` at each sequence's last position
/// (transformers' `ForCausalLMLoss` shift), flattened to match `[B·T, V]` logits.
pub fn shifted_labels(
    labels: &Tensor,
    batch_seq: Vec<i64>,
    opts: &LinearCrossEntropy,
) -> Result<Tensor> {
    if labels.size() != batch_seq || batch_seq.len() != 2 {
        return Err(shape("labels", batch_seq, labels));
    }
    check_int64_labels(labels)?;
    let (b, t) = (batch_seq[0], batch_seq[1]);
    let pad = Tensor::f_full([b, 1], opts.ignore_index, (Kind::Int64, labels.device()))?;
    let shifted = Tensor::f_cat(&[labels.f_narrow(1, 1, (t - 1).max(0))?, pad], 1)?;
    Ok(shifted.f_narrow(1, 0, t)?.f_reshape([-1])?)
}

/// Labels are token ids: int64 (a narrower kind would be promoted silently by the shift).
fn check_int64_labels(labels: &Tensor) -> Result<()> {
    if labels.kind() != Kind::Int64 {
        return Err(Error::DtypeMismatch {
            name: "labels".into(),
            expected: "Int64".into(),
            actual: labels.kind(),
        });
    }
    Ok(())
}

fn shape(name: &str, expected: Vec<i64>, t: &Tensor) -> Error {
    Error::ShapeMismatch { name: name.into(), expected, actual: t.size() }
}
