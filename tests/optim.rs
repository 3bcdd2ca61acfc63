//! `FusedAdamW` against libtorch's own AdamW (tch's `nn::AdamW`): the same trajectories over
//! several steps, fused and composed, with mixed dtypes, a parameter without a gradient, and
//! learning-rate changes.

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::optim::FusedAdamW;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Two sets of stores with the same variables: `a` (f32 [5, 4]), `b` (f32 [7]) in the first
/// store of a pair, `c` (f64 [3, 3]) in the second.
fn stores() -> [(nn::VarStore, nn::VarStore); 2] {
    tch::manual_seed(3);
    let make = || {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = vs.root().zeros("a", &[5, 4]);
        let _ = vs.root().zeros("b", &[7]);
        let mut cs = nn::VarStore::new(Device::Cpu);
        let _ = cs.root().zeros("c", &[3, 3]);
        cs.double();
        (vs, cs)
    };
    let (x, y) = (make(), make());
    tch::no_grad(|| {
        for (sx, sy) in [(&x.0, &y.0), (&x.1, &y.1)] {
            let vy = sy.variables();
            for (k, t) in sx.variables() {
                let init = Tensor::randn(t.size(), (t.kind(), Device::Cpu));
                t.shallow_clone().copy_(&init);
                vy[&k].shallow_clone().copy_(&init);
            }
        }
    });
    [x, y]
}

fn loss(vs: &(nn::VarStore, nn::VarStore), step: i64) -> Tensor {
    let (v, c) = (vs.0.variables(), vs.1.variables());
    let w = step as f64 + 1.0;
    (v["a"].square() * w).sum(Kind::Float)
        + (&v["b"] - 0.5).pow_tensor_scalar(4).sum(Kind::Float)
        + c["c"].sin().sum(Kind::Double).to_kind(Kind::Float)
}

#[test]
fn matches_libtorch_adamw_fused_and_composed() {
    for fused in [true, false] {
        let [ours_vs, ref_vs] = stores();
        let params: Vec<Tensor> = ours_vs
            .0
            .variables()
            .into_values()
            .chain(ours_vs.1.variables().into_values())
            .collect();
        let mut ours = FusedAdamW::new(params, 0.05).unwrap().weight_decay(0.1).unwrap();
        ours.set_fused(fused);
        assert_eq!(ours.len(), 3);
        assert_eq!(ours_vs.1.variables()["c"].kind(), Kind::Double);
        let adamw = nn::AdamW { wd: 0.1, ..Default::default() };
        let mut r0 = adamw.build(&ref_vs.0, 0.05).unwrap();
        let mut r1 = adamw.build(&ref_vs.1, 0.05).unwrap();
        let before = loss(&ours_vs, 0).double_value(&[]);
        for step in 0..6 {
            if step == 3 {
                ours.set_lr(0.02);
                r0.set_lr(0.02);
                r1.set_lr(0.02);
            }
            ours.backward_step(&loss(&ours_vs, step)).unwrap();
            r0.zero_grad();
            r1.zero_grad();
            loss(&ref_vs, step).backward();
            r0.step();
            r1.step();
        }
        assert!(loss(&ours_vs, 0).double_value(&[]) < before - 0.1, "it trained");
        let o: Vec<_> = ours_vs.0.variables().into_iter().chain(ours_vs.1.variables()).collect();
        let r: std::collections::HashMap<_, _> =
            ref_vs.0.variables().into_iter().chain(ref_vs.1.variables()).collect();
        for (k, t) in o {
            let d = max_diff(&t, &r[&k]);
            assert!(d < 1e-6, "fused {fused}: {k} differs by {d}");
        }
    }
}

#[test]
fn a_parameter_without_gradient_is_left_alone_and_bad_input_is_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let used = vs.root().randn("used", &[3], 0.0, 1.0);
    let unused = vs.root().randn("unused", &[3], 0.0, 1.0);
    let before = unused.copy();
    let mut opt = FusedAdamW::from_var_store(&vs, 0.1).unwrap();
    for _ in 0..3 {
        opt.backward_step(&used.square().sum(Kind::Float)).unwrap();
    }
    assert_eq!(max_diff(&unused, &before), 0.0, "no gradient, no update (no weight decay either)");
    // gradients are dropped, not zeroed
    opt.zero_grad();
    assert!(!used.grad().defined());
    let frozen = Tensor::ones([2], (Kind::Float, Device::Cpu));
    assert!(FusedAdamW::new([frozen], 0.1).is_err());
    let ints = Tensor::ones([2], (Kind::Int64, Device::Cpu));
    assert!(FusedAdamW::new([ints], 0.1).is_err());
    assert!(FusedAdamW::new([], 0.1).unwrap().betas(1.0, 0.9).is_err());
    assert!(FusedAdamW::new([], 0.1).unwrap().eps(0.0).is_err());
    assert!(FusedAdamW::new([], 0.1).unwrap().weight_decay(-1.0).is_err());
}
