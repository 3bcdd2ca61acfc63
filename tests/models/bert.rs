//! The BERT encoder against transformers 5 (fixture by `scripts/make_bert_fixtures.py`): last
//! hidden states with padding, mean pooling, the pooler; LoRA and ReFT attach to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::models::bert::{load_weights, mean_pool, Bert, BertConfig};
use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};
use tch_peft::{io, Error};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
}

fn io_tensors() -> BTreeMap<String, Tensor> {
    io::read_safetensors(dir().join("io.safetensors")).unwrap().tensors.into_iter().collect()
}

#[test]
fn hidden_states_pooling_and_pooler_match_transformers() {
    let cfg = BertConfig::from_pretrained(dir()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Bert::new(&vs.root(), &cfg, None).unwrap();
    load_weights(&vs, dir()).unwrap();
    let t = io_tensors();
    let h = model.forward_t(&t["input_ids"], Some(&t["attention_mask"]), false).unwrap();
    let keep = t["attention_mask"].to_kind(Kind::Float).unsqueeze(-1);
    let d = max_abs_diff(&(&h * &keep), &(&t["last_hidden_state"] * &keep));
    assert!(d < 1e-5, "last hidden state on tokens: {d}");
    let pooled = mean_pool(&h, &t["attention_mask"]);
    assert!(max_abs_diff(&pooled, &t["mean_pooled"]) < 1e-5);
    assert!(max_abs_diff(&model.pooled(&h, false).unwrap(), &t["pooler_output"]) < 1e-5);
    // bad input is an error, not an abort
    let long = Tensor::zeros([1, 41], (Kind::Int64, Device::Cpu));
    assert!(matches!(model.forward_t(&long, None, false), Err(Error::ShapeMismatch { .. })));
    let bad = Tensor::from_slice(&[5i64, 100]).view([1, 2]);
    assert!(model.forward_t(&bad, None, false).is_err());
}

#[test]
fn lora_and_reft_attach_to_the_encoder() {
    tch::manual_seed(0);
    let cfg = BertConfig::from_pretrained(dir()).unwrap();
    let (mut base, adapter_vs, reft_vs) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let lcfg = LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::for_targets(["query", "value"]) };
    let builder = LoraBuilder::new(&adapter_vs.root(), lcfg).unwrap();
    let model = Bert::new(&base.root(), &cfg, Some(&builder)).unwrap();
    let lora = builder.finish().unwrap();
    assert_eq!(lora.modules().len(), 4);
    load_weights(&base, dir()).unwrap();
    base.freeze();
    let reft = ReftModel::new(
        &reft_vs.root(),
        ReftConfig::new(
            InterventionConfig::new(InterventionKind::LoReft, 32, 2),
            ReftLayers::all(),
            "f1+l1".parse().unwrap(),
        ),
        cfg.num_hidden_layers,
    )
    .unwrap();
    let t = io_tensors();
    let lengths: Vec<i64> =
        Vec::try_from(t["attention_mask"].sum_dim_intlist(1, false, Kind::Int64)).unwrap();
    let loc =
        reft.config().positions.batch_locations(&lengths, &[0, 0, 0], true, Device::Cpu).unwrap();
    // a toy objective on the pooled embedding: both adapters train, the encoder does not
    let before: Vec<(String, Tensor)> =
        base.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let mut opt_l = nn::Adam::default().build(&adapter_vs, 1e-2).unwrap();
    let mut opt_r = nn::Adam::default().build(&reft_vs, 1e-2).unwrap();
    let target = randn(&[3, 32], Kind::Float);
    let loss = || {
        let h = model
            .forward_hooked(
                &t["input_ids"],
                Some(&t["attention_mask"]),
                true,
                Some(&reft.hook(&loc)),
            )
            .unwrap();
        (mean_pool(&h, &t["attention_mask"]) - &target).square().mean(Kind::Float)
    };
    let l0 = loss().double_value(&[]);
    for _ in 0..30 {
        let l = loss();
        opt_l.zero_grad();
        opt_r.zero_grad();
        l.backward();
        opt_l.step();
        opt_r.step();
        reft.retract().unwrap();
    }
    let l1 = loss().double_value(&[]);
    assert!(l1 < l0 * 0.8, "{l0} → {l1}");
    for (k, v) in before {
        assert!(bit_equal(&base.variables()[&k], &v), "{k} changed");
    }
}
