//! How LoRA factors start (PEFT's `init_lora_weights`): kaiming-uniform A with zero B (the
//! default), gaussian, random B, orthogonal, and the randomized SVD behind `pissa_niter_K`.
//! PiSSA and OLoRA, which need the loaded base weight, finish in
//! [`LoraLinear::init_from_base_weights`](super::LoraLinear::init_from_base_weights).

use std::sync::atomic::Ordering;

use tch::{Kind, Tensor};

use super::linear::LoraLinear;
use super::merge::compute_kind;
use crate::Error;

use crate::lora::config::LoraInit;
use crate::Result;

/// `lora_A: [r, in]` and `lora_B: [out, r]` as PEFT initialises them (see [`LoraInit`]).
pub(crate) fn init_factors(
    init: LoraInit,
    r: i64,
    in_features: i64,
    out_features: i64,
    opts: (Kind, tch::Device),
) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        // PyTorch's kaiming_uniform_(a=√5) on a [r, in] weight: U(±1/√in)
        let bound_in = 1.0 / (in_features as f64).sqrt();
        let a = match init {
            // PiSSA/OLoRA start as kaiming/zero and are set by `init_from_base_weights`
            LoraInit::Kaiming
            | LoraInit::Random
            | LoraInit::Pissa
            | LoraInit::PissaNiter(_)
            | LoraInit::Olora => {
                Tensor::empty([r, in_features], opts).uniform_(-bound_in, bound_in)
            }
            LoraInit::Gaussian => {
                Tensor::empty([r, in_features], opts).normal_(0.0, 1.0 / r as f64)
            }
            LoraInit::Orthogonal => return orthogonal_factors(r, in_features, out_features, opts),
        };
        let b = match init {
            LoraInit::Random => {
                let bound_r = 1.0 / (r as f64).sqrt();
                Tensor::empty([out_features, r], opts).uniform_(-bound_r, bound_r)
            }
            LoraInit::Kaiming
            | LoraInit::Gaussian
            | LoraInit::Orthogonal
            | LoraInit::Pissa
            | LoraInit::PissaNiter(_)
            | LoraInit::Olora => Tensor::zeros([out_features, r], opts),
        };
        (a, b)
    })
}

/// PEFT's orthogonal init: with `Q` a random orthogonal `r×r` matrix,
/// `A = (randn(in, r/2) · Q[0::2])ᵀ / 10` and `B = (randn(r/2, out)ᵀ · Q[1::2]) / 10`; rows of `Q`
/// are orthonormal, so `BA = 0`. `r` must be even (checked by the config).
fn orthogonal_factors(
    r: i64,
    in_features: i64,
    out_features: i64,
    opts: (Kind, tch::Device),
) -> (Tensor, Tensor) {
    let (q, _) = Tensor::linalg_qr(&Tensor::randn([r, r], opts), "reduced");
    let idx = |start: i64| Tensor::arange_start_step(start, r, 2, (Kind::Int64, opts.1));
    let (set1, set2) = (q.index_select(0, &idx(0)), q.index_select(0, &idx(1)));
    let a = Tensor::randn([in_features, r / 2], opts).mm(&set1).tr().contiguous() / 10.0;
    let b = Tensor::randn([r / 2, out_features], opts).tr().mm(&set2) / 10.0;
    (a, b)
}

/// A rank-`q` SVD of `a: [m, n]` by randomized subspace iteration (Halko et al. 2011, as
/// `torch.svd_lowrank(a, q, niter)` without centring or oversampling): `(U [m, q], S [q],
/// V [n, q])`.
pub(crate) fn svd_lowrank(a: &Tensor, q: i64, niter: u32) -> Result<(Tensor, Tensor, Tensor)> {
    let n = a.size()[1];
    let orth = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::f_linalg_qr(t, "reduced")?.0) };
    let g = Tensor::f_randn([n, q], (a.kind(), a.device()))?;
    let mut basis = orth(&a.f_mm(&g)?)?;
    for _ in 0..niter {
        let z = orth(&a.f_tr()?.f_mm(&basis)?)?;
        basis = orth(&a.f_mm(&z)?)?;
    }
    let small = basis.f_tr()?.f_mm(a)?; // [q, n]
    let (u, s, v) = small.f_svd(true, true)?;
    Ok((basis.f_mm(&u)?, s, v))
}

impl LoraLinear {
    /// Runs the initialisation that depends on the pre-trained base weight, as PEFT does when it
    /// attaches the adapter: PiSSA/OLoRA derive `A` and `B` from `W` and leave the residual
    /// `W − s·BA` in the base weight (once: a layer already initialised keeps its factors), and
    /// DoRA sets its magnitude to `‖W + s·BA‖_row`. Layers wrapped with [`new`](Self::new) run it
    /// at construction; layers built by [`LoraBuilder`](crate::lora::LoraBuilder) create their base
    /// weight themselves, so call this (or
    /// [`LoraAdapter::init_from_base_weights`](crate::lora::LoraAdapter::init_from_base_weights)) once
    /// the pre-trained weights are loaded, unless a trained adapter is loaded instead. A no-op for
    /// the other inits.
    pub fn init_from_base_weights(&self) -> Result<()> {
        if self.is_merged() {
            return Err(Error::MergeState { module: self.module.clone(), state: "already merged" });
        }
        let _guard = tch::no_grad_guard();
        let _base = self.state.merge.base_lock().write();
        let ready = self.state.base_init_done.load(Ordering::Acquire);
        if self.init.uses_base_weight() && !ready {
            // a 4-bit base is refused these inits at construction
            let Some(base) = self.base.dense() else {
                return Err(Error::Unsupported {
                    field: "init_lora_weights".into(),
                    reason: format!("`{}` has a 4-bit base", self.module),
                });
            };
            let w = &base.ws;
            let compute = compute_kind(w.kind());
            let wf = w.f_to_kind(compute)?;
            let (a, b) = match self.init {
                LoraInit::Pissa | LoraInit::PissaNiter(_) => {
                    // reduced SVD W = U·diag(S)·Vᵀ (tch's linalg_svd cannot pass "no driver")
                    let (u, sv, v) = match self.init {
                        LoraInit::PissaNiter(k) => svd_lowrank(&wf, self.r, k)?,
                        _ => wf.f_svd(true, true)?,
                    };
                    let sr = (sv.f_narrow(0, 0, self.r)? / self.scaling).f_sqrt()?;
                    let a = v.f_narrow(1, 0, self.r)?.f_tr()?.f_mul(&sr.f_unsqueeze(1)?)?;
                    let b = u.f_narrow(1, 0, self.r)?.f_mul(&sr.f_unsqueeze(0)?)?;
                    (a, b)
                }
                _ => {
                    let (q, r) = Tensor::f_linalg_qr(&wf, "reduced")?;
                    (r.f_narrow(0, 0, self.r)?, q.f_narrow(1, 0, self.r)?)
                }
            };
            let residual = wf.f_sub(&b.f_mm(&a)?.f_mul_scalar(self.scaling)?)?;
            self.lora_a.shallow_clone().f_copy_(&a)?;
            self.lora_b.shallow_clone().f_copy_(&b)?;
            w.shallow_clone().f_copy_(&residual)?;
        }
        if let Some(m) = &self.magnitude {
            self.dora_init_magnitude(m)?;
        }
        self.set_base_init_done(true);
        Ok(())
    }
}
