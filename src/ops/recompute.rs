//! Outputs that the LoRA node consuming them may recompute in its backward instead of keeping.
//!
//! A LoRA layer's A gradient needs its input `x` (`dA = s·(g B)ᵀ x`), so the LoRA node keeps
//! `x` from forward to backward. When `x` is an RMSNorm's or a SwiGLU's output, the op's own
//! node already keeps what `x` is made from (the norm's input, the gate and up projections):
//! keeping `x` as well doubles that memory. A [`Recomputable`] is such an output with the recipe
//! for it; handed to [`lora::forward_recomputable`](crate::lora::forward_recomputable), the
//! node keeps the recipe's tensors (already held) and replays the op's kernel in its backward,
//! bit for bit. In a Llama-3.2-1B LoRA step at 8 × 1024 tokens that is 3.2 GB less at a cost of
//! one more pass of each replayed op (figures in `docs/PERFORMANCE.md`).
//!
//! Recipes exist where the CUDA kernels ran (bf16 on CUDA, autograd recording, an input of the
//! op requiring grad, recomputation on: [`set_recompute`]); elsewhere a `Recomputable` is a
//! plain tensor and the node keeps `x`. The node checks the version counters of the output and
//! of the recipe's tensors: after an in-place change to any of them it keeps `x` instead.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;

static RECOMPUTE: AtomicBool = AtomicBool::new(true);

/// Switches recomputation of [`Recomputable`] inputs on or off for the process (on by default;
/// off keeps every LoRA node's input, trading memory for the replayed passes).
pub fn set_recompute(on: bool) {
    RECOMPUTE.store(on, Ordering::Relaxed);
}

/// Whether [`Recomputable`] outputs carry their recipe (see [`set_recompute`]).
pub fn recompute_enabled() -> bool {
    RECOMPUTE.load(Ordering::Relaxed)
}

/// How an output is remade by the kernel that made it.
#[derive(Debug)]
pub(crate) enum RecipeKind {
    /// `rms_norm(src, weight, eps)`; `src` is what the norm's node keeps.
    RmsNorm { src: Tensor, weight: Tensor, eps: f64 },
    /// `swiglu(gate, up)`.
    SwiGlu { gate: Tensor, up: Tensor },
}

/// A recipe with the version counters of its two inputs and of the output when the op ran: the
/// LoRA node replays only what nothing has changed in place since (else it keeps its input).
#[derive(Debug)]
pub(crate) struct Recipe {
    pub(crate) kind: RecipeKind,
    pub(crate) versions: [i64; 3],
}

/// An op's output, with (where its kernel ran) how to replay it; see the module documentation.
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// let (g, u) = (Tensor::randn([4, 8], (Kind::Float, Device::Cpu)), Tensor::randn([4, 8], (Kind::Float, Device::Cpu)));
/// let y = tch_peft::ops::swiglu_recomputable(&g, &u)?;
/// assert!(y.tensor().allclose(&tch_peft::ops::swiglu(&g, &u)?, 0.0, 0.0, false));
/// assert!(!y.has_recipe()); // composed ops on the CPU: nothing to replay
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Recomputable {
    value: Tensor,
    recipe: Option<Recipe>,
}

impl Recomputable {
    /// A tensor without a recipe: a LoRA node keeps it as it is.
    pub fn plain(value: Tensor) -> Self {
        Recomputable { value, recipe: None }
    }

    /// `value` made by the kernel `kind` replays, the recipe kept only while recomputation is
    /// on, autograd records and the op's own node was recorded (an input requires grad: only
    /// then does that node keep the recipe's tensors anyway).
    pub(crate) fn with_recipe(value: Tensor, kind: RecipeKind) -> Self {
        let (a, b) = match &kind {
            RecipeKind::RmsNorm { src, weight, .. } => (src, weight),
            RecipeKind::SwiGlu { gate, up } => (gate, up),
        };
        #[cfg(tch_peft_csrc)]
        let recipe = if recompute_enabled()
            && crate::sys::grad_enabled()
            && (a.requires_grad() || b.requires_grad())
        {
            let v = crate::sys::tensor_version;
            let versions = [v(a), v(b), v(&value)];
            Some(Recipe { versions, kind })
        } else {
            None
        };
        #[cfg(not(tch_peft_csrc))]
        let recipe = {
            let _ = (a, b);
            None
        };
        Recomputable { value, recipe }
    }

    /// The output.
    pub fn tensor(&self) -> &Tensor {
        &self.value
    }

    /// The output, the recipe dropped.
    pub fn into_tensor(self) -> Tensor {
        self.value
    }

    /// Whether a LoRA node fed this output would replay it instead of keeping it.
    pub fn has_recipe(&self) -> bool {
        self.recipe.is_some()
    }

    pub(crate) fn recipe(&self) -> Option<&Recipe> {
        self.recipe.as_ref()
    }
}
