//! [`FreezableBatchNorm`]: a BatchNorm whose running statistics can be frozen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn::{self, ModuleT};
use tch::Tensor;

/// A BatchNorm whose running statistics can be frozen: while frozen it normalises with the
/// stored statistics and never updates them, also in training mode (timm's `FrozenBatchNorm2d`;
/// a frozen backbone must not drift). Its affine weight and bias freeze through the store as
/// any other variable. Clones share the flag.
#[derive(Debug)]
pub struct FreezableBatchNorm {
    bn: nn::BatchNorm,
    frozen: Arc<AtomicBool>,
}

impl FreezableBatchNorm {
    /// Wraps a tch BatchNorm (trainable statistics until [`set_frozen`](Self::set_frozen)).
    pub fn new(bn: nn::BatchNorm) -> Self {
        FreezableBatchNorm { bn, frozen: Arc::new(AtomicBool::new(false)) }
    }

    /// Freezes or unfreezes the running statistics.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }

    /// Whether the running statistics are frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// The wrapped BatchNorm.
    pub fn inner(&self) -> &nn::BatchNorm {
        &self.bn
    }
}

impl ModuleT for FreezableBatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(xs, train && !self.is_frozen())
    }
}
