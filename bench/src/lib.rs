//! The experiment harness of tch-peft, kept out of the library: the method comparison on a real
//! sentence encoder and real data ([`compare`], [`data`]), run by `examples/compare`, timed by
//! `benches/compare.rs`; the GPU side-by-side harness lives in `benches/gpu/`.
//!
//! Not published: it depends on `tokenizers`, `indicatif` and `plotters`, which a user of the
//! library does not need.
#![deny(missing_docs)]

pub mod compare;
pub mod data;

pub use tch_peft::{Error, Result};

/// [`Error::InvalidConfig`] for a field of the harness's own inputs.
pub(crate) fn config_error(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { field: field.into(), reason: reason.into() }
}
