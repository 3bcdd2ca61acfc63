//! Weight interpolation and merging: WiSE-FT between two stores ([`wise_ft`]), mergekit 0.1.5's
//! per-tensor methods ([`merge_tensor`]: linear, SLERP, task arithmetic, TIES, DARE, Breadcrumbs,
//! Model Stock), its YAML configuration with per-layer gradients and filters ([`MergeConfig`]),
//! and merging checkpoint directories with bounded memory ([`merge_directories`]).

mod config;
mod methods;
pub(crate) mod sparsify;
mod stream;
pub mod wise_ft;

pub use config::{Conditional, MergeConfig, ModelEntry, Setting};
pub use methods::{merge_tensor, slerp, GlobalParams, MergeMethod, ModelParams};
pub use stream::{merge_directories, MergeStats, ModelFiles};
pub use wise_ft::WiseFt;
