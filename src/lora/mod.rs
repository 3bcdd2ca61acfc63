//! LoRA: low-rank adaptation (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>), with
//! rsLoRA scaling (Kalajdzievski 2023, <https://arxiv.org/abs/2312.03732>).
//!
//! A frozen weight `W: [out, in]` is adapted as `W + s·BA`, with `A: [r, in]`, `B: [out, r]`,
//! `s = lora_alpha / r` (or `lora_alpha / √r` with `use_rslora`). Names, defaults, init and file
//! format follow Hugging Face PEFT 0.21, so adapters move between the two.
//!
//! * [`LoraConfig`]: PEFT's fields, validated, (de)serialisable as `adapter_config.json`.
//! * [`LoraLinear`]: wraps an `nn::Linear`; forward, merge/unmerge (bit-exact), enable/disable.
//! * [`LoraEmbedding`]: LoRA on an embedding table (PEFT's `lora_embedding_A/B`).
//! * [`LoraConv2d`]: LoRA on a 2-D convolution (stride, padding, dilation honoured).
//! * [`LoraBuilder`]: build-time targeting — a model calls `builder.linear(path, …)` instead of
//!   `nn::linear` and gets a plain or adapted layer by PEFT's `target_modules` rules.
//! * [`LoraStack`]: the named adapters of one layer (their branches summed in the forward).
//! * [`LoraAdapter`]: every adapter of a model (PEFT's `PeftModel`): add, activate (several at
//!   once), disable, delete, merge a subset, save/load each (PEFT directories, atomic writes).

mod adapters;
mod builder;
mod config;
mod layer;
mod model_layers;

pub use adapters::{
    Combination, DisabledAdapters, LoraAdapter, MajoritySign, TaskMerge, DEFAULT_ADAPTER_NAME,
};
pub use builder::{embedding, linear, LoraBuilder};
pub use config::{scaling, LoraBias, LoraConfig, LoraInit, TaskType, MAX_PISSA_NITER};
pub(crate) use layer::path_name;
pub use layer::{
    custom_cuda_kernels_available, fused_kernel_available, set_custom_cuda_kernels, Conv2dConfig,
    LinearBase, LoraConv2d, LoraEmbedding, LoraLinear, LoraStack, ModuleCopy,
};
pub use model_layers::{
    forward_recomputable, forward_shared, MaybeLoraConv2d, MaybeLoraEmbedding, MaybeLoraLinear,
};

pub(crate) use layer::{all_finite, compute_kind, is_float};
