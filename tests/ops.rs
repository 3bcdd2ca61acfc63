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

/// `f(x)` and the gradients of its inputs for the upstream gradient `g`, in f64.
fn grads_of(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    g: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let xs: Vec<Tensor> = inputs.iter().map(|t| t.detach().set_requires_grad(true)).collect();
    let y = f(&xs);
    (&y * g).sum(Kind::Double).backward();
    (y.detach(), xs.iter().map(Tensor::grad).collect())
}

#[test]
fn rms_norm_is_the_math_and_its_documented_backward() {
    use tch_peft::ops::rms_norm;
    let (rows, h, eps) = (6, 24, 1e-5);
    let x = randn(&[2, 3, h], Kind::Double);
    let w = randn(&[h], Kind::Double);
    let g = randn(&[2, 3, h], Kind::Double);
    let (y, grads) = grads_of(|t| rms_norm(&t[0], &t[1], eps).unwrap(), &[&x, &w], &g);
    // y = w ⊙ x / sqrt(mean x² + ε), in f64 from the definition
    let r = (x.square().mean_dim(-1, true, Kind::Double) + eps).rsqrt();
    let xh = &x * &r;
    assert!(max_abs_diff(&y, &(&w * &xh)) < 1e-12);
    // the kernels' backward: dn = dy ⊙ w, dx = r·(dn − x̂·mean(dn ⊙ x̂)), dw = Σ dy ⊙ x̂
    let dn = &g * &w;
    let dx = &r * (&dn - &xh * (&dn * &xh).mean_dim(-1, true, Kind::Double));
    let dw = (&g * &xh).view([rows, h]).sum_dim_intlist(0, false, Kind::Double);
    assert!(max_abs_diff(&grads[0], &dx) < 1e-12, "dx");
    assert!(max_abs_diff(&grads[1], &dw) < 1e-12, "dw");
    // bf16: the value rounds to bf16 after the f32 scale, then the weight's product rounds
    let (xb, wb) = (x.to_kind(Kind::BFloat16), w.to_kind(Kind::BFloat16));
    let yb = rms_norm(&xb, &wb, eps).unwrap();
    assert_eq!(yb.kind(), Kind::BFloat16);
    assert!(rel_diff(&yb, &y) < 1e-2);
    // checked inputs
    let bad_w = randn(&[h + 1], Kind::Double);
    assert!(matches!(rms_norm(&x, &bad_w, eps), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(rms_norm(&x, &w, f64::NAN), Err(Error::InvalidConfig { .. })));
    let ints = Tensor::zeros([2, h], (Kind::Int64, Device::Cpu));
    assert!(matches!(rms_norm(&ints, &w, eps), Err(Error::DtypeMismatch { .. })));
}

#[test]
fn add_rms_norm_is_the_add_then_the_norm_with_both_gradients() {
    use tch_peft::ops::{add_rms_norm, rms_norm};
    let (h, eps) = (16, 1e-6);
    let x = randn(&[3, h], Kind::Double);
    let r = randn(&[3, h], Kind::Double);
    let w = randn(&[h], Kind::Double);
    let (gs, gn) = (randn(&[3, h], Kind::Double), randn(&[3, h], Kind::Double));
    // one output of the pair: s and the norm side by side, each with its own upstream gradient
    let g = Tensor::cat(&[&gs, &gn], 1);
    let pair = |t: &[Tensor]| {
        let (s, n) = add_rms_norm(&t[0], &t[1], &t[2], eps).unwrap();
        Tensor::cat(&[s, n], 1)
    };
    let apart = |t: &[Tensor]| {
        let s = &t[0] + &t[1];
        let n = rms_norm(&s, &t[2], eps).unwrap();
        Tensor::cat(&[s, n], 1)
    };
    let (y, grads) = grads_of(pair, &[&x, &r, &w], &g);
    let (y_ref, grads_ref) = grads_of(apart, &[&x, &r, &w], &g);
    assert!(max_abs_diff(&y, &y_ref) < 1e-12);
    for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
        assert!(max_abs_diff(a, b) < 1e-12, "gradient {i}");
    }
    // both addends get the same gradient
    assert!(max_abs_diff(&grads[0], &grads[1]) < 1e-12);
    let bad = randn(&[2, h], Kind::Double);
    assert!(matches!(add_rms_norm(&x, &bad, &w, eps), Err(Error::ShapeMismatch { .. })));
    let ints = Tensor::zeros([3, h], (Kind::Int64, Device::Cpu));
    assert!(matches!(add_rms_norm(&x, &ints, &w, eps), Err(Error::DtypeMismatch { .. })));
    assert!(matches!(add_rms_norm(&x, &r, &w, -1.0), Err(Error::InvalidConfig { .. })));
}

#[test]
fn swiglu_is_the_math_and_its_documented_backward() {
    use tch_peft::ops::swiglu;
    let gate = randn(&[5, 16], Kind::Double) * 3.0;
    let up = randn(&[5, 16], Kind::Double);
    let g = randn(&[5, 16], Kind::Double);
    let (y, grads) = grads_of(|t| swiglu(&t[0], &t[1]).unwrap(), &[&gate, &up], &g);
    let sig = gate.sigmoid();
    let silu = &gate * &sig;
    assert!(max_abs_diff(&y, &(&silu * &up)) < 1e-12);
    let dg = &g * &up * &sig * ((&gate * (1.0 - &sig)) + 1.0);
    assert!(max_abs_diff(&grads[0], &dg) < 1e-12, "dg");
    assert!(max_abs_diff(&grads[1], &(&g * &silu)) < 1e-12, "du");
    let short = randn(&[5, 8], Kind::Double);
    assert!(matches!(swiglu(&gate, &short), Err(Error::ShapeMismatch { .. })));
    let f32_up = up.to_kind(Kind::Float);
    assert!(matches!(swiglu(&gate, &f32_up), Err(Error::DtypeMismatch { .. })));
}

#[test]
fn rotary_embedding_rotates_pairs_by_position_and_its_backward_is_the_inverse() {
    use tch_peft::ops::{apply_rotary, rotary_tables};
    let (b, s, hq, hk, d, theta) = (2, 5, 4, 2, 8, 500.0);
    let (cos, sin) = rotary_tables(s, d, theta, Kind::Double, Device::Cpu).unwrap();
    // the tables from the definition: angle[p, i] = p·θ^(−2(i mod D/2)/D)
    for (p, i) in [(0, 0), (3, 1), (4, 6), (2, 3)] {
        let angle = p as f64 * theta.powf(-2.0 * (i % (d / 2)) as f64 / d as f64);
        let c = cos.double_value(&[p, i]);
        assert!((c - angle.cos()).abs() < 1e-6, "cos[{p}, {i}] = {c}");
        assert!((sin.double_value(&[p, i]) - angle.sin()).abs() < 1e-6);
    }
    let q = randn(&[b, s, hq, d], Kind::Double);
    let k = randn(&[b, s, hk, d], Kind::Double);
    let (yq, yk) = apply_rotary(&q, Some(&k), &cos, &sin).unwrap();
    let yk = yk.unwrap();
    // pair (i, i + D/2) at position p turns by its angle: a rotation of the 2-vector
    let half = d / 2;
    for (bi, p, h, i) in [(0, 0, 0, 0), (1, 4, 3, 2), (0, 2, 1, 3)] {
        let (x1, x2) = (q.double_value(&[bi, p, h, i]), q.double_value(&[bi, p, h, i + half]));
        let (c, sn) = (cos.double_value(&[p, i]), sin.double_value(&[p, i]));
        assert!((yq.double_value(&[bi, p, h, i]) - (x1 * c - x2 * sn)).abs() < 1e-12);
        assert!((yq.double_value(&[bi, p, h, i + half]) - (x2 * c + x1 * sn)).abs() < 1e-12);
    }
    // a rotation keeps every pair's norm, for k too
    let norms =
        |t: &Tensor| (t.narrow(-1, 0, half).square() + t.narrow(-1, half, half).square()).sqrt();
    // (up to the f32 tables' cos² + sin² ≠ 1)
    assert!(max_abs_diff(&norms(&yk), &norms(&k)) < 1e-6);
    // backward: dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin) = the rotation by −angle
    let g = randn(&[b, s, hq, d], Kind::Double);
    let (_, grads) = grads_of(|t| apply_rotary(&t[0], None, &cos, &sin).unwrap().0, &[&q], &g);
    let (inverse, _) = apply_rotary(&g, None, &cos, &(-&sin)).unwrap();
    assert!(max_abs_diff(&grads[0], &inverse) < 1e-12);
    // checked inputs
    let (c4, s4) = rotary_tables(s - 1, d, theta, Kind::Double, Device::Cpu).unwrap();
    assert!(matches!(apply_rotary(&q, None, &c4, &s4), Err(Error::ShapeMismatch { .. })));
    let k_short = randn(&[b, s - 1, hk, d], Kind::Double);
    assert!(matches!(
        apply_rotary(&q, Some(&k_short), &cos, &sin),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(rotary_tables(4, 7, theta, Kind::Float, Device::Cpu).is_err());
    assert!(rotary_tables(4, 8, f64::INFINITY, Kind::Float, Device::Cpu).is_err());
}
