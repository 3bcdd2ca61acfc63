//! Weight interpolation and merging: WiSE-FT between two stores ([`wise_ft`]), mergekit 0.1.5's
//! per-tensor methods ([`merge_tensor`]: linear, SLERP, NuSLERP, Multi-SLERP, Karcher, task
//! arithmetic, TIES, DARE, Breadcrumbs, DELLA, SCE, Model Stock, passthrough), its YAML
//! configuration with `models` or `slices`, per-layer gradients and filters ([`MergeConfig`]),
//! merging checkpoint directories with bounded memory ([`merge_directories`]), and extracting a
//! LoRA adapter from a fine-tuned model and its base ([`extract_lora`]).

mod config;
mod execute;
mod extract;
mod fused;
pub(crate) mod geometric;
mod methods;
mod output;
mod params;
mod plan;
mod sink;
pub(crate) mod sparsify;
mod stream;
pub mod wise_ft;

pub use config::{
    Conditional, MergeConfig, ModelEntry, OutputSlice, Parameters, Setting, SliceSource,
    TokenizerConfig, TokenizerSource,
};
pub use execute::{merge_directories, merge_directories_with_progress, MergeStats, Progress};
pub use extract::{extract_lora, ExtractOptions, ExtractStats};
#[doc(hidden)]
pub use fused::without_fused_kernels;
pub use geometric::{slerp, MAX_KARCHER_ITER};
pub use methods::{merge_tensor, BasePolicy, GlobalParams, MergeMethod, ModelParams};
pub use stream::ModelFiles;
pub use wise_ft::WiseFt;
