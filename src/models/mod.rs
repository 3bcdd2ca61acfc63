//! Reference models with Hugging Face parameter names, built so that adapters attach to them:
//! their linear layers go through [`crate::lora::LoraBuilder`].

pub mod bert;
pub mod llama;

pub use bert::{Bert, BertConfig};
pub use llama::{Llama, LlamaConfig};

/// A callback on a model's residual stream: [`Llama::forward_hooked`] calls it after every
/// decoder block with the block's output `[batch, seq, hidden]` and continues with the tensor it
/// returns. ReFT implements it; any model can call it at its own hook points.
pub trait ResidualHook {
    /// The (possibly edited) hidden states after block `layer` (0-based).
    fn after_block(
        &self,
        layer: i64,
        hidden: &tch::Tensor,
        train: bool,
    ) -> crate::Result<tch::Tensor>;
}
