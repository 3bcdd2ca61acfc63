//! Layer freezing for any tch model, through its `VarStore` names: freeze plans by target,
//! layer index or predicate, gradual unfreezing (ULMFiT), layer-wise learning-rate decay
//! (timm), frozen BatchNorm statistics.
//!
//! **The optimizer rule.** tch's optimizers skip a parameter whose gradient is undefined, and a
//! frozen variable (`requires_grad = false`) gets no gradient. So: change what is frozen
//! *before* `zero_grad`/`backward_step`, never between `backward` and `step` (a variable frozen
//! after `backward` still holds the gradient just computed and would be stepped). The safe path
//! is [`FreezePlan::apply`](crate::Applicable::apply) (or a [`GradualUnfreezing`] call) at the start of a step, then
//! `opt.backward_step(&loss)`; unfreezing zeroes the stale gradient, so nothing from an earlier
//! step leaks into the first update. A variable registered non-trainable
//! (`nn::Path::zeros_no_train`, BatchNorm running statistics) is not in the optimizer at all;
//! unfreezing it is an error. Layer-wise learning rates use optimizer groups, which tch fixes
//! when the optimizer first sees a variable: assign them ([`LayerwiseLr::assign_groups`])
//! before building the optimizer.
//!
//! ```
//! use tch::{nn, Device};
//! use tch_peft::freeze::{FreezePlan, Select};
//! use tch_peft::Applicable;
//! let vs = nn::VarStore::new(Device::Cpu);
//! for i in 0..4 {
//!     let _ = nn::linear(vs.root() / "layers" / i / "fc", 8, 8, Default::default());
//! }
//! let _ = nn::linear(vs.root() / "head", 8, 2, Default::default());
//! // freeze the first two blocks
//! let mut plan = FreezePlan::new(&vs, Select::layers(0..2))?;
//! plan.apply()?;
//! let report = tch_peft::ParamReport::from_var_stores(&[&vs]);
//! assert_eq!(report.trainable, 2 * (8 * 8 + 8) + (8 * 2 + 2));
//! plan.revert()?; // everything trains again
//! # Ok::<(), tch_peft::Error>(())
//! ```

mod batch_norm;
mod plan;
mod schedule;
mod select;

pub use batch_norm::FreezableBatchNorm;
pub use plan::{module_report, FreezePlan, ModuleReport, ModuleRow};
pub use schedule::{GradualUnfreezing, LayerGroups, LayerwiseLr};
pub use select::Select;
