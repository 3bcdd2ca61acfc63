//! Reading and writing safetensors files: atomic writes with metadata, strict typed errors.
//!
//! tch's own `Tensor::write_safetensors` writes no `__metadata__` (PEFT writes
//! `{"format": "pt"}`) and is not atomic; its `VarStore::read_safetensors` copies into
//! variables with grad mode on. These functions fix the three.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// PEFT's safetensors metadata: `{"format": "pt"}`.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

fn kind_to_dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

fn dtype_to_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// A host copy of one tensor, ready to serialise.
struct HostView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostView {
    fn new(name: &str, t: &Tensor) -> Result<Self> {
        let kind = t.kind();
        let dtype = kind_to_dtype(kind).ok_or_else(|| Error::DtypeMismatch {
            name: name.to_string(),
            expected: "a dtype safetensors can store (bool, integer, f16, bf16, f32, f64)".into(),
            actual: kind,
        })?;
        let host = tch::no_grad(|| t.f_to_device(Device::Cpu).and_then(|h| h.f_contiguous()))?;
        let numel = host.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        host.f_copy_data_u8(&mut bytes, numel)?;
        Ok(HostView { dtype, shape: host.size().iter().map(|&d| d as usize).collect(), bytes })
    }
}

impl View for &HostView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes named tensors to a safetensors file atomically, with optional metadata.
///
/// Tensors may live on any device and need not be contiguous; they are copied to the host.
/// Names must be unique.
///
/// ```no_run
/// use tch::{Kind, Tensor};
/// let t = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
/// tch_peft::io::write_safetensors(
///     "adapter.safetensors",
///     &[("w".to_string(), t)],
///     Some(tch_peft::io::pt_metadata()),
/// )?;
/// # Ok::<(), tch_peft::Error>(())
/// ```
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut views = BTreeMap::new();
    for (name, t) in tensors {
        if views.insert(name.clone(), HostView::new(name, t)?).is_some() {
            return Err(Error::DuplicateParameter(name.clone()));
        }
    }
    let bytes =
        safetensors::tensor::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), metadata)
            .map_err(|e| Error::CorruptFile { file: path.to_path_buf(), reason: e.to_string() })?;
    super::atomic::write_atomic(path, &bytes)
}

/// The contents of a safetensors file: tensors (CPU, in file order sorted by name) and metadata.
#[derive(Debug)]
pub struct SafetensorsFile {
    /// The tensors, sorted by name.
    pub tensors: Vec<(String, Tensor)>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<HashMap<String, String>>,
}

/// Reads every tensor of a safetensors file onto the CPU.
///
/// Only a regular file is read (a FIFO or device is an error, not a hang); a truncated or
/// malformed file gives [`Error::CorruptFile`] naming it; a missing file [`Error::Io`].
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
    let path = path.as_ref();
    let bytes = super::files::read_capped(path, u64::MAX)?;
    let file = SafetensorsFile::from_bytes(&bytes, path)?;
    super::check_loaded_finite(file.tensors.iter().map(|(n, t)| (n.as_str(), t)), path)?;
    Ok(file)
}

impl SafetensorsFile {
    /// Parses the bytes of a safetensors file (`file` names it in errors): the header must
    /// be at most [`MAX_HEADER_BYTES`](super::MAX_HEADER_BYTES), and its offsets must tile the
    /// data exactly (the safetensors crate's checks).
    pub fn from_bytes(bytes: &[u8], file: impl AsRef<Path>) -> Result<Self> {
        let path = file.as_ref();
        let corrupt = |reason: String| Error::CorruptFile { file: path.to_path_buf(), reason };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut tensors = Vec::new();
        for (name, view) in st.tensors() {
            let kind = dtype_to_kind(view.dtype()).ok_or_else(|| {
                corrupt(format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
            })?;
            let shape: Vec<i64> = view
                .shape()
                .iter()
                .map(|&d| i64::try_from(d))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| corrupt(format!("tensor `{name}` has a dimension over 2^63")))?;
            let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            tensors.push((name, t));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(SafetensorsFile { tensors, metadata: meta.metadata().clone() })
    }
}
