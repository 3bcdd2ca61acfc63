//! WiSE-FT (Wortsman et al. 2022): `θ(α) = (1 − α)·θ₀ + α·θ₁` over every variable and buffer.

use std::collections::HashMap;

use tch::nn::VarStore;
use tch::Tensor;

use crate::adapter::{Adapter, AdapterKind, Applicable};
use crate::lora::{compute_kind, is_float};
use crate::{Error, Result};

/// The pairs `(name, θ₀, θ₁)` to interpolate: with `partial = false` both stores must hold the
/// same names with the same shapes and dtypes (errors name the first difference); with
/// `partial = true` the common names are used (and at least one must exist).
fn pairs(
    theta0: &VarStore,
    theta1: &VarStore,
    partial: bool,
) -> Result<Vec<(String, Tensor, Tensor)>> {
    let (a, b) = (theta0.variables(), theta1.variables());
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let Some(t1) = b.get(n) else {
            if partial {
                continue;
            }
            return Err(Error::UnexpectedTensor {
                name: n.clone(),
                file: "θ₁ (fine-tuned store)".into(),
            });
        };
        let t0 = &a[n];
        if t0.size() != t1.size() {
            return Err(Error::ShapeMismatch {
                name: n.clone(),
                expected: t0.size(),
                actual: t1.size(),
            });
        }
        if t0.kind() != t1.kind() {
            return Err(Error::DtypeMismatch {
                name: n.clone(),
                expected: format!("{:?}", t0.kind()),
                actual: t1.kind(),
            });
        }
        out.push((n.clone(), t0.shallow_clone(), t1.shallow_clone()));
    }
    if !partial {
        if let Some(n) = b.keys().filter(|k| !a.contains_key(*k)).min() {
            return Err(Error::MissingTensor {
                name: n.clone(),
                file: "θ₀ (zero-shot store)".into(),
            });
        }
    }
    if out.is_empty() {
        return Err(Error::config("partial", "the two stores share no variable"));
    }
    Ok(out)
}

/// `(1 − α)·a + α·b`, computed in f32 (f64 for f64), in `a`'s dtype. Integer tensors (counters)
/// take `b` when `α ≥ 0.5`, else `a`.
pub fn lerp(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let kind = a.kind();
    if !is_float(kind) {
        return Ok(if alpha >= 0.5 { b.copy() } else { a.copy() });
    }
    let c = compute_kind(kind);
    Ok(a.f_to_kind(c)?
        .f_mul_scalar(1.0 - alpha)?
        .f_add(&b.f_to_kind(c)?.f_mul_scalar(alpha)?)?
        .f_to_kind(kind)?)
}

/// Writes `θ(α)` into the variables of `dst` (which may be `theta0` or `theta1` itself, or a
/// third store with the same names). Strict unless `partial` (see the module docs).
pub fn interpolate_into(
    dst: &VarStore,
    theta0: &VarStore,
    theta1: &VarStore,
    alpha: f64,
    partial: bool,
) -> Result<()> {
    if !alpha.is_finite() {
        return Err(Error::config("alpha", format!("{alpha} is not finite")));
    }
    let pairs = pairs(theta0, theta1, partial)?;
    let targets = dst.variables();
    let mut values = Vec::with_capacity(pairs.len());
    for (n, a, b) in &pairs {
        let d = targets.get(n).ok_or_else(|| Error::MissingTensor {
            name: n.clone(),
            file: "destination store".into(),
        })?;
        if d.size() != a.size() {
            return Err(Error::ShapeMismatch {
                name: n.clone(),
                expected: a.size(),
                actual: d.size(),
            });
        }
        values.push((d.shallow_clone(), tch::no_grad(|| lerp(a, b, alpha))?));
    }
    let _guard = tch::no_grad_guard();
    for (mut d, v) in values {
        d.f_copy_(&v)?;
    }
    Ok(())
}

/// Evaluates `eval` at each `α` after writing `θ(α)` into `model` (the store the caller's model
/// reads), and restores `model`'s own values afterwards. Returns `(α, eval(α))`.
///
/// ```
/// use tch::{nn, Device, Kind};
/// use tch_peft::merge::wise_ft;
/// let (zs, ft, model) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
/// for vs in [&zs, &ft, &model] {
///     let _ = vs.root().zeros("w", &[2]);
/// }
/// tch::no_grad(|| { let _ = ft.variables()["w"].shallow_clone().fill_(1.0); });
/// let curve = wise_ft::sweep(&model, &zs, &ft, &[0.0, 0.5, 1.0], |_| {
///     Ok(model.variables()["w"].mean(Kind::Float).double_value(&[]))
/// })?;
/// assert_eq!(curve, [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)]);
/// # Ok::<(), tch_peft::Error>(())
/// ```
pub fn sweep<T, F>(
    model: &VarStore,
    theta0: &VarStore,
    theta1: &VarStore,
    alphas: &[f64],
    mut eval: F,
) -> Result<Vec<(f64, T)>>
where
    F: FnMut(f64) -> Result<T>,
{
    let saved: Vec<(Tensor, Tensor)> =
        model.variables().into_values().map(|t| (t.shallow_clone(), t.copy())).collect();
    let restore = || -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (t, v) in &saved {
            t.shallow_clone().f_copy_(v)?;
        }
        Ok(())
    };
    let mut out = Vec::with_capacity(alphas.len());
    for &a in alphas {
        if let Err(e) = interpolate_into(model, theta0, theta1, a, false)
            .and_then(|_| eval(a).map(|v| out.push((a, v))))
        {
            restore()?;
            return Err(e);
        }
    }
    restore()?;
    Ok(out)
}

/// WiSE-FT as an [`Adapter`]: `apply` writes `θ(α)` into `model` (keeping its values),
/// `revert` restores them bit-exactly.
#[derive(Debug)]
pub struct WiseFt {
    alpha: f64,
    theta0: HashMap<String, Tensor>,
    theta1: HashMap<String, Tensor>,
    model: Vec<(String, Tensor)>,
    saved: Option<Vec<Tensor>>,
}

impl WiseFt {
    /// Interpolation of `model`'s variables between `theta0` (zero-shot) and `theta1`
    /// (fine-tuned) at `alpha`; stores are checked strictly (same names, shapes, dtypes).
    pub fn new(model: &VarStore, theta0: &VarStore, theta1: &VarStore, alpha: f64) -> Result<Self> {
        let p = pairs(theta0, theta1, false)?;
        let m = model.variables();
        let mut model_vars = Vec::new();
        for (n, a, _) in &p {
            let t = m.get(n).ok_or_else(|| Error::MissingTensor {
                name: n.clone(),
                file: "model store".into(),
            })?;
            if t.size() != a.size() {
                return Err(Error::ShapeMismatch {
                    name: n.clone(),
                    expected: a.size(),
                    actual: t.size(),
                });
            }
            model_vars.push((n.clone(), t.shallow_clone()));
        }
        let theta0 = p.iter().map(|(n, a, _)| (n.clone(), a.shallow_clone())).collect();
        let theta1 = p.iter().map(|(n, _, b)| (n.clone(), b.shallow_clone())).collect();
        Ok(WiseFt { alpha, theta0, theta1, model: model_vars, saved: None })
    }

    /// The mixing coefficient.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

impl Adapter for WiseFt {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Interpolation
    }

    fn name(&self) -> &str {
        "wise-ft"
    }

    /// The two endpoints it owns, `theta0.<name>` then `theta1.<name>`, in the model's order
    /// (the model's own variables are the caller's).
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let end = |tag: &str, m: &HashMap<String, Tensor>| -> Vec<(String, Tensor)> {
            self.model.iter().map(|(n, _)| (format!("{tag}.{n}"), m[n].shallow_clone())).collect()
        };
        let mut v = end("theta0", &self.theta0);
        v.extend(end("theta1", &self.theta1));
        v
    }

    /// Nothing: interpolation trains no parameter (whatever the endpoint stores' flags say).
    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
}

impl Applicable for WiseFt {
    fn apply(&mut self) -> Result<()> {
        if self.saved.is_some() {
            return Err(Error::MergeState { module: "wise-ft".into(), state: "already applied" });
        }
        let _guard = tch::no_grad_guard();
        let saved: Vec<Tensor> = self.model.iter().map(|(_, t)| t.copy()).collect();
        for (n, t) in &self.model {
            let v = lerp(&self.theta0[n], &self.theta1[n], self.alpha)?;
            t.shallow_clone().f_copy_(&v)?;
        }
        self.saved = Some(saved);
        Ok(())
    }

    fn revert(&mut self) -> Result<()> {
        let Some(saved) = self.saved.take() else {
            return Err(Error::MergeState { module: "wise-ft".into(), state: "not applied" });
        };
        let _guard = tch::no_grad_guard();
        for ((_, t), s) in self.model.iter().zip(saved) {
            t.shallow_clone().f_copy_(&s)?;
        }
        Ok(())
    }

    fn is_applied(&self) -> bool {
        self.saved.is_some()
    }
}
