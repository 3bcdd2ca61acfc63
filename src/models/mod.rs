//! Reference models with Hugging Face parameter names, built so that adapters attach to them:
//! their linear layers go through [`crate::lora::LoraBuilder`].

pub mod llama;

pub use llama::{Llama, LlamaConfig};
