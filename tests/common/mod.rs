//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod tiny;

use std::path::PathBuf;

use tch::{nn, Device, Kind, Tensor};

/// A fresh temporary directory, unique per test and process.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-peft-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Overwrites a variable's values (under no_grad).
pub fn set(t: &Tensor, v: &Tensor) {
    tch::no_grad(|| {
        let mut d = t.shallow_clone();
        d.copy_(v);
    });
}

/// Max absolute difference, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Whether two tensors are bit-identical (same dtype, shape and bytes).
pub fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    a.kind() == b.kind() && a.size() == b.size() && a.equal(b)
}

/// A linear layer in `vs` at `name` with seeded random weights of the store's kind.
pub fn base_linear(vs: &nn::VarStore, name: &str, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs.root() / name, i, o, Default::default())
}

/// Seeded random input.
pub fn randn(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (kind, Device::Cpu))
}
