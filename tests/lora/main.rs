//! LoRA and DoRA (one test binary): layers (Linear, Conv2d, Embedding, the shared-input group),
//! DoRA, build-time targeting, named adapters and their combinations, and parity with PEFT 0.21
//! fixtures both ways.

#[path = "../common/mod.rs"]
mod common;

mod conv2d;
mod dora;
mod embedding;
mod linear;
mod model;
mod multi;
mod peft_multi;
mod peft_parity;
mod shared;
