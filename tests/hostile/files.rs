//! Special files and names a file declares: FIFOs and links to devices are refused instead of
//! read forever, shard and pyvene names stay inside their directory.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::common::temp_dir;
use tch_peft::lora::LoraConfig;
use tch_peft::{io, Error};

/// Runs `f` on a thread and fails the test if it has not returned within 20 s (a hang).
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the call hung")
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn is_not_regular(e: &Error) -> bool {
    matches!(e, Error::CorruptFile { reason, .. } if reason.contains("not a regular file"))
}

#[test]
fn a_fifo_is_refused_not_waited_on() {
    let dir = temp_dir("hostile-fifo");
    for name in ["adapter_config.json", "adapter_model.safetensors", "intkey.bin"] {
        mkfifo(&dir.join(name));
    }
    let d = dir.clone();
    let e = within_seconds(move || LoraConfig::from_pretrained(&d).unwrap_err());
    assert!(is_not_regular(&e), "{e}");
    let f = dir.join("adapter_model.safetensors");
    let e = within_seconds(move || io::read_safetensors(&f).unwrap_err());
    assert!(is_not_regular(&e), "{e}");
    let f = dir.join("intkey.bin");
    let e = within_seconds(move || io::read_torch_dict(&f).unwrap_err());
    assert!(is_not_regular(&e), "{e}");
}

#[test]
fn a_link_to_a_device_is_refused_not_read_until_memory_runs_out() {
    let dir = temp_dir("hostile-devzero");
    std::os::unix::fs::symlink("/dev/zero", dir.join("adapter_config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("w.safetensors")).unwrap();
    let d = dir.clone();
    let e = within_seconds(move || LoraConfig::from_pretrained(&d).unwrap_err());
    assert!(is_not_regular(&e), "{e}");
    let f = dir.join("w.safetensors");
    let e = within_seconds(move || io::read_safetensors(&f).unwrap_err());
    assert!(is_not_regular(&e), "{e}");
    // a link to a regular file is followed (the Hugging Face cache links into blobs)
    let t = tch::Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu));
    io::write_safetensors(dir.join("real.safetensors"), &[("t".into(), t)], None).unwrap();
    std::os::unix::fs::symlink(dir.join("real.safetensors"), dir.join("link.safetensors")).unwrap();
    assert_eq!(io::read_safetensors(dir.join("link.safetensors")).unwrap().tensors.len(), 1);
}

#[test]
fn shard_names_stay_inside_the_model_directory() {
    for shard in ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", ""] {
        let dir = temp_dir("hostile-shards");
        let index = serde_json::json!({"weight_map": {"w": shard}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = tch_peft::models::llama::weight_files(&dir).unwrap_err();
        assert!(matches!(e, Error::CorruptFile { .. }), "{shard:?}: {e}");
    }
}

#[test]
fn pyvene_keys_stay_inside_the_save_directory() {
    let dir = temp_dir("hostile-pyvene-keys");
    let config = serde_json::json!({
        "representations": [[0, "block_output", "pos", 1, 2, null, null, null]],
        "intervention_types": ["LoreftIntervention"],
        "intervention_dimensions": [16],
        "sorted_keys": ["../../../../etc/passwd#0"],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let e = tch_peft::reft::ReftModel::from_pyvene(
        &vs.root(),
        &dir,
        2,
        "f1".parse().unwrap(),
        tch_peft::reft::Activation::Linear,
        0.0,
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::CorruptFile { reason, .. } if reason.contains("not a file name inside")),
        "{e}"
    );
}
