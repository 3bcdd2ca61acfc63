//! How `R` keeps orthonormal rows: the `[d, r]` matrix `Rᵀ` with orthonormal columns.
//!
//! pyreft uses `torch.nn.utils.parametrizations.orthogonal` (Householder products for a
//! non-square matrix), rebuilt in every forward from `r` sequential reflections; its authors
//! name it the main training bottleneck (pyreft issue #63). Two choices here
//! ([`Orthogonality`]):
//!
//! * **Retraction** (the default): the forward uses the variable `V` itself as `Rᵀ`, and after
//!   each optimizer step [`retract`] puts it back on the manifold: `V ← Q` of its QR
//!   decomposition (signs fixed so that an orthonormal `V` maps to itself). The forward and
//!   backward cost nothing beyond the intervention's own matmuls, and the retraction is one
//!   batched QR per step for all interventions (`ReftModel::step` does both). This is the usual
//!   projected-gradient scheme on the Stiefel manifold; it needs the retraction call, which
//!   `ReftModel::step` makes.
//! * **Parametrized**: the variable is an unconstrained `V` and every forward uses its
//!   orthonormal factor by **CholeskyQR2** ([`orthonormalize`]): `G = VᵀV = L Lᵀ`,
//!   `Q₁ = V L⁻ᵀ`, once more on `Q₁`. Exact after any number of steps without any call, and
//!   differentiable; but the `r × r` Cholesky factorisations and triangular solves are tiny
//!   library calls that cost about 1.5 ms per intervention and step on an H200 (measured,
//!   docs/PERFORMANCE.md): acceptable on a CPU, too slow on a GPU with many layers.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::Result;

/// How an intervention's `R` keeps orthonormal rows (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Orthogonality {
    /// `R` is the variable, re-orthonormalised by a QR retraction after each optimizer step.
    #[default]
    Retraction,
    /// `R` is CholeskyQR2 of an unconstrained variable, in every forward.
    Parametrized,
}

/// `v ← Q` of `v`'s reduced QR decomposition with `R`'s diagonal made positive, in place and
/// without gradient; `v` may be one `[d, r]` matrix or a batch `[n, d, r]`.
pub fn retract(v: &Tensor) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let (q, r) = Tensor::f_linalg_qr(v, "reduced")?;
    let signs = r.f_diagonal(0, -2, -1)?.f_sign()?;
    // a zero diagonal entry (rank-deficient v) keeps its column as QR gives it
    let signs = signs.f_add(&signs.f_eq(0.0)?.f_to_kind(signs.kind())?)?;
    let q = q.f_mul(&signs.f_unsqueeze(-2)?)?;
    v.shallow_clone().f_copy_(&q)?;
    Ok(())
}

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
