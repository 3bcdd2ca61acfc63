//! Activation checkpointing: a training step's backward that keeps only each segment's input
//! from the forward and recomputes the segment's activations when its gradient is due.
//!
//! A model split into segments `x₁ = f₁(x₀), …, x_L = f_L(x_{L−1})` followed by a loss
//! `ℓ(x_L)` (for a decoder: one segment per block, the loss being the final norm, the head
//! and the cross-entropy) normally holds every segment's activations from the forward until the
//! backward has passed through it. [`backward_checkpointed`] instead:
//!
//! 1. runs every segment without autograd, keeping only the boundaries `x₀ … x_L`;
//! 2. runs the loss on `x_L` with autograd and its backward, which gives `g_L = ∂ℓ/∂x_L` (and
//!    accumulates the gradients of the loss's own parameters);
//! 3. for `i = L … 1`: reruns `f_i` on `x_{i−1}` with autograd and back-propagates `g_i` through
//!    it, which accumulates `f_i`'s parameter gradients and gives `g_{i−1}`;
//! 4. back-propagates `g₀` into `x₀`'s own graph where `x₀` requires grad.
//!
//! The gradients are those of `ℓ(f_L(…f₁(x₀)))`'s ordinary backward (the same kernels on the
//! same inputs); what it costs is one more forward of every segment, and what it saves is every
//! activation but the boundaries and one segment's at a time. Segments must be deterministic —
//! no dropout or other random draw — since the recomputation must see the forward's values, and
//! must not modify their input in place (it is the kept boundary).
//!
//! ```
//! # fn main() -> tch_peft::Result<()> {
//! use tch::{nn, Device, Kind, Tensor};
//! let vs = nn::VarStore::new(Device::Cpu);
//! let (w1, w2) = (vs.root().randn("w1", &[4, 4], 0.0, 0.5), vs.root().randn("w2", &[4, 4], 0.0, 0.5));
//! let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
//! let f1 = |x: &Tensor| Ok(x.matmul(&w1).tanh());
//! let f2 = |x: &Tensor| Ok(x.matmul(&w2).tanh());
//! let loss = |x: &Tensor| Ok(x.square().mean(Kind::Float));
//! let l = tch_peft::checkpoint::backward_checkpointed(&x, &[&f1, &f2], &loss)?;
//! let (g1, g2) = (w1.grad().copy(), w2.grad().copy());
//! // the ordinary backward gives the same gradients
//! vs.variables().values().for_each(|t| { let _ = t.grad().zero_(); });
//! let plain = loss(&f2(&f1(&x)?)?)?;
//! plain.backward();
//! assert!(g1.allclose(&w1.grad(), 1e-6, 1e-7, false) && g2.allclose(&w2.grad(), 1e-6, 1e-7, false));
//! assert_eq!(l.double_value(&[]), plain.double_value(&[]));
//! # Ok(()) }
//! ```

use tch::Tensor;

use crate::{Error, Result};

/// A segment of a checkpointed model: its output from its input.
pub type Segment<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

/// The forward and backward of `loss(segments[L−1](…segments[0](input)))` with activation
/// checkpointing at every segment boundary (see the [module documentation](self)); returns the
/// loss, detached. Gradients accumulate into the parameters' `.grad` as
/// [`Tensor::backward`] would accumulate them, and into `input`'s graph where `input`
/// requires grad. Call it with autograd on (not inside `tch::no_grad`).
///
/// # Errors
/// A segment's or the loss's own error; a loss that is not a scalar, or a segment whose output
/// is not shaped like its input's gradient demands (`ShapeMismatch`).
pub fn backward_checkpointed(
    input: &Tensor,
    segments: &[&Segment<'_>],
    loss: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    // 1. the boundaries, without autograd
    let mut bounds = Vec::with_capacity(segments.len() + 1);
    bounds.push(input.detach());
    tch::no_grad(|| -> Result<()> {
        for f in segments {
            let next = f(bounds.last().expect("non-empty"))?;
            bounds.push(next);
        }
        Ok(())
    })?;
    // 2. the loss and its backward; a boundary needs a gradient where anything before it does
    let needs_grad = |i: usize| i > 0 || input.requires_grad();
    let last = bounds.len() - 1;
    let x_last = leaf(&bounds[last], needs_grad(last));
    let l = loss(&x_last)?;
    if l.numel() != 1 {
        return Err(Error::ShapeMismatch {
            name: "checkpointed loss".into(),
            expected: vec![],
            actual: l.size(),
        });
    }
    if l.requires_grad() {
        l.f_backward()?;
    }
    let mut grad = x_last.grad();
    // 3. each segment again, with autograd, and its backward
    for (i, f) in segments.iter().enumerate().rev() {
        bounds.truncate(i + 1); // the boundaries after this segment are done with
        if !grad.defined() {
            break; // nothing before this point reaches the loss
        }
        let x = leaf(&bounds[i], needs_grad(i));
        let y = f(&x)?;
        if y.size() != grad.size() {
            return Err(Error::ShapeMismatch {
                name: format!("checkpointed segment {i}'s recomputed output"),
                expected: grad.size(),
                actual: y.size(),
            });
        }
        if y.requires_grad() {
            backward_with_grad(&y, &grad)?;
        }
        grad = if needs_grad(i) { x.grad() } else { Tensor::new() };
    }
    // 4. into the input's own graph
    if input.requires_grad() && grad.defined() {
        backward_with_grad(input, &grad)?;
    }
    Ok(l.detach())
}

/// A fresh leaf holding `t`'s values, requiring grad where a gradient must reach it.
fn leaf(t: &Tensor, requires_grad: bool) -> Tensor {
    let x = t.detach();
    if requires_grad {
        x.set_requires_grad(true)
    } else {
        x
    }
}

/// `y.backward(grad)`.
fn backward_with_grad(y: &Tensor, grad: &Tensor) -> Result<()> {
    #[cfg(tch_peft_csrc)]
    {
        crate::sys::backward_with_grad(y, grad)?;
    }
    #[cfg(not(tch_peft_csrc))]
    {
        // ∂/∂y Σ y ⊙ grad = grad
        y.f_mul(&grad.detach())?.f_sum(y.kind())?.f_backward()?;
    }
    Ok(())
}
