//! ReFT: parity with pyreft 0.1.0 (fixtures by `scripts/make_reft_fixtures.py`), R's
//! orthonormality through training, pyreft's position rules, the hook on the Llama, save/load,
//! and a LoReFT training run on the tiny Llama with the base bit-identical.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::models::llama::{load_weights, Llama, LlamaConfig};
use tch_peft::models::ResidualHook;
use tch_peft::reft::orthogonal::orthonormality_error;
use tch_peft::reft::{
    Activation, Intervention, InterventionConfig, InterventionKind, LowRankIntervention,
    Orthogonality, Positions, ReftConfig, ReftLayers, ReftModel,
};
use tch_peft::{io, Adapter, Error};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn every_intervention_matches_pyreft() {
    use InterventionKind::*;
    let cases = [
        ("loreft", LoReft, Activation::Linear, false),
        ("loreft_relu", LoReft, Activation::Relu, false),
        ("noreft", NoReft, Activation::Linear, true),
        ("nodireft", DiReft, Activation::Linear, true),
        ("nodireft_gelu", DiReft, Activation::Gelu, false),
        ("direft", DiReftOrthogonal, Activation::Linear, false),
        ("consreft", ConsReft, Activation::Linear, false),
        ("lobireft", LobiReft, Activation::Linear, false),
    ];
    for (case, kind, act_fn, add_bias) in cases {
        let file = fixture("reft").join(format!("{case}.safetensors"));
        let t: HashMap<String, Tensor> =
            io::read_safetensors(&file).unwrap().tensors.into_iter().collect();
        let sd: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("sd.").map(|k| (k.to_string(), v.shallow_clone())))
            .collect();
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = InterventionConfig { act_fn, add_bias, ..InterventionConfig::new(kind, 16, 4) };
        let iv = LowRankIntervention::new(&vs.root(), cfg).unwrap();
        // parameter count: the paper's 2dr + r for LoReFT
        let n: i64 = vs.trainable_variables().iter().map(Tensor::numel).sum::<usize>() as i64;
        assert_eq!(n, cfg.num_params(), "{case}");
        iv.load_pyreft(&sd, &file).unwrap();
        let out = iv.f_forward_t(&t["h"], false).unwrap();
        let d = max_abs_diff(&out, &t["out"]);
        assert!(d < 1e-5, "{case}: {d}");
        // what we would save is pyreft's state (R materialised)
        for (k, v) in iv.state_dict_pyreft().unwrap() {
            let theirs =
                if k == "rotate_layer" { &t["rotate_layer_materialised"] } else { &sd[&k] };
            assert!(max_abs_diff(&v, theirs) < 1e-6, "{case}: {k}");
        }
    }
    assert_eq!(InterventionConfig::new(InterventionKind::LoReft, 4096, 4).num_params(), 32_772);
}

#[test]
fn loading_a_pyreft_state_dict_checks_names_and_shapes() {
    let file = fixture("reft").join("loreft.safetensors");
    let t: HashMap<String, Tensor> =
        io::read_safetensors(&file).unwrap().tensors.into_iter().collect();
    let mut sd: HashMap<String, Tensor> = t
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("sd.").map(|k| (k.to_string(), v.shallow_clone())))
        .collect();
    let vs = nn::VarStore::new(Device::Cpu);
    let iv = LowRankIntervention::new(
        &vs.root(),
        InterventionConfig::new(InterventionKind::LoReft, 16, 2),
    )
    .unwrap();
    assert!(matches!(iv.load_pyreft(&sd, &file), Err(Error::ShapeMismatch { .. })));
    let vs = nn::VarStore::new(Device::Cpu);
    let iv = LowRankIntervention::new(
        &vs.root(),
        InterventionConfig::new(InterventionKind::LoReft, 16, 4),
    )
    .unwrap();
    sd.insert("extra".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
    assert!(matches!(iv.load_pyreft(&sd, &file), Err(Error::UnexpectedTensor { .. })));
    sd.remove("extra");
    sd.remove("bias");
    assert!(matches!(iv.load_pyreft(&sd, &file), Err(Error::MissingTensor { .. })));
}

#[test]
fn r_stays_orthonormal_through_many_adam_steps() {
    for mode in [Orthogonality::Retraction, Orthogonality::Parametrized] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = InterventionConfig {
            orthogonality: mode,
            ..InterventionConfig::new(InterventionKind::LoReft, 64, 8)
        };
        let iv = LowRankIntervention::new(&vs.root(), cfg).unwrap();
        let mut opt = nn::Adam::default().build(&vs, 0.05).unwrap();
        let x = randn(&[32, 64], Kind::Float);
        let target = randn(&[32, 64], Kind::Float);
        let loss = |iv: &LowRankIntervention| {
            (iv.f_forward_t(&x, true).unwrap() - &target).square().mean(Kind::Float)
        };
        let l0 = loss(&iv).double_value(&[]);
        for _ in 0..500 {
            opt.backward_step(&loss(&iv));
            iv.retract().unwrap();
        }
        let l1 = loss(&iv).double_value(&[]);
        assert!(l1 < l0 * 0.9, "{mode:?}: {l0} → {l1}");
        let r = tch::no_grad(|| iv.rotation()).unwrap().unwrap();
        let err = orthonormality_error(&r).unwrap();
        assert!(err < 1e-5, "{mode:?}: ‖RRᵀ − I‖ = {err}");
        if mode == Orthogonality::Parametrized {
            // the raw parameter has drifted: the parametrisation does the work
            let v = &vs.variables()["rotate_layer"];
            assert!(orthonormality_error(v).unwrap() > 1e-3);
        }
    }
    // without the retraction, R drifts: the check shows it
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let reft =
        ReftModel::new(&vs.root(), loreft_config(ReftLayers::all(), "f1", true, 16), 1).unwrap();
    for t in vs.trainable_variables() {
        set(&t, &(&t + randn(&t.size(), Kind::Float) * 0.1));
    }
    assert!(reft.orthonormality_error().unwrap() > 1e-3);
    reft.retract().unwrap();
    assert!(reft.orthonormality_error().unwrap() < 1e-5);
}

#[test]
fn positions_follow_pyreft() {
    let p: Positions = "f7+l7".parse().unwrap();
    assert_eq!(p.to_string(), "f7+l7");
    // n = 20: first 7, last 7 (tied: one list)
    let tied = p.locations(20, true);
    assert_eq!(tied.len(), 1);
    assert_eq!(tied[0], [0, 1, 2, 3, 4, 5, 6, 13, 14, 15, 16, 17, 18, 19]);
    // untied: two lists
    let untied = p.locations(20, false);
    assert_eq!(untied, vec![vec![0, 1, 2, 3, 4, 5, 6], vec![13, 14, 15, 16, 17, 18, 19]]);
    // n = 5: 5/2 = 2 each side, the rest padded with -1
    assert_eq!(
        p.locations(5, false),
        vec![vec![0, 1, -1, -1, -1, -1, -1], vec![3, 4, -1, -1, -1, -1, -1]]
    );
    // one-sided specs never split
    let l: Positions = "l3".parse().unwrap();
    assert_eq!(l.locations(10, false), vec![vec![7, 8, 9]]);
    let f: Positions = "f2".parse().unwrap();
    assert_eq!((f.first, f.last, f.to_string()), (2, 0, "f2".to_string()));
    for bad in ["", "x3", "f", "f1+", "f-1", "f0+l0", "l2+f1"] {
        assert!(bad.parse::<Positions>().is_err(), "{bad}");
    }
    // a batch with left padding of 2 on the second row
    let loc = "f1+l1"
        .parse::<Positions>()
        .unwrap()
        .batch_locations(&[4, 3], &[0, 2], true, Device::Cpu)
        .unwrap();
    assert_eq!(loc.size(), [1, 2, 2]);
    assert_eq!(Vec::<i64>::try_from(loc.reshape([-1])).unwrap(), [0, 3, 2, 4]);
}

fn loreft_config(layers: ReftLayers, positions: &str, tied: bool, d: i64) -> ReftConfig {
    ReftConfig {
        share_weights: tied,
        ..ReftConfig::new(
            InterventionConfig::new(InterventionKind::LoReft, d, 4),
            layers,
            positions.parse().unwrap(),
        )
    }
}

#[test]
fn only_intervened_positions_change_and_padding_slots_are_skipped() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let reft =
        ReftModel::new(&vs.root(), loreft_config(ReftLayers::List(vec![1]), "f2+l2", false, 8), 3)
            .unwrap();
    assert_eq!(reft.interventions().count(), 2, "untied: first and last");
    let h = randn(&[2, 7, 8], Kind::Float);
    // row 0: prompt of 7; row 1: prompt of 3 (→ 1 first, 1 last, pads)
    let loc =
        reft.config().positions.batch_locations(&[7, 3], &[0, 0], false, Device::Cpu).unwrap();
    let out = reft.hook(&loc).after_block(1, &h, false).unwrap();
    let changed = (&out - &h).abs().sum_dim_intlist(-1, false, Kind::Float).gt(0.0);
    let expected = Tensor::from_slice(&[
        true, true, false, false, false, true, true, //
        true, false, true, false, false, false, false,
    ])
    .view([2, 7]);
    assert!(changed.equal(&expected), "{changed}");
    // layer 0 has no intervention: identity
    assert!(reft.hook(&loc).after_block(0, &h, false).unwrap().equal(&h));
    // the untied interventions are different functions of the same state
    let (_, _, first) = reft.interventions().next().unwrap();
    let (_, _, last) = reft.interventions().nth(1).unwrap();
    let (x, y) = (h.get(0).narrow(0, 5, 1), out.get(0).narrow(0, 5, 1));
    assert!(max_abs_diff(&first.f_forward_t(&x, false).unwrap(), &y) > 1e-4);
    assert!(max_abs_diff(&last.f_forward_t(&x, false).unwrap(), &y) < 1e-6);
    // wrong shapes are errors, not aborts
    assert!(matches!(
        reft.apply(1, &randn(&[2, 7, 9], Kind::Float), &loc, false),
        Err(Error::ShapeMismatch { .. })
    ));
    let bad_loc = Tensor::zeros([1, 2, 2], (Kind::Int64, Device::Cpu));
    assert!(matches!(reft.apply(1, &h, &bad_loc, false), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        ReftModel::new(&vs.root(), loreft_config(ReftLayers::List(vec![3]), "f1", true, 8), 3),
        Err(Error::UnmatchedTarget { .. })
    ));
    // ReFT implements Adapter (bookkeeping) but not Applicable: nothing to merge, checked by
    // the compiler
    assert_eq!(Adapter::kind(&reft), tch_peft::AdapterKind::Reft);
}

#[test]
fn save_and_load_keep_outputs_and_every_setting() {
    tch::manual_seed(2);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ReftConfig {
        intervention: InterventionConfig {
            dropout: 0.1,
            act_fn: Activation::Tanh,
            add_bias: true,
            ..InterventionConfig::new(InterventionKind::NoReft, 8, 3)
        },
        ..loreft_config(ReftLayers::all(), "f1+l2", false, 8)
    };
    let reft = ReftModel::new(&vs.root(), cfg.clone(), 2).unwrap();
    let dir = temp_dir("reft-save");
    reft.save(&dir).unwrap();
    let vs2 = nn::VarStore::new(Device::Cpu);
    let back = ReftModel::load(&vs2.root(), &dir, 2).unwrap();
    assert_eq!(back.config(), &cfg);
    let h = randn(&[2, 6, 8], Kind::Float);
    let loc = cfg.positions.batch_locations(&[6, 5], &[0, 1], false, Device::Cpu).unwrap();
    for layer in 0..2 {
        let a = reft.apply(layer, &h, &loc, false).unwrap();
        let b = back.apply(layer, &h, &loc, false).unwrap();
        assert!(bit_equal(&a, &b), "layer {layer}");
    }
    let json = std::fs::read_to_string(dir.join(tch_peft::reft::REFT_CONFIG_NAME)).unwrap();
    assert!(
        json.contains("\"dropout\": 0.1") && json.contains("tanh") && json.contains("f1+l2"),
        "{json}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoReFT on the tiny Llama memorises continuations of fixed prompts; the base is untouched.
#[test]
fn loreft_trains_on_the_tiny_llama_with_the_base_bit_identical() {
    tch::manual_seed(3);
    let dir = fixture("llama").join("gqa");
    let cfg = LlamaConfig::from_pretrained(&dir).unwrap();
    let mut base_vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&base_vs.root(), &cfg, None).unwrap();
    load_weights(&base_vs, &dir, &cfg).unwrap();
    // the fixture's head (std 0.02) caps every logit near 0: sharpen it so that edited hidden
    // states can make confident predictions (the model stays frozen)
    tch::no_grad(|| {
        let mut head = base_vs.variables()["lm_head.weight"].shallow_clone();
        let _ = head.g_mul_scalar_(10.0);
    });
    base_vs.freeze();
    let before: Vec<(String, Tensor)> =
        base_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let reft_vs = nn::VarStore::new(Device::Cpu);
    let rcfg = loreft_config(ReftLayers::all(), "f2+l2", true, cfg.hidden_size);
    let reft = ReftModel::new(&reft_vs.root(), rcfg, cfg.num_hidden_layers).unwrap();
    assert_eq!(reft.num_params(), 2 * (2 * 64 * 4 + 4));
    // three prompts of 6 tokens, each to be continued by a fixed token (ReFT edits the prompt's
    // positions only, as pyreft trains it)
    let ids = Tensor::randint(cfg.vocab_size, [3, 7], (Kind::Int64, Device::Cpu));
    let loc =
        reft.config().positions.batch_locations(&[6, 6, 6], &[0, 0, 0], true, Device::Cpu).unwrap();
    let mut opt = nn::Adam::default().build(&reft_vs, 2e-2).unwrap();
    let loss = || {
        let logits = model.forward_hooked(&ids, None, true, Some(&reft.hook(&loc))).unwrap();
        // predict token 6 from the last prompt position
        let pred = logits.narrow(1, 5, 1).reshape([-1, cfg.vocab_size]);
        pred.cross_entropy_for_logits(&ids.narrow(1, 6, 1).reshape([-1]))
    };
    let l0 = loss().double_value(&[]);
    for _ in 0..100 {
        reft.step(&mut opt, &loss()).unwrap();
    }
    assert!(reft.orthonormality_error().unwrap() < 1e-5);
    let l1 = loss().double_value(&[]);
    assert!(l1 < 0.05 && l0 > 3.0, "{l0} → {l1}");
    for (k, v) in before {
        assert!(bit_equal(&base_vs.variables()[&k], &v), "{k} changed");
    }
}

/// pyvene save directories (torch pickles) import and reproduce pyreft's intervened logits on
/// the tiny Llama, with both of pyvene's key namings.
#[test]
fn pyvene_directories_import_and_match_pyreft_logits() {
    let llama_dir = fixture("llama").join("gqa");
    let cfg = LlamaConfig::from_pretrained(&llama_dir).unwrap();
    let base_vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&base_vs.root(), &cfg, None).unwrap();
    load_weights(&base_vs, &llama_dir, &cfg).unwrap();
    for (case, positions) in [("pyvene_loreft", "f1+l1"), ("pyvene_nodireft", "f1+l1")] {
        let dir = fixture("reft").join(case);
        let t: HashMap<String, Tensor> =
            io::read_safetensors(dir.join("io.safetensors")).unwrap().tensors.into_iter().collect();
        let check = |dir: &Path| {
            let vs = nn::VarStore::new(Device::Cpu);
            let reft = ReftModel::from_pyvene(
                &vs.root(),
                dir,
                cfg.num_hidden_layers,
                positions.parse().unwrap(),
                Activation::Linear,
                0.0,
            )
            .unwrap();
            // pyvene's locations [interventions, batch, positions]: per layer, its groups
            let groups = reft.config().groups() as i64;
            let loc = t["locations"].narrow(0, 0, groups);
            let loc = if groups == 1 { loc } else { t["locations"].shallow_clone() };
            let logits =
                model.forward_hooked(&t["input_ids"], None, false, Some(&reft.hook(&loc))).unwrap();
            let plain = model.forward_t(&t["input_ids"], None, false).unwrap();
            assert!(max_abs_diff(&plain, &t["logits"]) > 1e-3, "{case}: the intervention matters");
            let d = max_abs_diff(&logits, &t["logits"]);
            assert!(d < 1e-4, "{case}: {d}");
        };
        check(&dir);
        // the same directory with pyvene's earlier dotted key naming
        let old = temp_dir(&format!("pyvene-old-{case}"));
        let mut config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if let Some(key) = name.strip_prefix("intkey_").and_then(|k| k.strip_suffix(".bin")) {
                let (body, collision) = key.split_once('#').unwrap();
                let dotted = body
                    .replacen("layer_", "layer.", 1)
                    .replacen("_comp_", ".comp.", 1)
                    .replacen("_unit_", ".unit.", 1)
                    .replacen("_nunit_", ".nunit.", 1);
                config = config.replace(key, &format!("{dotted}#{collision}"));
                std::fs::copy(
                    dir.join(&name),
                    old.join(format!("intkey_{dotted}#{collision}.bin")),
                )
                .unwrap();
            }
        }
        std::fs::write(old.join("config.json"), config).unwrap();
        check(&old);
        let _ = std::fs::remove_dir_all(&old);
    }
    // a missing file is an error naming it
    let vs = nn::VarStore::new(Device::Cpu);
    let err = tch_peft::io::read_torch_dict(fixture("reft").join("nope.bin")).unwrap_err();
    assert!(err.to_string().contains("nope.bin"), "{err}");
    let err = ReftModel::from_pyvene(
        &vs.root(),
        fixture("reft"),
        2,
        "f1".parse().unwrap(),
        Activation::Linear,
        0.0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// ReFT and LoRA on one model: both train from their own stores, the base stays bit-identical.
#[test]
fn reft_and_lora_train_together() {
    tch::manual_seed(4);
    let dir = fixture("llama").join("gqa");
    let cfg = LlamaConfig::from_pretrained(&dir).unwrap();
    let (mut base_vs, lora_vs, reft_vs) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let lcfg = tch_peft::lora::LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        ..tch_peft::lora::LoraConfig::for_targets(["q_proj", "v_proj"])
    };
    let builder = tch_peft::lora::LoraBuilder::new(&lora_vs.root(), lcfg).unwrap();
    let model = Llama::new(&base_vs.root(), &cfg, Some(&builder)).unwrap();
    let lora = builder.finish().unwrap();
    load_weights(&base_vs, &dir, &cfg).unwrap();
    base_vs.freeze();
    let before: Vec<(String, Tensor)> =
        base_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let reft = ReftModel::new(
        &reft_vs.root(),
        loreft_config(ReftLayers::List(vec![1]), "l2", true, cfg.hidden_size),
        cfg.num_hidden_layers,
    )
    .unwrap();
    let ids = Tensor::randint(cfg.vocab_size, [2, 6], (Kind::Int64, Device::Cpu));
    let loc = reft.config().positions.batch_locations(&[6, 6], &[0, 0], true, Device::Cpu).unwrap();
    let mut opt_l = nn::Adam::default().build(&lora_vs, 1e-2).unwrap();
    let mut opt_r = nn::Adam::default().build(&reft_vs, 1e-2).unwrap();
    let lora_b0 = lora.layers()[0].lora_b().copy();
    let rot0 = reft.interventions().next().unwrap().2.rotation().unwrap().unwrap().detach().copy();
    for _ in 0..5 {
        let logits = model.forward_hooked(&ids, None, true, Some(&reft.hook(&loc))).unwrap();
        let loss = logits
            .narrow(1, 0, 5)
            .reshape([-1, cfg.vocab_size])
            .cross_entropy_for_logits(&ids.narrow(1, 1, 5).reshape([-1]));
        opt_l.zero_grad();
        opt_r.zero_grad();
        loss.backward();
        opt_l.step();
        opt_r.step();
        reft.retract().unwrap();
    }
    assert!(max_abs_diff(lora.layers()[0].lora_b(), &lora_b0) > 0.0, "LoRA trained");
    let rot1 = reft.interventions().next().unwrap().2.rotation().unwrap().unwrap();
    assert!(max_abs_diff(&rot1, &rot0) > 0.0, "ReFT trained");
    for (k, v) in before {
        assert!(bit_equal(&base_vs.variables()[&k], &v), "{k} changed");
    }
}

/// One intervention's state dict from a file: a pyvene pickle, and a safetensors re-export.
#[test]
fn an_intervention_loads_from_a_pickle_or_a_safetensors_file() {
    let dir = fixture("reft").join("pyvene_loreft");
    let pickle = dir.join("intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin");
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = InterventionConfig::new(InterventionKind::LoReft, 64, 4);
    let a = LowRankIntervention::new(&vs.root(), cfg).unwrap();
    a.load_pyreft_file(&pickle).unwrap();
    let out = temp_dir("reft-file").join("loreft.safetensors");
    let sd = a.state_dict_pyreft().unwrap();
    io::write_safetensors(&out, &sd, None).unwrap();
    let vs2 = nn::VarStore::new(Device::Cpu);
    let b = LowRankIntervention::new(&vs2.root(), cfg).unwrap();
    b.load_pyreft_file(&out).unwrap();
    let h = randn(&[5, 64], Kind::Float);
    assert!(bit_equal(&a.f_forward_t(&h, false).unwrap(), &b.f_forward_t(&h, false).unwrap()));
    let raw: HashMap<String, Tensor> = io::read_torch_dict(&pickle).unwrap().into_iter().collect();
    assert_eq!(raw["rotate_layer"].size(), [64, 4]);
    assert!(bit_equal(
        &sd.iter().find(|(k, _)| k == "rotate_layer").unwrap().1,
        &raw["rotate_layer"]
    ));
    // a file that is not a pickle
    let err = b.load_pyreft_file(fixture("reft").join("versions.json")).unwrap_err();
    assert!(matches!(err, Error::CorruptFile { .. }), "{err}");
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}
