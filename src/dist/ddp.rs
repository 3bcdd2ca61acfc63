//! DDP's Reducer: bucketed gradient all-reduce that overlaps the backward.

use tch::Tensor;

use super::flat::{agree_and_broadcast, trainable};
use super::group::{bad, ProcessGroup};
use crate::{Error, Result};

/// How gradients travel in [`DistributedDataParallel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradCompression {
    /// In the gradients' dtype.
    #[default]
    None,
    /// Each bucket cast to bf16 (divided by the world size first) for the all-reduce and cast
    /// back, as PyTorch's `bf16_compress_hook`: half the bytes of f32, about 3 significant
    /// digits.
    Bf16,
}

/// The options of [`DistributedDataParallel`], with PyTorch DDP's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdpOptions {
    /// The size of a bucket in MiB (`bucket_cap_mb`, 25).
    pub bucket_cap_mb: f64,
    /// The size of the first bucket in MiB (`torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`, 1):
    /// the last gradients to arrive, so that little waits after the backward.
    pub first_bucket_cap_mb: f64,
    /// Gradients become views into the buckets (`gradient_as_bucket_view`): no copy and no
    /// second buffer. Between steps, zero them with
    /// [`DistributedDataParallel::zero_grad`] or drop them (`FusedAdamW::zero_grad`): tch's
    /// `nn::Optimizer::zero_grad` detaches in place, which views refuse.
    pub gradient_as_bucket_view: bool,
    /// Search the graph from the forward's outputs for parameters it did not use, and mark them
    /// ready (`find_unused_parameters`): needed when some parameters get no gradient in a step.
    pub find_unused_parameters: bool,
    /// The set of used parameters and their order do not change between steps
    /// (`static_graph`): what activation checkpointing needs, where a parameter's gradient can
    /// be accumulated twice in one backward.
    pub static_graph: bool,
    /// How buckets travel.
    pub compression: GradCompression,
}

impl Default for DdpOptions {
    fn default() -> Self {
        DdpOptions {
            bucket_cap_mb: 25.0,
            first_bucket_cap_mb: 1.0,
            gradient_as_bucket_view: false,
            find_unused_parameters: false,
            static_graph: false,
            compression: GradCompression::None,
        }
    }
}

/// One bucket of gradients all-reduced together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// The parameters in it.
    pub params: usize,
    /// Their elements.
    pub numel: usize,
}

/// PyTorch's `DistributedDataParallel` for the trainable tensors of any method (LoRA, DoRA,
/// ReFT, a freeze plan's unfrozen weights, full fine-tuning), on c10d's own `Reducer`.
///
/// Every rank starts from rank 0's values (checked equal in count, dtype and shape first). In
/// each backward, as the gradients of a bucket are ready (autograd hooks on the parameters'
/// gradient accumulators), the bucket's all-reduce starts while the backward goes on; when the
/// backward returns, every gradient is its mean over ranks. The first step uses one bucket;
/// after it the buckets are rebuilt in the order the gradients became ready (`bucket_cap_mb`,
/// the first `first_bucket_cap_mb`), as DDP does.
///
/// Wrap each forward in [`forward`](Self::forward) (or call [`pre_forward`](Self::pre_forward)
/// and [`post_forward`](Self::post_forward) around it); gradient accumulation runs its
/// micro-steps inside [`no_sync`](Self::no_sync):
///
/// ```no_run
/// # fn main() -> tch_peft::Result<()> {
/// # use std::time::Duration;
/// use tch_peft::dist::{DdpOptions, DistributedDataParallel, ProcessGroup};
/// # let (x, y) = (tch::Tensor::zeros([1], tch::kind::FLOAT_CPU), tch::Tensor::zeros([1], tch::kind::FLOAT_CPU));
/// # let loss_of = |x: &tch::Tensor, y: &tch::Tensor| x - y;
/// let group = ProcessGroup::from_env(Duration::from_secs(300))?; // NCCL where CUDA is
/// let adapters = tch::nn::VarStore::new(group.device());
/// // … the model and its adapters in `adapters` …
/// let mut ddp = DistributedDataParallel::from_var_store(&group, &adapters, DdpOptions::default())?;
/// // accumulate one micro-batch without communication, then the last one with it
/// ddp.no_sync(|ddp| -> tch_peft::Result<()> {
///     ddp.forward(|| loss_of(&x, &y))?.backward();
///     Ok(())
/// })?;
/// ddp.forward(|| loss_of(&x, &y))?.backward(); // all-reduced during this backward
/// // optimizer.step() on every rank
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DistributedDataParallel<'g> {
    group: &'g ProcessGroup,
    params: Vec<(String, Tensor)>,
    options: DdpOptions,
    #[cfg(tch_peft_dist)]
    reducer: crate::sys::ReducerHandle,
    sync: bool,
    rebuilt: bool,
}

impl<'g> DistributedDataParallel<'g> {
    /// Over `params` (named leaves that require grad, on the group's device: the same names,
    /// shapes and dtypes on every rank, in the same order), with `options` (the same on every
    /// rank): checked across ranks, overwritten with rank 0's values, and hooked.
    ///
    /// # Errors
    /// `Distributed`, on every rank, when any rank has no tensors, a tensor that is not a leaf
    /// requiring grad or not on the CPU or the group's NCCL device, bucket caps outside 1
    /// byte–64 GiB, or other options, count, names, shapes or dtypes than rank 0 (naming the
    /// first tensor that differs); `Distributed` for a failed collective.
    pub fn new(
        group: &'g ProcessGroup,
        params: Vec<(String, Tensor)>,
        options: DdpOptions,
    ) -> Result<Self> {
        // problems of this rank's own are reported on every rank (agree_and_broadcast)
        let mut local = None;
        if params.is_empty() {
            local = Some("no tensors to keep in step".to_string());
        } else if let Some((name, _)) =
            params.iter().find(|(_, t)| !t.requires_grad() || !t.is_leaf())
        {
            local = Some(format!("`{name}` is not a leaf that requires grad"));
        }
        let bytes = |mb: f64| -> Option<i64> {
            let b = mb * 1048576.0;
            (b.is_finite() && (1.0..=(64u64 << 30) as f64).contains(&b)).then_some(b as i64)
        };
        let (cap, first) = (bytes(options.bucket_cap_mb), bytes(options.first_bucket_cap_mb));
        if cap.is_none() || first.is_none() {
            local.get_or_insert_with(|| {
                format!(
                    "bucket caps of {} and {} MiB (1 byte to 64 GiB)",
                    options.bucket_cap_mb, options.first_bucket_cap_mb
                )
            });
        }
        let (cap, first) = (cap.unwrap_or(-1), first.unwrap_or(-1));
        let flags = [
            options.gradient_as_bucket_view,
            options.find_unused_parameters,
            options.static_graph,
            options.compression == GradCompression::Bf16,
        ];
        let mut extra = vec![cap, first];
        extra.extend(flags.iter().map(|&f| i64::from(f)));
        agree_and_broadcast(group, &params, 1, &extra, local)?;
        #[cfg(tch_peft_dist)]
        {
            let refs: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
            let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            let o = crate::sys::ReducerOptions {
                bucket_cap_bytes: cap,
                first_bucket_cap_bytes: first,
                gradient_as_bucket_view: options.gradient_as_bucket_view,
                find_unused: options.find_unused_parameters,
                static_graph: options.static_graph,
                bf16_compress: options.compression == GradCompression::Bf16,
            };
            let reducer = crate::sys::ReducerHandle::new(&group.handle, &refs, &names, o)
                .map_err(|e| bad("DistributedDataParallel", e.to_string()))?;
            Ok(DistributedDataParallel {
                group,
                params,
                options,
                reducer,
                sync: true,
                rebuilt: false,
            })
        }
        #[cfg(not(tch_peft_dist))]
        unreachable!("no group exists without the binding")
    }

    /// Over the trainable variables of `vs` (those that require grad), in name order.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_var_store(
        group: &'g ProcessGroup,
        vs: &tch::nn::VarStore,
        options: DdpOptions,
    ) -> Result<Self> {
        Self::new(group, trainable(vs), options)
    }

    fn failed(&self, what: &str, e: tch::TchError) -> Error {
        let mut reason = e.to_string();
        if reason.contains("find_unused_parameters=True") {
            reason.push_str(
                "\n(in tch-peft: DdpOptions { find_unused_parameters: true, .. }, or every \
                 parameter used in every step)",
            );
        }
        bad(format!("DistributedDataParallel::{what} (rank {})", self.group.rank()), reason)
    }

    /// Runs the forward `f` between [`pre_forward`](Self::pre_forward) and
    /// [`post_forward`](Self::post_forward) on its output, which it returns (the loss, or what
    /// the loss is computed from).
    ///
    /// # Errors
    /// As those two.
    pub fn forward(&mut self, f: impl FnOnce() -> Tensor) -> Result<Tensor> {
        self.pre_forward()?;
        let out = f();
        self.post_forward(&[&out])?;
        Ok(out)
    }

    /// DDP's work before a forward: readies the Reducer for a synchronised backward (unless in
    /// [`no_sync`](Self::no_sync)) and, once, after the first step, rebuilds the buckets in the
    /// order the gradients arrived. Does nothing in no-grad mode.
    ///
    /// # Errors
    /// `Distributed` when the last synchronised backward did not finish its reduction (a
    /// parameter got no gradient without `find_unused_parameters`; the message names it), or the
    /// rebuild's collective fails.
    pub fn pre_forward(&mut self) -> Result<()> {
        #[cfg(tch_peft_dist)]
        {
            let rebuilt =
                self.reducer.pre_forward(self.sync).map_err(|e| self.failed("pre_forward", e))?;
            self.rebuilt |= rebuilt;
        }
        Ok(())
    }

    /// DDP's work after a forward, on its outputs: the next backward through them all-reduces
    /// the gradients (unless in [`no_sync`](Self::no_sync)); with `find_unused_parameters` the
    /// graph behind them is searched for parameters it does not reach.
    ///
    /// # Errors
    /// `Distributed` from the Reducer.
    pub fn post_forward(&mut self, outputs: &[&Tensor]) -> Result<()> {
        #[cfg(tch_peft_dist)]
        self.reducer
            .post_forward(outputs, self.sync)
            .map_err(|e| self.failed("post_forward", e))?;
        #[cfg(not(tch_peft_dist))]
        let _ = outputs;
        Ok(())
    }

    /// Runs `f` (micro-steps of gradient accumulation) without communication: the gradients of
    /// the forwards inside it only accumulate locally, and the first synchronised backward after
    /// it all-reduces the accumulated sums (PyTorch's `no_sync`).
    pub fn no_sync<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let old = std::mem::replace(&mut self.sync, false);
        // restored even when `f` panics
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *self)));
        self.sync = old;
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Zeroes every gradient in place (PyTorch's `zero_grad(set_to_none=False)`), keeping them
    /// views of the buckets under `gradient_as_bucket_view`.
    pub fn zero_grad(&self) {
        let _guard = tch::no_grad_guard();
        for (_, t) in &self.params {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Whether forwards now lead to synchronised backwards (false inside
    /// [`no_sync`](Self::no_sync)).
    pub fn is_synced(&self) -> bool {
        self.sync
    }

    /// The buckets, in the order they are all-reduced.
    ///
    /// # Errors
    /// `Distributed` from the Reducer.
    pub fn buckets(&self) -> Result<Vec<Bucket>> {
        #[cfg(tch_peft_dist)]
        return Ok(self
            .reducer
            .buckets()
            .map_err(|e| self.failed("buckets", e))?
            .into_iter()
            .map(|(params, numel)| Bucket { params, numel })
            .collect());
        #[cfg(not(tch_peft_dist))]
        unreachable!("no group exists without the binding")
    }

    /// Whether the buckets have been rebuilt in ready order (after the first step).
    pub fn buckets_rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// The tensors kept in step.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The options it was made with.
    pub fn options(&self) -> &DdpOptions {
        &self.options
    }

    /// The group.
    pub fn group(&self) -> &'g ProcessGroup {
        self.group
    }
}
