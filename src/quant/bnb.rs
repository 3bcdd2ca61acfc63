//! bitsandbytes' 4-bit weight format (see the [module documentation](super)).
//!
//! In a checkpoint, a quantized weight `<p>` is the tensors
//! - `<p>`: uint8 `[(n + 1) / 2, 1]`, the packed codes;
//! - `<p>.absmax`: f32 `[blocks]`, or uint8 with double quantization;
//! - `<p>.quant_map`: f32 `[16]`, the code table;
//! - with double quantization, `<p>.nested_absmax` (f32 `[⌈blocks / 256⌉]`) and
//!   `<p>.nested_quant_map` (f32 `[256]`);
//! - `<p>.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8, the bytes of a JSON object with
//!   `quant_type`, `blocksize`, `dtype`, `shape` and, nested, `nested_blocksize`, `nested_dtype`,
//!   `nested_offset`.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::dynamic_map::DYNAMIC_MAP;
use super::QuantType;
use crate::{Error, Result};

/// The block sizes bitsandbytes quantizes with.
const BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// The block size of double quantization's nested absmax (bitsandbytes' fixed 256).
const NESTED_BLOCKSIZE: i64 = 256;
/// The most elements a quantized weight may claim (2⁴⁰, ≈ 550 GB at 4 bits).
const MAX_ELEMENTS: i64 = 1 << 40;
/// The longest `quant_state` JSON accepted.
const MAX_STATE_BYTES: i64 = 1 << 16;

/// A 4-bit weight in bitsandbytes' format (NF4 or FP4, with or without double quantization).
#[derive(Debug)]
pub struct Bnb4bitWeight {
    quant_type: QuantType,
    blocksize: i64,
    shape: Vec<i64>,
    dtype: Kind,
    /// uint8 `[(n + 1) / 2, 1]`
    codes: Tensor,
    /// f32 `[16]`
    quant_map: Tensor,
    absmax: Absmax,
}

/// Where the per-block absmax lives.
#[derive(Debug)]
enum Absmax {
    /// f32 `[blocks]`.
    Plain(Tensor),
    /// Quantized once more (double quantization).
    Nested(NestedAbsmax),
}

/// Double quantization's 8-bit absmax: `absmax_j = map[codes_j] · absmax[j / blocksize] +
/// offset`, in f32.
#[derive(Debug)]
pub struct NestedAbsmax {
    /// uint8 `[blocks]`.
    pub codes: Tensor,
    /// f32 `[⌈blocks / blocksize⌉]`.
    pub absmax: Tensor,
    /// f32 `[256]`, bitsandbytes' dynamic map.
    pub map: Tensor,
    /// 256 in every file bitsandbytes writes.
    pub blocksize: i64,
    /// The mean of the f32 absmax, subtracted before its quantization.
    pub offset: f32,
}

/// The `quant_state` JSON.
#[derive(Debug, Serialize, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: i64,
    dtype: String,
    shape: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f64>,
}

fn bad(name: &str, reason: impl Into<String>) -> Error {
    Error::Quantization { name: name.into(), reason: reason.into() }
}

fn kind_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Float => Some("float32"),
        Kind::Half => Some("float16"),
        Kind::BFloat16 => Some("bfloat16"),
        _ => None,
    }
}

fn kind_of(name: &str) -> Option<Kind> {
    match name {
        "float32" => Some(Kind::Float),
        "float16" => Some(Kind::Half),
        "bfloat16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// `⌈a / b⌉` for `a ≥ 0`, `b > 0`.
fn blocks_of(a: i64, b: i64) -> i64 {
    a / b + i64::from(a % b != 0)
}

impl Bnb4bitWeight {
    /// Whether the checkpoint tensors behind `lookup` hold `name` as a bitsandbytes 4-bit weight
    /// (its `quant_state` entry is present).
    pub fn is_quantized(name: &str, lookup: &dyn Fn(&str) -> Option<Tensor>) -> bool {
        [QuantType::Nf4, QuantType::Fp4].iter().any(|q| lookup(&q.state_key(name)).is_some())
    }

    /// The weight `name` from a checkpoint's tensors (`lookup` returns the tensor stored under a
    /// key), every part checked against the others: dtypes, element counts, block counts, the
    /// JSON's fields and sizes, finite tables and absmax. The tensors are used as they are
    /// (same device); nothing is allocated by a size the file states before it is checked.
    ///
    /// # Errors
    /// [`Error::Quantization`] naming `name` and what is wrong.
    pub fn from_state(name: &str, lookup: &dyn Fn(&str) -> Option<Tensor>) -> Result<Self> {
        let (quant_type, state_bytes) = [QuantType::Nf4, QuantType::Fp4]
            .into_iter()
            .find_map(|q| lookup(&q.state_key(name)).map(|t| (q, t)))
            .ok_or_else(|| bad(name, "no `quant_state.bitsandbytes__nf4` or `__fp4` entry"))?;
        let part = |suffix: &str| {
            let key = if suffix.is_empty() { name.to_string() } else { format!("{name}.{suffix}") };
            lookup(&key).ok_or_else(|| bad(name, format!("`{key}` is missing")))
        };
        let json = read_state_json(name, &state_bytes)?;
        if json.quant_type != quant_type.name() {
            return Err(bad(
                name,
                format!(
                    "`quant_type` is {:?} under a `{}` key",
                    json.quant_type,
                    quant_type.name()
                ),
            ));
        }
        let blocksize = json.blocksize;
        if !BLOCKSIZES.contains(&blocksize) {
            return Err(bad(name, format!("blocksize {blocksize} is not one of {BLOCKSIZES:?}")));
        }
        let dtype = kind_of(&json.dtype)
            .ok_or_else(|| bad(name, format!("dtype {:?} is not a float dtype", json.dtype)))?;
        let n = checked_numel(name, &json.shape)?;
        let blocks = blocks_of(n, blocksize);
        let codes = part("")?;
        expect_tensor(name, "packed codes", &codes, Kind::Uint8, (n + 1) / 2)?;
        let quant_map = part("quant_map")?;
        expect_tensor(name, "quant_map", &quant_map, Kind::Float, 16)?;
        expect_finite(name, "quant_map", &quant_map)?;
        let absmax_t = part("absmax")?;
        let absmax = if json.nested_offset.is_some() || absmax_t.kind() == Kind::Uint8 {
            let nbs = json
                .nested_blocksize
                .ok_or_else(|| bad(name, "double quantization without `nested_blocksize`"))?;
            if !BLOCKSIZES.contains(&nbs) {
                return Err(bad(
                    name,
                    format!("nested_blocksize {nbs} is not one of {BLOCKSIZES:?}"),
                ));
            }
            if json.nested_dtype.as_deref().is_some_and(|d| d != "float32") {
                return Err(bad(
                    name,
                    format!("nested_dtype {:?} is not float32", json.nested_dtype),
                ));
            }
            let offset = json
                .nested_offset
                .ok_or_else(|| bad(name, "double quantization without `nested_offset`"))?;
            let offset32 = offset as f32;
            if !offset32.is_finite() {
                return Err(bad(name, format!("nested_offset {offset} is not a finite f32")));
            }
            expect_tensor(name, "absmax", &absmax_t, Kind::Uint8, blocks)?;
            let nested = part("nested_absmax")?;
            expect_tensor(name, "nested_absmax", &nested, Kind::Float, blocks_of(blocks, nbs))?;
            expect_finite(name, "nested_absmax", &nested)?;
            let map = part("nested_quant_map")?;
            expect_tensor(name, "nested_quant_map", &map, Kind::Float, 256)?;
            expect_finite(name, "nested_quant_map", &map)?;
            Absmax::Nested(NestedAbsmax {
                codes: absmax_t.reshape([-1]),
                absmax: nested.reshape([-1]),
                map: map.reshape([-1]),
                blocksize: nbs,
                offset: offset32,
            })
        } else {
            expect_tensor(name, "absmax", &absmax_t, Kind::Float, blocks)?;
            expect_finite(name, "absmax", &absmax_t)?;
            Absmax::Plain(absmax_t.reshape([-1]))
        };
        let device = codes.device();
        let mut parts = vec![&quant_map, absmax.first()];
        if let Absmax::Nested(q) = &absmax {
            parts.push(&q.absmax);
            parts.push(&q.map);
        }
        if let Some(other) = parts.iter().find(|t| t.device() != device) {
            return Err(Error::DeviceMismatch {
                name: format!("{name} (its quantization state)"),
                expected: device,
                actual: other.device(),
            });
        }
        Ok(Bnb4bitWeight {
            quant_type,
            blocksize,
            shape: json.shape,
            dtype,
            codes,
            quant_map: quant_map.reshape([-1]),
            absmax,
        })
    }

    /// `weight` quantized as bitsandbytes' `quantize_4bit(weight, blocksize, quant_type,
    /// compress_statistics=double_quant)` quantizes it on the CPU: the same codes, absmax and
    /// (with double quantization) nested absmax and offset, bit for bit. `weight` is f32, f16
    /// or bf16, finite; its dtype is the one [`dequantize`](Self::dequantize) returns.
    ///
    /// ```
    /// # fn main() -> tch_peft::Result<()> {
    /// use tch::{Device, Kind, Tensor};
    /// use tch_peft::quant::{Bnb4bitWeight, QuantType};
    /// tch::manual_seed(0);
    /// let w = Tensor::randn([8, 64], (Kind::Float, Device::Cpu));
    /// let q = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, false)?;
    /// let back = q.dequantize()?;
    /// // NF4's widest gap (0.72 to 1) is 0.28 of a block's absmax: off by half of it at most
    /// let err = (&back - &w).abs().max().double_value(&[]);
    /// assert!(err <= 0.14 * w.abs().max().double_value(&[]));
    /// // double quantization stores the absmax in 8 bits too (4.13 bits a weight on large
    /// // weights, once its 1 KiB table is amortised)
    /// let dq = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true)?;
    /// assert_eq!(dq.nested().map(|n| n.blocksize), Some(256));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Quantization`] for a block size bitsandbytes does not use, a dtype other than
    /// those three, or a weight holding NaN or infinite values.
    pub fn quantize(
        weight: &Tensor,
        quant_type: QuantType,
        blocksize: i64,
        double_quant: bool,
    ) -> Result<Self> {
        let name = "weight to quantize";
        if !BLOCKSIZES.contains(&blocksize) {
            return Err(bad(name, format!("blocksize {blocksize} is not one of {BLOCKSIZES:?}")));
        }
        let dtype = weight.kind();
        if kind_name(dtype).is_none() {
            return Err(bad(name, format!("dtype {dtype:?} is not f32, f16 or bf16")));
        }
        let n = weight.numel() as i64;
        if n == 0 {
            return Err(bad(name, "has no elements"));
        }
        if n > MAX_ELEMENTS {
            return Err(bad(name, format!("{n} elements exceed the limit of {MAX_ELEMENTS}")));
        }
        let a = weight.f_reshape([-1])?.f_to_kind(Kind::Float)?;
        if !bool::try_from(a.f_isfinite()?.f_all()?)? {
            return Err(bad(name, "holds NaN or infinite values"));
        }
        let device = a.device();
        let (scaled, absmax) = scale_blocks(&a, blocksize)?;
        let scaled = if n % 2 == 1 {
            Tensor::f_cat(&[scaled, Tensor::f_zeros([1], (Kind::Float, device))?], 0)?
        } else {
            scaled
        };
        let q = nearest_4bit(&scaled, quant_type)?;
        let pairs = q.f_view([-1, 2])?;
        let codes = pairs
            .f_select(1, 0)?
            .f_mul_scalar(16)?
            .f_add(&pairs.f_select(1, 1)?)?
            .f_to_kind(Kind::Uint8)?
            .f_unsqueeze(1)?;
        let absmax = if double_quant {
            Absmax::Nested(quantize_absmax(&absmax)?)
        } else {
            Absmax::Plain(absmax)
        };
        let quant_map = Tensor::from_slice(&quant_type.code()).f_to_device(device)?;
        Ok(Bnb4bitWeight {
            quant_type,
            blocksize,
            shape: weight.size(),
            dtype,
            codes,
            quant_map,
            absmax,
        })
    }

    /// The weight in its own dtype ([`dtype`](Self::dtype)), as bitsandbytes'
    /// `dequantize_4bit` gives it: `quant_map[code] · absmax` in f32, then cast.
    pub fn dequantize(&self) -> Result<Tensor> {
        self.dequantize_to(self.dtype)
    }

    /// The weight dequantized to `kind` (the f32 product cast to it). On CUDA to bf16, one
    /// run-time compiled kernel (same bits as the libtorch ops used elsewhere).
    pub fn dequantize_to(&self, kind: Kind) -> Result<Tensor> {
        #[cfg(tch_peft_csrc)]
        if kind == Kind::BFloat16 && self.device().is_cuda() && self.shape.len() == 2 {
            let (parts, dims, offset) = self.node_parts();
            let refs: Vec<&Tensor> = parts.iter().collect();
            if let Some(w) = crate::sys::dequantize_4bit(&refs, dims, offset)? {
                return Ok(w);
            }
        }
        let n = self.numel();
        let b = self.codes.f_reshape([-1])?.f_to_kind(Kind::Int)?;
        let hi = b.f_floor_divide_scalar(16)?;
        let lo = b.f_remainder(16)?;
        let idx = Tensor::f_stack(&[hi, lo], 1)?.f_reshape([-1])?.f_narrow(0, 0, n)?;
        let vals = self.quant_map.f_index_select(0, &idx)?;
        let scale = self.absmax()?.f_repeat_interleave_self_int(self.blocksize, 0, None)?;
        let w = vals.f_mul(&scale.f_narrow(0, 0, n)?)?;
        Ok(w.f_to_kind(kind)?.f_reshape(self.shape.as_slice())?)
    }

    /// The per-block absmax in f32 `[blocks]` (with double quantization: dequantized, offset
    /// added, as bitsandbytes computes it).
    pub fn absmax(&self) -> Result<Tensor> {
        Ok(match &self.absmax {
            Absmax::Plain(a) => a.shallow_clone(),
            Absmax::Nested(q) => {
                let blocks = q.codes.numel() as i64;
                let vals = q.map.f_index_select(0, &q.codes.f_to_kind(Kind::Int)?)?;
                let scale = q.absmax.f_repeat_interleave_self_int(q.blocksize, 0, None)?;
                vals.f_mul(&scale.f_narrow(0, 0, blocks)?)?.f_add_scalar(f64::from(q.offset))?
            }
        })
    }

    /// The checkpoint entries of this weight under `name`, in transformers' layout (the
    /// inverse of [`from_state`](Self::from_state)).
    pub fn state(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let mut json = QuantStateJson {
            quant_type: self.quant_type.name().into(),
            blocksize: self.blocksize,
            dtype: kind_name(self.dtype).expect("checked at construction").into(),
            shape: self.shape.clone(),
            nested_blocksize: None,
            nested_dtype: None,
            nested_offset: None,
        };
        let mut out = vec![
            (name.to_string(), self.codes.shallow_clone()),
            (format!("{name}.quant_map"), self.quant_map.shallow_clone()),
        ];
        match &self.absmax {
            Absmax::Plain(a) => out.push((format!("{name}.absmax"), a.shallow_clone())),
            Absmax::Nested(q) => {
                json.nested_blocksize = Some(q.blocksize);
                json.nested_dtype = Some("float32".into());
                json.nested_offset = Some(f64::from(q.offset));
                out.push((format!("{name}.absmax"), q.codes.shallow_clone()));
                out.push((format!("{name}.nested_absmax"), q.absmax.shallow_clone()));
                out.push((format!("{name}.nested_quant_map"), q.map.shallow_clone()));
            }
        }
        let bytes = serde_json::to_vec(&json)?;
        let device = self.codes.device();
        out.push((
            self.quant_type.state_key(name),
            Tensor::from_slice(&bytes).f_to_device(device)?,
        ));
        Ok(out)
    }

    /// This weight with `f` applied to each of its tensors (codes, tables, absmax).
    pub(crate) fn map_parts(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => Absmax::Plain(f(a)?),
            Absmax::Nested(q) => Absmax::Nested(NestedAbsmax {
                codes: f(&q.codes)?,
                absmax: f(&q.absmax)?,
                map: f(&q.map)?,
                blocksize: q.blocksize,
                offset: q.offset,
            }),
        };
        Ok(Bnb4bitWeight {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            shape: self.shape.clone(),
            dtype: self.dtype,
            codes: f(&self.codes)?,
            quant_map: f(&self.quant_map)?,
            absmax,
        })
    }

    /// This weight's tensors on `device`.
    pub fn to_device(&self, device: Device) -> Result<Self> {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => Absmax::Plain(a.f_to_device(device)?),
            Absmax::Nested(q) => Absmax::Nested(NestedAbsmax {
                codes: q.codes.f_to_device(device)?,
                absmax: q.absmax.f_to_device(device)?,
                map: q.map.f_to_device(device)?,
                blocksize: q.blocksize,
                offset: q.offset,
            }),
        };
        Ok(Bnb4bitWeight {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            shape: self.shape.clone(),
            dtype: self.dtype,
            codes: self.codes.f_to_device(device)?,
            quant_map: self.quant_map.f_to_device(device)?,
            absmax,
        })
    }

    /// NF4 or FP4.
    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    /// Elements per absmax block.
    pub fn blocksize(&self) -> i64 {
        self.blocksize
    }

    /// The weight's shape (`[out, in]` for a Linear).
    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    /// The dtype of the weight before quantization, which dequantization gives back.
    pub fn dtype(&self) -> Kind {
        self.dtype
    }

    /// The number of weight elements.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The device the codes are on.
    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// The packed codes, uint8 `[(n + 1) / 2, 1]`.
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// The code table, f32 `[16]`.
    pub fn quant_map(&self) -> &Tensor {
        &self.quant_map
    }

    /// The parts the C++ nodes take: codes, absmax (as stored), quant_map[, nested absmax,
    /// nested map]; out, in, blocksize, nested blocksize; the offset. (2-D weights.)
    pub(crate) fn node_parts(&self) -> (Vec<Tensor>, [i64; 4], f64) {
        let mut q =
            vec![self.codes.shallow_clone(), self.absmax_storage(), self.quant_map.shallow_clone()];
        let (nbs, offset) = match &self.absmax {
            Absmax::Nested(n) => {
                q.push(n.absmax.shallow_clone());
                q.push(n.map.shallow_clone());
                (n.blocksize, f64::from(n.offset))
            }
            Absmax::Plain(_) => (0, 0.0),
        };
        let in_features = self.shape.get(1).copied().unwrap_or(1);
        (q, [self.shape[0], in_features, self.blocksize, nbs], offset)
    }

    /// A second handle on the same tensors (shallow clones), with the nested offset replaced
    /// by `offset` where the weight is double-quantized.
    pub(crate) fn shallow_with_offset(&self, offset: f32) -> Self {
        let mut w = self.map_parts(|t| Ok(t.shallow_clone())).expect("shallow clones cannot fail");
        if let Absmax::Nested(q) = &mut w.absmax {
            q.offset = offset;
        }
        w
    }

    /// A weight of `shape` whose codes and absmax are all zero (it dequantizes to zeros), in
    /// `quant_type`'s layout with `blocksize` and (with `double_quant`) a nested absmax: the
    /// placeholder a model's 4-bit layer holds until its checkpoint is loaded.
    pub(crate) fn zeros(
        shape: &[i64],
        quant_type: QuantType,
        blocksize: i64,
        double_quant: bool,
        dtype: Kind,
        device: Device,
    ) -> Result<Self> {
        let name = "4-bit weight";
        if kind_name(dtype).is_none() {
            return Err(bad(name, format!("dtype {dtype:?} is not f32, f16 or bf16")));
        }
        if !BLOCKSIZES.contains(&blocksize) {
            return Err(bad(name, format!("blocksize {blocksize} is not one of {BLOCKSIZES:?}")));
        }
        let n = checked_numel(name, shape)?;
        let blocks = blocks_of(n, blocksize);
        let absmax = if double_quant {
            Absmax::Nested(NestedAbsmax {
                codes: Tensor::f_zeros([blocks], (Kind::Uint8, device))?,
                absmax: Tensor::f_zeros(
                    [blocks_of(blocks, NESTED_BLOCKSIZE)],
                    (Kind::Float, device),
                )?,
                map: Tensor::from_slice(&DYNAMIC_MAP).f_to_device(device)?,
                blocksize: NESTED_BLOCKSIZE,
                offset: 0.0,
            })
        } else {
            Absmax::Plain(Tensor::f_zeros([blocks], (Kind::Float, device))?)
        };
        Ok(Bnb4bitWeight {
            quant_type,
            blocksize,
            shape: shape.to_vec(),
            dtype,
            codes: Tensor::f_zeros([(n + 1) / 2, 1], (Kind::Uint8, device))?,
            quant_map: Tensor::from_slice(&quant_type.code()).f_to_device(device)?,
            absmax,
        })
    }

    /// Whether `other` has this weight's layout: type, shape, block sizes, double quantization.
    pub fn same_layout(&self, other: &Bnb4bitWeight) -> bool {
        self.quant_type == other.quant_type
            && self.blocksize == other.blocksize
            && self.shape == other.shape
            && self.nested().map(|n| n.blocksize) == other.nested().map(|n| n.blocksize)
    }

    /// Copies `other`'s codes, absmax and tables into this weight's tensors in place (moved to
    /// their device), without autograd; the nested offset is the caller's to keep. The layouts
    /// must match ([`same_layout`](Self::same_layout)).
    pub(crate) fn copy_parts_from(&self, other: &Bnb4bitWeight) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let (mine, _, _) = self.node_parts();
        let (theirs, _, _) = other.node_parts();
        // every source on the device and in shape before the first copy
        let sources = mine
            .iter()
            .zip(&theirs)
            .map(|(dst, src)| Ok(src.f_to_device(dst.device())?.f_view_as(dst)?))
            .collect::<Result<Vec<_>>>()?;
        for (dst, src) in mine.iter().zip(&sources) {
            dst.shallow_clone().f_copy_(src)?;
        }
        Ok(())
    }

    /// The absmax as stored: f32 `[blocks]`, or (double-quantized) its uint8 codes.
    pub fn absmax_storage(&self) -> Tensor {
        self.absmax.first().shallow_clone()
    }

    /// The nested absmax, where the weight is double-quantized.
    pub fn nested(&self) -> Option<&NestedAbsmax> {
        match &self.absmax {
            Absmax::Nested(q) => Some(q),
            Absmax::Plain(_) => None,
        }
    }

    /// Bytes the quantized weight holds (codes, absmax, tables): what a frozen 4-bit base layer
    /// costs in memory.
    pub fn storage_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let absmax = match &self.absmax {
            Absmax::Plain(a) => bytes(a),
            Absmax::Nested(q) => bytes(&q.codes) + bytes(&q.absmax) + bytes(&q.map),
        };
        bytes(&self.codes) + bytes(&self.quant_map) + absmax
    }
}

impl Absmax {
    fn first(&self) -> &Tensor {
        match self {
            Absmax::Plain(a) => a,
            Absmax::Nested(q) => &q.codes,
        }
    }
}

impl QuantType {
    /// The key of the `quant_state` entry of weight `name`.
    fn state_key(self, name: &str) -> String {
        format!("{name}.quant_state.bitsandbytes__{}", self.name())
    }
}

fn read_state_json(name: &str, t: &Tensor) -> Result<QuantStateJson> {
    if t.kind() != Kind::Uint8 || t.dim() != 1 {
        return Err(bad(
            name,
            format!("quant_state is {:?} {:?}, not 1-D uint8", t.kind(), t.size()),
        ));
    }
    let len = t.size()[0];
    if len > MAX_STATE_BYTES {
        return Err(bad(name, format!("quant_state is {len} bytes (limit {MAX_STATE_BYTES})")));
    }
    let bytes: Vec<u8> = Vec::<u8>::try_from(t.f_to_device(Device::Cpu)?.f_contiguous()?)?;
    serde_json::from_slice(&bytes).map_err(|e| bad(name, format!("quant_state JSON: {e}")))
}

fn checked_numel(name: &str, shape: &[i64]) -> Result<i64> {
    if shape.is_empty() || shape.len() > 8 {
        return Err(bad(name, format!("shape {shape:?} has {} dimensions", shape.len())));
    }
    let mut n: i64 = 1;
    for &d in shape {
        if d < 0 {
            return Err(bad(name, format!("shape {shape:?} has a negative size")));
        }
        n = n
            .checked_mul(d)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| bad(name, format!("shape {shape:?} exceeds {MAX_ELEMENTS} elements")))?;
    }
    Ok(n)
}

fn expect_tensor(name: &str, what: &str, t: &Tensor, kind: Kind, numel: i64) -> Result<()> {
    if t.kind() != kind || t.numel() as i64 != numel {
        return Err(bad(
            name,
            format!(
                "{what} is {:?} {:?}; the quant_state implies {kind:?} with {numel} elements",
                t.kind(),
                t.size()
            ),
        ));
    }
    Ok(())
}

fn expect_finite(name: &str, what: &str, t: &Tensor) -> Result<()> {
    if t.numel() > 0 && !bool::try_from(t.f_isfinite()?.f_all()?)? {
        return Err(bad(name, format!("{what} holds NaN or infinite values")));
    }
    Ok(())
}

/// bitsandbytes' 4-bit scaling: per full block `x · (1 / max(absmax, 1e-38))`, the last partial
/// block `x / max(absmax, 1e-38)`, both clamped to [−1, 1]; the absmax of full blocks unclamped,
/// of the partial one clamped (as bitsandbytes stores them).
fn scale_blocks(a: &Tensor, blocksize: i64) -> Result<(Tensor, Tensor)> {
    let n = a.numel() as i64;
    let rem = n % blocksize;
    let full = n - rem;
    let com = a.f_narrow(0, 0, full)?.f_view([full / blocksize, blocksize])?;
    let absmax = com.f_abs()?.f_amax([-1].as_slice(), false)?;
    let recip = absmax.f_clamp_min(1e-38)?.f_reciprocal()?;
    let mut scaled = com.f_mul(&recip.f_unsqueeze(1)?)?.f_clamp(-1.0, 1.0)?.f_reshape([-1])?;
    let mut absmax = absmax;
    if rem > 0 {
        let tail = a.f_narrow(0, full, rem)?;
        let am = tail.f_abs()?.f_max()?.f_clamp_min(1e-38)?;
        scaled = Tensor::f_cat(&[scaled, tail.f_div(&am)?.f_clamp(-1.0, 1.0)?], 0)?;
        absmax = Tensor::f_cat(&[absmax, am.f_unsqueeze(0)?], 0)?;
    }
    Ok((scaled, absmax))
}

/// The code of each scaled value: bitsandbytes' bucketize over the midpoints of the sorted code
/// table (a value on a midpoint goes to the lower code), mapped back to the table's order.
fn nearest_4bit(scaled: &Tensor, quant_type: QuantType) -> Result<Tensor> {
    let device = scaled.device();
    let code = Tensor::from_slice(&quant_type.code()).f_to_device(device)?;
    // argsort as libtorch sorts (FP4's two zeros keep libtorch's order)
    let order = code.f_argsort(0, false)?;
    let sorted = code.f_index_select(0, &order)?;
    let bounds = sorted.f_narrow(0, 0, 15)?.f_add(&sorted.f_narrow(0, 1, 15)?)?.f_div_scalar(2)?;
    let q = scaled.f_bucketize(&bounds, false, false)?;
    Ok(match quant_type {
        QuantType::Nf4 => q,
        QuantType::Fp4 => order.f_index_select(0, &q)?,
    })
}

/// Double quantization of the f32 absmax as bitsandbytes' CPU kernel (0.50) does it: the mean
/// subtracted; then per block of 256 values `v`, with `m = max |v|`, each `v · (1/m)` clamped to
/// [−1, 1] and looked up in a 65536-entry table that maps `[−1, 1]` in even steps to the
/// nearest dynamic-map code (see [`dynamic_map_lut`]); a block with `m = 0` gets code 0.
fn quantize_absmax(absmax: &Tensor) -> Result<NestedAbsmax> {
    let device = absmax.device();
    let offset = absmax.f_mean(Kind::Float)?;
    let v = absmax.f_sub(&offset)?;
    let n = v.numel() as i64;
    let blocks = blocks_of(n, NESTED_BLOCKSIZE);
    let padded = blocks * NESTED_BLOCKSIZE;
    let vp = Tensor::f_cat(&[v, Tensor::f_zeros([padded - n], (Kind::Float, device))?], 0)?
        .f_view([blocks, NESTED_BLOCKSIZE])?;
    let m = vp.f_abs()?.f_amax([-1].as_slice(), false)?;
    let inv = m.f_reciprocal()?.f_unsqueeze(1)?;
    // (0 · ∞ where m = 0: those blocks are set to code 0 below)
    let normed = vp.f_mul(&inv)?.f_clamp(-1.0, 1.0)?.f_nan_to_num(0.0, None, None)?;
    // (v + 1) · 0.5 · 65535 + 0.5, truncated: each step rounded to f32 as the C++ rounds it
    let idx = normed
        .f_add_scalar(1.0)?
        .f_mul_scalar(0.5)?
        .f_mul_scalar(65535.0)?
        .f_add_scalar(0.5)?
        .f_to_kind(Kind::Int64)?
        .f_clamp(0, 65535)?;
    let lut = Tensor::from_slice(&dynamic_map_lut()).f_to_device(device)?;
    let codes = lut.f_index_select(0, &idx.f_reshape([-1])?)?.f_view([blocks, NESTED_BLOCKSIZE])?;
    // blocks whose largest magnitude is 0 (their normed values are NaN): code 0
    let zero = m.f_eq(0.0)?.f_unsqueeze(1)?;
    let codes = codes.f_masked_fill(&zero, 0)?.f_reshape([-1])?.f_narrow(0, 0, n)?;
    Ok(NestedAbsmax {
        codes: codes.f_to_kind(Kind::Uint8)?,
        absmax: m,
        map: Tensor::from_slice(&DYNAMIC_MAP).f_to_device(device)?,
        blocksize: NESTED_BLOCKSIZE,
        offset: f32::try_from(&offset)?,
    })
}

/// bitsandbytes' quantization table for the dynamic map: entry `i` is the code nearest
/// `−1 + 2i/65535` (the first whose midpoint with the next code is not below it), every step in
/// f32 as its `build_quantize_lut` computes it.
fn dynamic_map_lut() -> Vec<u8> {
    let mid: Vec<f32> = DYNAMIC_MAP.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut code = 0usize;
    (0..65536u32)
        .map(|i| {
            let val = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
            while code < mid.len() && mid[code] < val {
                code += 1;
            }
            code as u8
        })
        .collect()
}
