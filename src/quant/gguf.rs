//! GGUF files (llama.cpp's format, versions 2 and 3): the header, metadata and tensor table read
//! with every count, length and offset checked against the file, and tensors dequantized to f32
//! exactly as the `gguf` Python package (`gguf.quants.dequantize`) dequantizes them.
//!
//! ```text
//! "GGUF" u32 version, u64 tensor count, u64 metadata count
//! metadata: (string key, u32 type, value)*     string = u64 length + UTF-8 bytes
//! tensors:  (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)*
//! data: from the next multiple of `general.alignment` (32), each tensor at its offset
//! ```
//!
//! `ne[0]` is the innermost (contiguous) dimension, so a tensor's shape is `ne` reversed. Block
//! formats (value `x` of each element, in f32; `d`, `m` are f16 scales):
//! - `Q8_0` (32): `x = q·d`, `q` i8; `Q4_0` (32): `x = (q − 8)·d`; `Q4_1`: `x = q·d + m`, with
//!   `q` the low nibbles of 16 bytes, then their high nibbles;
//! - `Q5_0` / `Q5_1` (32): the same with a fifth bit from a u32 (bit `i` for element `i`),
//!   `x = (q − 16)·d` / `x = q·d + m`;
//! - `Q4_K` (256): eight sub-blocks of 32 with 6-bit scales and mins,
//!   `x = (d·sc_j)·q − dmin·m_j`; `Q6_K` (256): 6-bit `q − 32` from 4 + 2 bits, sixteen i8
//!   scales, `x = (d·sc_j)·q`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use tch::Tensor;

use crate::io::open_regular;
use crate::{Error, Result};

/// The most bytes of header (metadata and tensor table) read: 1 GiB.
const MAX_HEADER_BYTES: u64 = 1 << 30;
/// The deepest nesting of metadata arrays accepted.
const MAX_ARRAY_DEPTH: usize = 4;
/// The most metadata values (array elements included) a file may hold: 2²⁴ (a 256k-token
/// vocabulary with its merges and scores is about 0.8 M).
const MAX_VALUES: u64 = 1 << 24;
/// The most dimensions a tensor may have (ggml's limit).
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f32
    F32(f32),
    /// f64
    F64(f64),
    /// bool
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array (of one element type).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, where it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, where it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, where it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit, blocks of 32, one f16 scale.
    Q8_0,
    /// 4-bit, blocks of 32, one f16 scale.
    Q4_0,
    /// 4-bit, blocks of 32, f16 scale and minimum.
    Q4_1,
    /// 5-bit, blocks of 32, one f16 scale.
    Q5_0,
    /// 5-bit, blocks of 32, f16 scale and minimum.
    Q5_1,
    /// 4-bit K-quant, super-blocks of 256.
    Q4K,
    /// 6-bit K-quant, super-blocks of 256.
    Q6K,
}

impl GgmlType {
    /// The type with ggml's number `id`, or an error naming it.
    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    13 => "Q5_K",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => "unknown",
                };
                return Err(format!("ggml type {other} ({name})"));
            }
        })
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// The tensor's name (llama.cpp's: `token_embd.weight`, `blk.0.attn_q.weight`, …).
    pub name: String,
    /// `ne` as stored: innermost dimension first.
    pub dims: Vec<u64>,
    /// Its type.
    pub ggml_type: GgmlType,
    /// Its data's offset from the start of the data section.
    pub offset: u64,
    /// Its data's length in bytes.
    pub bytes: u64,
}

impl GgufTensorInfo {
    /// The shape in libtorch's order (`ne` reversed).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// The number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file's header and tensor table; tensors are read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    data_start: u64,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptFile { file: path.to_path_buf(), reason: reason.into() }
}

/// A reader of the header that knows how many bytes the file has left.
struct Header<'a> {
    r: BufReader<&'a File>,
    pos: u64,
    len: u64,
    path: &'a Path,
    /// Metadata values read so far.
    values: u64,
}

/// The fewest bytes one value of metadata type `ty` takes (0 for an unknown type).
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 0,
    }
}

impl Header<'_> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.len.min(MAX_HEADER_BYTES));
        if end.is_none() {
            return Err(corrupt(
                self.path,
                format!("{what} of {n} bytes at offset {} runs past the header's end", self.pos),
            ));
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(n as usize).map_err(|_| corrupt(self.path, "header too large"))?;
        buf.resize(n as usize, 0);
        self.r.read_exact(&mut buf).map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| corrupt(self.path, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<GgufValue> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(corrupt(self.path, format!("more than {MAX_VALUES} metadata values")));
        }
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(corrupt(self.path, format!("`{key}`: bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(corrupt(
                        self.path,
                        format!("`{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                // a count beyond what the bytes left can hold is a lie
                let left = self.len.min(MAX_HEADER_BYTES).saturating_sub(self.pos);
                let min = min_value_bytes(elem);
                if min == 0 {
                    return Err(corrupt(self.path, format!("`{key}`: array of value type {elem}")));
                }
                if count > left / min || count > MAX_VALUES - self.values.min(MAX_VALUES) {
                    return Err(corrupt(
                        self.path,
                        format!("`{key}`: an array of {count} elements in fewer bytes"),
                    ));
                }
                let mut items = Vec::new();
                items
                    .try_reserve_exact(count as usize)
                    .map_err(|_| corrupt(self.path, format!("`{key}`: array too large")))?;
                for _ in 0..count {
                    items.push(self.value(elem, depth + 1, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(corrupt(self.path, format!("`{key}`: value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Reads the header and tensor table of the GGUF file at `path` (a regular file; version 2
    /// or 3), checking every length against the file: strings and arrays, the tensor count,
    /// dimensions (at most 4, their product and byte size in range), each tensor's data inside
    /// the file, the alignment a power of two.
    ///
    /// # Errors
    /// `CorruptFile` naming what is wrong; `Unsupported` for a tensor of a type this reader
    /// does not dequantize (naming the tensor and the type).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (file, len) = open_regular(path)?;
        let mut h = Header { r: BufReader::new(&file), pos: 0, len, path, values: 0 };
        if &h.array::<4>("magic")? != b"GGUF" {
            return Err(corrupt(path, "not a GGUF file (no `GGUF` magic)"));
        }
        let version = h.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(corrupt(path, format!("GGUF version {version} (2 and 3 are read)")));
        }
        let n_tensors = h.u64("tensor count")?;
        let n_kv = h.u64("metadata count")?;
        let left = len.saturating_sub(h.pos);
        if n_tensors > left / 24 || n_kv > left / 12 {
            return Err(corrupt(
                path,
                format!("{n_tensors} tensors and {n_kv} metadata entries in {left} bytes"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = h.string("metadata key")?;
            let ty = h.u32(&key)?;
            let value = h.value(ty, 0, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(corrupt(path, format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| corrupt(path, format!("general.alignment {v:?}")))?,
        };
        let mut tensors = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..n_tensors {
            let name = h.string("tensor name")?;
            let n_dims = h.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(corrupt(path, format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                let d = h.u64(&name)?;
                if d > i64::MAX as u64 {
                    return Err(corrupt(path, format!("tensor `{name}` has a dimension of {d}")));
                }
                dims.push(d);
            }
            let id = h.u32(&name)?;
            let ggml_type = GgmlType::from_id(id).map_err(|t| Error::Unsupported {
                field: "ggml tensor type".into(),
                reason: format!("tensor `{name}` is {t}; read are F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K"),
            })?;
            let offset = h.u64(&name)?;
            let bytes = tensor_bytes(&dims, ggml_type)
                .map_err(|reason| corrupt(path, format!("tensor `{name}`: {reason}")))?;
            if !offset.is_multiple_of(alignment) {
                return Err(corrupt(path, format!("tensor `{name}` at unaligned offset {offset}")));
            }
            if !names.insert(name.clone()) {
                return Err(corrupt(path, format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset, bytes });
        }
        let data_start = h.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.bytes));
            if end.is_none_or(|e| e > len) {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{}`'s {} bytes at offset {} run past the file's end",
                        t.name, t.bytes, t.offset
                    ),
                ));
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, data_start })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's GGUF version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The entry of the tensor named `name`.
    pub fn info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor `name` dequantized to f32 in libtorch's shape order (on the CPU).
    ///
    /// # Errors
    /// `MissingTensor` for a name not in the table; `Io` / `CorruptFile` when the data cannot be
    /// read (the file changed).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .info(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into(), file: self.path.clone() })?;
        let raw = self.raw(info)?;
        let values = dequantize(info.ggml_type, &raw, info.numel())
            .map_err(|reason| corrupt(&self.path, format!("tensor `{name}`: {reason}")))?;
        Ok(Tensor::from_slice(&values).f_reshape(info.shape())?)
    }

    /// The raw bytes of a tensor.
    fn raw(&self, info: &GgufTensorInfo) -> Result<Vec<u8>> {
        let (mut file, len) = open_regular(&self.path)?;
        let start = self.data_start + info.offset;
        if start + info.bytes > len {
            return Err(corrupt(&self.path, "the file shrank after its header was read"));
        }
        file.seek(SeekFrom::Start(start)).map_err(|e| Error::io(&self.path, e))?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(info.bytes as usize).map_err(|_| {
            corrupt(&self.path, format!("tensor `{}` does not fit in memory", info.name))
        })?;
        buf.resize(info.bytes as usize, 0);
        file.read_exact(&mut buf).map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }
}

/// The byte size of a tensor of `dims` and `ty`, or why it is impossible.
fn tensor_bytes(dims: &[u64], ty: GgmlType) -> std::result::Result<u64, String> {
    let (per_block, block_bytes) = ty.block();
    if !dims[0].is_multiple_of(per_block) {
        return Err(format!(
            "rows of {} elements are not whole {per_block}-element blocks",
            dims[0]
        ));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    (n / per_block).checked_mul(block_bytes).ok_or_else(|| format!("dimensions {dims:?} overflow"))
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `raw` (whole blocks of `ty`) as `n` f32 values.
fn dequantize(ty: GgmlType, raw: &[u8], n: u64) -> std::result::Result<Vec<f32>, String> {
    let (per_block, block_bytes) = ty.block();
    let n = usize::try_from(n).map_err(|_| "too many elements".to_string())?;
    if raw.len() as u64 != (n as u64 / per_block) * block_bytes {
        return Err("data length does not match the shape".into());
    }
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| "does not fit in memory".to_string())?;
    let blocks = raw.chunks_exact(block_bytes as usize);
    match ty {
        GgmlType::F32 => {
            out.extend(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        }
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::Bf16 => {
            out.extend(raw.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()))
        }
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let with_min = ty == GgmlType::Q4_1;
            for b in blocks {
                let d = f16_at(b, 0);
                let (m, qs) = if with_min { (f16_at(b, 2), &b[4..20]) } else { (0.0, &b[2..18]) };
                for half in [0u8, 4] {
                    for &q in qs {
                        let q = (q >> half) & 0x0F;
                        out.push(if with_min {
                            d * f32::from(q) + m
                        } else {
                            d * f32::from(q as i8 - 8)
                        });
                    }
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let with_min = ty == GgmlType::Q5_1;
            for b in blocks {
                let d = f16_at(b, 0);
                let (m, rest) = if with_min { (f16_at(b, 2), &b[4..]) } else { (0.0, &b[2..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for i in 0..32usize {
                    let low = if i < 16 { qs[i] & 0x0F } else { qs[i - 16] >> 4 };
                    let q = low | ((((qh >> i) & 1) as u8) << 4);
                    out.push(if with_min {
                        d * f32::from(q) + m
                    } else {
                        d * f32::from(q as i8 - 16)
                    });
                }
            }
        }
        GgmlType::Q4K => {
            for b in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let s = &b[4..16];
                let qs = &b[16..144];
                let mut sc = [0u8; 8];
                let mut mn = [0u8; 8];
                for j in 0..4 {
                    sc[j] = s[j] & 0x3F;
                    mn[j] = s[j + 4] & 0x3F;
                    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
                    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
                }
                for j in 0..8 {
                    let (ds, dm) = (d * f32::from(sc[j]), dmin * f32::from(mn[j]));
                    let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    let shift = if j % 2 == 0 { 0 } else { 4 };
                    out.extend(chunk.iter().map(|&q| ds * f32::from((q >> shift) & 0x0F) - dm));
                }
            }
        }
        GgmlType::Q6K => {
            for b in blocks {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for g in 0..8usize {
                    let (h, k) = (g / 4, g % 4);
                    for l in 0..32usize {
                        let e = g * 32 + l;
                        let low = (ql[h * 64 + (k % 2) * 32 + l] >> (4 * (k / 2))) & 0x0F;
                        let high = (qh[h * 32 + l] >> (2 * k)) & 0x03;
                        let q = (low | (high << 4)) as i8 - 32;
                        let ds = d * f32::from(scales[e / 16] as i8);
                        out.push(ds * f32::from(q));
                    }
                }
            }
        }
    }
    Ok(out)
}
