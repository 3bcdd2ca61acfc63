//! The fused ops against the same formulas in composed libtorch ops: values and gradients in
//! f64 (tight) and bf16 (the head's rounding), and their input checks.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use tch_peft::ops::{
    causal_lm_loss, linear_cross_entropy, linear_cross_entropy_composed, LinearCrossEntropy,
    Reduction,
};
use tch_peft::Error;

/// Loss and the gradients of hidden, weight and bias, by `f`.
fn loss_and_grads(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    h: &Tensor,
    w: &Tensor,
    b: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let (h, w, b) = (
        h.detach().set_requires_grad(true),
        w.detach().set_requires_grad(true),
        b.detach().set_requires_grad(true),
    );
    let loss = f(&h, &w, &b);
    // an upstream gradient other than 1 reaches every input
    (&loss * 0.75).backward();
    (loss.detach(), h.grad(), w.grad(), b.grad())
}

#[test]
fn the_chunked_linear_cross_entropy_is_the_composed_one_with_its_gradients() {
    let (n, h, v) = (37, 16, 53);
    let hidden = randn(&[n, h], Kind::Double);
    let weight = randn(&[v, h], Kind::Double) * 0.5;
    let bias = randn(&[v], Kind::Double);
    let labels = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let _ = labels.narrow(0, 3, 4).fill_(-100); // some ignored rows
    for (reduction, chunk) in
        [(Reduction::Mean, Some(5)), (Reduction::Sum, Some(64)), (Reduction::Mean, None)]
    {
        let opts = LinearCrossEntropy { reduction, chunk_rows: chunk, ..Default::default() };
        let fused = loss_and_grads(
            |h, w, b| linear_cross_entropy(h, w, Some(b), &labels, &opts).unwrap(),
            &hidden,
            &weight,
            &bias,
        );
        let reference = loss_and_grads(
            |h, w, b| linear_cross_entropy_composed(h, w, Some(b), &labels, &opts).unwrap(),
            &hidden,
            &weight,
            &bias,
        );
        // the loss is f32 (as transformers upcasts the logits); the gradients keep f64
        // (relative: a sum over the rows is ~100, where an f32 ulp is ~1e-5)
        assert!(rel_diff(&fused.0, &reference.0) < 1e-6, "{reduction:?} loss");
        for (name, a, b) in [
            ("h", &fused.1, &reference.1),
            ("w", &fused.2, &reference.2),
            ("b", &fused.3, &reference.3),
        ] {
            let d = rel_diff(a, b);
            assert!(d < 1e-5, "{reduction:?} chunk {chunk:?} grad {name}: {d}");
        }
    }
    // ignored labels may hold anything; frozen inputs get no gradient
    let odd = labels.copy();
    let _ = odd.narrow(0, 3, 4).fill_(-7);
    let opts = LinearCrossEntropy { ignore_index: -7, chunk_rows: Some(8), ..Default::default() };
    let h_only = hidden.detach().set_requires_grad(true);
    let loss = linear_cross_entropy(&h_only, &weight, None, &odd, &opts).unwrap();
    loss.backward();
    let expected = linear_cross_entropy_composed(&hidden, &weight, None, &odd, &opts).unwrap();
    assert!(max_abs_diff(&loss, &expected) < 1e-5);
    assert!(h_only.grad().defined() && !weight.grad().defined());
}

#[test]
fn in_bf16_the_fused_loss_and_input_gradient_round_as_the_composed_ones() {
    let (n, h, v) = (64, 32, 301);
    let hidden = randn(&[n, h], Kind::BFloat16);
    let weight = (randn(&[v, h], Kind::Float) * 0.2).to_kind(Kind::BFloat16);
    let labels = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let opts = LinearCrossEntropy { chunk_rows: Some(16), ..Default::default() };
    let run = |fused: bool| {
        let x = hidden.detach().set_requires_grad(true);
        let loss = if fused {
            linear_cross_entropy(&x, &weight, None, &labels, &opts).unwrap()
        } else {
            linear_cross_entropy_composed(&x, &weight, None, &labels, &opts).unwrap()
        };
        loss.backward();
        (loss.detach(), x.grad())
    };
    let ((l1, g1), (l2, g2)) = (run(true), run(false));
    assert_eq!(l1.kind(), Kind::Float);
    assert_eq!(g1.kind(), Kind::BFloat16);
    assert!(max_abs_diff(&l1, &l2) < 1e-4, "{}", max_abs_diff(&l1, &l2));
    // one bf16 rounding of the logits' gradient either way: within a few bf16 ulps
    assert!(rel_diff(&g1, &g2) < 2e-2, "{}", rel_diff(&g1, &g2));
}

#[test]
fn the_causal_lm_loss_shifts_the_labels_as_transformers() {
    let (b, t, h, v) = (2, 5, 8, 11);
    let hidden = randn(&[b, t, h], Kind::Double);
    let weight = randn(&[v, h], Kind::Double);
    let labels = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
    let opts = LinearCrossEntropy::default();
    let loss = causal_lm_loss(&hidden, &weight, None, &labels, &opts).unwrap();
    // by hand: position i of each sequence predicts label i + 1
    let logits = hidden.narrow(1, 0, t - 1).reshape([-1, h]).matmul(&weight.tr());
    let targets = labels.narrow(1, 1, t - 1).reshape([-1]);
    let expected =
        logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Mean, -100, 0.0);
    assert!(max_abs_diff(&loss, &expected) < 1e-5);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let hidden = randn(&[4, 8], Kind::Float);
    let weight = randn(&[10, 8], Kind::Float);
    let labels = Tensor::from_slice(&[1i64, 2, 3, 4]);
    let opts = LinearCrossEntropy::default();
    let err = |r: tch_peft::Result<Tensor>| r.expect_err("refused");
    let out_of_range = Tensor::from_slice(&[1i64, 10, 3, -100]);
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &weight, None, &out_of_range, &opts)),
        Error::TokenOutOfRange { vocab_size: 10, .. }
    ));
    let negative = Tensor::from_slice(&[1i64, -1, 3, 4]);
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &weight, None, &negative, &opts)),
        Error::TokenOutOfRange { .. }
    ));
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &randn(&[10, 7], Kind::Float), None, &labels, &opts)),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &weight.to_kind(Kind::Double), None, &labels, &opts)),
        Error::DtypeMismatch { .. }
    ));
    assert!(matches!(
        err(linear_cross_entropy(
            &hidden,
            &weight,
            Some(&randn(&[9], Kind::Float)),
            &labels,
            &opts
        )),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &weight, None, &labels.to_kind(Kind::Int), &opts)),
        Error::DtypeMismatch { .. }
    ));
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &weight, None, &labels.narrow(0, 0, 3), &opts)),
        Error::ShapeMismatch { .. }
    ));
    let zero_chunk = LinearCrossEntropy { chunk_rows: Some(0), ..Default::default() };
    assert!(matches!(
        err(linear_cross_entropy(&hidden, &weight, None, &labels, &zero_chunk)),
        Error::InvalidConfig { .. }
    ));
    // every row ignored: NaN, as torch's mean over no rows
    let none = Tensor::from_slice(&[-100i64; 4]);
    let loss = linear_cross_entropy(&hidden, &weight, None, &none, &opts).unwrap();
    assert!(loss.double_value(&[]).is_nan());
}
