//! ReFT positions and loads: overflowing and huge position specs, negative offsets, a weights
//! file wrong in its second layer (nothing loaded), integer tensors, and configs that ask for
//! more parameters than the file holds.

use crate::common::temp_dir;
use tch::{nn, Device, Kind, Tensor};
use tch_peft::reft::{
    InterventionConfig, InterventionKind, Positions, ReftConfig, ReftLayers, ReftModel,
};
use tch_peft::{io, Adapter, Error};

#[test]
fn position_specs_are_bounded() {
    for spec in ["f9223372036854775807+l1", "f100000000000", "l70000", "f-1", "f1+l-2"] {
        assert!(spec.parse::<Positions>().is_err(), "{spec}");
    }
    let p: Positions = "f65536+l1".parse().unwrap();
    assert_eq!(p.locations(4, true)[0].len(), 65537);
    // fields set by hand are clamped, not allocated
    let huge = Positions { first: i64::MAX, last: i64::MAX };
    assert_eq!(huge.locations(6, true)[0][..6], [0, 1, 2, 3, 4, 5]);
}

#[test]
fn negative_lengths_and_offsets_are_refused() {
    let p: Positions = "f1+l1".parse().unwrap();
    assert!(p.batch_locations(&[4], &[-3], true, Device::Cpu).is_err());
    assert!(p.batch_locations(&[-4], &[0], true, Device::Cpu).is_err());
    assert!(p.batch_locations(&[4], &[i64::MAX], true, Device::Cpu).is_err());
    let ok = p.batch_locations(&[4], &[2], true, Device::Cpu).unwrap();
    assert_eq!(Vec::<i64>::try_from(ok.flatten(0, -1)).unwrap(), [2, 5]);
}

fn two_layer_model(vs: &nn::VarStore) -> ReftModel {
    let cfg = ReftConfig::new(
        InterventionConfig::new(InterventionKind::LoReft, 8, 2),
        ReftLayers::List(vec![0, 1]),
        "f1".parse().unwrap(),
    );
    ReftModel::new(&vs.root(), cfg, 2).unwrap()
}

fn snapshot(m: &ReftModel) -> Vec<(String, Tensor)> {
    m.named_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect()
}

#[test]
fn a_load_wrong_in_its_second_layer_loads_nothing() {
    let dir = temp_dir("hostile-reft-partial");
    let saved_vs = nn::VarStore::new(Device::Cpu);
    two_layer_model(&saved_vs).save(&dir).unwrap();
    let file = dir.join(tch_peft::reft::REFT_WEIGHTS_NAME);
    let mut t: Vec<(String, Tensor)> = io::read_safetensors(&file).unwrap().tensors;
    t.push(("layers.1.0.bogus".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    io::write_safetensors(&file, &t, None).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let fresh = two_layer_model(&vs);
    let before = snapshot(&fresh);
    let e = fresh.load_weights(&file).unwrap_err();
    assert!(matches!(&e, Error::UnexpectedTensor { name, .. } if name.contains("bogus")), "{e}");
    for ((n, b), (_, now)) in before.iter().zip(fresh.named_tensors()) {
        assert!(b.equal(&now), "{n} was written by a load that failed");
    }
}

#[test]
fn integer_tensors_are_a_dtype_mismatch_not_converted() {
    let dir = temp_dir("hostile-reft-int");
    let saved_vs = nn::VarStore::new(Device::Cpu);
    two_layer_model(&saved_vs).save(&dir).unwrap();
    let file = dir.join(tch_peft::reft::REFT_WEIGHTS_NAME);
    let t: Vec<(String, Tensor)> = io::read_safetensors(&file)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(n, t)| if n == "layers.1.0.weight" { (n, t.to_kind(Kind::Int64)) } else { (n, t) })
        .collect();
    io::write_safetensors(&file, &t, None).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let e = two_layer_model(&vs).load_weights(&file).unwrap_err();
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
}

#[test]
fn a_config_asking_for_more_than_the_file_holds_is_refused_before_building() {
    let dir = temp_dir("hostile-reft-huge");
    let saved_vs = nn::VarStore::new(Device::Cpu);
    two_layer_model(&saved_vs).save(&dir).unwrap();
    let cfg_file = dir.join(tch_peft::reft::REFT_CONFIG_NAME);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_file).unwrap()).unwrap();
    cfg["intervention"]["embed_dim"] = 100_000.into();
    cfg["intervention"]["low_rank_dimension"] = 100_000.into();
    std::fs::write(&cfg_file, cfg.to_string()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let e = ReftModel::load(&vs.root(), &dir, 2).unwrap_err();
    assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
    assert_eq!(vs.len(), 0, "nothing was allocated");
    cfg["intervention"]["embed_dim"] = 1_000_000_000_000i64.into();
    std::fs::write(&cfg_file, cfg.to_string()).unwrap();
    assert!(ReftModel::load(&vs.root(), &dir, 2).is_err());
}
