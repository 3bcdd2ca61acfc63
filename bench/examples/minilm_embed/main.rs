//! Sentence embeddings with all-MiniLM-L6-v2 (mean pooling), the model of the method comparison.
//!
//! ```text
//! scripts/fetch-assets.sh
//! scripts/with-torch cargo run --release -p tch-peft-bench --example minilm_embed -- "This is a test sentence." "LoRA adapters are small."
//! ```
//!
//! Prints the first five dimensions of each embedding and the cosine similarities; the numbers
//! match transformers' `BertModel` with the same pooling (docs/results.md).

use tch::{nn, Device, Kind};
use tch_peft::models::bert::{load_weights, mean_pool, Bert, BertConfig};
use tch_peft_bench::data::{Example, TextBatcher};

fn main() -> tch_peft::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/minilm");
    if !dir.join("model.safetensors").exists() {
        eprintln!("error: {} is missing; run scripts/fetch-assets.sh first", dir.display());
        std::process::exit(1);
    }
    let mut sentences: Vec<String> = std::env::args().skip(1).collect();
    if sentences.is_empty() {
        sentences = vec!["This is a test sentence.".into(), "LoRA adapters are small.".into()];
    }
    let device = Device::cuda_if_available();
    let cfg = BertConfig::from_pretrained(&dir)?;
    let vs = nn::VarStore::new(device);
    let model = Bert::new(&vs.root(), &cfg, None)?;
    load_weights(&vs, &dir)?;
    let batcher = TextBatcher::from_file(dir.join("tokenizer.json"), 256)?;
    let ex: Vec<Example> = sentences
        .iter()
        .map(|s| Example { text: s.clone(), label: 0, domain: String::new() })
        .collect();
    let b = batcher.batch(&ex, device)?;
    let h = tch::no_grad(|| model.forward_t(&b.input_ids, Some(&b.attention_mask), false))?;
    let e = mean_pool(&h, &b.attention_mask).to_kind(Kind::Double).to_device(Device::Cpu);
    for (i, s) in sentences.iter().enumerate() {
        let head: Vec<f64> = Vec::try_from(e.get(i as i64).narrow(0, 0, 5))?;
        println!("{s:?}: {head:.6?}");
    }
    let n = &e / e.norm_scalaropt_dim(2.0, [1], true);
    println!("cosine similarities:\n{}", n.matmul(&n.tr()));
    Ok(())
}
