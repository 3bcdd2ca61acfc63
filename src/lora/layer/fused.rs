//! The fused LoRA and DoRA Linear autograd nodes (`csrc/lora_linear.cpp`), reached through a
//! small C ABI.
//!
//! tch cannot define a custom backward pass from Rust, so these are C++ compiled by `build.rs`
//! against the same libtorch. One node serves one layer or several sharing an input, LoRA and
//! DoRA alike: it writes the input gradient once, `dx = g·(W + s·BA)`, instead of `g·W`, a
//! full-size `s·(gB)·A` and their sum, and is one autograd node instead of about ten
//! dispatched ops per layer (its bandwidth-bound passes — a group's low-rank outputs, DoRA's
//! weight-side part and magnitude reduction — run as NVRTC kernels on CUDA,
//! `csrc/cuda_kernels.cpp`). Without it (a `doc-only` build, or headers not found) the layer
//! falls back to composing tch ops, which compute the same values.

pub(crate) use crate::sys::{lora_group, DoraMember, GroupMember, MemberWeight};
