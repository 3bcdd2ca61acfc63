//! The method comparison on a CUDA device (allocator peaks reported). Needs a GPU:
//!
//! ```text
//! scripts/with-torch cargo test -p tch-peft-bench --features cuda-tests --test cuda
//! ```
#![cfg(feature = "cuda-tests")]

use tch::Device;

#[test]
fn the_comparison_runs_on_cuda_with_allocator_peaks() {
    // the fixtures (tiny BERT, a few Kotzias sentences) through compare::run on the GPU
    use std::path::Path;
    use tch_peft_bench::compare::{run, sentiment_prompts, Method, RunConfig, Task};
    use tch_peft_bench::data::{kotzias, TextBatcher};
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    let d = Device::Cuda(0);
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ex = kotzias(here.join("tests/fixtures/data/kotzias"), "amazon").unwrap();
    let task = Task {
        name: "cuda smoke".into(),
        train: ex.clone(),
        val: ex[..2].to_vec(),
        tests: vec![("id".into(), ex.clone())],
        prompts: sentiment_prompts(),
    };
    let batcher =
        TextBatcher::from_file(here.join("tests/fixtures/data/tokenizer.json"), 16).unwrap();
    let cfg = RunConfig {
        model_dir: here.join("../tests/fixtures/bert"),
        epochs: 2,
        batch: 2,
        max_length: 16,
        seed: 0,
        device: d,
        patience: 1,
    };
    for m in [Method::LinearProbe, Method::GradualUnfreezing, Method::LoReft, Method::Lora] {
        let (r, base, _) = run(m, &task, &batcher, &cfg, None).unwrap();
        assert_eq!(base.device(), d);
        assert!((0.0..=1.0).contains(&r.accuracies[0].1), "{r:?}");
        let peak = r.peak_memory_bytes.expect("the CUDA allocator's peak");
        assert!(peak > 0 && peak < 1 << 30, "{r:?}");
    }
}
