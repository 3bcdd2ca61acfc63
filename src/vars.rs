//! Crate-private helpers over a `VarStore`'s internals: which registered variable a tensor is.
//!
//! tch keeps a store's variables twice, by name (`named_variables`) and as the optimizer's list
//! (`trainable_variables`, without names), so matching the two needs tensor identity. A data
//! pointer is not one: every zero-size tensor has the null pointer. Identity here is
//! `is_set_to`: the same storage (its `StorageImpl`), offset, sizes and strides, so distinct
//! zero-size tensors differ and a shallow clone matches its variable. Tied variables (one
//! tensor registered under two names) are one variable to the optimizer; where a name is needed
//! for one, callers choose deterministically among its names.

use tch::nn::{self, VarStore};
use tch::Tensor;

/// `nn::linear` (same variables, same initialisation and draw order) with an error instead of
/// a panic when the allocation fails or a size is negative.
pub(crate) fn try_linear(
    p: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    c: nn::LinearConfig,
) -> crate::Result<nn::Linear> {
    check_dims(p, &[out_dim, in_dim])?;
    let bs = if c.bias {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = c.bs_init.unwrap_or(nn::Init::Uniform { lo: -bound, up: bound });
        Some(p.f_var("bias", &[out_dim], init)?)
    } else {
        None
    };
    Ok(nn::Linear { ws: p.f_var("weight", &[out_dim, in_dim], c.ws_init)?, bs })
}

/// `nn::embedding(p, num, dim, c).ws` with an error instead of a panic.
pub(crate) fn try_embedding(
    p: &nn::Path,
    num: i64,
    dim: i64,
    c: nn::EmbeddingConfig,
) -> crate::Result<Tensor> {
    check_dims(p, &[num, dim])?;
    Ok(p.f_var("weight", &[num, dim], c.ws_init)?)
}

/// Sizes of a new variable must be non-negative and their product must fit an `i64`.
pub(crate) fn check_dims(p: &nn::Path, dims: &[i64]) -> crate::Result<()> {
    let ok = dims.iter().all(|&d| d >= 0)
        && dims.iter().try_fold(1i64, |a, &d| a.checked_mul(d)).is_some();
    if ok {
        Ok(())
    } else {
        Err(crate::Error::ShapeMismatch {
            name: format!("new variable under `{}`", p.components().collect::<Vec<_>>().join(".")),
            expected: vec![-1; dims.len()],
            actual: dims.to_vec(),
        })
    }
}

/// Whether `a` and `b` are the same tensor (see the module docs).
pub(crate) fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.f_is_set_to(b).unwrap_or(false)
}

/// The variables of `vs` that tch's optimizers can see (registered trainable, whether or not
/// they require grad now).
pub(crate) fn optimizer_visible(vs: &VarStore) -> Vec<Tensor> {
    let vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
    vars.trainable_variables.iter().map(|v| v.tensor.shallow_clone()).collect()
}

/// Removes every variable of `vs` that is one of `tensors`, by name and from the optimizer's
/// list.
pub(crate) fn remove_from_store(vs: &VarStore, tensors: &[Tensor]) {
    let gone = |t: &Tensor| tensors.iter().any(|x| same_tensor(x, t));
    let mut vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
    vars.named_variables.retain(|_, t| !gone(t));
    vars.trainable_variables.retain(|v| !gone(&v.tensor));
}
