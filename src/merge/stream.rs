//! Reading model directories tensor by tensor for the streamed merge: safetensors headers
//! checked against their files, and each tensor, or a byte range of it, read on its own
//! (header offsets, one seek and read — no mmap, so the page cache, not the process, holds
//! what the OS keeps, and a file truncated meanwhile is an I/O error, not a `SIGBUS`), into
//! reused aligned buffers. Peak memory grows with the largest tensor a method needs whole
//! times the number of inputs (a chunk for the element-wise methods), not with the model.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::plan::split_layer;
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

pub(crate) fn dtype_of(kind: Kind) -> Result<&'static str> {
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
    /// disk + 1 (layers: see [`MergeConfig`](super::MergeConfig)'s slices).
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

    /// Reads bytes `range` of one tensor's data (all of it: `0..byte_len`) into `buf` (grown as
    /// needed, never shrunk), through `handles` (this model's open files, by index, opened on
    /// first use). A range past the tensor's end is refused.
    pub(crate) fn read_raw(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
        handles: &mut HashMap<usize, File>,
        buf: &mut Buf,
    ) -> Result<()> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into(), file: self.dir.clone() })?;
        let (path, data_start) = &self.files[e.file];
        if range.start > range.end || range.end > e.end - e.start {
            return Err(Error::io(
                path,
                std::io::Error::other(format!("bytes {range:?} of `{name}` are outside it")),
            ));
        }
        let f = match handles.entry(e.file) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(io::open_regular(path)?.0),
        };
        f.seek(SeekFrom::Start(data_start + e.start + range.start))
            .map_err(|err| Error::io(path, err))?;
        buf.set_len((range.end - range.start) as usize);
        f.read_exact(buf.bytes_mut()).map_err(|err| Error::io(path, err))?;
        Ok(())
    }

    /// The path of the file holding `name`.
    pub(crate) fn file_of(&self, name: &str) -> PathBuf {
        self.tensors.get(name).map_or_else(|| self.dir.clone(), |e| self.files[e.file].0.clone())
    }
}

/// Whether every value of a tensor of `kind` in `bytes` is finite (integers always are), by
/// the exponent bits: a scan with no allocation.
pub(crate) fn finite_bytes(kind: Kind, bytes: &[u8]) -> bool {
    fn all<const N: usize>(bytes: &[u8], mask: u64) -> bool {
        bytes.chunks_exact(N).fold(true, |ok, c| {
            let mut w = [0u8; 8];
            w[..N].copy_from_slice(c);
            ok & (u64::from_le_bytes(w) & mask != mask)
        })
    }
    match kind {
        Kind::Float => all::<4>(bytes, 0x7f80_0000),
        Kind::Half => all::<2>(bytes, 0x7c00),
        Kind::BFloat16 => all::<2>(bytes, 0x7f80),
        Kind::Double => all::<8>(bytes, 0x7ff0_0000_0000_0000),
        _ => true,
    }
}

/// Asks Linux to map `[ptr, ptr + len)` writable now, in one call (`MADV_POPULATE_WRITE`,
/// Linux 5.14; a hint: errors ignored). Transparent huge pages were tried instead: the
/// compaction they trigger made the merge slower.
fn populate(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside an allocation this buffer owns; populating changes
            // no content
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// A byte buffer aligned for any element type (8 bytes), reused across tensors.
#[derive(Debug, Default)]
pub(crate) struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    /// Makes the buffer `len` bytes long (growing its storage when needed).
    pub(crate) fn set_len(&mut self, len: usize) {
        self.reserve(len, len);
        self.len = len;
    }

    /// Makes room for `len` bytes, allocating `max(len, hint)` when growing: zeroed lazily
    /// (calloc: the kernel's zero pages until written), then populated in one call where the
    /// kernel can (no fault per page when the read fills it).
    pub(crate) fn reserve(&mut self, len: usize, hint: usize) {
        let cap = len.max(hint).div_ceil(8);
        if self.words.len() < cap {
            self.words = Vec::new(); // the old storage goes before the new is touched
            let mut v: Vec<u64> = vec![0; cap];
            populate(v.as_mut_ptr().cast(), cap * 8);
            self.words = v;
        }
    }

    /// The bytes the buffer holds without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.words.len() * 8
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    /// The bytes, mutably.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and the borrow is unique
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}
