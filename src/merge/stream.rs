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
use crate::freeze::block_index;
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

/// Runs a [`MergeConfig`] over model directories and writes `out/model.safetensors`, plus the
/// base's (or first model's) `config.json` and other non-weight files. Tensors are merged one
/// at a time; layer tensors get `t = layer / (layers − 1)` for gradients (`layers` the larger
/// of the base's `num_hidden_layers` and the largest block index + 1), other tensors `t = 0`.
/// Integer tensors are copied from the base.
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
    let base = cfg.base_model.as_ref().map(ModelFiles::open).transpose()?;
    let models: Vec<ModelFiles> =
        cfg.models.iter().map(|m| ModelFiles::open(&m.model)).collect::<Result<_>>()?;
    let reference = base.as_ref().unwrap_or(&models[0]);
    let names = reference.names();
    let out_kind = cfg.dtype.as_deref().map(kind_from_name).transpose()?;
    let deepest = names
        .iter()
        .filter_map(|n| block_index(n, &[]))
        .max()
        .map_or(1, |m| m.saturating_add(1).max(1));
    let num_layers = reference.num_layers.map_or(deepest, |n| n.max(deepest));
    // every input has every tensor, with the same shape
    let mut plan = Vec::with_capacity(names.len());
    for n in &names {
        let Some((shape, kind)) = reference.info(n) else { continue };
        for m in &models {
            match m.info(n) {
                None => return Err(Error::MissingTensor { name: n.clone(), file: m.dir.clone() }),
                Some((s, _)) if s != shape => {
                    return Err(Error::ShapeMismatch {
                        name: format!("{n} in {}", m.dir.display()),
                        expected: shape,
                        actual: s,
                    })
                }
                Some(_) => {}
            }
        }
        let float = crate::lora::is_float(kind);
        let k = if float { out_kind.unwrap_or(kind) } else { kind };
        let bytes = shape
            .iter()
            .try_fold(k.elt_size_in_bytes() as u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| Error::config("dtype", format!("`{n}` is too large")))?;
        plan.push((n.clone(), shape, k, float, bytes));
    }
    // the header, from shapes and output kinds
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    for (n, shape, k, _, bytes) in &plan {
        let end = offset
            .checked_add(*bytes)
            .ok_or_else(|| Error::config("models", "the merged model is too large"))?;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dtype_of(*k)?, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut stats =
        MergeStats { tensors: plan.len(), bytes_read: 0, bytes_written: 0, seconds: 0.0 };
    // the weights of an earlier model in `out` (shards, their index, other formats) go
    io::replace_dir(out, &is_weight_file, |dir| {
        let path = dir.join("model.safetensors");
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(text.len() as u64).to_le_bytes()).map_err(|e| Error::io(&path, e))?;
        w.write_all(&text).map_err(|e| Error::io(&path, e))?;
        for (n, _, k, float, bytes) in &plan {
            let t = match block_index(n, &[]) {
                Some(i) if num_layers > 1 => i as f64 / (num_layers - 1) as f64,
                _ => 0.0,
            };
            let merged = if !float {
                reference.read(n)?
            } else {
                let b = base.as_ref().map(|b| b.read(n)).transpose()?;
                let inputs: Vec<Tensor> =
                    models.iter().map(|m| m.read(n)).collect::<Result<_>>()?;
                stats.bytes_read += inputs
                    .iter()
                    .chain(b.iter())
                    .map(|x| (x.numel() * x.kind().elt_size_in_bytes()) as u64)
                    .sum::<u64>();
                let params: Vec<_> =
                    (0..models.len()).map(|i| cfg.model_params(i, n, t)).collect::<Result<_>>()?;
                let pairs: Vec<(&Tensor, _)> = inputs.iter().zip(params).collect();
                let merged = tch::no_grad(|| {
                    merge_tensor(cfg.merge_method, b.as_ref(), &pairs, &cfg.global_params(n, t))
                })?;
                if !crate::lora::all_finite(&merged)? {
                    return Err(Error::NonFinite { name: n.clone(), file: out.to_path_buf() });
                }
                merged
            };
            let merged = merged.f_to_kind(*k)?.f_contiguous()?;
            let mut buf = vec![0u8; *bytes as usize];
            merged.f_copy_data_u8(&mut buf, merged.numel())?;
            w.write_all(&buf).map_err(|e| Error::io(&path, e))?;
            stats.bytes_written += bytes;
        }
        w.flush().map_err(|e| Error::io(&path, e))?;
        // the other files of the reference model (config, tokenizer), not its weights
        for entry in std::fs::read_dir(&reference.dir).map_err(|e| Error::io(&reference.dir, e))? {
            let p = entry.map_err(|e| Error::io(&reference.dir, e))?.path();
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            if is_weight_file(name) || name.starts_with('.') || io::open_regular(&p).is_err() {
                continue;
            }
            let dst = dir.join(name);
            std::fs::copy(&p, &dst).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    })?;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Weights of a model directory in any format (not copied from the reference, not kept from an
/// earlier model in the output).
fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Refuses an output directory that is (or links to) the base or one of the models: the merge
/// would replace its own input.
fn check_output_is_not_an_input(cfg: &MergeConfig, out: &Path) -> Result<()> {
    let Ok(out_c) = std::fs::canonicalize(out) else { return Ok(()) }; // not there yet
    let inputs = cfg.base_model.iter().chain(cfg.models.iter().map(|m| &m.model));
    for input in inputs {
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
