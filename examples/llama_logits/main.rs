//! Logits of a Hugging Face Llama checkpoint, optionally with a PEFT LoRA adapter.
//!
//! ```text
//! scripts/with-torch cargo run --release --example llama_logits -- \
//!     --model DIR [--adapter PEFT_DIR] [--merge] --input FILE.json --output FILE.safetensors
//! ```
//!
//! * `--model`: a directory with `config.json` and `model.safetensors` (or a sharded
//!   `model.safetensors.index.json`; a bitsandbytes 4-bit checkpoint stays 4-bit, the adapter
//!   training on it as QLoRA),
//!   or a llama.cpp `.gguf` file (the config from its metadata, its tensors dequantized to
//!   f32: `tch_peft::models::gguf`).
//! * `--adapter`: a PEFT LoRA directory (`adapter_config.json`, `adapter_model.safetensors`).
//! * `--new-adapter CONFIG.json --save-adapter DIR [--seed N]`: instead of loading an adapter,
//!   create one from a PEFT `adapter_config.json` (DoRA/PiSSA/module copies initialised from the
//!   loaded weights), move every adapter variable by seeded noise (a stand-in for training, so
//!   that the adapter changes the logits), and save it as a PEFT directory. Used by
//!   `scripts/check_rust_adapters_in_peft.py` to show that Python PEFT loads what Rust writes.
//! * `--merge`: merge the adapter into the weights before the forward (on a 4-bit base: quantized
//!   again, as PEFT merges into a bitsandbytes base).
//! * `--4bit`: quantize the block linears on load (NF4, double quantization, bit for bit as
//!   bitsandbytes), from a float checkpoint or from the GGUF file's dequantized tensors; QLoRA.
//! * `--save-model DIR`: write the loaded base model (4-bit in bitsandbytes' layout) as a
//!   Hugging Face directory that transformers loads.
//! * `--input`: JSON `{"input_ids": [[...], ...]}` (rows of equal length; an optional
//!   `"attention_mask"` of the same shape marks padding with 0).
//! * `--prompt TEXT` (instead of `--input`): one row of ids from the model's tokenizer — the
//!   GGUF file's own (`models::gguf::GgufTokenizer`), or the `tokenizer.json` beside it or in
//!   the checkpoint directory.
//! * `--output`: a safetensors file with one f32 tensor `logits` of shape `[batch, seq, vocab]`
//!   (and the `input_ids`).

use std::path::PathBuf;

use tch::{nn, Device, Kind, Tensor};
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::models::gguf::{self, GgufTokenizer};
use tch_peft::models::llama::{Llama, LlamaConfig};
use tch_peft::quant::gguf::GgufFile;
use tch_peft::{io, Error};

const USAGE: &str = "usage: llama_logits --model DIR [--4bit] [--adapter PEFT_DIR | --new-adapter CONFIG.json --save-adapter DIR [--seed N]] [--merge] [--save-model DIR] (--input FILE.json | --prompt TEXT) --output FILE.safetensors";

struct Args {
    model: PathBuf,
    adapter: Option<PathBuf>,
    new_adapter: Option<(PathBuf, PathBuf, i64)>,
    merge: bool,
    four_bit: bool,
    save_model: Option<PathBuf>,
    /// `--input FILE.json` or `--prompt TEXT`.
    input: Result<PathBuf, String>,
    output: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut model, mut adapter, mut merge, mut input, mut output) =
        (None, None, false, None, None);
    let (mut new_adapter, mut save_adapter, mut seed) = (None, None, 0i64);
    let mut four_bit = false;
    let mut prompt = None;
    let mut save_model = None;
    while let Some(arg) = it.next() {
        let mut value =
            |name: &str| it.next().map(PathBuf::from).ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--model" => model = Some(value("--model")?),
            "--adapter" => adapter = Some(value("--adapter")?),
            "--new-adapter" => new_adapter = Some(value("--new-adapter")?),
            "--save-adapter" => save_adapter = Some(value("--save-adapter")?),
            "--seed" => {
                let v = value("--seed")?;
                seed = v.to_string_lossy().parse().map_err(|_| "--seed needs an integer")?;
            }
            "--merge" => merge = true,
            "--4bit" => four_bit = true,
            "--save-model" => save_model = Some(value("--save-model")?),
            "--input" => input = Some(value("--input")?),
            "--prompt" => {
                prompt = Some(value("--prompt")?.to_string_lossy().into_owned());
            }
            "--output" => output = Some(value("--output")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let need = |v: Option<PathBuf>, name: &str| v.ok_or(format!("{name} is required"));
    let new_adapter = match (new_adapter, save_adapter) {
        (Some(c), Some(d)) => Some((c, d, seed)),
        (None, None) => None,
        _ => return Err("--new-adapter and --save-adapter go together".into()),
    };
    if adapter.is_some() && new_adapter.is_some() {
        return Err("--adapter and --new-adapter exclude each other".into());
    }
    if merge && adapter.is_none() && new_adapter.is_none() {
        return Err("--merge needs an adapter".into());
    }
    Ok(Args {
        model: need(model, "--model")?,
        adapter,
        new_adapter,
        merge,
        four_bit,
        save_model,
        input: match (input, prompt) {
            (Some(i), None) => Ok(i),
            (None, Some(p)) => Err(p),
            _ => return Err("one of --input and --prompt is required".into()),
        },
        output: need(output, "--output")?,
    })
}

/// A `[rows, cols]` i64 tensor from a JSON array of equal-length integer arrays.
fn matrix(
    value: &serde_json::Value,
    field: &str,
    file: &std::path::Path,
) -> tch_peft::Result<Tensor> {
    let bad = |reason: String| Error::CorruptFile { file: file.to_path_buf(), reason };
    let rows =
        value.as_array().ok_or_else(|| bad(format!("`{field}` is not an array of arrays")))?;
    let mut flat = Vec::new();
    let mut width = None;
    for (i, row) in rows.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| bad(format!("`{field}[{i}]` is not an array")))?;
        if *width.get_or_insert(row.len()) != row.len() {
            return Err(bad(format!("`{field}` rows differ in length (row {i})")));
        }
        for v in row {
            flat.push(
                v.as_i64().ok_or_else(|| bad(format!("`{field}[{i}]` holds a non-integer")))?,
            );
        }
    }
    Ok(Tensor::from_slice(&flat).view([rows.len() as i64, width.unwrap_or(0) as i64]))
}

fn run(args: Args) -> tch_peft::Result<()> {
    let device = Device::cuda_if_available();
    let gguf_file = if args.model.extension().is_some_and(|e| e == "gguf") {
        Some(GgufFile::open(&args.model)?)
    } else {
        None
    };
    let mut config = match &gguf_file {
        Some(f) => gguf::llama_config(f)?,
        None => LlamaConfig::from_pretrained(&args.model)?,
    };
    if args.four_bit && config.bnb_4bit()?.is_none() {
        config = config.with_bnb_4bit(&tch_peft::quant::Bnb4bitConfig::default());
    }
    let (base_vs, adapter_vs) = (nn::VarStore::new(device), nn::VarStore::new(device));
    let config_file = args.adapter.as_ref().or(args.new_adapter.as_ref().map(|n| &n.0));
    let lora = match config_file {
        Some(file) => {
            Some(LoraBuilder::new(&adapter_vs.root(), LoraConfig::from_pretrained(file)?)?)
        }
        None => None,
    };
    if let Some((_, _, seed)) = &args.new_adapter {
        // the adapter's random init and the noise below are reproducible
        tch::manual_seed(*seed);
    }
    let model = Llama::new(&base_vs.root(), &config, lora.as_ref())?;
    match &gguf_file {
        Some(f) => model.load_gguf(&base_vs, f)?,
        None => model.load_weights(&base_vs, &args.model)?,
    }
    if let Some(dir) = &args.save_model {
        model.save_pretrained(&base_vs, dir)?;
        eprintln!("model saved to {}", dir.display());
    }
    if let Some(builder) = lora {
        let adapter = builder.finish()?;
        match (&args.adapter, &args.new_adapter) {
            (Some(dir), _) => adapter.load_pretrained(dir)?,
            (None, Some((_, out, _))) => {
                adapter.init_from_base_weights()?;
                tch::no_grad(|| {
                    for t in adapter_vs.trainable_variables() {
                        let noise = Tensor::randn_like(&t) * 0.05;
                        let _ = t.shallow_clone().g_add_(&noise);
                    }
                });
                adapter.save_pretrained(out)?;
                eprintln!("adapter saved to {}", out.display());
            }
            (None, None) => unreachable!("a config file implies an adapter"),
        }
        eprintln!("adapter: {} modules", adapter.modules().len());
        if args.merge {
            adapter.safe_merge()?;
            eprintln!("adapter merged");
        }
    }
    let (ids, mask) = match &args.input {
        Ok(input) => {
            let text = std::fs::read_to_string(input)
                .map_err(|e| Error::Io { path: input.clone(), source: e })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::CorruptFile { file: input.clone(), reason: e.to_string() })?;
            let ids = matrix(&json["input_ids"], "input_ids", input)?;
            let mask = match json.get("attention_mask") {
                Some(m) => Some(matrix(m, "attention_mask", input)?),
                None => None,
            };
            (ids, mask)
        }
        Err(prompt) => {
            let tokenizer = match &gguf_file {
                Some(f) => GgufTokenizer::beside_or_from_gguf(f)?,
                None => GgufTokenizer::from_json(args.model.join("tokenizer.json"))?,
            };
            let ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
            eprintln!("prompt: {} tokens", ids.len());
            (Tensor::from_slice(&ids).view([1, -1]), None)
        }
    };
    let logits = tch::no_grad(|| model.forward_t(&ids, mask.as_ref(), false))?;
    let logits = logits.to_kind(Kind::Float).to_device(Device::Cpu);
    eprintln!("logits {:?} on {device:?}", logits.size());
    let out =
        [("logits".to_string(), logits), ("input_ids".to_string(), ids.to_device(Device::Cpu))];
    io::write_safetensors(&args.output, &out, Some(io::pt_metadata()))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
