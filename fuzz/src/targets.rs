//! The bodies of the fuzz targets: each feeds bytes to one reader of outside input through the
//! crate's public API and ignores the `Result` — any panic, abort, hang or runaway allocation is
//! the finding. The replay test (`tests/fuzz_regressions.rs`) runs the same functions over the
//! committed seeds and regression inputs, so CI checks them without nightly.
//!
//! Targets that read files write the input into a scratch directory of this process first.

use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};
use tch_peft::io;
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::merge::{MergeConfig, ModelFiles};
use tch_peft::models::{Llama, LlamaConfig};
use tch_peft::reft::{Activation, Positions, ReftConfig, ReftModel};

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and the seed folders call them.
pub const TARGETS: [&str; 11] = [
    "safetensors",
    "adapter_config",
    "pickle",
    "torch_zip",
    "pyvene",
    "merge_config",
    "merge_header",
    "reft_config",
    "model_config",
    "gguf",
    "bnb_checkpoint",
];

/// Runs the target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "safetensors" => safetensors(data),
        "adapter_config" => adapter_config(data),
        "pickle" => pickle(data),
        "torch_zip" => torch_zip(data),
        "pyvene" => pyvene(data),
        "merge_config" => merge_config(data),
        "merge_header" => merge_header(data),
        "reft_config" => reft_config(data),
        "model_config" => model_config(data),
        "gguf" => gguf(data),
        "bnb_checkpoint" => bnb_checkpoint(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// A scratch directory `<tmp>/tch-peft-fuzz-<pid>/<name>`, emptied.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-peft-fuzz-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("a scratch file");
}

/// The bytes as a safetensors file: parsed, and when it parses, loaded into a small adapter
/// (`proj`, 8 → 8, r 2) as its weights.
pub fn safetensors(data: &[u8]) {
    if io::SafetensorsFile::from_bytes(data, "fuzz.safetensors").is_err() {
        return;
    }
    let dir = scratch("safetensors");
    let file = dir.join(io::PEFT_WEIGHTS_NAME);
    write(&file, data);
    let (base, vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig { r: 2, ..LoraConfig::for_targets(["proj"]) };
    let Ok(builder) = LoraBuilder::new(&vs.root(), cfg) else { return };
    let Ok(_layer) = builder.linear(&(base.root() / "proj"), 8, 8, Default::default()) else {
        return;
    };
    if let Ok(adapter) = builder.finish() {
        let _ = adapter.load_safetensors(&file);
    }
}

/// The bytes as `adapter_config.json`: read, and when valid, built on a small two-layer model.
pub fn adapter_config(data: &[u8]) {
    let dir = scratch("adapter_config");
    write(&dir.join(io::PEFT_CONFIG_NAME), data);
    let Ok(cfg) = LoraConfig::from_pretrained(&dir) else { return };
    let (base, vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let Ok(builder) = LoraBuilder::new(&vs.root(), cfg) else { return };
    for name in ["q_proj", "v_proj"] {
        let p = base.root() / "model" / "layers" / 0 / name;
        if let Ok(layer) = builder.linear(&p, 8, 8, Default::default()) {
            let _ = layer.f_forward_t(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)), true);
        }
    }
    let _ = builder.finish();
}

/// A `torch.save` archive of the bytes as `archive/data.pkl`, with storages `0` (64 f32) and
/// `1` (8 i64).
pub fn pickle(data: &[u8]) {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let entries: [(&str, Vec<u8>); 4] = [
            ("archive/data.pkl", data.to_vec()),
            ("archive/byteorder", b"little".to_vec()),
            ("archive/data/0", (0..64).flat_map(|i| (i as f32).to_le_bytes()).collect()),
            ("archive/data/1", (0..8).flat_map(|i| (i as i64).to_le_bytes()).collect()),
        ];
        for (name, bytes) in entries {
            z.start_file(name, opts).expect("zip");
            z.write_all(&bytes).expect("zip");
        }
        z.finish().expect("zip");
    }
    let _ = io::read_torch_dict_bytes(&buf.into_inner(), "fuzz.bin");
}

/// The bytes as a whole `torch.save` archive.
pub fn torch_zip(data: &[u8]) {
    let _ = io::read_torch_dict_bytes(data, "fuzz.bin");
}

/// The bytes as a pyvene save directory's `config.json`, beside two LoReFT state dicts
/// (d 16, r 2) under both of pyvene's key namings for layers 0 and 1.
pub fn pyvene(data: &[u8]) {
    let dir = scratch("pyvene");
    write(&dir.join("config.json"), data);
    for l in 0..2 {
        let key = format!("layer_{l}_comp_block_output_unit_pos_nunit_1#0");
        write(&dir.join(format!("intkey_{key}.bin")), &loreft_state_dict(16, 2));
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let Ok(positions) = "f1+l1".parse::<Positions>() else { return };
    let _ = ReftModel::from_pyvene(&vs.root(), &dir, 4, positions, Activation::Linear, 0.0);
}

/// A `torch.save` archive of a LoReFT state dict: `rotate_layer [d, r]`, `weight [r, d]`,
/// `bias [r]`, each on its own f32 storage.
fn loreft_state_dict(d: i64, r: i64) -> Vec<u8> {
    fn int(p: &mut Vec<u8>, v: i64) {
        p.extend([0x8a, 8]);
        p.extend_from_slice(&v.to_le_bytes());
    }
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    let tensors: [(&str, Vec<i64>); 3] =
        [("rotate_layer", vec![d, r]), ("weight", vec![r, d]), ("bias", vec![r])];
    let mut p = vec![0x80, 2, b'}', b'('];
    for (i, (name, size)) in tensors.iter().enumerate() {
        unicode(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        unicode(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut p, &i.to_string());
        unicode(&mut p, "cpu");
        int(&mut p, size.iter().product());
        p.extend(b"tQ");
        int(&mut p, 0);
        p.push(b'(');
        for s in size {
            int(&mut p, *s);
        }
        p.extend(b"t(");
        let stride: Vec<i64> = if size.len() == 2 { vec![size[1], 1] } else { vec![1] };
        for s in stride {
            int(&mut p, s);
        }
        p.extend(b"t\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend(b"u.");
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).expect("zip");
        z.write_all(&p).expect("zip");
        for (i, (_, size)) in tensors.iter().enumerate() {
            let n: i64 = size.iter().product();
            z.start_file(format!("archive/data/{i}"), opts).expect("zip");
            z.write_all(&vec![0u8; 4 * n as usize]).expect("zip");
        }
        z.finish().expect("zip");
    }
    buf.into_inner()
}

/// The bytes as a mergekit YAML: parsed, and when valid, every parameter evaluated for a few
/// tensor names at depths in and out of `[0, 1]`.
pub fn merge_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = MergeConfig::from_yaml(text) else { return };
    let mut blocks = vec![&cfg.parameters];
    blocks.extend(cfg.models.iter().map(|m| &m.parameters));
    for s in &cfg.slices {
        blocks.push(&s.parameters);
        blocks.extend(s.sources.iter().map(|src| &src.parameters));
    }
    for name in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", ""] {
        for t in [0.0, 0.5, 1.0, 7.0, -3.0, f64::NAN] {
            for setting in blocks.iter().take(16).flat_map(|b| b.values()) {
                let _ = setting.number(name, t);
                let _ = setting.boolean(name, t);
            }
        }
    }
}

/// The bytes as a model directory's `model.safetensors`: headers read by the streamed merge, and
/// every tensor read.
/// The bytes as a GGUF file: opened, every tensor read, its tokenizer built and used, and where
/// it describes a small Llama, the config derived, the model built (float, and 4-bit) and the
/// weights loaded (quantized on load into the 4-bit one).
pub fn gguf(data: &[u8]) {
    use tch_peft::quant::gguf::GgufFile;
    let dir = scratch("gguf");
    let path = dir.join("model.gguf");
    write(&path, data);
    let Ok(file) = GgufFile::open(&path) else { return };
    for t in file.tensors() {
        let _ = file.tensor(&t.name);
    }
    if let Ok(tok) = tch_peft::models::gguf::GgufTokenizer::from_gguf(&file) {
        if let Ok(ids) = tok.encode("Hello <|im_start|> wörld 123") {
            let _ = tok.decode(&ids);
        }
    }
    let Ok(cfg) = tch_peft::models::gguf::llama_config(&file) else { return };
    if cfg.num_parameters().is_ok_and(|n| n <= 1 << 16) {
        let vs = nn::VarStore::new(Device::Cpu);
        if Llama::new(&vs.root(), &cfg, None).is_ok() {
            let _ = tch_peft::models::gguf::load_llama_weights(&vs, &file, &cfg);
        }
        let cfg4 = cfg.with_bnb_4bit(&tch_peft::quant::Bnb4bitConfig::default());
        let vs4 = nn::VarStore::new(Device::Cpu);
        if let Ok(model) = Llama::new(&vs4.root(), &cfg4, None) {
            let _ = model.load_gguf(&vs4, &file);
        }
    }
}

/// The bytes as the `model.safetensors` of a bitsandbytes 4-bit Llama directory (the config of
/// `tests/fixtures/bnb/llama-nf4`): loaded into the 4-bit model the config builds (the codes
/// kept, each state checked against its layer) and into a float model (dequantized), and run.
pub fn bnb_checkpoint(data: &[u8]) {
    const CONFIG: &str = include_str!("../../tests/fixtures/bnb/llama-nf4/config.json");
    let dir = scratch("bnb_checkpoint");
    write(&dir.join("config.json"), CONFIG.as_bytes());
    write(&dir.join("model.safetensors"), data);
    let Ok(cfg) = LlamaConfig::from_pretrained(&dir) else { return };
    let ids = tch::Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let vs = nn::VarStore::new(Device::Cpu);
    if let Ok(model) = Llama::new(&vs.root(), &cfg, None) {
        if model.load_weights(&vs, &dir).is_ok() {
            let _ = model.forward_t(&ids, None, false);
        }
    }
    let float_cfg = LlamaConfig { quantization_config: None, ..cfg };
    let vs = nn::VarStore::new(Device::Cpu);
    if let Ok(model) = Llama::new(&vs.root(), &float_cfg, None) {
        if model.load_weights(&vs, &dir).is_ok() {
            let _ = model.forward_t(&ids, None, false);
        }
    }
}

pub fn merge_header(data: &[u8]) {
    let dir = scratch("merge_header");
    write(&dir.join("model.safetensors"), data);
    let Ok(files) = ModelFiles::open(&dir) else { return };
    for name in files.names() {
        let _ = files.read(&name);
    }
}

/// The bytes as a `reft_config.json`, and as a positions spec: parsed, and the positions of a
/// few prompt lengths computed.
pub fn reft_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let positions = text.trim().parse::<Positions>().ok();
    let config = serde_json::from_str::<ReftConfig>(text).ok();
    for p in positions.into_iter().chain(config.as_ref().map(|c| c.positions)) {
        for n in [0, 1, 7, 100] {
            let _ = p.locations(n, true);
            let _ = p.locations(n, false);
        }
        let _ = p.batch_locations(&[3, 9], &[0, 2], false, Device::Cpu);
    }
    if let Some(cfg) = config {
        if cfg.intervention.validate().is_ok() && cfg.intervention.num_params() <= 1 << 16 {
            let vs = nn::VarStore::new(Device::Cpu);
            let _ = ReftModel::new(&vs.root(), cfg, 4);
        }
    }
}

/// The bytes as a Llama `config.json` (next to a 64 KiB weights file): read, and when the
/// model is small, built and run.
pub fn model_config(data: &[u8]) {
    let dir = scratch("model_config");
    write(&dir.join("config.json"), data);
    let t = Tensor::zeros([1 << 14], (Kind::Float, Device::Cpu));
    if io::write_safetensors(dir.join("model.safetensors"), &[("w".into(), t)], None).is_err() {
        return;
    }
    let Ok(cfg) = LlamaConfig::from_pretrained(&dir) else { return };
    if cfg.num_parameters().is_ok_and(|n| n <= 1 << 14) {
        let vs = nn::VarStore::new(Device::Cpu);
        if let Ok(model) = Llama::new(&vs.root(), &cfg, None) {
            let ids = Tensor::from_slice(&[0i64, 1, 2]).view([1, 3]);
            let _ = model.forward_t(&ids, None, false);
        }
    }
}
