//! Freezing: selections, plans (only unfrozen variables change under an optimizer), the report,
//! gradual unfreezing order, layer-wise learning rates on tch's optimizer groups, frozen
//! BatchNorm statistics, and a CNN adapted from one task to another with early layers frozen.

mod common;

use common::*;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::freeze::{
    module_report, FreezableBatchNorm, FreezePlan, GradualUnfreezing, LayerGroups, LayerwiseLr,
    Select,
};
use tch_peft::target::TargetModules;
use tch_peft::{Applicable, Error};

/// `embed` (table), `layers.{0,1,2}.{fc,norm}`, `head`.
fn store() -> (nn::VarStore, Vec<nn::Linear>) {
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = nn::embedding(vs.root() / "embed", 10, 4, Default::default());
    let mut fcs = Vec::new();
    for i in 0..3 {
        let p = vs.root() / "layers" / i;
        fcs.push(nn::linear(&p / "fc", 4, 4, Default::default()));
        let _ = nn::layer_norm(&p / "norm", vec![4], Default::default());
    }
    fcs.push(nn::linear(vs.root() / "head", 4, 2, Default::default()));
    (vs, fcs)
}

fn names(vs: &nn::VarStore) -> Vec<String> {
    let mut v: Vec<String> = vs.variables().into_keys().collect();
    v.sort();
    v
}

#[test]
fn selections_follow_peft_rules_and_refuse_what_matches_nothing() {
    let (vs, _) = store();
    let n = names(&vs);
    let s = Select::modules(["fc"]).resolve(&n).unwrap();
    assert_eq!(s.len(), 6, "{s:?}");
    let s = Select::modules(["layers.1.fc", "head"]).resolve(&n).unwrap();
    assert_eq!(s, ["head.bias", "head.weight", "layers.1.fc.bias", "layers.1.fc.weight"]);
    let s = Select::Targets(TargetModules::regex(r"layers\.[02]\.norm")).resolve(&n).unwrap();
    assert_eq!(s.len(), 4);
    let s = Select::first_layers(2).resolve(&n).unwrap();
    assert_eq!(s.len(), 8);
    assert!(s.iter().all(|x| x.starts_with("layers.0.") || x.starts_with("layers.1.")));
    let s = Select::layers(0..3).except(Select::modules(["norm"])).resolve(&n).unwrap();
    assert_eq!(s.len(), 6);
    let s = Select::predicate(|n| n.ends_with("bias")).resolve(&n).unwrap();
    assert_eq!(s.len(), 7);
    let s = Select::Any(vec![Select::modules(["embed"]), Select::modules(["head"])])
        .resolve(&n)
        .unwrap();
    assert_eq!(s, ["embed.weight", "head.bias", "head.weight"]);
    let err = Select::modules(["fc", "nope"]).resolve(&n).unwrap_err();
    assert!(matches!(err, Error::UnmatchedTarget { ref target, .. } if target == "nope"), "{err}");
    assert!(matches!(Select::layers(5..7).resolve(&n), Err(Error::UnmatchedTarget { .. })));
    assert!(Select::Targets(TargetModules::all_linear()).resolve(&n).is_err());
    assert!(Select::Targets(TargetModules::regex("(")).resolve(&n).is_err());
}

#[test]
fn only_unfrozen_variables_change_under_the_optimizer_and_revert_restores() {
    tch::manual_seed(0);
    let (vs, fcs) = store();
    let mut plan = FreezePlan::new(&vs, Select::first_layers(2)).unwrap();
    plan.apply().unwrap();
    assert!(matches!(plan.apply(), Err(Error::MergeState { .. })));
    // the report counts exactly: 2 blocks × (fc 4·4+4, norm 4+4) frozen
    let report = tch_peft::ParamReport::from_var_stores(&[&vs]);
    assert_eq!(report.total, 40 + 3 * 28 + 10);
    assert_eq!(report.trainable, report.total - 2 * 28);
    assert_eq!(plan.report().total, 56);
    assert_eq!(plan.report().trainable, 0);
    let before: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let mut opt = nn::Adam::default().build(&vs, 0.05).unwrap();
    let x = randn(&[8, 4], Kind::Float);
    for _ in 0..5 {
        let mut h = x.shallow_clone();
        for l in &fcs {
            h = h.apply(l).tanh();
        }
        opt.backward_step(&h.square().mean(Kind::Float));
    }
    let after = vs.variables();
    for (k, v) in &before {
        let frozen = k.starts_with("layers.0.") || k.starts_with("layers.1.");
        let trained_in_graph =
            k.contains(".fc.") || k.starts_with("head") || k.starts_with("layers.2.fc");
        if frozen {
            assert!(bit_equal(&after[k], v), "{k} changed while frozen");
        } else if trained_in_graph {
            assert!(!bit_equal(&after[k], v), "{k} did not train");
        }
    }
    plan.revert().unwrap();
    assert!(vs.trainable_variables().iter().all(Tensor::requires_grad));
    assert!(matches!(plan.revert(), Err(Error::MergeState { .. })));
}

#[test]
fn unfreezing_a_buffer_is_an_error_and_unfreezing_drops_stale_gradients() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _bn = nn::batch_norm2d(vs.root() / "bn", 3, Default::default());
    let fc = nn::linear(vs.root() / "fc", 3, 3, Default::default());
    let err = FreezePlan::unfreeze(&vs, Select::modules(["bn"])).unwrap_err();
    assert!(err.to_string().contains("running_"), "{err}");
    // a gradient computed, then the variable frozen (the wrong order) and unfrozen again:
    // the stale gradient is gone, so no update leaks
    let x = randn(&[2, 3], Kind::Float);
    x.apply(&fc).sum(Kind::Float).backward();
    assert!(fc.ws.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let mut freeze = FreezePlan::new(&vs, Select::modules(["fc"])).unwrap();
    freeze.apply().unwrap();
    freeze.revert().unwrap();
    assert_eq!(fc.ws.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn module_report_lists_modules_and_peft_summary() {
    let (vs, _) = store();
    let mut plan = FreezePlan::new(&vs, Select::modules(["embed", "layers.0.norm"])).unwrap();
    plan.apply().unwrap();
    let _ = nn::VarStore::new(Device::Cpu);
    let report = module_report(&vs);
    let norm = report.modules.iter().find(|r| r.module == "layers.0.norm").unwrap();
    assert_eq!((norm.params, norm.trainable, norm.trains()), (8, 0, "no"));
    assert_eq!(norm.variables, [("bias".to_string(), vec![4]), ("weight".to_string(), vec![4])]);
    assert_eq!((report.summary.trainable, report.summary.total), (86, 134));
    let text = report.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("module"));
    let row = |m: &str| lines.iter().find(|l| l.starts_with(&format!("{m} "))).copied().unwrap();
    assert!(row("embed").contains(" no "), "{text}");
    assert!(row("layers.0.fc").contains(" yes "), "{text}");
    assert!(row("layers.0.norm").contains("bias[4], weight[4]"), "{text}");
    assert_eq!(
        lines.last().unwrap(),
        &"trainable params: 86 || all params: 134 || trainable%: 64.1791"
    );
}

#[test]
fn gradual_unfreezing_goes_from_the_top_down() {
    let (vs, _) = store();
    let groups = LayerGroups::from_store(&vs, &[], &["head"]).unwrap();
    let first: Vec<&str> = groups.groups.iter().map(|g| g[0].as_str()).collect();
    assert_eq!(
        first,
        ["embed.weight", "layers.0.fc.bias", "layers.1.fc.bias", "layers.2.fc.bias", "head.bias"]
    );
    let mut s = GradualUnfreezing::new(&vs, groups.clone(), 2).unwrap();
    let trains = |g: usize| vs.variables()[&groups.groups[g][0]].requires_grad();
    assert_eq!(s.trainable_groups(), 1);
    assert!(trains(4) && !trains(3) && !trains(0));
    assert_eq!(s.advance(), 1, "every 2 calls");
    assert_eq!(s.advance(), 2);
    assert!(trains(3) && !trains(2));
    for _ in 0..10 {
        s.advance();
    }
    assert_eq!(s.trainable_groups(), 5);
    assert!((0..5).all(trains));
    assert!(GradualUnfreezing::new(&vs, groups, 0).is_err());
    assert!(LayerGroups::from_store(&vs, &[], &["classifier"]).is_err());
}

#[test]
fn layerwise_lr_decay_scales_each_group_and_skips_weight_decay_on_1d() {
    tch::manual_seed(1);
    let (vs, fcs) = store();
    let groups = LayerGroups::from_store(&vs, &[], &["head"]).unwrap();
    let lw = LayerwiseLr::assign_groups(&vs, &groups, 0.5, 0.0).unwrap();
    let (lr, wd) = (0.1, 0.01);
    let mut opt =
        nn::Sgd { momentum: 0.0, dampening: 0.0, wd: 0.0, nesterov: false }.build(&vs, lr).unwrap();
    lw.configure(&mut opt, lr, wd);
    let before: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let x = randn(&[8, 4], Kind::Float);
    let mut h = x.shallow_clone();
    for l in &fcs {
        h = h.apply(l).tanh();
    }
    let loss = h.square().mean(Kind::Float);
    opt.zero_grad();
    loss.backward();
    let grads: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.grad().defined())
        .map(|(k, v)| (k, v.grad().copy()))
        .collect();
    assert_eq!(grads.len(), 8, "fc and head weights and biases");
    opt.step();
    let after = vs.variables();
    for (k, g) in grads {
        let old = &before.iter().find(|(n, _)| *n == k).unwrap().1;
        let id = groups.group_of(&k).unwrap() as i32;
        let scale = 0.5f64.powi(4 - id);
        let decay = if old.dim() > 1 { wd } else { 0.0 };
        let expected = old - (&g + old * decay) * (lr * scale);
        assert!(max_abs_diff(&after[&k], &expected) < 1e-7, "{k}: group {id}");
    }
    assert!(LayerwiseLr::assign_groups(&vs, &groups, 1.5, 0.0).is_err());
}

#[test]
fn frozen_batch_norm_keeps_its_running_statistics_in_training() {
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = FreezableBatchNorm::new(nn::batch_norm2d(vs.root() / "bn", 3, Default::default()));
    let x = randn(&[4, 3, 5, 5], Kind::Float) * 3.0 + 1.0;
    let mean0 = bn.inner().running_mean.copy();
    bn.set_frozen(true);
    let y = bn.forward_t(&x, true);
    assert!(bit_equal(&bn.inner().running_mean, &mean0));
    // frozen: normalised with the stored statistics (eval semantics)
    assert!(max_abs_diff(&y, &bn.inner().forward_t(&x, false)) < 1e-6);
    bn.set_frozen(false);
    let _ = bn.forward_t(&x, true);
    assert!(!bit_equal(&bn.inner().running_mean, &mean0));
}

/// The claim: a small CNN trained on one task, its early layers (and their BatchNorm
/// statistics) frozen, adapts to a second task; the frozen layers stay bit-identical.
#[test]
fn a_cnn_adapts_to_a_second_task_with_early_layers_frozen() {
    tch::manual_seed(2);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let conv1 = nn::conv2d(
        &p / "features" / 0 / "conv",
        1,
        8,
        3,
        nn::ConvConfig { padding: 1, ..Default::default() },
    );
    let bn1 = FreezableBatchNorm::new(nn::batch_norm2d(
        &p / "features" / 0 / "bn",
        8,
        Default::default(),
    ));
    let conv2 = nn::conv2d(
        &p / "features" / 1 / "conv",
        8,
        8,
        3,
        nn::ConvConfig { padding: 1, ..Default::default() },
    );
    let head = nn::linear(&p / "head", 8 * 4, 2, Default::default());
    let forward = |x: &Tensor, train: bool| {
        let h = x.apply(&conv1).apply_t(&bn1, train).relu().max_pool2d_default(2);
        let h = h.apply(&conv2).relu().adaptive_avg_pool2d([2, 2]);
        h.flatten(1, -1).apply(&head)
    };
    // 8×8 images with one bright 2×2 blob; task A: left or right half, task B: top or bottom
    let data = |n: i64| {
        let pos = Tensor::randint(7, [n, 2], (Kind::Int64, Device::Cpu));
        let mut x = randn(&[n, 1, 8, 8], Kind::Float) * 0.1;
        let p: Vec<i64> = Vec::try_from(pos.reshape([-1])).unwrap();
        for i in 0..n as usize {
            let (r, c) = (p[2 * i], p[2 * i + 1]);
            let _ = x.get(i as i64).narrow(1, r, 2).narrow(2, c, 2).fill_(1.0);
        }
        x = x.detach();
        let row = pos.select(1, 0).ge(4).to_kind(Kind::Int64);
        let col = pos.select(1, 1).ge(4).to_kind(Kind::Int64);
        (x, col, row)
    };
    let acc = |x: &Tensor, y: &Tensor| {
        forward(x, false)
            .argmax(-1, false)
            .eq_tensor(y)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let (xa, ya, _) = data(256);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    for _ in 0..60 {
        opt.backward_step(&forward(&xa, true).cross_entropy_for_logits(&ya));
    }
    let (xt, yta, ytb) = data(256);
    assert!(acc(&xt, &yta) > 0.9, "task A learned: {}", acc(&xt, &yta));
    // task B: features.0 (conv, BN affine and statistics) frozen
    let mut plan = FreezePlan::new(&vs, Select::first_layers(1)).unwrap();
    plan.apply().unwrap();
    bn1.set_frozen(true);
    let frozen: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| k.starts_with("features.0."))
        .map(|(k, v)| (k, v.copy()))
        .collect();
    assert_eq!(frozen.len(), 6, "conv w/b, bn w/b and both running statistics");
    let (xb, _, yb) = data(256);
    let before_b = acc(&xt, &ytb);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    for _ in 0..60 {
        opt.backward_step(&forward(&xb, true).cross_entropy_for_logits(&yb));
    }
    let after_b = acc(&xt, &ytb);
    assert!(after_b > 0.9 && after_b > before_b + 0.2, "task B: {before_b} → {after_b}");
    for (k, v) in frozen {
        assert!(bit_equal(&vs.variables()[&k], &v), "{k} changed");
    }
}

#[test]
fn zero_size_variables_are_told_apart() {
    // every zero-size tensor has the null data pointer: a trainable one must not make a
    // zero-size buffer look optimizer-visible, nor give another zero-size variable its group
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _embed = (&root / "embed").zeros("weight", &[0, 4]);
    let _buffer = (&root / "layers" / 0 / "norm").zeros_no_train("running", &[0]);
    let _w = (&root / "layers" / 0 / "fc").randn("weight", &[4, 4], 0.0, 1.0);
    let _head = (&root / "head").zeros("bias", &[0]);
    let err = FreezePlan::unfreeze(&vs, Select::modules(["layers.0.norm"])).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let groups = LayerGroups::from_store(&vs, &[], &["head"]).unwrap();
    let lw = LayerwiseLr::assign_groups(&vs, &groups, 0.5, 0.0).unwrap();
    let vars = vs.variables_.lock().unwrap();
    let scale_of = |name: &str| {
        let t = &vars.named_variables[name];
        let v = vars.trainable_variables.iter().find(|v| v.tensor.is_set_to(t)).unwrap();
        lw.groups[v.group].0
    };
    // embed: group 0 of 3 (stem, block 0, head) → 0.5²; head → 1
    assert_eq!(scale_of("embed.weight"), 0.25);
    assert_eq!(scale_of("head.bias"), 1.0);
    assert_eq!(scale_of("layers.0.fc.weight"), 0.5);
}

#[test]
fn a_tied_variable_takes_its_lowest_layer_group() {
    // one tensor under two names (tied embeddings): the optimizer sees it twice, and both
    // entries get the group of the stem, whichever name the store lists first
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let embed = (&root / "embed").randn("weight", &[6, 4], 0.0, 1.0);
    let _w = (&root / "layers" / 0 / "fc").randn("weight", &[4, 4], 0.0, 1.0);
    let _tied = (&root / "head").add("weight", embed.shallow_clone(), true);
    let groups = LayerGroups::from_store(&vs, &[], &["head"]).unwrap();
    let lw = LayerwiseLr::assign_groups(&vs, &groups, 0.5, 0.0).unwrap();
    let vars = vs.variables_.lock().unwrap();
    let tied: Vec<f64> = vars
        .trainable_variables
        .iter()
        .filter(|v| v.tensor.is_set_to(&embed))
        .map(|v| lw.groups[v.group].0)
        .collect();
    assert_eq!(tied, [0.25, 0.25]);
}
