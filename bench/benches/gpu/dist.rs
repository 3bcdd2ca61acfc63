//! Data-parallel forms of the training step: a variant with a suffix, `lora+ddp` (DDP's Reducer,
//! default buckets), `+ddp-b1` / `+ddp-b5` / `+ddp-b100` (buckets of 1, 5, 100 MiB), `+ddp-bf16`
//! (its bf16 compression hook), `+ddp-nosync` (the Reducer made, every step inside `no_sync`: no
//! communication), `+flat` (one all-reduce after the backward), `+pertensor` (one all-reduce per
//! gradient after the backward: what never to do). Also `--only allreduce`: NCCL all-reduce
//! through the binding, 1 to 256 MB.
//!
//! The group comes from torchrun's environment (NCCL on `LOCAL_RANK`), else is a group of one
//! over a file store with NCCL on device 0; every rank runs the same per-rank batch (weak
//! scaling).

use std::sync::OnceLock;
use std::time::Duration;

use tch::Tensor;
use tch_peft::dist::{DataParallel, DdpOptions, DistributedDataParallel, GradCompression};
use tch_peft::dist::{ProcessGroup, ReduceOp, Rendezvous};

/// How a variant keeps its ranks in step.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Ddp(DdpOptions),
    DdpNoSync,
    Flat,
    PerTensor,
}

/// The variant without its suffix, and the mode the suffix names.
pub fn parse(variant: &str) -> (&str, Option<Mode>) {
    let Some((base, mode)) = variant.split_once('+') else { return (variant, None) };
    let cap = |mb: f64| Mode::Ddp(DdpOptions { bucket_cap_mb: mb, ..Default::default() });
    let mode = match mode {
        "ddp" => Mode::Ddp(DdpOptions::default()),
        "ddp-b1" => cap(1.0),
        "ddp-b5" => cap(5.0),
        "ddp-b100" => cap(100.0),
        "ddp-bf16" => {
            Mode::Ddp(DdpOptions { compression: GradCompression::Bf16, ..Default::default() })
        }
        "ddp-nosync" => Mode::DdpNoSync,
        "flat" => Mode::Flat,
        "pertensor" => Mode::PerTensor,
        other => panic!(
            "unknown data-parallel suffix `+{other}` (ddp, ddp-b1, ddp-b5, ddp-b100, ddp-bf16, \
             ddp-nosync, flat, pertensor)"
        ),
    };
    (base, Some(mode))
}

/// The process group of this run (made on first use).
pub fn group() -> &'static ProcessGroup {
    static GROUP: OnceLock<ProcessGroup> = OnceLock::new();
    GROUP.get_or_init(|| {
        let timeout = Duration::from_secs(300);
        if std::env::var_os("RANK").is_some() {
            return ProcessGroup::from_env(timeout).expect("group from torchrun's environment");
        }
        let dir = std::env::temp_dir().join(format!("tch-peft-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("store dir");
        let mut g = ProcessGroup::new(Rendezvous::File(dir.join("store")), 0, 1, timeout)
            .expect("group of one");
        g.add_nccl(0).expect("NCCL on cuda:0");
        g
    })
}

/// A step's data-parallel work around its forward and backward.
pub struct Dp {
    ddp: Option<DistributedDataParallel<'static>>,
    flat: Option<DataParallel<'static>>,
    nosync: bool,
    per_tensor: bool,
}

impl Dp {
    pub fn new(mode: Mode, vs: &tch::nn::VarStore) -> Dp {
        let g = group();
        let ddp = |o| Some(DistributedDataParallel::from_var_store(g, vs, o).expect("ddp"));
        let flat = || Some(DataParallel::from_var_store(g, vs).expect("flat"));
        let (ddp, flat, nosync, per_tensor) = match mode {
            Mode::Ddp(o) => (ddp(o), None, false, false),
            Mode::DdpNoSync => (ddp(DdpOptions::default()), None, true, false),
            Mode::Flat => (None, flat(), false, false),
            Mode::PerTensor => (None, flat(), false, true),
        };
        Dp { ddp, flat, nosync, per_tensor }
    }

    /// `f` on the DDP wrapper, inside `no_sync` for `+ddp-nosync`.
    fn with_ddp(
        &mut self,
        f: impl FnOnce(&mut DistributedDataParallel<'static>) -> tch_peft::Result<()>,
    ) {
        if let Some(d) = self.ddp.as_mut() {
            let r = if self.nosync { d.no_sync(f) } else { f(d) };
            r.expect("ddp");
        }
    }

    pub fn before_forward(&mut self) {
        self.with_ddp(|d| d.pre_forward());
    }

    /// After the forward, on its outputs (none for a checkpointed step's several backwards).
    pub fn after_forward(&mut self, outs: &[&Tensor]) {
        self.with_ddp(|d| d.post_forward(outs));
    }

    pub fn after_backward(&self) {
        let Some(f) = &self.flat else { return };
        if self.per_tensor {
            for (_, p) in f.params() {
                group().all_reduce(&[&p.grad()], ReduceOp::Average).expect("all_reduce");
            }
        } else {
            f.sync_gradients().expect("sync");
        }
    }
}

/// NCCL all-reduce (sum) of one f32 tensor of each size (MB) through the binding: (MB, the
/// median milliseconds of `steps` synchronised calls after `warmup`, the bus bandwidth in GB/s:
/// 2(n−1)/n × bytes ÷ time, NCCL's own measure, or bytes ÷ time at a world of one).
pub fn all_reduce_rows(sizes_mb: &[f64], warmup: usize, steps: usize) -> Vec<(f64, f64, f64)> {
    let g = group();
    let device = g.device();
    let n = g.world_size() as f64;
    let factor = if n > 1.0 { 2.0 * (n - 1.0) / n } else { 1.0 };
    sizes_mb
        .iter()
        .map(|&mb| {
            let t = Tensor::ones([(mb * 1e6 / 4.0) as i64], (tch::Kind::Float, device));
            let mut times = Vec::with_capacity(steps);
            for i in 0..warmup + steps {
                g.barrier().expect("barrier");
                crate::common::sync(device);
                let start = std::time::Instant::now();
                g.all_reduce(&[&t], ReduceOp::Sum).expect("all_reduce");
                crate::common::sync(device);
                if i >= warmup {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            (mb, ms, factor * mb * 1e6 / (ms * 1e-3) / 1e9)
        })
        .collect()
}
