//! mergekit 0.1.5's merge methods on one tensor (`mergekit/merge_methods/`, `sparsify.py`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::sparsify::{magnitude_mask, random_mask, sign_consensus_mask, MajoritySign, Ranking};
use crate::lora::compute_kind;
use crate::{Error, Result};

/// A merge method, by mergekit's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// `Σ w_i θ_i` (÷ `Σ w_i` with `normalize`, default true).
    Linear,
    /// Spherical interpolation between the base and one model by `t` (linear when nearly
    /// colinear, `|cos| > 0.9995`).
    Slerp,
    /// `θ₀ + λ·Σ w_i δ_i` (÷ `Σ w_i` with `normalize`, default false).
    TaskArithmetic,
    /// TIES: magnitude pruning to `density`, weighted sign election, disjoint mean (÷ the
    /// agreeing weights; `normalize` default true).
    Ties,
    /// DARE: Bernoulli(`density`) drop, L1-norm rescale (mergekit's; `rescale`, default true),
    /// weighted sum.
    DareLinear,
    /// DARE's drop and rescale, then TIES' sign election.
    DareTies,
    /// Model Breadcrumbs: drop the top `gamma` and the smallest so that `density` remains.
    Breadcrumbs,
    /// Breadcrumbs with TIES' sign election.
    BreadcrumbsTies,
    /// Model Stock: `t = N cos / (1 + (N − 1) cos)` from the mean pairwise cosine of the task
    /// vectors; `t·mean(θ_i) + (1 − t)·θ₀` (needs a base and ≥ 2 models).
    ModelStock,
}

impl MergeMethod {
    /// Whether the method needs a base model.
    pub fn needs_base(self) -> bool {
        !matches!(self, MergeMethod::Linear)
    }

    /// mergekit's default of `normalize`.
    pub fn default_normalize(self) -> bool {
        matches!(self, MergeMethod::Linear | MergeMethod::Ties)
    }

    /// mergekit's default of `rescale`.
    pub fn default_rescale(self) -> bool {
        matches!(self, MergeMethod::DareLinear | MergeMethod::DareTies)
    }

    fn sparsification(self) -> Option<Sparsify> {
        match self {
            MergeMethod::Ties => Some(Sparsify::Magnitude),
            MergeMethod::DareLinear | MergeMethod::DareTies => Some(Sparsify::Random),
            MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies => Some(Sparsify::Outliers),
            _ => None,
        }
    }

    fn consensus(self) -> bool {
        matches!(self, MergeMethod::Ties | MergeMethod::DareTies | MergeMethod::BreadcrumbsTies)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparsify {
    Magnitude,
    Random,
    Outliers,
}

/// The parameters of one input model, as evaluated for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelParams {
    /// `weight` (required by the weighted methods).
    pub weight: f64,
    /// `density` (default 1).
    pub density: f64,
    /// `gamma` of Breadcrumbs (default 0.01).
    pub gamma: f64,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams { weight: 1.0, density: 1.0, gamma: 0.01 }
    }
}

/// The method-wide parameters, as evaluated for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalParams {
    /// `normalize` (method default when `None`).
    pub normalize: Option<bool>,
    /// `rescale` for DARE (method default when `None`).
    pub rescale: Option<bool>,
    /// `lambda` (default 1).
    pub lambda: f64,
    /// SLERP's `t`.
    pub t: Option<f64>,
    /// Model Stock's `filter_wise` (default false).
    pub filter_wise: bool,
    /// DARE: rescale the kept entries by `1/density` (the paper's) instead of mergekit's L1-norm
    /// ratio. Config key `inverse_density` (not in mergekit). Default false.
    pub inverse_density: bool,
}

impl Default for GlobalParams {
    fn default() -> Self {
        GlobalParams {
            normalize: None,
            rescale: None,
            lambda: 1.0,
            t: None,
            filter_wise: false,
            inverse_density: false,
        }
    }
}

/// `tensor ⊙ mask`, rescaled to keep the L1 norm when asked (mergekit's
/// `rescaled_masked_tensor`, eps 1e-7).
fn masked(t: &Tensor, mask: &Tensor, l1: bool) -> Result<Tensor> {
    let m = t.f_mul(mask)?;
    if !l1 {
        return Ok(m);
    }
    let before = t.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let after = m.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    if before < 1e-7 || after < 1e-7 {
        return Ok(m);
    }
    Ok(m.f_mul_scalar(before / after)?)
}

fn sparsify(
    delta: &Tensor,
    how: Sparsify,
    p: &ModelParams,
    l1: bool,
    inverse_density: bool,
) -> Result<Tensor> {
    let density = p.density;
    if density >= 1.0 {
        return Ok(delta.shallow_clone());
    }
    let n = delta.numel() as i64;
    let flat_abs =
        || -> Result<Tensor> { Ok(delta.f_abs()?.f_reshape([-1])?.f_to_kind(Kind::Float)?) };
    let mask_from = |idx: &Tensor| -> Result<Tensor> {
        let mask =
            Tensor::f_zeros([n], (delta.kind(), delta.device()))?.f_index_fill(0, idx, 1.0)?;
        Ok(mask.f_reshape(delta.size())?)
    };
    match how {
        Sparsify::Magnitude => {
            if density <= 0.0 || n == 0 {
                return Ok(delta.f_zeros_like()?);
            }
            // mergekit keeps at least one entry and ranks |delta| in f32
            let k = ((density * n as f64) as i64).max(1);
            masked(delta, &magnitude_mask(delta, k, Kind::Float, Ranking::ArgSort)?, l1)
        }
        Sparsify::Outliers => {
            let target = (density * n as f64) as i64;
            let top = (p.gamma * n as f64) as i64;
            let bot = (n - target - top).max(0);
            let order = flat_abs()?.f_argsort(0, false)?;
            let keep = order.f_narrow(0, bot.min(n), target.min(n - bot.min(n)))?;
            masked(delta, &mask_from(&keep)?, l1)
        }
        Sparsify::Random => {
            let work = if delta.kind() == Kind::BFloat16 { Kind::BFloat16 } else { Kind::Float };
            let mask = random_mask(delta, density, work)?;
            let d = delta.f_to_kind(work)?;
            let out = if inverse_density && l1 {
                d.f_mul(&mask)?.f_div_scalar(density)?
            } else {
                masked(&d, &mask, l1)?
            };
            Ok(out.f_to_kind(delta.kind())?)
        }
    }
}

/// Merges one tensor: `base` (required unless the method is `Linear`) and the `models` with
/// their parameters. The result has the base's dtype (the first model's for `Linear`).
///
/// ```
/// use tch::Tensor;
/// use tch_peft::merge::{merge_tensor, GlobalParams, MergeMethod, ModelParams};
/// let base = Tensor::from_slice(&[0.0f32, 0.0, 0.0]);
/// let a = Tensor::from_slice(&[1.0f32, -2.0, 3.0]);
/// let b = Tensor::from_slice(&[1.0f32, 4.0, -1.0]);
/// let p = ModelParams { weight: 1.0, ..Default::default() };
/// let m = merge_tensor(MergeMethod::Ties, Some(&base), &[(&a, p), (&b, p)], &GlobalParams::default())?;
/// // signs elected from the weighted sum 2, 2, 2; disagreeing entries left out of the mean
/// assert_eq!(Vec::<f32>::try_from(&m).unwrap(), [1.0, 4.0, 3.0]);
/// # Ok::<(), tch_peft::Error>(())
/// ```
pub fn merge_tensor(
    method: MergeMethod,
    base: Option<&Tensor>,
    models: &[(&Tensor, ModelParams)],
    global: &GlobalParams,
) -> Result<Tensor> {
    if models.is_empty() {
        return Err(Error::config("models", "no model to merge"));
    }
    for (_, p) in models {
        for (field, x) in [("weight", p.weight), ("density", p.density), ("gamma", p.gamma)] {
            if !x.is_finite() {
                return Err(Error::config(field, format!("{x} is not a finite number")));
            }
        }
    }
    if let Some(x) = [Some(global.lambda), global.t].into_iter().flatten().find(|x| !x.is_finite())
    {
        return Err(Error::config("parameters", format!("{x} is not a finite number")));
    }
    let shape = base.map(Tensor::size).unwrap_or_else(|| models[0].0.size());
    for (t, _) in models {
        if t.size() != shape {
            return Err(Error::ShapeMismatch {
                name: "input tensor".into(),
                expected: shape,
                actual: t.size(),
            });
        }
    }
    let base = match (base, method.needs_base()) {
        (Some(b), _) => Some(b),
        (None, false) => None,
        (None, true) => {
            return Err(Error::config("base_model", format!("{method:?} needs a base model")))
        }
    };
    let normalize = global.normalize.unwrap_or(method.default_normalize());
    match method {
        MergeMethod::Linear => {
            let out_kind = models[0].0.kind();
            let wk = compute_kind(out_kind);
            let mut acc = models[0].0.f_zeros_like()?.f_to_kind(wk)?;
            let mut total = 0.0;
            for (t, p) in models {
                acc = acc.f_add(&t.f_to_kind(wk)?.f_mul_scalar(p.weight)?)?;
                total += p.weight;
            }
            if normalize {
                if total == 0.0 {
                    return Err(Error::config(
                        "weight",
                        "the weights sum to zero, and `normalize` divides by their sum",
                    ));
                }
                acc = acc.f_div_scalar(total)?;
            }
            Ok(acc.f_to_kind(out_kind)?)
        }
        MergeMethod::Slerp => {
            let base = base.expect("checked");
            if models.len() != 1 {
                return Err(Error::config("models", "SLERP merges the base and exactly one model"));
            }
            let t = global.t.ok_or_else(|| Error::config("t", "SLERP needs `t`"))?;
            slerp(t, base, models[0].0)
        }
        MergeMethod::ModelStock => {
            let base = base.expect("checked");
            if models.len() < 2 {
                return Err(Error::config(
                    "models",
                    "Model Stock needs a base and at least two models",
                ));
            }
            model_stock(base, models, global.filter_wise)
        }
        _ => {
            let base = base.expect("checked");
            let rescale = global.rescale.unwrap_or(method.default_rescale());
            let mut deltas = Vec::with_capacity(models.len());
            for (t, p) in models {
                let d = t.f_sub(base)?;
                deltas.push(match method.sparsification() {
                    Some(how) => sparsify(&d, how, p, rescale, global.inverse_density)?,
                    None => d,
                });
            }
            let stacked = Tensor::f_stack(&deltas, 0)?;
            let mut wshape = vec![models.len() as i64];
            wshape.extend(std::iter::repeat_n(1, stacked.dim() - 1));
            let weights: Vec<f64> = models.iter().map(|(_, p)| p.weight).collect();
            let w = Tensor::from_slice(&weights)
                .f_to_kind(stacked.kind())?
                .f_to_device(stacked.device())?
                .f_view(wshape.as_slice())?;
            let weighted = stacked.f_mul(&w)?;
            let (mut mixed, divisor) = if method.consensus() {
                // mergekit elects the sign from the weighted deltas' sum
                let mask = sign_consensus_mask(&weighted, MajoritySign::Total)?;
                let mixed = weighted.f_mul(&mask)?.f_sum_dim_intlist(0, false, weighted.kind())?;
                let div = w.f_mul(&mask)?.f_sum_dim_intlist(0, false, weighted.kind())?;
                let div = div.f_masked_fill(&div.f_eq(0.0)?, 1.0)?;
                (mixed, div)
            } else {
                let mixed = weighted.f_sum_dim_intlist(0, false, weighted.kind())?;
                let total: f64 = weights.iter().sum();
                let total = if total.abs() < 1e-8 { 1.0 } else { total };
                (
                    mixed,
                    Tensor::from(total)
                        .f_to_kind(weighted.kind())?
                        .f_to_device(weighted.device())?,
                )
            };
            if normalize {
                mixed = mixed.f_div(&divisor)?;
            }
            if global.lambda != 1.0 {
                mixed = mixed.f_mul_scalar(global.lambda)?;
            }
            Ok(base.f_add(&mixed)?.f_to_kind(base.kind())?)
        }
    }
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
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    let out = a.f_mul_scalar(ca)?.f_add(&b.f_mul_scalar(cb)?)?;
    Ok(out.f_reshape(v0.size())?.f_to_kind(v0.kind())?)
}

fn model_stock(
    base: &Tensor,
    models: &[(&Tensor, ModelParams)],
    filter_wise: bool,
) -> Result<Tensor> {
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
    let ws: Vec<Tensor> = models.iter().map(|(t, _)| prep(t)).collect::<Result<_>>()?;
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
