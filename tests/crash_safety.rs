//! Saves that a crash cannot tear: a child process saving an adapter directory (or writing a
//! merge) over and over is killed with SIGKILL at random moments; every time, the destination
//! holds one complete save — config and weights of the same round — and the next save works and
//! cleans up after the dead process.
//!
//! The child is this test binary itself, running the ignored `child_*` tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tch::{nn, Device, Kind, Tensor};
use tch_peft::io;
use tch_peft::lora::{LoraAdapter, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::merge::{merge_directories, MergeConfig};

const KILLS: usize = 12;

fn adapter(vs: &nn::VarStore, base: &nn::VarStore, round: i64) -> (MaybeLoraLinear, LoraAdapter) {
    // the round is in the config (alpha) and in every weight: a torn save shows as a mismatch
    let cfg =
        LoraConfig { r: 4, lora_alpha: round as f64 + 1.0, ..LoraConfig::for_targets(["proj"]) };
    let b = LoraBuilder::new(&vs.root(), cfg).unwrap();
    let layer = b.linear(&(base.root() / "proj"), 256, 256, Default::default()).unwrap();
    let lora = layer.as_lora().unwrap();
    tch::no_grad(|| {
        let _ = lora.lora_a().shallow_clone().fill_(round as f64);
        let _ = lora.lora_b().shallow_clone().fill_(round as f64);
    });
    (layer, b.finish().unwrap())
}

/// The round a saved adapter directory holds, checking that config and weights agree.
fn saved_round(dir: &Path) -> i64 {
    let cfg = LoraConfig::from_pretrained(dir).expect("a readable config");
    let round = cfg.lora_alpha as i64 - 1;
    let file = io::read_safetensors(dir.join(io::PEFT_WEIGHTS_NAME)).expect("readable weights");
    assert_eq!(file.tensors.len(), 2);
    for (name, t) in &file.tensors {
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        assert!(
            lo == round as f64 && hi == round as f64,
            "{name} of round {lo}..{hi}, config {round}"
        );
    }
    round
}

fn child(test: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--ignored", "--test-threads=1"])
        .env("TCH_PEFT_CRASH_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// How long a child takes to finish its first round here (start-up included, under whatever
/// load the machine has): the kills then fall between half and twice that, so that they land
/// before, inside and after writes.
fn first_round_time(test: &str, root: &Path, finished: impl Fn() -> bool) -> Duration {
    let started = std::time::Instant::now();
    let mut c = child(test, root);
    while !finished() {
        assert!(started.elapsed() < Duration::from_secs(120), "the child made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    let t = started.elapsed();
    c.kill().unwrap();
    c.wait().unwrap();
    t
}

fn kill_delay(rng: &mut rand::rngs::StdRng, first: Duration) -> Duration {
    let ms = first.as_millis() as u64;
    Duration::from_millis(rng.random_range(ms / 2..=ms * 2 + 1))
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tch-peft-"))
        .collect()
}

#[test]
#[ignore = "the child process of adapter_saves_survive_sigkill"]
fn child_saves_adapters() {
    let dir = PathBuf::from(std::env::var("TCH_PEFT_CRASH_DIR").unwrap());
    for round in 1.. {
        let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let (_layer, a) = adapter(&vs, &base, round);
        a.save_pretrained(dir.join("adapter")).unwrap();
    }
}

#[test]
fn adapter_saves_survive_sigkill() {
    let root = common::temp_dir("crash-adapter");
    let dir = root.join("adapter");
    {
        let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let (_layer, a) = adapter(&vs, &base, 0);
        a.save_pretrained(&dir).unwrap();
    }
    let first = first_round_time("child_saves_adapters", &root, || {
        LoraConfig::from_pretrained(&dir).is_ok_and(|c| c.lora_alpha > 1.0)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut rounds = Vec::new();
    for _ in 0..KILLS {
        let mut c = child("child_saves_adapters", &root);
        std::thread::sleep(kill_delay(&mut rng, first));
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        rounds.push(saved_round(&dir));
    }
    // the destination always held a whole save (and the first child got past round 0)
    assert!(rounds.iter().all(|&r| r > 0), "{rounds:?}");
    let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (_layer, a) = adapter(&vs, &base, 99);
    a.save_pretrained(&dir).unwrap();
    assert_eq!(saved_round(&dir), 99);
    assert!(temporaries(&root).is_empty(), "{:?}", temporaries(&root));
}

/// Two inputs of eight 256×256 tensors, so that a merge takes a while.
fn merge_inputs(root: &Path) -> (PathBuf, PathBuf) {
    let make = |name: &str, v: f64| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ts: Vec<(String, Tensor)> = (0..8)
            .map(|i| {
                (
                    format!("model.layers.{i}.w"),
                    Tensor::full([256, 256], v, (Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        io::write_safetensors(dir.join("model.safetensors"), &ts, None).unwrap();
        std::fs::write(dir.join("config.json"), format!("{{\"round\": {v}}}")).unwrap();
        dir
    };
    (make("a", 0.0), make("b", 1000.0))
}

/// A linear merge whose every value is `w` (weights `1 − w/1000` and `w/1000` of 0 and 1000).
fn merge_config(a: &Path, b: &Path, w: f64) -> MergeConfig {
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: {}}}\n  - model: {}\n    parameters: {{weight: {}}}\n",
        a.display(),
        1.0 - w / 1000.0,
        b.display(),
        w / 1000.0
    );
    MergeConfig::from_yaml(&yaml).unwrap()
}

#[test]
#[ignore = "the child process of merges_survive_sigkill"]
fn child_merges() {
    let root = PathBuf::from(std::env::var("TCH_PEFT_CRASH_DIR").unwrap());
    let (a, b) = (root.join("a"), root.join("b"));
    for round in 1.. {
        merge_directories(&merge_config(&a, &b, (round % 1000) as f64), root.join("out")).unwrap();
    }
}

/// The value every tensor of a merge output holds, checking the file is whole.
fn merged_value(out: &Path) -> f64 {
    let file = io::read_safetensors(out.join("model.safetensors")).expect("a whole output");
    assert_eq!(file.tensors.len(), 8);
    let v = file.tensors[0].1.double_value(&[0, 0]);
    for (name, t) in &file.tensors {
        assert!(t.eq(v).all().int64_value(&[]) == 1, "{name} is not all {v}");
    }
    assert!(out.join("config.json").is_file());
    v
}

#[test]
fn merges_survive_sigkill() {
    let root = common::temp_dir("crash-merge");
    let (a, b) = merge_inputs(&root);
    let out = root.join("out");
    merge_directories(&merge_config(&a, &b, 0.0), &out).unwrap();
    let first = first_round_time("child_merges", &root, || {
        io::read_safetensors(out.join("model.safetensors"))
            .is_ok_and(|f| f.tensors[0].1.double_value(&[0, 0]) > 0.0)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut values = Vec::new();
    for _ in 0..KILLS {
        let mut c = child("child_merges", &root);
        std::thread::sleep(kill_delay(&mut rng, first));
        c.kill().unwrap();
        c.wait().unwrap();
        values.push(merged_value(&out));
    }
    assert!(values.iter().all(|&v| v > 0.0), "{values:?}");
    merge_directories(&merge_config(&a, &b, 500.0), &out).unwrap();
    assert_eq!(merged_value(&out), 500.0);
    assert!(temporaries(&root).is_empty(), "{:?}", temporaries(&root));
}
