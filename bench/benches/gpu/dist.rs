//! Data-parallel forms of the training step: a variant with a suffix, `lora+ddp` (DDP's Reducer,
//! default buckets), `+ddp-bf16` (its bf16 compression hook), `+ddp-nosync` (the Reducer made,
//! every step inside `no_sync`: no communication), `+flat` (one all-reduce after the backward).
//! The group comes from torchrun's environment (NCCL on `LOCAL_RANK`), else is a group of one
//! over a file store with NCCL on device 0; every rank runs the same per-rank batch (weak
//! scaling).

use std::sync::OnceLock;
use std::time::Duration;

use tch::Tensor;
use tch_peft::dist::{DataParallel, DdpOptions, DistributedDataParallel, GradCompression};
use tch_peft::dist::{ProcessGroup, Rendezvous};

/// How a variant keeps its ranks in step.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Ddp(DdpOptions),
    DdpNoSync,
    Flat,
}

/// The variant without its suffix, and the mode the suffix names.
pub fn parse(variant: &str) -> (&str, Option<Mode>) {
    let Some((base, mode)) = variant.split_once('+') else { return (variant, None) };
    let mode = match mode {
        "ddp" => Mode::Ddp(DdpOptions::default()),
        "ddp-bf16" => {
            Mode::Ddp(DdpOptions { compression: GradCompression::Bf16, ..Default::default() })
        }
        "ddp-nosync" => Mode::DdpNoSync,
        "flat" => Mode::Flat,
        other => {
            panic!("unknown data-parallel suffix `+{other}` (ddp, ddp-bf16, ddp-nosync, flat)")
        }
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
}

impl Dp {
    pub fn new(mode: Mode, vs: &tch::nn::VarStore) -> Dp {
        let g = group();
        let ddp = |o| Some(DistributedDataParallel::from_var_store(g, vs, o).expect("ddp"));
        match mode {
            Mode::Ddp(o) => Dp { ddp: ddp(o), flat: None, nosync: false },
            Mode::DdpNoSync => Dp { ddp: ddp(DdpOptions::default()), flat: None, nosync: true },
            Mode::Flat => Dp {
                ddp: None,
                flat: Some(DataParallel::from_var_store(g, vs).expect("flat")),
                nosync: false,
            },
        }
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
        if let Some(f) = &self.flat {
            f.sync_gradients().expect("sync");
        }
    }
}
