//! Model operations fused for speed and memory, as building blocks for any model graph: today
//! the linear cross-entropy of a language-model head ([`linear_cross_entropy`],
//! [`causal_lm_loss`]), which never holds the full `[tokens, vocab]` logits.
//!
//! Each op has one meaning whatever runs it: an autograd node of the crate's C++ where that was
//! compiled, else the same formula in composed libtorch ops (a `doc-only` build), checked
//! against the composed ops in the tests.

mod cross_entropy;

#[doc(hidden)]
pub use cross_entropy::composed as linear_cross_entropy_composed;
pub use cross_entropy::{causal_lm_loss, linear_cross_entropy, LinearCrossEntropy, Reduction};
