//! How `R` keeps orthonormal rows: the `[d, r]` matrix `Rᵀ` with orthonormal columns,
//! parametrised so that every optimizer step stays on the manifold.
//!
//! Why this parametrisation: pyreft uses `torch.nn.utils.parametrizations.orthogonal`
//! (Householder products for a non-square matrix), rebuilt at every forward from `r` sequential
//! reflections — its authors name it the main training bottleneck (pyreft issue #63). A QR
//! retraction after each step would be cheap but only holds if the caller never forgets it.
//! Here the trainable variable is an unconstrained `V: [d, r]` and the forward uses its
//! orthonormal factor by **CholeskyQR2**: `G = VᵀV = L Lᵀ`, `Q₁ = V L⁻ᵀ`, then once more on `Q₁`
//! (the second pass restores orthogonality to rounding level for any reasonably conditioned `V`).
//! That is two `[d, r]ᵀ[d, r]` Gram products, two `r × r` Cholesky factorisations and two
//! triangular solves — `O(d r²)`, a handful of small kernels, no host synchronisation
//! (`linalg_cholesky_ex` does not check), differentiable end to end, and exact by construction
//! after any number of steps. The result equals the `Q` of the QR decomposition of `V` with a
//! positive `R` diagonal, so the map is onto the whole Stiefel manifold.

use tch::{Kind, Tensor};

use crate::Result;

/// One CholeskyQR pass: `V L⁻ᵀ` with `L Lᵀ = VᵀV`.
fn cholesky_qr(v: &Tensor) -> Result<Tensor> {
    let gram = v.f_tr()?.f_mm(v)?;
    let (l, _info) = gram.f_linalg_cholesky_ex(false, false)?;
    // solve X Lᵀ = V for X (right side, upper = Lᵀ)
    Ok(l.f_tr()?.f_linalg_solve_triangular(v, true, false, false)?)
}

/// The orthonormal-column factor of `v: [d, r]` (CholeskyQR2; see the module docs).
pub fn orthonormalize(v: &Tensor) -> Result<Tensor> {
    cholesky_qr(&cholesky_qr(v)?)
}

/// `‖QᵀQ − I‖_max` of a `[d, r]` matrix, in f64 (a check; syncs).
pub fn orthonormality_error(q: &Tensor) -> Result<f64> {
    let q = q.f_to_kind(Kind::Double)?;
    let r = q.size()[1];
    let eye = Tensor::f_eye(r, (Kind::Double, q.device()))?;
    Ok(q.f_tr()?.f_mm(&q)?.f_sub(&eye)?.f_abs()?.f_max()?.f_double_value(&[])?)
}

/// A random `[d, r]` matrix with orthonormal columns (`torch.nn.init.orthogonal_` of a tall
/// matrix: the `Q` of a Gaussian matrix's QR, signs fixed by `R`'s diagonal).
pub fn random_orthonormal(d: i64, r: i64, opts: (Kind, tch::Device)) -> Result<Tensor> {
    let g = Tensor::f_randn([d, r], opts)?;
    let (q, rr) = Tensor::f_linalg_qr(&g, "reduced")?;
    let signs = rr.f_diagonal(0, 0, 1)?.f_sign()?;
    Ok(q.f_mul(&signs.f_unsqueeze(0)?)?)
}

/// The `[d, r]` matrix torch's `parametrizations.orthogonal` materialises (Householder map with
/// trivialisation, pyreft's `rotate_layer.weight`) from its saved `original: [d, r]` and
/// `base: [d, d]`: `base · (H(tril₋₁(original), τ) · diag(sign))`, `τ_j = 2 / (1 + ‖a_j‖²)`.
pub fn from_torch_householder(original: &Tensor, base: &Tensor) -> Result<Tensor> {
    let a = original.f_tril(-1)?;
    let tau = a
        .f_square()?
        .f_sum_dim_intlist(0, false, a.kind())?
        .f_add_scalar(1.0)?
        .f_reciprocal()?
        .f_mul_scalar(2.0)?;
    let q = Tensor::f_linalg_householder_product(&a, &tau)?;
    // torch multiplies by X's diagonal cast to int (its entries are ±1)
    let signs = original.f_diagonal(0, 0, 1)?.f_to_kind(Kind::Int)?.f_to_kind(a.kind())?;
    Ok(base.f_mm(&q.f_mul(&signs.f_unsqueeze(0)?)?)?)
}
