//! Smoke test of the method comparison on the tiny BERT and the data fixtures: every method
//! runs, parameter counts relate as they must, WiSE-FT's ends are the two models.

use std::path::{Path, PathBuf};

use tch::Device;
use tch_peft_bench::compare::{run, sentiment_prompts, wise_ft_curve, Method, RunConfig, Task};
use tch_peft_bench::data::{kotzias, TextBatcher};

/// The harness's data fixtures (`scripts/make_data_fixtures.py`).
fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// The library's tiny BERT (`scripts/make_bert_fixtures.py`).
fn bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bert")
}

#[test]
fn every_method_runs_and_wise_ft_interpolates_between_its_ends() {
    let ex = kotzias(data().join("kotzias"), "amazon").unwrap();
    let task = Task {
        name: "smoke".into(),
        train: ex.clone(),
        val: ex[..2].to_vec(),
        tests: vec![("id".into(), ex.clone()), ("other".into(), ex[1..].to_vec())],
        prompts: sentiment_prompts(),
    };
    let batcher = TextBatcher::from_file(data().join("tokenizer.json"), 16).unwrap();
    let cfg = RunConfig {
        model_dir: bert(),
        epochs: 2,
        batch: 2,
        max_length: 16,
        seed: 0,
        device: Device::Cpu,
        patience: 1,
    };
    let mut results = Vec::new();
    let mut zero = None;
    let mut full = None;
    for m in [
        Method::ZeroShot,
        Method::LinearProbe,
        Method::TopLayers(1),
        Method::GradualUnfreezing,
        Method::LoReft,
        Method::Lora,
        Method::Dora,
        Method::Full,
    ] {
        let (r, base, head) = run(m, &task, &batcher, &cfg, None).unwrap();
        assert_eq!(r.accuracies.len(), 2);
        assert!(r.accuracies.iter().all(|(_, a)| (0.0..=1.0).contains(a)), "{r:?}");
        if cfg!(target_os = "linux") {
            assert!(r.peak_memory_bytes.unwrap() > 10 << 20, "{r:?}");
        }
        match m {
            Method::ZeroShot => {
                assert_eq!((r.trainable, r.adapter_bytes), (0, 0));
                zero = Some((base, head));
            }
            Method::Full => full = Some((base, head)),
            _ => assert!(!r.val_curve.is_empty() && r.step_ms > 0.0),
        }
        results.push(r);
    }
    let t = |name: &str| results.iter().find(|r| r.method.starts_with(name)).unwrap().trainable;
    assert_eq!(t("linear probe"), 32 * 2 + 2, "the head alone");
    assert_eq!(t("LoReFT"), 32 * 2 + 2 + (2 * 32 * 4 + 4));
    assert!(t("LoRA") > t("LoReFT") && t("DoRA") > t("LoRA"));
    assert!(t("top-1") > t("LoRA") && t("full") > t("top-1"));
    // gradual unfreezing ends with every encoder variable trainable (and saved)
    assert_eq!(t("gradual"), t("full"));
    let total = results.iter().find(|r| r.method.starts_with("full")).unwrap();
    assert_eq!(total.trainable, total.total);
    let curve = wise_ft_curve(
        zero.as_ref().unwrap(),
        full.as_ref().unwrap(),
        &[0.0, 1.0],
        &task,
        &batcher,
        &cfg,
    )
    .unwrap();
    let acc = |name: &str| &results.iter().find(|r| r.method.starts_with(name)).unwrap().accuracies;
    assert_eq!(&curve[0].1, acc("zero-shot"));
    assert_eq!(&curve[1].1, acc("full"));
}
