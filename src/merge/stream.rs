//! Merging checkpoint directories tensor by tensor with bounded memory: each input tensor is
//! read from its safetensors file on its own (header offsets, one seek and read — no mmap, so
//! the page cache, not the process, holds what the OS keeps), merged, and appended to the output
//! file, whose header is written first from the inputs' headers. Peak memory grows with the
//! largest tensor times the number of inputs, not with the model.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Kind, Tensor};

use super::config::MergeConfig;
use super::methods::merge_tensor;
use super::plan::{self, split_layer, Plan};
use crate::{io, Error, Result};

/// A tensor's place in a safetensors file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    start: u64,
    end: u64,
}

/// The most layers a `config.json` may declare (`num_hidden_layers`).
const MAX_LAYERS: i64 = 1 << 20;

/// One tensor of a safetensors header, as the format declares it.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// `(kind, shape, start, end)` per tensor of a header.
type HeaderTensors = Vec<(String, (Kind, Vec<i64>, u64, u64))>;

/// Reads and checks a safetensors header from `f` (a file of `size` bytes): its length fits the
/// file and [`MAX_HEADER_BYTES`](io::MAX_HEADER_BYTES), every entry has a known dtype, a shape
/// whose byte size is computed without overflow and equals its offsets' span, and offsets
/// inside the file. Returns where the data starts and the entries.
fn read_header(f: &mut File, size: u64, path: &Path) -> Result<(u64, HeaderTensors)> {
    let corrupt = |reason: String| Error::CorruptFile { file: path.to_path_buf(), reason };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| corrupt("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > io::MAX_HEADER_BYTES {
        return Err(corrupt(format!("header length {n} does not fit the file")));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&buf).map_err(|e| corrupt(format!("header: {e}")))?;
    header.remove("__metadata__");
    let data_start = 8 + n;
    let data_len = size - data_start;
    let mut out = Vec::with_capacity(header.len());
    for (name, v) in header {
        let e: HeaderEntry =
            serde_json::from_value(v).map_err(|e| corrupt(format!("`{name}`: {e}")))?;
        let kind =
            kind_of(&e.dtype).ok_or_else(|| corrupt(format!("`{name}`: dtype `{}`", e.dtype)))?;
        let bytes = e
            .shape
            .iter()
            .try_fold(kind.elt_size_in_bytes() as u64, |a, &d| a.checked_mul(d))
            .filter(|&b| b <= i64::MAX as u64);
        let [start, end] = e.data_offsets;
        let dims_fit = e.shape.iter().all(|&d| d <= i64::MAX as u64);
        if !dims_fit
            || bytes.is_none()
            || end < start
            || Some(end - start) != bytes
            || end > data_len
        {
            return Err(corrupt(format!("`{name}`: offsets do not fit its shape or the file")));
        }
        let shape = e.shape.iter().map(|&d| d as i64).collect();
        out.push((name, (kind, shape, start, end)));
    }
    Ok((data_start, out))
}

/// The safetensors files of a model directory, by tensor name (headers only).
#[derive(Debug)]
pub struct ModelFiles {
    dir: PathBuf,
    files: Vec<(PathBuf, u64)>,
    tensors: HashMap<String, Entry>,
    /// `num_hidden_layers` from `config.json`, if any.
    pub num_layers: Option<i64>,
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Double => "F64",
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        other => {
            return Err(Error::Unsupported { field: "dtype".into(), reason: format!("{other:?}") })
        }
    })
}

/// The output kind named in a mergekit config (`float32`, `float16`, `bfloat16`, `float64`).
pub(crate) fn kind_from_name(name: &str) -> Result<Kind> {
    Ok(match name {
        "float32" | "fp32" => Kind::Float,
        "float16" | "fp16" => Kind::Half,
        "bfloat16" | "bf16" => Kind::BFloat16,
        "float64" => Kind::Double,
        other => return Err(Error::config("dtype", format!("`{other}` is not a supported dtype"))),
    })
}

impl ModelFiles {
    /// Reads the headers of every `*.safetensors` file in `dir` (a single file or shards).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors file"),
            ));
        }
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let (mut f, size) = io::open_regular(&path)?;
            let (data_start, entries) = read_header(&mut f, size, &path)?;
            for (name, (kind, shape, start, end)) in entries {
                if tensors
                    .insert(name.clone(), Entry { file: i, kind, shape, start, end })
                    .is_some()
                {
                    return Err(Error::CorruptFile {
                        file: path.clone(),
                        reason: format!("`{name}` appears in two files"),
                    });
                }
            }
            files.push((path, data_start));
        }
        let config = dir.join("config.json");
        let num_layers = match io::open_regular(&config) {
            Err(_) => None,
            Ok(_) => {
                let text = io::read_config(&config)?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    Error::CorruptFile { file: config.clone(), reason: e.to_string() }
                })?;
                match v.get("num_hidden_layers") {
                    None => None,
                    Some(n) => {
                        Some(n.as_i64().filter(|n| (1..=MAX_LAYERS).contains(n)).ok_or_else(
                            || Error::CorruptFile {
                                file: config.clone(),
                                reason: format!("num_hidden_layers {n} is not in 1..={MAX_LAYERS}"),
                            },
                        )?)
                    }
                }
            }
        };
        Ok(ModelFiles { dir, files, tensors, num_layers })
    }

    /// The model's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The number of layers: the larger of `num_hidden_layers` and the deepest layer index on
    /// disk + 1 (layers: see [`MergeConfig`]'s slices).
    pub fn depth(&self) -> u64 {
        let deepest = self
            .tensors
            .keys()
            .filter_map(|n| split_layer(n))
            .map(|(_, i, _)| i.saturating_add(1))
            .max()
            .unwrap_or(0);
        deepest.max(self.num_layers.map_or(0, |n| n as u64))
    }

    /// Whether the model has the tensor.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// Shape and kind of a tensor.
    pub fn info(&self, name: &str) -> Option<(Vec<i64>, Kind)> {
        self.tensors.get(name).map(|e| (e.shape.clone(), e.kind))
    }

    /// Reads one tensor (only its bytes).
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into(), file: self.dir.clone() })?;
        let (path, data_start) = &self.files[e.file];
        let (mut f, _) = io::open_regular(path)?;
        f.seek(SeekFrom::Start(data_start + e.start)).map_err(|err| Error::io(path, err))?;
        let mut buf = vec![0u8; (e.end - e.start) as usize];
        f.read_exact(&mut buf).map_err(|err| Error::io(path, err))?;
        let t = Tensor::f_from_data_size(&buf, &e.shape, e.kind)?;
        io::check_loaded_finite([(name, &t)], path)?;
        Ok(t)
    }
}

/// What a streamed merge did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeStats {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes read from the inputs.
    pub bytes_read: u64,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// The tokenizer files mergekit copies (`merge.py: _copy_tokenizer`).
const TOKENIZER_FILES: [&str; 10] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
];

/// The files that define a vocabulary: inputs must agree on them for a tokenizer source to be
/// copied without permuting the embeddings.
const VOCABULARY_FILES: [&str; 3] = ["tokenizer.json", "tokenizer.model", "added_tokens.json"];

/// Runs a [`MergeConfig`] over model directories and writes `out/model.safetensors` with the
/// donor's (the base's, else the first source's) `config.json` and other non-weight files.
///
/// The config is planned as mergekit plans it: `models` become one slice of all layers with
/// the base added when not listed; each slice's layers follow the previous slices' (renumbered
/// in the tensor names, and `num_hidden_layers` rewritten in `config.json`); gradients run over
/// each slice's depth (`t = i / (n − 1)`, 1 for a one-layer slice); tensors outside the layers
/// use `t = 0` and come from the first slice's sources (embeddings) or the last's. A layer is
/// the first all-digit component of a tensor's module path. Integer tensors are copied from
/// the first source. With `tokenizer_source`, that model's tokenizer files are written, after
/// checking that every input has the same vocabulary files (so no embedding needs permuting).
///
/// The output directory is replaced as a whole (a crash leaves the old one or the new one; see
/// [`crate::io`]); it may not be one of the inputs. Errors name the tensor and model when a
/// tensor is missing or shaped differently, and refuse a merged tensor that is not finite
/// ([`Error::NonFinite`]: the weights or the inputs are not sane) before anything is replaced.
pub fn merge_directories(cfg: &MergeConfig, out: impl AsRef<Path>) -> Result<MergeStats> {
    cfg.validate()?;
    let out = out.as_ref();
    check_output_is_not_an_input(cfg, out)?;
    if let Some(seed) = cfg.random_seed {
        tch::manual_seed(seed);
    }
    let started = Instant::now();
    let plan = plan::build(cfg)?;
    check_vocabularies(&plan)?;
    // the header, from shapes and output kinds
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    for p in &plan.tensors {
        let end = offset
            .checked_add(p.bytes)
            .ok_or_else(|| Error::config("models", "the merged model is too large"))?;
        let entry = serde_json::json!({
            "dtype": dtype_of(p.out_kind)?, "shape": p.shape, "data_offsets": [offset, end]
        });
        if header.insert(p.name.clone(), entry).is_some() {
            return Err(Error::config("slices", format!("`{}` would be written twice", p.name)));
        }
        offset = end;
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut stats =
        MergeStats { tensors: plan.tensors.len(), bytes_read: 0, bytes_written: 0, seconds: 0.0 };
    let method = cfg.merge_method;
    // the weights of an earlier model in `out` (shards, their index, other formats) go
    io::replace_dir(out, &is_weight_file, |dir| {
        let path = dir.join("model.safetensors");
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(text.len() as u64).to_le_bytes()).map_err(|e| Error::io(&path, e))?;
        w.write_all(&text).map_err(|e| Error::io(&path, e))?;
        for p in &plan.tensors {
            let merged = if !p.float {
                let i = &p.inputs[0];
                plan.models[i.model].read(&i.name)?
            } else {
                let mut base = None;
                let mut inputs = Vec::with_capacity(p.inputs.len());
                for i in &p.inputs {
                    let t = plan.models[i.model].read(&i.name)?;
                    stats.bytes_read += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
                    let t = if t.kind() == p.work_kind { t } else { t.f_to_kind(p.work_kind)? };
                    if i.is_base {
                        base = Some(t);
                    } else {
                        inputs.push((t, i.params));
                    }
                }
                let pairs: Vec<(&Tensor, _)> = inputs.iter().map(|(t, p)| (t, *p)).collect();
                let merged =
                    tch::no_grad(|| merge_tensor(method, base.as_ref(), &pairs, &p.global))?;
                if !crate::lora::all_finite(&merged)? {
                    return Err(Error::NonFinite { name: p.name.clone(), file: out.to_path_buf() });
                }
                merged
            };
            let merged = merged.f_to_kind(p.out_kind)?.f_contiguous()?;
            let mut buf = vec![0u8; p.bytes as usize];
            merged.f_copy_data_u8(&mut buf, merged.numel())?;
            w.write_all(&buf).map_err(|e| Error::io(&path, e))?;
            stats.bytes_written += p.bytes;
        }
        w.flush().map_err(|e| Error::io(&path, e))?;
        copy_other_files(cfg, &plan, dir)
    })?;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// With a tokenizer source, every input must carry the same vocabulary files as the source (or
/// none): mergekit would otherwise permute the embeddings to the source's vocabulary.
fn check_vocabularies(plan: &Plan) -> Result<()> {
    let Some(src) = plan.tokenizer else { return Ok(()) };
    let read = |dir: &Path, f: &str| -> Result<Option<Vec<u8>>> {
        let p = dir.join(f);
        match io::open_regular(&p) {
            Err(_) => Ok(None),
            Ok(_) => Ok(Some(io::read_capped(&p, 1 << 30)?)),
        }
    };
    let source_dir = plan.models[src].dir();
    for f in VOCABULARY_FILES {
        let theirs = read(source_dir, f)?;
        for m in &plan.models {
            match (read(m.dir(), f)?, &theirs) {
                (None, _) => {}
                (Some(a), Some(b)) if &a == b => {}
                _ => {
                    return Err(Error::Unsupported {
                        field: "tokenizer_source".into(),
                        reason: format!(
                            "{} has a different `{f}` than {}: its embeddings would need \
                             permuting to the source's vocabulary",
                            m.dir().display(),
                            source_dir.display()
                        ),
                    })
                }
            }
        }
    }
    Ok(())
}

/// The donor's non-weight files (config, tokenizer, …), the tokenizer source's tokenizer files
/// in place of the donor's, and `config.json` with the new depth and dtype.
fn copy_other_files(cfg: &MergeConfig, plan: &Plan, dir: &Path) -> Result<()> {
    let donor = plan.models[plan.donor].dir();
    let tokenizer = plan.tokenizer.map(|t| plan.models[t].dir());
    for entry in std::fs::read_dir(donor).map_err(|e| Error::io(donor, e))? {
        let p = entry.map_err(|e| Error::io(donor, e))?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        let replaced = tokenizer.is_some() && TOKENIZER_FILES.contains(&name);
        if is_weight_file(name)
            || name.starts_with('.')
            || replaced
            || io::open_regular(&p).is_err()
        {
            continue;
        }
        copy_file(&p, &dir.join(name))?;
    }
    if let Some(src) = tokenizer {
        for name in TOKENIZER_FILES {
            let p = src.join(name);
            if io::open_regular(&p).is_ok() {
                copy_file(&p, &dir.join(name))?;
            }
        }
    }
    let config = dir.join("config.json");
    let kind = cfg.out_dtype.as_deref().or(cfg.dtype.as_deref());
    if io::open_regular(&config).is_ok() && (plan.num_layers.is_some() || kind.is_some()) {
        let text = io::read_config(&config)?;
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::CorruptFile { file: config.clone(), reason: e.to_string() })?;
        if let Some(obj) = v.as_object_mut() {
            if let Some(n) = plan.num_layers {
                obj.insert("num_hidden_layers".into(), n.into());
            }
            if let Some(k) = kind {
                let name = super::stream::canonical_dtype_name(k);
                let key = if obj.contains_key("torch_dtype") { "torch_dtype" } else { "dtype" };
                obj.insert(key.into(), name.into());
            }
        }
        let text = serde_json::to_string_pretty(&v)?;
        std::fs::write(&config, text).map_err(|e| Error::io(&config, e))?;
    }
    Ok(())
}

/// Copies a file by streaming (no whole-file buffer).
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let (mut src, _) = io::open_regular(from)?;
    let mut dst = File::create(to).map_err(|e| Error::io(to, e))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| Error::io(from, e))?;
    Ok(())
}

/// The name transformers writes for a dtype (`float16` for `fp16`).
pub(crate) fn canonical_dtype_name(name: &str) -> &str {
    match name {
        "fp32" => "float32",
        "fp16" => "float16",
        "bf16" => "bfloat16",
        other => other,
    }
}

/// Weights of a model directory in any format (not copied from the reference, not kept from an
/// earlier model in the output).
fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Every model directory a config names (base, models, slice sources and bases, tokenizer).
fn inputs_of(cfg: &MergeConfig) -> Vec<&Path> {
    let mut v: Vec<&Path> = cfg.base_model.iter().map(|p| p.as_path()).collect();
    v.extend(cfg.models.iter().map(|m| m.model.as_path()));
    for s in &cfg.slices {
        v.extend(s.base_model.iter().map(|p| p.as_path()));
        v.extend(s.sources.iter().map(|src| src.model.as_path()));
    }
    if let Some(super::config::TokenizerSource::Model(p)) = cfg.tokenizer_source() {
        v.push(p);
    }
    v
}

/// Refuses an output directory that is (or links to) one of the inputs: the merge would
/// replace its own input.
fn check_output_is_not_an_input(cfg: &MergeConfig, out: &Path) -> Result<()> {
    let Ok(out_c) = std::fs::canonicalize(out) else { return Ok(()) }; // not there yet
    for input in inputs_of(cfg) {
        if std::fs::canonicalize(input).is_ok_and(|c| c == out_c) {
            return Err(Error::config(
                "out",
                format!(
                    "{} is an input of the merge; write the merged model elsewhere",
                    out.display()
                ),
            ));
        }
    }
    Ok(())
}
