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
use crate::{Error, Result};

/// A tensor's place in a safetensors file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    start: u64,
    end: u64,
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
            let corrupt = |reason: String| Error::CorruptFile { file: path.clone(), reason };
            let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| Error::io(&path, e))?;
            let n = u64::from_le_bytes(len);
            let size = f.metadata().map_err(|e| Error::io(&path, e))?.len();
            if n > size.saturating_sub(8) || n > 100_000_000 {
                return Err(corrupt(format!("header length {n} does not fit the file")));
            }
            let mut buf = vec![0u8; n as usize];
            f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
            let header: serde_json::Value =
                serde_json::from_slice(&buf).map_err(|e| corrupt(format!("header: {e}")))?;
            let obj =
                header.as_object().ok_or_else(|| corrupt("header is not an object".into()))?;
            let data_start = 8 + n;
            for (name, v) in obj {
                if name == "__metadata__" {
                    continue;
                }
                let dtype = v["dtype"].as_str().unwrap_or_default().to_string();
                let kind =
                    kind_of(&dtype).ok_or_else(|| corrupt(format!("`{name}`: dtype `{dtype}`")))?;
                let shape: Vec<i64> = v["shape"]
                    .as_array()
                    .ok_or_else(|| corrupt(format!("`{name}`: no shape")))?
                    .iter()
                    .map(|x| x.as_i64().unwrap_or(-1))
                    .collect();
                let off = v["data_offsets"]
                    .as_array()
                    .ok_or_else(|| corrupt(format!("`{name}`: no offsets")))?;
                let (start, end) = (off[0].as_u64().unwrap_or(0), off[1].as_u64().unwrap_or(0));
                let numel: i64 = shape.iter().product();
                let expected = numel as u64 * kind.elt_size_in_bytes() as u64;
                if shape.iter().any(|&d| d < 0)
                    || end < start
                    || end - start != expected
                    || data_start + end > size
                {
                    return Err(corrupt(format!(
                        "`{name}`: offsets do not fit its shape or the file"
                    )));
                }
                if tensors
                    .insert(name.clone(), Entry { file: i, kind, shape, start, end })
                    .is_some()
                {
                    return Err(corrupt(format!("`{name}` appears in two files")));
                }
            }
            files.push((path, data_start));
        }
        let num_layers = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["num_hidden_layers"].as_i64());
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
        let mut f = File::open(path).map_err(|err| Error::io(path, err))?;
        f.seek(SeekFrom::Start(data_start + e.start)).map_err(|err| Error::io(path, err))?;
        let mut buf = vec![0u8; (e.end - e.start) as usize];
        f.read_exact(&mut buf).map_err(|err| Error::io(path, err))?;
        Ok(Tensor::f_from_data_size(&buf, &e.shape, e.kind)?)
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

/// Runs a [`MergeConfig`] over model directories and writes `out/model.safetensors` (atomically:
/// a temporary file renamed at the end), plus the base's (or first model's) `config.json` and
/// other non-weight files. Tensors are merged one at a time; layer tensors get
/// `t = layer / (layers − 1)` for gradients (`num_hidden_layers` from the base's config, or
/// the largest block index + 1), other tensors `t = 0`. Integer tensors are copied from the
/// base. Errors name the tensor and model when a tensor is missing or shaped differently.
pub fn merge_directories(cfg: &MergeConfig, out: impl AsRef<Path>) -> Result<MergeStats> {
    cfg.validate()?;
    if let Some(seed) = cfg.random_seed {
        tch::manual_seed(seed);
    }
    let started = Instant::now();
    let out = out.as_ref();
    let base = cfg.base_model.as_ref().map(ModelFiles::open).transpose()?;
    let models: Vec<ModelFiles> =
        cfg.models.iter().map(|m| ModelFiles::open(&m.model)).collect::<Result<_>>()?;
    let reference = base.as_ref().unwrap_or(&models[0]);
    let names = reference.names();
    let out_kind = cfg.dtype.as_deref().map(kind_from_name).transpose()?;
    let num_layers = reference.num_layers.unwrap_or_else(|| {
        names.iter().filter_map(|n| block_index(n, &[])).max().map_or(1, |m| m + 1)
    });
    // every input has every tensor, with the same shape
    for m in &models {
        for n in &names {
            let (shape, _) = reference.info(n).expect("listed");
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
    }
    // the header, from shapes and output kinds
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    let mut plan = Vec::with_capacity(names.len());
    for n in &names {
        let (shape, kind) = reference.info(n).expect("listed");
        let float = crate::lora::is_float(kind);
        let k = if float { out_kind.unwrap_or(kind) } else { kind };
        let bytes = shape.iter().product::<i64>() as u64 * k.elt_size_in_bytes() as u64;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dtype_of(k)?, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        plan.push((n.clone(), k, float, bytes));
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let final_path = out.join("model.safetensors");
    let tmp = out.join(format!(".model.safetensors.{}.tmp", std::process::id()));
    let result = (|| -> Result<MergeStats> {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(text.len() as u64).to_le_bytes()).map_err(|e| Error::io(&tmp, e))?;
        w.write_all(&text).map_err(|e| Error::io(&tmp, e))?;
        let (mut read, mut written) = (0u64, 0u64);
        for (n, k, float, bytes) in &plan {
            let t = if block_index(n, &[]).is_some() && num_layers > 1 {
                block_index(n, &[]).unwrap_or(0) as f64 / (num_layers - 1) as f64
            } else {
                0.0
            };
            let merged = if !float {
                reference.read(n)?
            } else {
                let b = base.as_ref().map(|b| b.read(n)).transpose()?;
                let inputs: Vec<Tensor> =
                    models.iter().map(|m| m.read(n)).collect::<Result<_>>()?;
                read += inputs
                    .iter()
                    .chain(b.iter())
                    .map(|x| (x.numel() * x.kind().elt_size_in_bytes()) as u64)
                    .sum::<u64>();
                let params: Vec<_> =
                    (0..models.len()).map(|i| cfg.model_params(i, n, t)).collect::<Result<_>>()?;
                let pairs: Vec<(&Tensor, _)> = inputs.iter().zip(params).collect();
                tch::no_grad(|| {
                    merge_tensor(cfg.merge_method, b.as_ref(), &pairs, &cfg.global_params(n, t))
                })?
            };
            let merged = merged.f_to_kind(*k)?.f_contiguous()?;
            let mut buf = vec![0u8; *bytes as usize];
            merged.f_copy_data_u8(&mut buf, merged.numel())?;
            w.write_all(&buf).map_err(|e| Error::io(&tmp, e))?;
            written += bytes;
        }
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        w.get_ref().sync_all().map_err(|e| Error::io(&tmp, e))?;
        Ok(MergeStats {
            tensors: plan.len(),
            bytes_read: read,
            bytes_written: written,
            seconds: 0.0,
        })
    })();
    let mut stats = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    // the other files of the reference model (config, tokenizer), not its weights
    for entry in std::fs::read_dir(&reference.dir).map_err(|e| Error::io(&reference.dir, e))? {
        let p = entry.map_err(|e| Error::io(&reference.dir, e))?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        if p.is_file()
            && !name.ends_with(".safetensors")
            && !name.ends_with(".safetensors.index.json")
        {
            std::fs::copy(&p, out.join(name)).map_err(|e| Error::io(&p, e))?;
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}
