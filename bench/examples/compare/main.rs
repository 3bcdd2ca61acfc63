//! Method comparison on all-MiniLM-L6-v2 and real data (issue 6): zero-shot head, linear probe,
//! top-2 layers, gradual unfreezing, LoReFT, LoRA, DoRA and full fine-tuning on the same data,
//! seeds and step budget, then WiSE-FT between the zero-shot and the fine-tuned weights.
//!
//! ```text
//! scripts/fetch-assets.sh
//! scripts/with-torch cargo run --release -p tch-peft-bench --example compare -- [--task a|b|c] [--seeds 3] [--epochs N] [--out results]
//! ```
//!
//! `--task c` (default, fast): Kotzias Amazon → Yelp/IMDb, 3 epochs; `--task a`: VADER movie
//! snippets → tweets/Amazon/NYT, 2 epochs; `--task b`: SpamAssassin early → later mail and hard
//! ham, 2 epochs (REAL-DATA's splits and budgets). `--methods` takes a comma-separated subset
//! (`zero,probe,top2,gradual,loreft,lora,dora,full`). Runs on CUDA when one is present.
//!
//! Prints a table (accuracy per test set as mean ± std over seeds, trainable parameters, median
//! step time, peak memory, saved size) and writes to `--out`: `task-X.csv` (one row per method
//! and seed), `task-X.json` (with validation curves and the WiSE-FT sweep per seed), `task-X.md`
//! (the tables as Markdown) and two SVG charts, `task-X-params.svg` (accuracy against trainable
//! parameters) and `task-X-wise.svg` (the WiSE-FT ID/OOD curve).

mod chart;

use std::path::{Path, PathBuf};

use tch::Device;
use tch_peft_bench::compare::{
    kotzias_task, run, spam_task, vader_task, wise_ft_curve, Method, RunConfig, RunResult,
    WisePoint,
};
use tch_peft_bench::data::TextBatcher;

const ALPHAS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

fn parse_method(s: &str) -> Option<Method> {
    Some(match s {
        "zero" => Method::ZeroShot,
        "probe" => Method::LinearProbe,
        "top2" => Method::TopLayers(2),
        "gradual" => Method::GradualUnfreezing,
        "loreft" => Method::LoReft,
        "lora" => Method::Lora,
        "dora" => Method::Dora,
        "full" => Method::Full,
        _ => return None,
    })
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "usage: compare [--task a|b|c] [--seeds N] [--epochs N] [--out DIR] \
         [--methods zero,probe,top2,gradual,loreft,lora,dora,full]\n{msg}"
    );
    std::process::exit(2)
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> tch_peft::Result<()> {
    std::fs::write(path, contents)
        .map_err(|e| tch_peft::Error::Io { path: path.to_path_buf(), source: e })
}

/// A size in MiB/kB for the tables.
fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{} kB", bytes.div_ceil(1024))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut seeds, mut epochs, mut out) = (3u64, None, PathBuf::from("results"));
    let mut task_name = "c".to_string();
    let mut methods = vec![
        Method::ZeroShot,
        Method::LinearProbe,
        Method::TopLayers(2),
        Method::GradualUnfreezing,
        Method::LoReft,
        Method::Lora,
        Method::Dora,
        Method::Full,
    ];
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage(&format!("`{a}` needs a value")));
        match a.as_str() {
            "--seeds" => seeds = v.parse().unwrap_or_else(|_| usage("--seeds: a number")),
            "--epochs" => epochs = Some(v.parse().unwrap_or_else(|_| usage("--epochs: a number"))),
            "--out" => out = PathBuf::from(v),
            "--task" => task_name = v.to_lowercase(),
            "--methods" => {
                methods = v
                    .split(',')
                    .map(|m| {
                        parse_method(m.trim())
                            .unwrap_or_else(|| usage(&format!("unknown method `{m}`")))
                    })
                    .collect()
            }
            other => usage(&format!("unknown option `{other}`")),
        }
    }
    if !["a", "b", "c"].contains(&task_name.as_str()) {
        usage(&format!("unknown task `{task_name}`"));
    }
    let epochs = epochs.unwrap_or(if task_name == "c" { 3 } else { 2 });
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets");
    if !root.join("minilm/model.safetensors").exists() {
        eprintln!("error: assets missing; run scripts/fetch-assets.sh first");
        std::process::exit(1);
    }
    let device = Device::cuda_if_available();
    let batcher = TextBatcher::from_file(root.join("minilm/tokenizer.json"), 64)?;
    let started = std::time::Instant::now();
    let mut results: Vec<RunResult> = Vec::new();
    let mut wise: Vec<Vec<WisePoint>> = Vec::new();
    let mut title = String::new();
    for seed in 0..seeds {
        let task = match task_name.as_str() {
            "a" => vader_task(root.join("vader"), seed)?,
            "b" => spam_task(root.join("spam"), seed)?,
            _ => kotzias_task(root.join("kotzias"), seed)?,
        };
        title = task.name.clone();
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
        for &m in &methods {
            let (r, base, head) = run(m, &task, &batcher, &cfg, None)?;
            eprintln!(
                "seed {seed} {:<20} {} ({:.1} ms/step)",
                r.method,
                r.accuracies
                    .iter()
                    .map(|(n, a)| format!("{n} {:.1}", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.step_ms
            );
            results.push(r);
            match m {
                Method::ZeroShot => zero = Some((base, head)),
                Method::Full => {
                    if let Some(z) = &zero {
                        wise.push(wise_ft_curve(z, &(base, head), &ALPHAS, &task, &batcher, &cfg)?);
                    }
                }
                _ => {}
            }
        }
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let sets: Vec<String> = results[0].accuracies.iter().map(|(n, _)| n.clone()).collect();

    // the table: mean ± std over seeds, printed and as Markdown
    let mut header =
        format!("{:<20} {:>11} {:>9} {:>10}", "method", "trainable", "ms/step", "peak");
    for s in &sets {
        header.push_str(&format!(" {:>14}", s));
    }
    header.push_str(&format!(" {:>9}", "saved"));
    println!("{title}: {seeds} seed(s), {epochs} epoch(s), {device:?}, {minutes:.1} min\n{header}");
    let mut md = format!(
        "{title}: {seeds} seed(s), {epochs} epoch(s) at most, device {device:?}, {minutes:.1} min.\n\n\
         | method | trainable params | % of model | ms / step | peak memory |"
    );
    for s in &sets {
        md.push_str(&format!(" {s} |"));
    }
    md.push_str(" saved |\n|---|---|---|---|---|");
    md.push_str(&"---|".repeat(sets.len() + 1));
    md.push('\n');
    let mut csv =
        String::from("method,seed,trainable,total,step_ms,peak_memory_bytes,adapter_bytes");
    for s in &sets {
        csv.push_str(&format!(",{s}"));
    }
    csv.push('\n');
    let mut points = Vec::new();
    for m in &methods {
        let rs: Vec<&RunResult> = results.iter().filter(|r| r.method == m.name()).collect();
        let step = mean_std(&rs.iter().map(|r| r.step_ms).collect::<Vec<_>>()).0;
        let peak = rs.iter().filter_map(|r| r.peak_memory_bytes).max();
        let peak_s = peak.map(human).unwrap_or_else(|| "–".into());
        let saved = rs[0].adapter_bytes;
        let mut line =
            format!("{:<20} {:>11} {:>9.1} {:>10}", m.name(), rs[0].trainable, step, peak_s);
        let pct = 100.0 * rs[0].trainable as f64 / rs[0].total as f64;
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |",
            m.name(),
            thousands(rs[0].trainable),
            if pct == 0.0 || pct >= 1.0 { format!("{pct:.2}") } else { format!("{pct:.3}") },
            if step > 0.0 { format!("{step:.0}") } else { "–".into() },
            peak_s
        ));
        let mut means = Vec::new();
        for (i, _) in sets.iter().enumerate() {
            let v: Vec<f64> = rs.iter().map(|r| 100.0 * r.accuracies[i].1).collect();
            let (mu, sd) = mean_std(&v);
            means.push(mu);
            line.push_str(&format!(" {:>8.1} ± {:>3.1}", mu, sd));
            md.push_str(&format!(" {mu:.1} ± {sd:.1} |"));
        }
        line.push_str(&format!(" {:>9}", if saved > 0 { human(saved) } else { "–".into() }));
        md.push_str(&format!(" {} |\n", if saved > 0 { human(saved) } else { "–".into() }));
        println!("{line}");
        points.push(chart::MethodPoint { name: m.name(), trainable: rs[0].trainable, means });
        for r in rs {
            csv.push_str(&format!(
                "{},{},{},{},{:.2},{},{}",
                r.method,
                r.seed,
                r.trainable,
                r.total,
                r.step_ms,
                r.peak_memory_bytes.map(|b| b.to_string()).unwrap_or_default(),
                r.adapter_bytes
            ));
            for (_, a) in &r.accuracies {
                csv.push_str(&format!(",{a:.4}"));
            }
            csv.push('\n');
        }
    }
    let mut wise_means = Vec::new();
    if !wise.is_empty() {
        println!("\nWiSE-FT (zero-shot ↔ full fine-tuning), mean over seeds:");
        md.push_str("\nWiSE-FT between the zero-shot weights (α = 0) and full fine-tuning (α = 1), mean ± std over seeds:\n\n| α |");
        for s in &sets {
            md.push_str(&format!(" {s} |"));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(sets.len()));
        md.push('\n');
        for (i, alpha) in ALPHAS.iter().enumerate() {
            let mut line = format!("  α = {alpha:<5}");
            md.push_str(&format!("| {alpha} |"));
            let mut row = Vec::new();
            for (j, s) in sets.iter().enumerate() {
                let v: Vec<f64> = wise.iter().map(|c| 100.0 * c[i].1[j].1).collect();
                let (mu, sd) = mean_std(&v);
                row.push(mu);
                line.push_str(&format!(" {s}: {mu:.1}"));
                md.push_str(&format!(" {mu:.1} ± {sd:.1} |"));
            }
            md.push('\n');
            println!("{line}");
            wise_means.push((*alpha, row));
        }
    }
    let dir_err = |e| tch_peft::Error::Io { path: out.clone(), source: e };
    std::fs::create_dir_all(&out).map_err(dir_err)?;
    let stem = format!("task-{task_name}");
    write(&out.join(format!("{stem}.csv")), csv)?;
    write(&out.join(format!("{stem}.md")), md)?;
    let json = serde_json::json!({
        "task": title, "seeds": seeds, "epochs": epochs, "device": format!("{device:?}"),
        "minutes": minutes,
        "runs": results.iter().map(|r| serde_json::json!({
            "method": r.method, "seed": r.seed, "trainable": r.trainable, "total": r.total,
            "step_ms": r.step_ms, "peak_memory_bytes": r.peak_memory_bytes,
            "adapter_bytes": r.adapter_bytes, "val_curve": r.val_curve,
            "accuracies": r.accuracies.iter().map(|(n, a)| (n.clone(), *a)).collect::<std::collections::BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
        "wise_ft": wise.iter().map(|c| c.iter().map(|(a, accs)| serde_json::json!({"alpha": a, "accuracies": accs})).collect::<Vec<_>>()).collect::<Vec<_>>(),
    });
    write(&out.join(format!("{stem}.json")), serde_json::to_string_pretty(&json)?)?;
    let params_svg = out.join(format!("{stem}-params.svg"));
    chart::accuracy_vs_params(&params_svg, &title, &sets, &points)?;
    let mut written = vec![params_svg];
    if !wise_means.is_empty() {
        let wise_svg = out.join(format!("{stem}-wise.svg"));
        chart::wise_curve(&wise_svg, &title, &sets, &wise_means, &points)?;
        written.push(wise_svg);
    }
    println!(
        "\nwrote {0}/{stem}.csv, .json, .md and {1}",
        out.display(),
        written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// A count with `,` thousands separators (as Python's `{:,d}`).
fn thousands(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.char_indices() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) && c.is_ascii_digit() {
            out.push(',');
        }
        out.push(c);
    }
    out
}
