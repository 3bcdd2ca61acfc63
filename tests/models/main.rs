//! The reference models (one test binary): BERT and Llama against transformers' outputs.

#[path = "../common/mod.rs"]
mod common;

mod bert;
#[cfg(feature = "tokenizer")]
mod gguf_tokenizer;
mod llama;
