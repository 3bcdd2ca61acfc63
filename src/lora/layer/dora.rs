//! DoRA (Liu et al. 2024, <https://arxiv.org/abs/2402.09353>) on a linear layer: the weight
//! `W + s·BA` split into a trainable per-row magnitude `m` and the direction
//! `(W + s·BA) / ‖W + s·BA‖_row`, the norm detached as in PEFT.
//!
//! DoRA is a variant of [`LoraLinear`] (PEFT's `DoraLinearVariant`): a layer with a magnitude
//! vector hands each step that DoRA changes to this file — the magnitude's creation and its
//! initialisation from the loaded base, the merged weight, the composed forward (without and with
//! dropout) — and keeps everything else (factors, scaling, merge state, the fused node, which
//! takes DoRA members as well) in common with LoRA. The row norm is computed without forming
//! `W + s·BA`.

use tch::nn;
use tch::Tensor;

use super::linear::LoraLinear;
use super::merge::compute_kind;
use crate::Result;

/// The trainable magnitude `lora_magnitude_vector: [out]` of a new DoRA layer, registered under
/// `p`, initialised to `‖W + s·BA‖_row` in the adapters' dtype (f32, f64 on an f64 base).
pub(super) fn new_magnitude(
    p: &nn::Path,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Result<Tensor> {
    let kind = compute_kind(w.kind());
    let norm = tch::no_grad(|| dora_weight_norm(w, a, b, s).and_then(|n| Ok(n.f_to_kind(kind)?)))?;
    Ok(p.add("lora_magnitude_vector", norm, true))
}

/// `‖W + s·BA‖` per output row, in f32 (f64 for an f64 base), without forming `W + s·BA`:
/// `‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ`, from an `[out, r]` and an `[r, r]` product.
/// Callers run it under `no_grad` (DoRA detaches the norm).
pub(crate) fn dora_weight_norm(w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    dora_weight_norm_with(&dora_row_sq(w)?, w, a, b, s)
}

/// `‖W_i‖²` per row in the compute kind (f32 for half types).
pub(crate) fn dora_row_sq(w: &Tensor) -> Result<Tensor> {
    let kind = compute_kind(w.kind());
    Ok(w.f_to_kind(kind)?.f_square()?.f_sum_dim_intlist(1, false, kind)?)
}

/// `‖W + s·BA‖` per row from `‖W_i‖²` (`w_sq`): `‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ`,
/// without forming the `[out, in]` matrix. On a bf16/f16 CUDA weight, `W Aᵀ` reads `W` in its
/// own dtype rather than an f32 copy: A (f32) is split into a half-precision head and tail
/// (`A = A_hi + A_lo` to about 2⁻¹⁶ relative) and two GEMMs accumulate in f32.
pub(crate) fn dora_weight_norm_with(
    w_sq: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Result<Tensor> {
    let kind = compute_kind(w.kind());
    let (a, b) = (a.f_to_kind(kind)?, b.f_to_kind(kind)?);
    let wa = if w.kind() != kind && w.device().is_cuda() {
        // five launches: head, tail (the subtraction promotes to f32), its cast, two GEMMs
        let hi = a.f_to_kind(w.kind())?;
        let lo = a.f_sub(&hi)?.f_to_kind(w.kind())?;
        w.f_mm_dtype(&hi.f_tr()?, kind)?.f_addmm_dtype(w, &lo.f_tr()?, kind)?
    } else {
        w.f_to_kind(kind)?.f_mm(&a.f_tr()?)?
    };
    let cross = wa.f_mul(&b)?.f_sum_dim_intlist(1, false, kind)?;
    let ba_sq = b.f_mm(&a.f_mm(&a.f_tr()?)?)?.f_mul(&b)?.f_sum_dim_intlist(1, false, kind)?;
    let sq = w_sq.f_add(&cross.f_mul_scalar(2.0 * s)?)?.f_add(&ba_sq.f_mul_scalar(s * s)?)?;
    // rounding can take an exactly-zero row slightly negative
    Ok(sq.f_clamp_min(0.0)?.f_sqrt()?)
}

impl LoraLinear {
    /// The magnitude set from the (loaded) base weight: `m = ‖W + s·BA‖_row`.
    pub(super) fn dora_init_magnitude(&self, m: &Tensor) -> Result<()> {
        let w = self.base_weight(tch::Kind::Float)?;
        let norm = dora_weight_norm(&w, self.lora_a(), self.lora_b(), self.scaling())?;
        m.shallow_clone().f_copy_(&norm.f_to_kind(m.kind())?)?;
        Ok(())
    }

    /// DoRA's merged weight from the merged LoRA weight `W + s·BA` (in the compute kind):
    /// `m / ‖W + s·BA‖_row` times it, the norm of the unmerged weight.
    pub(super) fn dora_merged(&self, m: &Tensor, merged: &Tensor) -> Result<Tensor> {
        let w = self.base_weight(tch::Kind::Float)?;
        let norm = dora_weight_norm(&w, self.lora_a(), self.lora_b(), self.scaling())?;
        let g = m.f_to_kind(merged.kind())?.f_div(&norm)?.f_unsqueeze(1)?;
        Ok(merged.f_mul(&g)?)
    }

    /// DoRA's branch added to the base output `y` for the dropped-out input `x_d` with
    /// `h = s·x_d Aᵀ` and B in the activations' dtype:
    /// `y + (g − 1)·(x_d Wᵀ) + g·(h Bᵀ)`, `g = m / ‖W + s·BA‖_row` (detached norm).
    pub(super) fn dora_add_delta(
        &self,
        m: &Tensor,
        xd: &Tensor,
        h: &Tensor,
        b: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        let norm = self.dora_norm()?;
        let g = m.f_div(&norm.f_to_kind(m.kind())?)?.f_to_kind(y.kind())?;
        let xd_w = xd.f_linear::<Tensor>(&self.base_weight(xd.kind())?, None)?;
        let adapted = xd_w.f_addmm(h, &b.f_tr()?)?;
        Ok(y.f_sub(&xd_w)?.f_addcmul(&adapted, &g)?)
    }

    /// DoRA as PEFT computes it, with `g = m / ‖W + s·BA‖_row` (norm detached) and `x_d` the
    /// dropped-out input:
    /// `y = x Wᵀ + b + (g − 1)·(x_d Wᵀ) + g·s·(x_d Aᵀ) Bᵀ`, i.e. `g·(x Wᵀ + s x Aᵀ Bᵀ) + b` without
    /// dropout.
    pub(super) fn dora_forward(
        &self,
        x2: &Tensor,
        m: &Tensor,
        bias: Option<&Tensor>,
        dropout: bool,
    ) -> Result<Tensor> {
        // `f_forward_t` has checked the base initialisation
        let kind = x2.kind();
        let norm = self.dora_norm()?;
        let g = m.f_div(&norm.f_to_kind(m.kind())?)?.f_to_kind(kind)?; // [out], grad to m
        let cast =
            |t: &Tensor| if t.kind() == kind { Ok(t.shallow_clone()) } else { t.f_to_kind(kind) };
        let (a, b) = (cast(self.lora_a())?, cast(self.lora_b())?);
        let xd = if dropout { x2.f_dropout(self.dropout, true)? } else { x2.shallow_clone() };
        let h = xd.f_mm(&a.f_tr()?)?.f_mul_scalar(self.scaling())?; // [N, r]
        let w = self.base_weight(kind)?;
        let y = if dropout {
            // base + (g − 1)·(x_d Wᵀ) + g·s·x_d Aᵀ Bᵀ = base − x_d Wᵀ + g·(x_d Wᵀ + s·x_d Aᵀ Bᵀ)
            let base = x2.f_linear(&w, bias)?;
            let xd_w = xd.f_linear::<Tensor>(&w, None)?;
            let adapted = xd_w.f_addmm(&h, &b.f_tr()?)?;
            base.f_sub(&xd_w)?.f_addcmul(&adapted, &g)?
        } else {
            // g·(x Wᵀ + s·x Aᵀ Bᵀ) + b: one accumulate in place, one fused scale-and-add
            let mut adapted = x2.f_linear::<Tensor>(&w, None)?;
            let _ = adapted.f_addmm_(&h, &b.f_tr()?)?;
            match bias {
                Some(bs) => bs.f_addcmul(&adapted, &g)?,
                None => adapted.f_mul(&g)?,
            }
        };
        Ok(y)
    }
}
