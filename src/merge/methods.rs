//! mergekit 0.1.5's merge methods on one tensor (`mergekit/merge_methods/`, `sparsify.py`):
//! the method list, their per-tensor parameters, and the task-vector family (task arithmetic,
//! TIES, DARE, Breadcrumbs, DELLA, SCE). The spherical and averaging methods are in
//! [`geometric`](super::geometric).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::geometric::{karcher, model_stock, multislerp, nuslerp_merge};
use super::sparsify::{
    della_mask, magnitude_mask, random_mask, sign_consensus_mask, MajoritySign, Ranking,
};
use crate::{Error, Result};

/// A merge method, by mergekit's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// `Σ w_i θ_i` (÷ `Σ w_i` with `normalize`, default true). The base, when given, is one of
    /// the weighted inputs.
    Linear,
    /// Spherical interpolation between the base and one model by `t` (linear when nearly
    /// colinear, `|cos| > 0.9995`).
    Slerp,
    /// SLERP of two models by `t = w₂/(w₁+w₂)`; with a base, of their task vectors
    /// (`θ₀ + slerp(t, δ₁, δ₂)`), whole (`nuslerp_flatten`, default) or per row/column.
    Nuslerp,
    /// Barycentric spherical interpolation of any number of models (of their task vectors
    /// with a base): tangent-space mean at the weighted mean direction, mapped back, scaled by
    /// the weighted mean norm.
    Multislerp,
    /// The weighted Karcher (Riemannian) mean of the inputs' directions on the unit sphere, by
    /// up to `max_iter` steps, scaled by their mean norm. The base, when given, is one of the
    /// inputs.
    Karcher,
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
    /// DELLA: per row, keep each entry with probability `density − ε + 2ε·rank/(n−1)` (rank by
    /// magnitude), L1 rescale, TIES' sign election and disjoint mean (`normalize` default
    /// true).
    Della,
    /// DELLA's drop without the sign election (`normalize` default false).
    DellaLinear,
    /// SCE: keep the `select_topk` fraction of entries of largest variance across the task
    /// vectors, weight each vector by its mean square, elect signs, and take the weighted mean
    /// of the agreeing entries.
    Sce,
    /// Model Stock: `t = N cos / (1 + (N − 1) cos)` from the mean pairwise cosine of the task
    /// vectors; `t·mean(θ_i) + (1 − t)·θ₀` (needs a base and ≥ 2 models).
    ModelStock,
    /// One input's tensor (× `scale` when given): with `slices`, stacks layer ranges of
    /// different models ("frankenmerges").
    Passthrough,
}

/// How a method treats the base model (mergekit's `BasePolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasePolicy {
    /// The method needs a base.
    Required,
    /// The method works with or without one (task vectors with it).
    Optional,
    /// The base, when named, is an input like the others.
    Ignored,
}

impl MergeMethod {
    /// How the method treats the base model.
    pub fn base_policy(self) -> BasePolicy {
        use MergeMethod as M;
        match self {
            M::Linear | M::Karcher | M::Passthrough => BasePolicy::Ignored,
            M::Nuslerp | M::Multislerp => BasePolicy::Optional,
            _ => BasePolicy::Required,
        }
    }

    /// Whether the method needs a base model.
    pub fn needs_base(self) -> bool {
        self.base_policy() == BasePolicy::Required
    }

    /// mergekit's default of `normalize`.
    pub fn default_normalize(self) -> bool {
        matches!(self, MergeMethod::Linear | MergeMethod::Ties | MergeMethod::Della)
    }

    /// mergekit's default of `rescale`.
    pub fn default_rescale(self) -> bool {
        matches!(
            self,
            MergeMethod::DareLinear
                | MergeMethod::DareTies
                | MergeMethod::Della
                | MergeMethod::DellaLinear
        )
    }

    /// The fewest and most inputs other than the base, and the fewest inputs in all (mergekit's
    /// `InputContract`s).
    pub(crate) fn input_counts(self) -> (usize, Option<usize>, usize) {
        use MergeMethod as M;
        match self {
            M::Slerp => (1, Some(1), 2),
            M::Nuslerp => (2, Some(2), 2),
            M::ModelStock => (2, None, 3),
            M::Passthrough => (1, Some(1), 1),
            M::Multislerp => (1, None, 1),
            _ => (0, None, 1),
        }
    }

    /// Errors unless `non_base` inputs besides the base (`has_base`) fit the method's input
    /// counts; `field` names the config part in the error.
    pub(crate) fn check_input_counts(
        self,
        non_base: usize,
        has_base: bool,
        field: &str,
    ) -> Result<()> {
        let (min, max, min_inputs) = self.input_counts();
        let inputs = non_base + usize::from(has_base);
        if non_base >= min && max.is_none_or(|m| non_base <= m) && inputs >= min_inputs {
            return Ok(());
        }
        let want = match max {
            Some(m) if m == min => format!("exactly {m}"),
            Some(m) => format!("{min} to {m}"),
            None => format!("at least {}", min.max(min_inputs - usize::from(has_base))),
        };
        let besides = if has_base { " besides the base" } else { "" };
        Err(Error::config(
            field,
            format!("{self:?} merges {want} model(s){besides}; got {non_base}"),
        ))
    }

    fn sparsification(self) -> Option<Sparsify> {
        match self {
            MergeMethod::Ties => Some(Sparsify::Magnitude),
            MergeMethod::DareLinear | MergeMethod::DareTies => Some(Sparsify::Random),
            MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies => Some(Sparsify::Outliers),
            MergeMethod::Della | MergeMethod::DellaLinear => Some(Sparsify::Della),
            _ => None,
        }
    }

    fn consensus(self) -> bool {
        matches!(
            self,
            MergeMethod::Ties
                | MergeMethod::DareTies
                | MergeMethod::BreadcrumbsTies
                | MergeMethod::Della
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparsify {
    Magnitude,
    Random,
    Outliers,
    Della,
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
    /// `epsilon` of DELLA (default 0.15): keep probabilities span `density ± epsilon`.
    pub epsilon: f64,
    /// `scale` of Passthrough (none: the tensor as it is).
    pub scale: Option<f64>,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams { weight: 1.0, density: 1.0, gamma: 0.01, epsilon: 0.15, scale: None }
    }
}

/// The method-wide parameters, as evaluated for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalParams {
    /// `normalize` (method default when `None`).
    pub normalize: Option<bool>,
    /// `rescale` for DARE and DELLA (method default when `None`).
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
    /// NuSLERP: interpolate columns (true) instead of rows, when not flattened. Default false.
    pub nuslerp_row_wise: bool,
    /// NuSLERP: interpolate the whole tensor as one vector. Default true.
    pub nuslerp_flatten: bool,
    /// Multi-SLERP: divide the weights by their sum. Default true.
    pub normalize_weights: bool,
    /// Multi-SLERP's `eps` (default 1e-8).
    pub eps: f64,
    /// Karcher's most iterations (default 10).
    pub max_iter: f64,
    /// Karcher's tolerance (default 1e-5).
    pub tol: f64,
    /// SCE's kept fraction of entries, by variance (default 1).
    pub select_topk: f64,
    /// TIES and Breadcrumbs in the streamed merge: rank by mergekit's `argsort` (its order among
    /// equal magnitudes) instead of a threshold that keeps every entry tied with the last kept
    /// one. Config key `exact_ties` (not in mergekit). Default false; [`merge_tensor`] always
    /// ranks as mergekit does.
    pub exact_ties: bool,
    /// DARE in the streamed merge: draw the masks from libtorch's generator, as mergekit and
    /// [`merge_tensor`] do (mergekit's masks after the same seed), instead of the faster
    /// counter-based generator. Config key `exact_masks` (not in mergekit). Default false.
    pub exact_masks: bool,
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
            nuslerp_row_wise: false,
            nuslerp_flatten: true,
            normalize_weights: true,
            eps: 1e-8,
            max_iter: 10.0,
            tol: 1e-5,
            select_topk: 1.0,
            exact_ties: false,
            exact_masks: false,
        }
    }
}

impl GlobalParams {
    fn numbers(&self) -> [f64; 5] {
        [self.lambda, self.eps, self.max_iter, self.tol, self.select_topk]
    }
}

/// `tensor ⊙ mask`, rescaled to keep the L1 norm when asked (mergekit's
/// `rescaled_masked_tensor`, eps 1e-7; the norms summed in f32, f64 for f64).
fn masked(t: &Tensor, mask: &Tensor, l1: bool) -> Result<Tensor> {
    let m = t.f_mul(mask)?;
    if !l1 {
        return Ok(m);
    }
    let kind = crate::lora::compute_kind(t.kind());
    let before = t.f_abs()?.f_sum(kind)?;
    let after = m.f_abs()?.f_sum(kind)?;
    if before.f_double_value(&[])? < 1e-7 || after.f_double_value(&[])? < 1e-7 {
        return Ok(m);
    }
    Ok(m.f_mul(&before.f_div(&after)?.f_to_kind(m.kind())?)?)
}

/// The dtype mergekit's random masks work in on this tensor's device: the tensor's own on
/// accelerators and for bf16, f32 otherwise (CPU Bernoulli has no f16).
fn random_work_kind(t: &Tensor) -> Kind {
    if t.device() != tch::Device::Cpu || t.kind() == Kind::BFloat16 {
        t.kind()
    } else {
        Kind::Float
    }
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
            if inverse_density && l1 && density == 0.0 {
                return Ok(delta.f_zeros_like()?); // every entry dropped; no 0/0
            }
            let work = random_work_kind(delta);
            let mask = random_mask(delta, density, work)?;
            let d = delta.f_to_kind(work)?;
            let out = if inverse_density && l1 {
                d.f_mul(&mask)?.f_div_scalar(density)?
            } else {
                masked(&d, &mask, l1)?
            };
            Ok(out.f_to_kind(delta.kind())?)
        }
        Sparsify::Della => {
            if density <= 0.0 {
                return Ok(delta.f_zeros_like()?);
            }
            if density + p.epsilon >= 1.0 || density - p.epsilon <= 0.0 {
                return Err(Error::config(
                    "epsilon",
                    format!("density ± epsilon ({density} ± {}) must lie inside (0, 1)", p.epsilon),
                ));
            }
            let work = random_work_kind(delta);
            let rows = if delta.dim() < 2 { delta.f_unsqueeze(0)? } else { delta.shallow_clone() };
            let mask = della_mask(&rows, density, p.epsilon, work)?;
            let out = masked(&rows.f_to_kind(work)?, &mask, l1)?;
            Ok(out.f_to_kind(delta.kind())?.f_reshape(delta.size())?)
        }
    }
}

/// Merges one tensor: `base` (required by [`BasePolicy::Required`] methods, used by the
/// optional ones when given, ignored by the others — pass it among `models` there) and the
/// `models` with their parameters. The task-vector methods return the base's dtype, the others
/// the inputs'.
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
    for (_, p) in models {
        let numbers = [("weight", p.weight), ("density", p.density), ("gamma", p.gamma)];
        for (field, x) in numbers.into_iter().chain([("epsilon", p.epsilon)]) {
            if !x.is_finite() {
                return Err(Error::config(field, format!("{x} is not a finite number")));
            }
        }
        if let Some(x) = p.scale.filter(|x| !x.is_finite()) {
            return Err(Error::config("scale", format!("{x} is not a finite number")));
        }
    }
    if let Some(x) = global.numbers().into_iter().chain(global.t).find(|x| !x.is_finite()) {
        return Err(Error::config("parameters", format!("{x} is not a finite number")));
    }
    let base = match method.base_policy() {
        BasePolicy::Ignored => None,
        BasePolicy::Optional => base,
        BasePolicy::Required => Some(base.ok_or_else(|| {
            Error::config("base_model", format!("{method:?} needs a base model"))
        })?),
    };
    let n = models.len();
    method.check_input_counts(n, base.is_some(), "models")?;
    if n == 0 {
        // the task-vector methods with the base alone (mergekit returns it)
        return Ok(base.expect("an input").shallow_clone());
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
    let normalize = global.normalize.unwrap_or(method.default_normalize());
    let tensors: Vec<&Tensor> = models.iter().map(|(t, _)| *t).collect();
    let weights: Vec<f64> = models.iter().map(|(_, p)| p.weight).collect();
    match method {
        MergeMethod::Linear => linear(&tensors, &weights, normalize),
        MergeMethod::Passthrough => {
            let (t, p) = &models[0];
            Ok(match p.scale {
                Some(s) => t.f_mul_scalar(s)?,
                None => t.shallow_clone(),
            })
        }
        MergeMethod::Slerp => {
            let t = global.t.ok_or_else(|| Error::config("t", "SLERP needs `t`"))?;
            super::geometric::slerp(t, base.expect("required"), models[0].0)
        }
        MergeMethod::Nuslerp => nuslerp_merge(base, &tensors, &weights, global),
        MergeMethod::Multislerp => multislerp(base, &tensors, &weights, global),
        MergeMethod::Karcher => {
            let alphas = vec![1.0 / n as f64; n];
            karcher(&tensors, &alphas, global.max_iter, global.tol)
        }
        MergeMethod::ModelStock => {
            model_stock(base.expect("required"), &tensors, global.filter_wise)
        }
        MergeMethod::Sce => sce(base.expect("required"), &tensors, global.select_topk),
        _ => task_vectors(method, base.expect("required"), models, global, normalize),
    }
}

/// `Σ w_i θ_i` (÷ `Σ w_i`), in f32 (f64 for f64), in the first input's dtype.
fn linear(tensors: &[&Tensor], weights: &[f64], normalize: bool) -> Result<Tensor> {
    let out_kind = tensors[0].kind();
    let wk = crate::lora::compute_kind(out_kind);
    let mut acc = tensors[0].f_zeros_like()?.f_to_kind(wk)?;
    for (t, w) in tensors.iter().zip(weights) {
        acc = acc.f_add(&t.f_to_kind(wk)?.f_mul_scalar(*w)?)?;
    }
    if normalize {
        let total: f64 = weights.iter().sum();
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

/// The task-vector family: sparsify each `δ_i`, weight, elect signs when the method does, sum,
/// normalise, `θ₀ + λ·mixed` (mergekit's `GeneralizedTaskArithmeticMerge`).
fn task_vectors(
    method: MergeMethod,
    base: &Tensor,
    models: &[(&Tensor, ModelParams)],
    global: &GlobalParams,
    normalize: bool,
) -> Result<Tensor> {
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
        (mixed, Tensor::from(total).f_to_kind(weighted.kind())?.f_to_device(weighted.device())?)
    };
    if normalize {
        mixed = mixed.f_div(&divisor)?;
    }
    if global.lambda != 1.0 {
        mixed = mixed.f_mul_scalar(global.lambda)?;
    }
    Ok(base.f_add(&mixed)?.f_to_kind(base.kind())?)
}

/// SCE (mergekit's `sce_merge`): select by variance, weight by mean square, erase by sign.
fn sce(base: &Tensor, tensors: &[&Tensor], select_topk: f64) -> Result<Tensor> {
    let deltas: Vec<Tensor> =
        tensors.iter().map(|t| t.f_sub(base)).collect::<std::result::Result<_, _>>()?;
    let mut tvs = Tensor::f_stack(&deltas, 0)?;
    let kind = tvs.kind();
    let n = tensors.len() as i64;
    if select_topk < 1.0 {
        let mask = if select_topk <= 0.0 {
            base.f_zeros_like()?
        } else {
            let var = tvs.f_var_correction(Some([0i64].as_slice()), 0, false)?;
            let nonzero = var.f_count_nonzero(None)?.f_int64_value(&[])?;
            let k = (nonzero as f64 * select_topk) as i64;
            let mask = var.f_zeros_like()?;
            if k == 0 {
                mask
            } else {
                let (_, idx) = var.f_abs()?.f_reshape([-1])?.f_topk(k, 0, true, true)?;
                mask.f_reshape([-1])?.f_index_fill(0, &idx, 1.0)?.f_reshape(var.size())?
            }
        };
        tvs = tvs.f_mul(&mask.f_unsqueeze(0)?)?;
    }
    let erase = sign_consensus_mask(&tvs, MajoritySign::Total)?;
    let w = tvs.f_square()?.f_reshape([n, -1])?.f_mean_dim(1, false, kind)?;
    let sum = w.f_sum(kind)?.f_double_value(&[])?;
    let w = if sum.abs() < 1e-6 { w.f_ones_like()?.f_div_scalar(n)? } else { w.f_div_scalar(sum)? };
    let mut wshape = vec![n];
    wshape.extend(std::iter::repeat_n(1, tvs.dim() - 1));
    let erased = w.f_view(wshape.as_slice())?.f_mul(&erase)?;
    let merged = tvs.f_mul(&erased)?.f_sum_dim_intlist(0, false, kind)?;
    let total = erased.f_sum_dim_intlist(0, false, kind)?.f_clamp_min(1e-6)?;
    Ok(base.f_add(&merged.f_div(&total)?)?)
}
