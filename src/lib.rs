#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
// The README (the crate docs) shows a downstream `build.rs`, whose `fn main` is the point.
#![allow(clippy::needless_doctest_main)]

pub mod adapter;
pub mod checkpoint;
pub mod dist;
mod error;
pub mod freeze;
pub mod io;
pub mod lora;
pub mod memory;
pub mod merge;
pub mod models;
pub mod ops;
pub mod optim;
pub mod profiler;
pub mod quant;
pub mod reft;
#[cfg(tch_peft_csrc)]
mod sys;
pub mod target;
mod vars;

pub use adapter::{Adapter, AdapterKind, Applicable, ParamEntry, ParamReport};
pub use error::{Error, Result};
pub use lora::{LoraAdapter, LoraBuilder, LoraConfig, LoraLinear};
