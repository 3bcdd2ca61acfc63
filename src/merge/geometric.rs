//! The spherical and averaging methods on one tensor: SLERP, NuSLERP, Multi-SLERP, the Karcher
//! mean and Model Stock (mergekit 0.1.5's `slerp.py`, `nuslerp.py`, `multislerp.py`,
//! `karcher.py`, `model_stock.py`), each in the order of operations of its reference so that
//! f32 results agree to rounding.

use tch::{Kind, Tensor};

use super::methods::GlobalParams;
use crate::lora::compute_kind;
use crate::{Error, Result};

/// The most Karcher iterations a config may ask for.
pub const MAX_KARCHER_ITER: f64 = 10_000.0;

/// Karcher's `max_iter` as a count, or an error unless it is a whole number in
/// `0..=MAX_KARCHER_ITER`.
pub(crate) fn karcher_iterations(max_iter: f64) -> Result<u64> {
    if !(0.0..=MAX_KARCHER_ITER).contains(&max_iter) || max_iter.fract() != 0.0 {
        return Err(Error::config(
            "max_iter",
            format!("{max_iter} is not a whole number of iterations in 0..={MAX_KARCHER_ITER}"),
        ));
    }
    Ok(max_iter as u64)
}

/// Multi-SLERP's error for more than two inputs whose weighted unit vectors cancel.
pub(crate) fn multislerp_no_direction() -> Error {
    Error::config(
        "weight",
        "the weighted sum of the unit inputs is zero (antipodal inputs with balancing \
         weights); Multi-SLERP has no direction to interpolate around",
    )
}

/// The weights of `v₀` and `v₁` in their spherical interpolation by `t`, the cosine between
/// them `dot`: `sin((1 − t)θ)/sin θ` and `sin(tθ)/sin θ`, or `1 − t` and `t` when `colinear`.
pub(crate) fn slerp_coefficients(t: f64, dot: f64, colinear: bool) -> (f64, f64) {
    if colinear {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

/// NuSLERP's `t = w₂/(w₁+w₂)`, ½ when the weights cancel.
pub(crate) fn nuslerp_t(w1: f64, w2: f64) -> f64 {
    let total = w1 + w2;
    if total.abs() < 1e-6 {
        0.5
    } else {
        w2 / total
    }
}

fn norm2(x: &Tensor, dim: Option<i64>, keepdim: bool, kind: Option<Kind>) -> Result<Tensor> {
    let x = match kind {
        Some(k) => x.f_to_kind(k)?,
        None => x.shallow_clone(),
    };
    Ok(match dim {
        Some(d) => x.f_norm_scalaropt_dim(2, [d], keepdim)?,
        None => x.f_reshape([-1])?.f_norm_scalaropt_dim(2, [0], keepdim)?,
    })
}

/// `torch.where(cond, a, b)`.
fn select(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.f_where_self(cond, b)?)
}

/// mergekit's SLERP of two tensors (flattened), in f32 (f64 for f64).
pub fn slerp(t: f64, v0: &Tensor, v1: &Tensor) -> Result<Tensor> {
    let kind = compute_kind(v0.kind());
    let (a, b) = (v0.f_reshape([-1])?.f_to_kind(kind)?, v1.f_reshape([-1])?.f_to_kind(kind)?);
    if a.numel() == 0 {
        return Ok(v0.shallow_clone());
    }
    let norm = |x: &Tensor| -> Result<f64> {
        let n = x.f_square()?.f_sum(Kind::Double)?.f_sqrt()?.f_double_value(&[])?;
        Ok(if n > 1e-8 { n } else { 1.0 })
    };
    let (na, nb) = (norm(&a)?, norm(&b)?);
    let dot = a
        .f_div_scalar(na)?
        .f_mul(&b.f_div_scalar(nb)?)?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?
        .clamp(-1.0, 1.0);
    let (ca, cb) = slerp_coefficients(t, dot, dot.abs() > 0.9995);
    let out = a.f_mul_scalar(ca)?.f_add(&b.f_mul_scalar(cb)?)?;
    Ok(out.f_reshape(v0.size())?.f_to_kind(v0.kind())?)
}

/// Model Stock (mergekit's `model_stock_merge_method`): the interpolation ratio from the mean
/// pairwise cosine of the task vectors (per row with `filter_wise`).
pub(crate) fn model_stock(base: &Tensor, models: &[&Tensor], filter_wise: bool) -> Result<Tensor> {
    let shape = base.size();
    let kind = compute_kind(base.kind());
    let prep = |t: &Tensor| -> Result<Tensor> {
        let t = t.f_to_kind(kind)?;
        Ok(if filter_wise {
            if t.dim() == 1 {
                t.f_unsqueeze(0)?
            } else {
                t
            }
        } else {
            t.f_reshape([-1])?
        })
    };
    let w0 = prep(base)?;
    let ws: Vec<Tensor> = models.iter().map(|t| prep(t)).collect::<Result<_>>()?;
    let offsets: Vec<Tensor> =
        ws.iter().map(|w| w.f_sub(&w0)).collect::<std::result::Result<_, _>>()?;
    let mut cos = Vec::new();
    for i in 0..offsets.len() {
        for j in i + 1..offsets.len() {
            let (a, b) = (&offsets[i], &offsets[j]);
            let na = a.f_square()?.f_sum_dim_intlist(-1, false, kind)?.f_sqrt()?;
            let nb = b.f_square()?.f_sum_dim_intlist(-1, false, kind)?.f_sqrt()?;
            let dotp = a.f_mul(b)?.f_sum_dim_intlist(-1, false, kind)?;
            cos.push(dotp.f_div(&na.f_mul(&nb)?.f_clamp_min(1e-6)?)?.f_clamp(-1.0, 1.0)?);
        }
    }
    let cos = Tensor::f_stack(&cos, 0)?.f_mean_dim(0, false, kind)?.f_unsqueeze(-1)?;
    let n = ws.len() as f64;
    let denom = cos.f_mul_scalar(n - 1.0)?.f_add_scalar(1.0)?;
    let singular = denom.f_abs()?.f_lt(1e-6)?;
    let safe = denom.f_masked_fill(&singular, 1.0)?;
    let t = cos.f_mul_scalar(n)?.f_div(&safe)?.f_masked_fill(&singular, 0.0)?;
    let mut avg = ws[0].shallow_clone();
    for w in &ws[1..] {
        avg = avg.f_add(w)?;
    }
    let avg = avg.f_div_scalar(n)?;
    let one_minus = t.f_neg()?.f_add_scalar(1.0)?;
    let out = avg.f_mul(&t)?.f_add(&w0.f_mul(&one_minus)?)?;
    Ok(out.f_reshape(shape)?.f_to_kind(base.kind())?)
}

/// NuSLERP of `v0`, `v1` by `t` along the last dimension (each row a vector), after moving
/// `dim` there, or of the flattened tensors; linear where the vectors are colinear
/// (`1 − cos² ≤ 1e-16`). In the inputs' dtype.
fn nuslerp(t: f64, v0: &Tensor, v1: &Tensor, dim: i64, flatten: bool) -> Result<Tensor> {
    let shape = v0.size();
    let (a, b) = if flatten {
        (v0.f_reshape([-1])?, v1.f_reshape([-1])?)
    } else if dim != -1 {
        (v0.f_transpose(dim, -1)?, v1.f_transpose(dim, -1)?)
    } else {
        (v0.shallow_clone(), v1.shallow_clone())
    };
    let unit = |x: &Tensor| -> Result<Tensor> {
        Ok(x.f_div(&norm2(x, Some(-1), true, None)?.f_clamp_min(1e-7)?)?)
    };
    let cos =
        unit(&a)?.f_mul(&unit(&b)?)?.f_sum_dim_intlist(-1, true, a.kind())?.f_clamp(-1.0, 1.0)?;
    let colinear = cos.f_square()?.f_neg()?.f_add_scalar(1.0)?.f_le(1e-16)?;
    let theta = select(&colinear, &cos.f_zeros_like()?, &cos)?.f_arccos()?;
    let sin = theta.f_sin()?;
    let spherical = theta
        .f_mul_scalar(1.0 - t)?
        .f_sin()?
        .f_mul(&a)?
        .f_add(&theta.f_mul_scalar(t)?.f_sin()?.f_mul(&b)?)?
        .f_div(&sin)?;
    let lerp = a.f_mul_scalar(1.0 - t)?.f_add(&b.f_mul_scalar(t)?)?;
    let mut out = select(&colinear, &lerp, &spherical)?;
    if dim != -1 && !flatten {
        out = out.f_transpose(dim, -1)?;
    }
    Ok(out.f_reshape(shape)?)
}

/// NuSLERP of two models (`t = w₂/(w₁+w₂)`, ½ when the weights cancel), of their task vectors
/// when a base is given.
pub(crate) fn nuslerp_merge(
    base: Option<&Tensor>,
    tensors: &[&Tensor],
    weights: &[f64],
    g: &GlobalParams,
) -> Result<Tensor> {
    let t = nuslerp_t(weights[0], weights[1]);
    let dim = if g.nuslerp_row_wise { 0 } else { -1 };
    match base {
        Some(b) => Ok(b.f_add(&nuslerp(
            t,
            &tensors[0].f_sub(b)?,
            &tensors[1].f_sub(b)?,
            dim,
            g.nuslerp_flatten,
        )?)?),
        None => nuslerp(t, tensors[0], tensors[1], dim, g.nuslerp_flatten),
    }
}

/// Multi-SLERP (mergekit's `multislerp`): project the unit vectors on the tangent space at
/// their weighted mean direction, average there, map back, scale by the weighted mean norm.
pub(crate) fn multislerp(
    base: Option<&Tensor>,
    tensors: &[&Tensor],
    weights: &[f64],
    g: &GlobalParams,
) -> Result<Tensor> {
    if tensors.len() == 1 {
        return Ok(tensors[0].shallow_clone());
    }
    let n = tensors.len() as i64;
    let mut stacked = Tensor::f_stack(tensors, 0)?;
    if let Some(b) = base {
        stacked = stacked.f_sub(b)?;
    }
    let kind = stacked.kind();
    let shape = tensors[0].size();
    let flat = stacked.f_view([n, -1])?;
    let mut w = Tensor::from_slice(weights).f_to_kind(kind)?.f_to_device(stacked.device())?;
    if g.normalize_weights {
        w = w.f_div(&w.f_sum(kind)?)?;
    }
    let wcol = w.f_view([-1, 1])?;
    let norms = norm2(&flat, Some(-1), true, None)?;
    let unit = flat.f_div(&norms.f_add_scalar(g.eps)?)?;
    let mean = unit.f_mul(&wcol)?.f_sum_dim_intlist(0, false, kind)?;
    let mean_norm = norm2(&mean, None, false, None)?;
    if mean_norm.f_double_value(&[])? < g.eps {
        if n != 2 {
            return Err(multislerp_no_direction());
        }
        let w0 = w.f_get(0)?;
        let w1 = w.f_get(1)?;
        let mut res = stacked.f_get(0)?.f_mul(&w0)?.f_add(&stacked.f_get(1)?.f_mul(&w1)?)?;
        if let Some(b) = base {
            res = res.f_add(b)?;
        }
        return Ok(res.f_view(shape.as_slice())?);
    }
    let mean = mean.f_div(&mean_norm)?;
    let dots = unit.f_mul(&mean)?.f_sum_dim_intlist(-1, true, kind)?;
    let tangent = unit.f_sub(&dots.f_mul(&mean)?)?;
    let tr = tangent.f_mul(&wcol)?.f_sum_dim_intlist(0, false, kind)?;
    let tn = norm2(&tr, None, false, None)?.f_add_scalar(g.eps)?;
    let result = mean.f_mul(&tn.f_cos()?)?.f_add(&tr.f_mul(&tn.f_sin()?.f_div(&tn)?)?)?;
    let avg_norm = norms.f_squeeze_dim(-1)?.f_mul(&w)?.f_sum(kind)?;
    let mut result = result.f_mul(&avg_norm)?.f_view(shape.as_slice())?;
    if let Some(b) = base {
        result = result.f_add(b)?;
    }
    Ok(result)
}

/// The weighted Karcher mean on the unit sphere (mergekit's `karcher_merge_tensors`): start at
/// the normalised weighted mean of the unit inputs, step along the mean log map until its norm
/// is below `tol` or `max_iter` steps, scale by `Σ α_i ‖θ_i‖`. Inputs of norm ≤ `tol` take no
/// part in the direction.
pub(crate) fn karcher(
    tensors: &[&Tensor],
    alphas: &[f64],
    max_iter: f64,
    tol: f64,
) -> Result<Tensor> {
    let iterations = karcher_iterations(max_iter)?;
    if tensors.len() == 1 {
        return Ok(tensors[0].shallow_clone());
    }
    let kind = compute_kind(tensors[0].kind());
    let mut norms = Vec::with_capacity(tensors.len());
    let mut units = Vec::with_capacity(tensors.len());
    for t in tensors {
        let norm = norm2(&t.f_to_kind(kind)?, None, false, None)?;
        units.push(if norm.f_double_value(&[])? == 0.0 {
            t.f_zeros_like()?
        } else {
            t.f_div(&norm)?.f_to_kind(t.kind())?
        });
        norms.push(norm);
    }
    let valid: Vec<usize> =
        (0..tensors.len()).filter(|&i| norms[i].double_value(&[]) > tol).collect();
    if valid.is_empty() {
        return Ok(tensors[0].f_zeros_like()?);
    }
    let alpha_sum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    let alpha: Vec<f64> = valid.iter().map(|&i| alphas[i] / alpha_sum).collect();
    let us: Vec<&Tensor> = valid.iter().map(|&i| &units[i]).collect();
    let mut mean = us[0].f_zeros_like()?;
    for (a, u) in alpha.iter().zip(&us) {
        mean = mean.f_add(&u.f_mul_scalar(*a)?)?;
    }
    let mean_norm = norm2(&mean.f_to_kind(kind)?, None, false, None)?;
    let mut mean = if mean_norm.f_double_value(&[])? < tol {
        us[0].copy()
    } else {
        mean.f_div(&mean_norm)?.f_to_kind(mean.kind())?
    };
    for _ in 0..iterations {
        let mut tangent = mean.f_zeros_like()?;
        let flat_mean = mean.f_flatten(0, -1)?;
        for (a, u) in alpha.iter().zip(&us) {
            let dot = flat_mean.f_dot(&u.f_flatten(0, -1)?)?.f_clamp(-1.0, 1.0)?;
            let theta = dot.f_arccos()?;
            if theta.f_double_value(&[])? < tol {
                continue;
            }
            let coef = theta.f_div(&theta.f_sin()?)?.f_mul_scalar(*a)?;
            tangent = tangent.f_add(&coef.f_mul(&u.f_sub(&dot.f_mul(&mean)?)?)?)?;
        }
        let tn = norm2(&tangent.f_to_kind(kind)?, None, false, None)?;
        if tn.f_double_value(&[])? < tol {
            break;
        }
        mean = tn
            .f_cos()?
            .f_mul(&mean)?
            .f_add(&tn.f_sin()?.f_mul(&tangent.f_div(&tn)?)?)?
            .f_to_kind(mean.kind())?;
        let un = norm2(&mean.f_to_kind(kind)?, None, false, None)?;
        if un.f_double_value(&[])? > tol {
            mean = mean.f_div(&un)?.f_to_kind(mean.kind())?;
        }
    }
    let mut scale = Tensor::f_zeros([], (kind, mean.device()))?;
    for (a, nrm) in alphas.iter().zip(&norms) {
        scale = scale.f_add(&nrm.f_mul_scalar(*a)?)?;
    }
    Ok(scale.f_mul(&mean)?)
}
