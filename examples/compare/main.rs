//! Method comparison on all-MiniLM-L6-v2 and real data (issue 6): zero-shot head, linear probe,
//! top-2 layers, LoRA, DoRA, LoReFT and full fine-tuning on the same data, seeds and step
//! budget, then WiSE-FT between the zero-shot and the fine-tuned weights.
//!
//! ```text
//! scripts/fetch-assets.sh
//! scripts/with-torch cargo run --release --example compare -- [--task a|b|c] [--seeds 3] [--epochs 3] [--out results]
//! ```
//!
//! `--task c` (default, fast): Kotzias Amazon → Yelp/IMDb; `--task a`: VADER movie snippets →
//! tweets/Amazon/NYT; `--task b`: SpamAssassin early → later mail and hard ham (REAL-DATA's
//! splits). Prints a table (accuracy per test
//! set as mean ± std over seeds, trainable parameters, median step time, saved size) and writes
//! `results/compare.csv` and `results/compare.json`.

use std::path::PathBuf;

use tch::Device;
use tch_peft::compare::{
    kotzias_task, run, spam_task, vader_task, wise_ft_curve, Method, RunConfig, RunResult,
};
use tch_peft::data::TextBatcher;

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

fn main() -> tch_peft::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut seeds, mut epochs, mut out) = (3u64, 3usize, PathBuf::from("results"));
    let mut task_name = "c".to_string();
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--seeds" => seeds = v.parse().unwrap_or(3),
            "--epochs" => epochs = v.parse().unwrap_or(3),
            "--out" => out = PathBuf::from(v),
            "--task" => task_name = v.to_lowercase(),
            other => {
                eprintln!(
                    "usage: compare [--seeds N] [--epochs N] [--out DIR] (unknown `{other}`)"
                );
                std::process::exit(2);
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets");
    if !root.join("minilm/model.safetensors").exists() {
        eprintln!("error: assets missing; run scripts/fetch-assets.sh first");
        std::process::exit(1);
    }
    let device = Device::cuda_if_available();
    let batcher = TextBatcher::from_file(root.join("minilm/tokenizer.json"), 64)?;
    let methods = [
        Method::ZeroShot,
        Method::LinearProbe,
        Method::TopLayers(2),
        Method::LoReft,
        Method::Lora,
        Method::Dora,
        Method::Full,
    ];
    let mut results: Vec<RunResult> = Vec::new();
    let mut wise = Vec::new();
    for seed in 0..seeds {
        let task = match task_name.as_str() {
            "a" => vader_task(root.join("vader"), seed)?,
            "b" => spam_task(root.join("spam"), seed)?,
            _ => kotzias_task(root.join("kotzias"), seed)?,
        };
        let cfg = RunConfig {
            model_dir: root.join("minilm"),
            epochs,
            batch: 32,
            max_length: 64,
            seed,
            device,
            patience: 2,
        };
        let mut zero = None;
        for m in methods {
            let (r, base, head) = run(m, &task, &batcher, &cfg, None)?;
            eprintln!("seed {seed} {:<20} {:?} ({:.1} ms/step)", r.method, r.accuracies, r.step_ms);
            results.push(r);
            match m {
                Method::ZeroShot => zero = Some((base, head)),
                Method::Full => {
                    if let Some(z) = &zero {
                        wise.push(wise_ft_curve(
                            z,
                            &(base, head),
                            &[0.0, 0.25, 0.5, 0.75, 1.0],
                            &task,
                            &batcher,
                            &cfg,
                        )?);
                    }
                }
                _ => {}
            }
        }
    }
    // the table: mean ± std over seeds
    let sets: Vec<String> = results[0].accuracies.iter().map(|(n, _)| n.clone()).collect();
    let mut header = format!("{:<20} {:>10} {:>9}", "method", "trainable", "ms/step");
    for s in &sets {
        header.push_str(&format!(" {:>14}", s));
    }
    header.push_str(&format!(" {:>10}", "saved"));
    println!("{header}");
    let mut csv = String::from("method,seed,trainable,total,step_ms,adapter_bytes");
    for s in &sets {
        csv.push_str(&format!(",{s}"));
    }
    csv.push('\n');
    for m in methods {
        let rs: Vec<&RunResult> = results.iter().filter(|r| r.method == m.name()).collect();
        let steps: Vec<f64> = rs.iter().map(|r| r.step_ms).collect();
        let mut line =
            format!("{:<20} {:>10} {:>9.1}", m.name(), rs[0].trainable, mean_std(&steps).0);
        for (i, _) in sets.iter().enumerate() {
            let v: Vec<f64> = rs.iter().map(|r| 100.0 * r.accuracies[i].1).collect();
            let (mu, sd) = mean_std(&v);
            line.push_str(&format!(" {:>8.1} ± {:>3.1}", mu, sd));
        }
        line.push_str(&format!(" {:>8} kB", rs[0].adapter_bytes / 1024));
        println!("{line}");
        for r in rs {
            csv.push_str(&format!(
                "{},{},{},{},{:.2},{}",
                r.method, r.seed, r.trainable, r.total, r.step_ms, r.adapter_bytes
            ));
            for (_, a) in &r.accuracies {
                csv.push_str(&format!(",{a:.4}"));
            }
            csv.push('\n');
        }
    }
    println!("\nWiSE-FT (zero-shot ↔ full fine-tuning), mean over seeds:");
    for (i, alpha) in [0.0, 0.25, 0.5, 0.75, 1.0].iter().enumerate() {
        let mut line = format!("  α = {alpha:<5}");
        for (j, s) in sets.iter().enumerate() {
            let v: Vec<f64> = wise.iter().map(|c| 100.0 * c[i].1[j].1).collect();
            line.push_str(&format!(" {s}: {:.1}", mean_std(&v).0));
        }
        println!("{line}");
    }
    std::fs::create_dir_all(&out)
        .map_err(|e| tch_peft::Error::Io { path: out.clone(), source: e })?;
    std::fs::write(out.join("compare.csv"), csv)
        .map_err(|e| tch_peft::Error::Io { path: out.clone(), source: e })?;
    let json = serde_json::json!({
        "task": task_name,
        "runs": results.iter().map(|r| serde_json::json!({
            "method": r.method, "seed": r.seed, "trainable": r.trainable, "total": r.total,
            "step_ms": r.step_ms, "adapter_bytes": r.adapter_bytes, "val_curve": r.val_curve,
            "accuracies": r.accuracies.iter().map(|(n, a)| (n.clone(), *a)).collect::<std::collections::BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
        "wise_ft": wise.iter().map(|c| c.iter().map(|(a, accs)| serde_json::json!({"alpha": a, "accuracies": accs})).collect::<Vec<_>>()).collect::<Vec<_>>(),
    });
    std::fs::write(out.join("compare.json"), serde_json::to_string_pretty(&json)?)
        .map_err(|e| tch_peft::Error::Io { path: out.clone(), source: e })?;
    println!("\nwrote {}/compare.csv and compare.json", out.display());
    Ok(())
}
