//! Merge checkpoints with a mergekit YAML config, streamed tensor by tensor; extract a LoRA
//! adapter from a fine-tuned model and its base.
//!
//! ```text
//! scripts/with-torch cargo run --release --example merge -- --config FILE.yml --out DIR
//! scripts/with-torch cargo run --release --example merge -- --extract-lora --base DIR --model DIR --out DIR [--max-rank 128]
//! scripts/with-torch cargo run --release --example merge -- --synthetic DIR [--size-gb 1] [--models 3]
//! ```
//!
//! * `--config`: mergekit's YAML (`merge_method`, `base_model`, `models` or `slices` with
//!   `layer_range`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source`); models are local
//!   directories with `config.json` and `*.safetensors` (sharded or not), relative paths taken
//!   from the config file's folder. Fields this crate does not run (e.g. `modules`,
//!   `tokenizer_source: union`) are errors naming them. A progress line (tensors, GB/s) goes to
//!   stderr.
//! * `--out`: the merged directory (`model.safetensors` and the donor's other files).
//! * `--extract-lora`: mergekit-extract-lora: `--model` minus `--base`, truncated SVD per linear
//!   layer to `--max-rank`, written as a PEFT adapter directory in `--out`.
//! * `--synthetic DIR`: writes a base and `--models` fine-tuned checkpoints of `--size-gb` GB
//!   each (f32, 64 MiB tensors, Llama-style names) and configs `DIR/ties.yml` and
//!   `DIR/task_arithmetic.yml` over them (the side-by-side with mergekit on Llama-shaped
//!   checkpoints is `scripts/bench_merge_vs_mergekit.py`).

use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use tch_peft::merge::{
    extract_lora, merge_directories_with_progress, ExtractOptions, MergeConfig, Progress,
};
use tch_peft::{io, Error, Result};

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A progress line on stderr, at most every 0.2 s and at the end.
fn progress_bar() -> impl FnMut(&Progress) {
    let mut last = -1.0;
    move |p: &Progress| {
        if p.seconds - last < 0.2 && p.done < p.total {
            return;
        }
        last = p.seconds;
        let width = 30;
        let filled = width * p.done / p.total.max(1);
        let gbs = p.bytes_read as f64 / 1e9 / p.seconds.max(1e-9);
        eprint!(
            "\r[{}{}] {}/{} tensors, {:.2} GB read, {gbs:.2} GB/s",
            "#".repeat(filled),
            " ".repeat(width - filled),
            p.done,
            p.total,
            p.bytes_read as f64 / 1e9
        );
        if p.done == p.total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

fn run_config(config: &Path, out: &Path) -> Result<()> {
    let cfg = MergeConfig::from_file(config)?;
    let stats = merge_directories_with_progress(&cfg, out, progress_bar())?;
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "{:?}: {} tensors, read {:.2} GB, wrote {:.2} GB in {:.1} s ({:.2} GB/s read); peak RSS {:.0} MiB",
        cfg.merge_method,
        stats.tensors,
        gb(stats.bytes_read),
        gb(stats.bytes_written),
        stats.seconds,
        gb(stats.bytes_read) / stats.seconds,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    println!("merged model in {}", out.display());
    Ok(())
}

fn run_extract(base: &Path, model: &Path, out: &Path, max_rank: i64) -> Result<()> {
    let opts = ExtractOptions { max_rank, ..Default::default() };
    let stats = extract_lora(base, model, out, &opts)?;
    println!(
        "{} modules decomposed (rank ≤ {max_rank}), {} saved whole ({}); ‖ΔW − BA‖/‖ΔW‖ = {:.3e}",
        stats.ranks.len(),
        stats.modules_to_save.len(),
        stats.modules_to_save.join(", "),
        stats.relative_error
    );
    println!("adapter in {}", out.display());
    Ok(())
}

fn synthetic(dir: &Path, size_gb: f64, models: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let per_tensor: i64 = 4096 * 4096; // 64 MiB in f32
    let count = ((size_gb * 1e9) / (per_tensor as f64 * 4.0)).ceil().max(1.0) as i64;
    let layers = count.max(2);
    tch::manual_seed(0);
    for (i, name) in
        std::iter::once("base".to_string()).chain((1..=models).map(|i| format!("m{i}"))).enumerate()
    {
        let d = dir.join(&name);
        std::fs::create_dir_all(&d).map_err(|e| Error::Io { path: d.to_path_buf(), source: e })?;
        std::fs::write(d.join("config.json"), format!("{{\"num_hidden_layers\": {layers}}}"))
            .map_err(|e| Error::Io { path: d.to_path_buf(), source: e })?;
        let tensors: Vec<(String, Tensor)> = (0..count)
            .map(|l| {
                let t = Tensor::randn([4096, 4096], (Kind::Float, tch::Device::Cpu))
                    * if i == 0 { 1.0 } else { 0.01 };
                (format!("model.layers.{l}.mlp.up_proj.weight"), t)
            })
            .collect();
        io::write_safetensors(d.join("model.safetensors"), &tensors, Some(io::pt_metadata()))?;
        eprintln!("wrote {}", d.display());
    }
    for method in ["ties", "task_arithmetic"] {
        let mut yaml = format!("merge_method: {method}\nbase_model: base\nmodels:\n");
        for i in 1..=models {
            yaml.push_str(&format!(
                "  - model: m{i}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            ));
        }
        let config = dir.join(format!("{method}.yml"));
        std::fs::write(&config, yaml)
            .map_err(|e| Error::Io { path: config.to_path_buf(), source: e })?;
        println!("wrote {}", config.display());
    }
    println!(
        "merge in a fresh process, so that peak memory is the merge's: merge --config {}/ties.yml --out {}/merged",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// glibc returns freed blocks of 32 MiB and more to the kernel at once, so that every large
/// tensor libtorch allocates for the methods without a one-pass kernel comes back as fresh,
/// zero-filled pages; keeping them in the heap saves the kernel that work (peak memory is the
/// same: the blocks are reused).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads start
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
    let usage = "usage: merge --config FILE.yml --out DIR | --extract-lora --base DIR --model DIR --out DIR [--max-rank N] | --synthetic DIR [--size-gb N] [--models N]";
    let mut args = std::env::args().skip(1);
    let (mut config, mut out, mut synth, mut size_gb, mut models) = (None, None, None, 1.0, 3usize);
    let (mut extract, mut base, mut model, mut max_rank) = (false, None, None, 128i64);
    while let Some(a) = args.next() {
        let mut v = || {
            args.next().unwrap_or_else(|| {
                eprintln!("error: {a} needs a value");
                std::process::exit(2)
            })
        };
        let number = |s: String| -> f64 {
            s.parse().unwrap_or_else(|_| {
                eprintln!("error: `{s}` is not a number\n{usage}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(v())),
            "--out" => out = Some(PathBuf::from(v())),
            "--synthetic" => synth = Some(PathBuf::from(v())),
            "--size-gb" => size_gb = number(v()),
            "--models" => models = number(v()) as usize,
            "--extract-lora" => extract = true,
            "--base" => base = Some(PathBuf::from(v())),
            "--model" => model = Some(PathBuf::from(v())),
            "--max-rank" => max_rank = number(v()) as i64,
            other => {
                eprintln!("error: unknown argument `{other}`\n{usage}");
                std::process::exit(2)
            }
        }
    }
    let result = match (config, out, synth, extract, base, model) {
        (Some(c), Some(o), None, false, None, None) => run_config(&c, &o),
        (None, Some(o), None, true, Some(b), Some(m)) => run_extract(&b, &m, &o, max_rank),
        (None, None, Some(d), false, None, None) => synthetic(&d, size_gb, models),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
