//! AdamW for many small tensors: [`FusedAdamW`] updates every parameter of a device and dtype in
//! a couple of kernel launches (ATen's multi-tensor `_fused_adamw_`, what
//! `torch.optim.AdamW(fused=True)` runs), where tch's `nn::AdamW` (libtorch's C++ optimizer)
//! launches about eight kernels per parameter. For LoRA on every linear layer of a 16-block
//! model that is 224 parameters: thousands of launches per step, which on a GPU cost more host
//! time than the adapter's arithmetic (`docs/PERFORMANCE.md`, issue 7).
//!
//! Same update as PyTorch's AdamW (decoupled weight decay; defaults β = (0.9, 0.999),
//! ε = 1e-8, weight decay 0.01, as tch's `nn::AdamW`); optimizer state in each parameter's dtype
//! (as PyTorch); gradients dropped rather than zeroed by [`zero_grad`](FusedAdamW::zero_grad)
//! (PyTorch's `set_to_none=True`). Parameters without a gradient in a step are skipped (their
//! step count does not advance), as in PyTorch.
//!
//! ```
//! use tch::{nn, Device, Kind};
//! use tch_peft::optim::FusedAdamW;
//! let vs = nn::VarStore::new(Device::Cpu);
//! let w = vs.root().randn("w", &[4, 3], 0.0, 1.0);
//! let mut opt = FusedAdamW::from_var_store(&vs, 1e-2)?;
//! let before = w.copy();
//! let loss = w.square().sum(Kind::Float);
//! opt.backward_step(&loss)?;
//! assert!((&w - &before).abs().max().double_value(&[]) > 0.0);
//! # Ok::<(), tch_peft::Error>(())
//! ```

use std::collections::BTreeMap;

use tch::{nn, Device, Kind, Tensor};

use crate::{Error, Result};

/// One parameter and its state.
#[derive(Debug)]
struct Slot {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// An f32 scalar on the parameter's device (the fused kernel reads it there).
    step: Tensor,
    /// The host copy of the step count (the composed fallback's bias corrections).
    host_step: i64,
}

/// AdamW over a fixed list of parameters, fused per device and dtype. See the [module
/// docs](self).
#[derive(Debug)]
pub struct FusedAdamW {
    slots: Vec<Slot>,
    /// Slot indices per (device, dtype) group.
    groups: Vec<Vec<usize>>,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    fused: bool,
}

fn device_key(d: Device) -> i64 {
    match d {
        Device::Cuda(i) => i as i64,
        _ => -1,
    }
}

impl FusedAdamW {
    /// AdamW over `params` (each must be a floating-point leaf tensor that requires grad) at
    /// learning rate `lr`, with PyTorch's defaults for the rest.
    pub fn new(params: impl IntoIterator<Item = Tensor>, lr: f64) -> Result<Self> {
        let mut slots = Vec::new();
        let mut by_group: BTreeMap<(i64, String), Vec<usize>> = BTreeMap::new();
        for (i, p) in params.into_iter().enumerate() {
            if !crate::lora::is_float(p.kind()) {
                return Err(Error::DtypeMismatch {
                    name: format!("parameter {i}"),
                    expected: "a floating-point kind".into(),
                    actual: p.kind(),
                });
            }
            if !p.requires_grad() {
                return Err(Error::config(
                    "params",
                    format!("parameter {i} does not require grad (frozen variables cannot train)"),
                ));
            }
            let state = || Tensor::zeros_like(&p).set_requires_grad(false);
            let key = (device_key(p.device()), format!("{:?}", p.kind()));
            by_group.entry(key).or_default().push(slots.len());
            slots.push(Slot {
                exp_avg: state(),
                exp_avg_sq: state(),
                step: Tensor::zeros([], (Kind::Float, p.device())),
                host_step: 0,
                param: p,
            });
        }
        Ok(FusedAdamW {
            slots,
            groups: by_group.into_values().collect(),
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            fused: cfg!(tch_peft_csrc),
        })
    }

    /// AdamW over the variables of `vs` that require grad now.
    pub fn from_var_store(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        let mut vars: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(vars.into_iter().map(|(_, t)| t), lr)
    }

    /// Sets β₁ and β₂ (each in `[0, 1)`).
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return Err(Error::config("betas", format!("({beta1}, {beta2}) must lie in [0, 1)")));
        }
        self.betas = (beta1, beta2);
        Ok(self)
    }

    /// Sets ε (> 0).
    pub fn eps(mut self, eps: f64) -> Result<Self> {
        if eps.is_nan() || eps <= 0.0 {
            return Err(Error::config("eps", format!("{eps} must be positive")));
        }
        self.eps = eps;
        Ok(self)
    }

    /// Sets the decoupled weight decay (≥ 0).
    pub fn weight_decay(mut self, weight_decay: f64) -> Result<Self> {
        if weight_decay.is_nan() || weight_decay < 0.0 {
            return Err(Error::config("weight_decay", format!("{weight_decay} must be ≥ 0")));
        }
        self.weight_decay = weight_decay;
        Ok(self)
    }

    /// Uses the composed per-parameter update instead of the fused kernel (same values; for
    /// measurements and tests).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused && cfg!(tch_peft_csrc);
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// How many parameters it updates.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether it updates nothing.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Drops every parameter's gradient (PyTorch's `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        #[cfg(tch_peft_csrc)]
        crate::sys::grads_to_none(self.slots.iter().map(|s| &s.param));
        #[cfg(not(tch_peft_csrc))]
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// One AdamW step over the parameters that have a gradient.
    pub fn step(&mut self) -> Result<()> {
        let (b1, b2) = self.betas;
        for g in 0..self.groups.len() {
            let live: Vec<(usize, Tensor)> = self.groups[g]
                .iter()
                .filter_map(|&i| {
                    let grad = self.slots[i].param.grad();
                    grad.defined().then_some((i, grad))
                })
                .collect();
            if live.is_empty() {
                continue;
            }
            if self.fused {
                self.fused_step(&live)?;
            } else {
                let _guard = tch::no_grad_guard();
                for (i, grad) in &live {
                    let s = &mut self.slots[*i];
                    s.host_step += 1;
                    let _ = s.step.f_add_scalar_(1.0)?;
                    let t = s.host_step as i32;
                    let mut p = s.param.shallow_clone();
                    let _ = p.f_mul_scalar_(1.0 - self.lr * self.weight_decay)?;
                    let _ = s.exp_avg.f_lerp_(grad, 1.0 - b1)?;
                    let _ = s
                        .exp_avg_sq
                        .f_mul_scalar_(b2)?
                        .f_addcmul_(&grad.f_mul_scalar(1.0 - b2)?, grad)?;
                    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                    let denom =
                        s.exp_avg_sq.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(self.eps)?;
                    let _ = p.f_addcdiv_(&s.exp_avg.f_mul_scalar(-self.lr / bc1)?, &denom)?;
                }
            }
        }
        Ok(())
    }

    #[cfg(tch_peft_csrc)]
    fn fused_step(&mut self, live: &[(usize, Tensor)]) -> Result<()> {
        let slots = &self.slots;
        let tensors: Vec<[&Tensor; 5]> = live
            .iter()
            .map(|(i, g)| {
                let s = &slots[*i];
                [&s.param, g, &s.exp_avg, &s.exp_avg_sq, &s.step]
            })
            .collect();
        let hyper = crate::sys::AdamWHyper {
            lr: self.lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            weight_decay: self.weight_decay,
            eps: self.eps,
        };
        crate::sys::fused_adamw(&tensors, &hyper)?;
        for (i, _) in live {
            self.slots[*i].host_step += 1;
        }
        Ok(())
    }

    #[cfg(not(tch_peft_csrc))]
    fn fused_step(&mut self, _live: &[(usize, Tensor)]) -> Result<()> {
        Err(Error::Unsupported {
            field: "fused".into(),
            reason: "the fused AdamW kernel was not compiled in (no libtorch headers)".into(),
        })
    }

    /// `zero_grad`, `loss.backward()`, `step`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }
}
