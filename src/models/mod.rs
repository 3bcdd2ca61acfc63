//! Reference models with Hugging Face parameter names, built so that adapters attach to them:
//! their linear layers go through [`crate::lora::LoraBuilder`].

pub mod bert;
pub mod gguf;
#[cfg(feature = "tokenizer")]
mod gguf_tokenizer;
pub mod llama;

pub use bert::{Bert, BertConfig};
pub use llama::{Llama, LlamaConfig};

/// A callback on a model's residual stream: [`Llama::forward_hooked`] calls it after every
/// decoder block it may edit ([`edits_block`](Self::edits_block)) with the block's output
/// `[batch, seq, hidden]` and continues with the tensor it returns. ReFT implements it; any
/// model can call it at its own hook points.
pub trait ResidualHook {
    /// The (possibly edited) hidden states after block `layer` (0-based).
    fn after_block(
        &self,
        layer: i64,
        hidden: &tch::Tensor,
        train: bool,
    ) -> crate::Result<tch::Tensor>;

    /// Whether [`after_block`](Self::after_block) may change block `layer`'s output. Where it
    /// says `false` a model may skip the call (Llama does), and can fuse that block's residual
    /// add into the next norm ([`crate::ops::add_rms_norm`]). Default: `true`.
    fn edits_block(&self, layer: i64) -> bool {
        let _ = layer;
        true
    }

    /// Whether [`after_block`](Self::after_block) with `train` draws random numbers (dropout),
    /// so that running a block again gives other values: a checkpointed step
    /// ([`Llama::causal_lm_backward_checkpointed`]) refuses such a hook. Default: `true`, as a
    /// hook that cannot say is not known to be deterministic.
    fn draws_random(&self, train: bool) -> bool {
        let _ = train;
        true
    }
}

/// The largest vocabulary a model config may declare (`vocab_size`): 2²⁴.
pub const MAX_VOCAB: i64 = 1 << 24;
/// The largest width, MLP width or position table a model config may declare: 2²⁰.
pub const MAX_WIDTH: i64 = 1 << 20;
/// The most layers, heads or head width a model config may declare: 2¹².
pub const MAX_COUNT: i64 = 1 << 12;
/// The most parameters a model config may describe: 2⁴¹.
pub const MAX_PARAMETERS: i64 = 1 << 41;

/// `field` must lie in `1..=max`.
pub(crate) fn check_size(field: &str, v: i64, max: i64) -> crate::Result<()> {
    if (1..=max).contains(&v) {
        Ok(())
    } else {
        Err(crate::Error::config(field, format!("{v} is not in 1..={max}")))
    }
}

/// `Σ a·b` over `terms`, `None` on overflow or past [`MAX_PARAMETERS`].
pub(crate) fn count_parameters(terms: &[(i64, i64)]) -> Option<i64> {
    terms
        .iter()
        .try_fold(0i64, |acc, &(a, b)| acc.checked_add(a.checked_mul(b)?))
        .filter(|&n| n <= MAX_PARAMETERS)
}

/// A config read from a model directory may not describe more parameters than its weight files
/// hold bytes (one byte per parameter at the least): checked before anything is allocated.
/// Directories without weight files are not checked.
pub(crate) fn check_against_weights(
    dir: &std::path::Path,
    parameters: i64,
    files: crate::Result<Vec<std::path::PathBuf>>,
) -> crate::Result<()> {
    let Ok(files) = files else { return Ok(()) };
    let mut bytes = 0u64;
    for f in &files {
        // a shard the index lists must be there: a missing one cannot vouch for the size
        let (_, len) = crate::io::open_regular(f)?;
        bytes = bytes.saturating_add(len);
    }
    if bytes > 0 && (parameters as u64) > bytes {
        return Err(crate::Error::CorruptFile {
            file: dir.join("config.json"),
            reason: format!(
                "the config describes {parameters} parameters, but the weight files hold only \
                 {bytes} bytes"
            ),
        });
    }
    Ok(())
}

/// An attention mask, when given, must be `[batch, seq]`.
pub(crate) fn check_mask(
    attention_mask: Option<&tch::Tensor>,
    b: i64,
    s: i64,
) -> crate::Result<()> {
    match attention_mask {
        Some(m) if m.size() != [b, s] => Err(crate::Error::ShapeMismatch {
            name: "attention_mask".into(),
            expected: vec![b, s],
            actual: m.size(),
        }),
        _ => Ok(()),
    }
}

/// Checks `input_ids` (`[batch, seq]`, int64) and `attention_mask` (`[batch, seq]`) and embeds
/// the ids with `table`; returns `(batch, seq, embeddings)`. An id outside `[0, vocab)` is an
/// error: checked up front on CUDA (where the lookup would be a fatal device assert), caught
/// from the lookup itself on the CPU at no extra cost.
pub(crate) fn embed_checked(
    table: &crate::lora::MaybeLoraEmbedding,
    input_ids: &tch::Tensor,
    attention_mask: Option<&tch::Tensor>,
    vocab: i64,
) -> crate::Result<(i64, i64, tch::Tensor)> {
    use crate::Error;
    let size = input_ids.size();
    if size.len() != 2 || input_ids.kind() != tch::Kind::Int64 {
        return Err(Error::ShapeMismatch {
            name: "input_ids (int64)".into(),
            expected: vec![-1, -1],
            actual: size,
        });
    }
    let (b, s) = (size[0], size[1]);
    check_mask(attention_mask, b, s)?;
    let device = table.weight().device();
    let bad_ids = || Error::TokenOutOfRange { input: "input_ids", vocab_size: vocab };
    let ids = input_ids.to_device(device);
    if device.is_cuda() {
        let out_of_range = ids.lt(0).logical_or(&ids.ge(vocab)).any();
        if out_of_range.int64_value(&[]) != 0 {
            return Err(bad_ids());
        }
    }
    let emb = table.f_forward(&ids).map_err(|_| bad_ids())?;
    Ok((b, s, emb))
}
