//! Merge checkpoints with a mergekit YAML config, streamed tensor by tensor.
//!
//! ```text
//! scripts/with-torch cargo run --release --example merge -- --config FILE.yml --out DIR
//! scripts/with-torch cargo run --release --example merge -- --synthetic DIR [--size-gb 1] [--models 3]
//! ```
//!
//! * `--config`: mergekit's YAML (`merge_method`, `base_model`, `models` with `parameters`,
//!   global `parameters`, `dtype`); model entries are local directories with `config.json` and
//!   `*.safetensors` (sharded or not), relative paths taken from the config file's folder.
//!   Fields this crate does not run (e.g. `slices`, `tokenizer_source`) are errors naming them.
//! * `--out`: the merged directory (`model.safetensors` and the base's other files).
//! * `--synthetic DIR`: writes a base and `--models` fine-tuned checkpoints of `--size-gb` GB
//!   each (f32, 64 MiB tensors, Llama-style names) and configs `DIR/ties.yml` and
//!   `DIR/task_arithmetic.yml` over them; merging them with `--config` (in a fresh process)
//!   prints throughput and peak memory: the measurement in docs/PERFORMANCE.md.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use tch_peft::merge::{merge_directories, MergeConfig};
use tch_peft::{io, Error, Result};

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn run_config(config: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| Error::Io { path: config.to_path_buf(), source: e })?;
    let mut cfg = MergeConfig::from_yaml(&text)?;
    let root = config.parent().unwrap_or(Path::new("."));
    cfg.base_model = cfg.base_model.map(|b| root.join(b));
    for m in &mut cfg.models {
        m.model = root.join(&m.model);
    }
    let stats = merge_directories(&cfg, out)?;
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

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut config, mut out, mut synth, mut size_gb, mut models) = (None, None, None, 1.0, 3usize);
    while let Some(a) = args.next() {
        let mut v = || {
            args.next().unwrap_or_else(|| {
                eprintln!("error: {a} needs a value");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(v())),
            "--out" => out = Some(PathBuf::from(v())),
            "--synthetic" => synth = Some(PathBuf::from(v())),
            "--size-gb" => size_gb = v().parse().unwrap_or(1.0),
            "--models" => models = v().parse().unwrap_or(3),
            other => {
                eprintln!("error: unknown argument `{other}`\nusage: merge --config FILE.yml --out DIR | --synthetic DIR [--size-gb N] [--models N]");
                std::process::exit(2)
            }
        }
    }
    let result = match (config, out, synth) {
        (Some(c), Some(o), None) => run_config(&c, &o),
        (None, None, Some(d)) => synthetic(&d, size_gb, models),
        _ => {
            eprintln!("usage: merge --config FILE.yml --out DIR | --synthetic DIR [--size-gb N] [--models N]");
            std::process::exit(2)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
