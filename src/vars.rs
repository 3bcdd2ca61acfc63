//! Crate-private helpers over a `VarStore`'s internals: which registered variable a tensor is.
//!
//! tch keeps a store's variables twice, by name (`named_variables`) and as the optimizer's list
//! (`trainable_variables`, without names), so matching the two needs tensor identity. A data
//! pointer is not one: every zero-size tensor has the null pointer. Identity here is
//! `is_set_to`: the same storage (its `StorageImpl`), offset, sizes and strides, so distinct
//! zero-size tensors differ and a shallow clone matches its variable. Tied variables (one
//! tensor registered under two names) are one variable to the optimizer; where a name is needed
//! for one, callers choose deterministically among its names.

use tch::nn::VarStore;
use tch::Tensor;

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
