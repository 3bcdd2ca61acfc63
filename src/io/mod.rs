//! File formats: safetensors with atomic writes, and PEFT's key naming at the file boundary.
//!
//! In memory, adapter tensors are named by the adapted module's path
//! (`model.layers.0.self_attn.q_proj.lora_A.weight`). PEFT's files prefix every key with
//! `base_model.model.` (the `PeftModel` wrapper's path); [`to_peft_key`] adds it on save and
//! [`from_peft_key`] strips it on load.

mod safetensors;

pub use self::safetensors::{
    pt_metadata, read_safetensors, write_atomic, write_safetensors, SafetensorsFile,
};

/// The prefix PEFT gives every key of `adapter_model.safetensors`.
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";

/// PEFT's file name for adapter weights.
pub const PEFT_WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// PEFT's file name for the adapter config.
pub const PEFT_CONFIG_NAME: &str = "adapter_config.json";

/// The key PEFT writes for an in-memory adapter tensor name.
///
/// ```
/// assert_eq!(
///     tch_peft::io::to_peft_key("model.layers.0.q_proj.lora_A.weight"),
///     "base_model.model.model.layers.0.q_proj.lora_A.weight"
/// );
/// ```
pub fn to_peft_key(name: &str) -> String {
    format!("{PEFT_KEY_PREFIX}{name}")
}

/// The in-memory name for a key read from a file: strips `base_model.model.` when present.
pub fn from_peft_key(key: &str) -> &str {
    key.strip_prefix(PEFT_KEY_PREFIX).unwrap_or(key)
}
