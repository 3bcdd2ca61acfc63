//! Which parameters each method takes (mergekit's `MergeMethodSpec`s), and resolving them for
//! one tensor from the most specific setting that gives a value: the source's, the slice's,
//! the config's, then the method's default.

use super::config::{Parameters, Setting};
use super::methods::{GlobalParams, MergeMethod, ModelParams};
use crate::{Error, Result};

/// Which inputs a parameter is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One value for the tensor.
    Shared,
    /// One value per input, the base included.
    Input,
    /// One value per input other than the base.
    NonBase,
}

/// A parameter's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fallback {
    /// The config must give it.
    Required,
    /// This value.
    Value(f64),
    /// Absent unless given (Passthrough's `scale`).
    Unset,
}

/// One parameter of a method.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    pub name: &'static str,
    pub scope: Scope,
    pub default: Fallback,
}

const fn spec(name: &'static str, scope: Scope, default: Fallback) -> Spec {
    Spec { name, scope, default }
}

use Fallback::{Required, Unset, Value};
use Scope::{Input, NonBase, Shared};

/// Every parameter name some mergekit method (or this crate's `inverse_density`,
/// `exact_ties` and `exact_masks`) takes; other names are refused as typos.
pub(crate) const KNOWN_PARAMETERS: [&str; 21] = [
    "weight",
    "normalize",
    "t",
    "nuslerp_row_wise",
    "nuslerp_flatten",
    "normalize_weights",
    "eps",
    "max_iter",
    "tol",
    "int8_mask",
    "rescale",
    "lambda",
    "density",
    "gamma",
    "epsilon",
    "select_topk",
    "filter_wise",
    "scale",
    "inverse_density",
    "exact_ties",
    "exact_masks",
];

const fn b(x: bool) -> Fallback {
    Value(if x { 1.0 } else { 0.0 })
}

/// The parameters of `method`, as mergekit 0.1.5 declares them.
pub(crate) fn specs(method: MergeMethod) -> Vec<Spec> {
    use MergeMethod as M;
    match method {
        M::Linear => vec![spec("weight", Input, Required), spec("normalize", Shared, b(true))],
        M::Slerp => vec![spec("t", Shared, Required)],
        M::Nuslerp => vec![
            spec("weight", NonBase, Required),
            spec("nuslerp_row_wise", Shared, b(false)),
            spec("nuslerp_flatten", Shared, b(true)),
        ],
        M::Multislerp => vec![
            spec("weight", NonBase, Required),
            spec("normalize_weights", Shared, b(true)),
            spec("eps", Shared, Value(1e-8)),
        ],
        M::Karcher => vec![spec("max_iter", Shared, Value(10.0)), spec("tol", Shared, Value(1e-5))],
        M::Sce => {
            vec![spec("int8_mask", Shared, b(false)), spec("select_topk", Shared, Value(1.0))]
        }
        M::ModelStock => vec![spec("filter_wise", Shared, b(false))],
        M::Passthrough => vec![spec("scale", Input, Unset)],
        M::TaskArithmetic
        | M::Ties
        | M::DareLinear
        | M::DareTies
        | M::Breadcrumbs
        | M::BreadcrumbsTies
        | M::Della
        | M::DellaLinear => {
            let mut v = vec![
                spec("int8_mask", Shared, b(false)),
                spec("normalize", Shared, b(method.default_normalize())),
                spec("rescale", Shared, b(method.default_rescale())),
                spec("lambda", Shared, Value(1.0)),
                spec("weight", NonBase, Required),
                spec("density", NonBase, Value(1.0)),
            ];
            match method {
                M::Breadcrumbs | M::BreadcrumbsTies => {
                    v.push(spec("gamma", NonBase, Value(0.01)));
                    v.push(spec("exact_ties", Shared, b(false)));
                }
                M::Ties => v.push(spec("exact_ties", Shared, b(false))),
                M::Della | M::DellaLinear => v.push(spec("epsilon", NonBase, Value(0.15))),
                M::DareLinear | M::DareTies => {
                    v.push(spec("inverse_density", Shared, b(false)));
                    v.push(spec("exact_masks", Shared, b(false)));
                }
                _ => {}
            }
            v
        }
    }
}

/// The first value the settings give for `name` (most specific first), evaluated for `tensor`
/// at depth `t`.
fn lookup(name: &str, settings: &[&Parameters], tensor: &str, t: f64) -> Option<f64> {
    settings.iter().find_map(|p| p.get(name).and_then(|s: &Setting| s.number(tensor, t)))
}

fn resolve(
    s: &Spec,
    settings: &[&Parameters],
    tensor: &str,
    t: f64,
    who: &str,
) -> Result<Option<f64>> {
    match (lookup(s.name, settings, tensor, t), s.default) {
        (Some(x), _) => Ok(Some(x)),
        (None, Value(x)) => Ok(Some(x)),
        (None, Unset) => Ok(None),
        (None, Required) => Err(Error::config(
            s.name,
            format!("{who} has no `{}` for `{tensor}`, and the method needs it", s.name),
        )),
    }
}

/// The method-wide parameters of one output tensor (`settings`: slice's, then global).
pub(crate) fn global(
    method: MergeMethod,
    settings: &[&Parameters],
    tensor: &str,
    t: f64,
) -> Result<GlobalParams> {
    let mut g = GlobalParams::default();
    for s in specs(method).iter().filter(|s| s.scope == Shared) {
        let Some(x) = resolve(s, settings, tensor, t, "the config")? else { continue };
        let on = x != 0.0;
        match s.name {
            "normalize" => g.normalize = Some(on),
            "rescale" => g.rescale = Some(on),
            "lambda" => g.lambda = x,
            "t" => g.t = Some(x),
            "filter_wise" => g.filter_wise = on,
            "inverse_density" => g.inverse_density = on,
            "nuslerp_row_wise" => g.nuslerp_row_wise = on,
            "nuslerp_flatten" => g.nuslerp_flatten = on,
            "normalize_weights" => g.normalize_weights = on,
            "eps" => g.eps = x,
            "max_iter" => g.max_iter = x,
            "tol" => g.tol = x,
            "select_topk" => g.select_topk = x,
            "exact_ties" => g.exact_ties = on,
            "exact_masks" => g.exact_masks = on,
            _ => {} // int8_mask: the mask's dtype only
        }
    }
    Ok(g)
}

/// The parameters of one input (`settings`: source's, slice's, global), `is_base` when it is
/// the method's base (which takes no per-model parameters but the `Input`-scoped ones).
pub(crate) fn model(
    method: MergeMethod,
    settings: &[&Parameters],
    tensor: &str,
    t: f64,
    who: &str,
    is_base: bool,
) -> Result<ModelParams> {
    let mut p = ModelParams::default();
    for s in specs(method).iter().filter(|s| s.scope == Input || (s.scope == NonBase && !is_base)) {
        let v = resolve(s, settings, tensor, t, who)?;
        match (s.name, v) {
            ("weight", Some(x)) => p.weight = x,
            ("density", Some(x)) => p.density = x,
            ("gamma", Some(x)) => p.gamma = x,
            ("epsilon", Some(x)) => p.epsilon = x,
            ("scale", v) => p.scale = v,
            _ => {}
        }
    }
    Ok(p)
}
