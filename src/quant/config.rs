//! [`Bnb4bitConfig`]: which layers of a model are 4-bit and in what layout, read from (and
//! written to) transformers' `quantization_config`.

use serde_json::{json, Value};
use tch::Kind;

use super::QuantType;
use crate::{Error, Result};

/// How a model's linear layers are quantized to 4 bits, as transformers'
/// `BitsAndBytesConfig(load_in_4bit=True, …)` describes it in a checkpoint's `config.json`
/// (`quantization_config`).
///
/// bitsandbytes always quantizes in blocks of 64 with a nested block of 256. The modules named in
/// `llm_int8_skip_modules` stay in float; without that list, `lm_head` does (transformers'
/// default, the output embeddings).
///
/// ```
/// use tch_peft::quant::{Bnb4bitConfig, QuantType};
/// let q = serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
///     "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": false});
/// let c = Bnb4bitConfig::from_quantization_config(&q)?;
/// assert_eq!((c.quant_type, c.double_quant, c.blocksize), (QuantType::Fp4, false, 64));
/// assert!(c.quantizes("model.layers.0.mlp.up_proj") && !c.quantizes("lm_head"));
/// let q = serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
///     "llm_int8_skip_modules": ["model.layers.1", "down_proj"]});
/// let c = Bnb4bitConfig::from_quantization_config(&q)?;
/// assert!(!c.quantizes("model.layers.1.self_attn.q_proj"));
/// assert!(c.quantizes("model.layers.11.self_attn.q_proj"));
/// assert!(!c.quantizes("model.layers.0.mlp.down_proj") && c.quantizes("lm_head"));
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4bitConfig {
    /// NF4 (QLoRA's, the default) or FP4.
    pub quant_type: QuantType,
    /// Elements per absmax block (64).
    pub blocksize: i64,
    /// Double quantization (QLoRA's; the default): the absmax itself in 8 bits.
    pub double_quant: bool,
    /// The dtype bitsandbytes computes in (`bnb_4bit_compute_dtype`), recorded in the saved
    /// config; this crate computes in the input's dtype.
    pub compute_dtype: Kind,
    /// Modules kept in float (`llm_int8_skip_modules`), matched as transformers matches them:
    /// from the start of the name up to a `.`, or as a suffix; `None`: `lm_head` alone.
    pub skip_modules: Option<Vec<String>>,
}

impl Default for Bnb4bitConfig {
    /// QLoRA's: NF4 with double quantization, bf16 compute.
    fn default() -> Self {
        Bnb4bitConfig {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            compute_dtype: Kind::BFloat16,
            skip_modules: None,
        }
    }
}

fn bad(reason: String) -> Error {
    Error::Unsupported { field: "quantization_config".into(), reason }
}

impl Bnb4bitConfig {
    /// The config of a `quantization_config` object: `quant_method` "bitsandbytes" with
    /// `load_in_4bit` (or `_load_in_4bit`) true.
    ///
    /// # Errors
    /// `Unsupported` naming the field for another method, 8-bit, an unknown quant type, a
    /// compute dtype other than f32/f16/bf16, or a quant storage other than uint8.
    pub fn from_quantization_config(q: &Value) -> Result<Self> {
        let method = q.get("quant_method").and_then(Value::as_str);
        let four_bit = ["load_in_4bit", "_load_in_4bit"]
            .iter()
            .any(|k| q.get(k).and_then(Value::as_bool) == Some(true));
        if method != Some("bitsandbytes") || !four_bit {
            return Err(bad(format!(
                "quant_method {method:?} (4-bit: {four_bit}); bitsandbytes 4-bit is read"
            )));
        }
        let str_field = |k: &str| q.get(k).filter(|v| !v.is_null()).map(|v| v.as_str().ok_or(v));
        let quant_type = match str_field("bnb_4bit_quant_type") {
            None => QuantType::Fp4, // transformers' default
            Some(Ok(name)) => QuantType::from_name(name)
                .ok_or_else(|| bad(format!("bnb_4bit_quant_type {name:?}")))?,
            Some(Err(v)) => return Err(bad(format!("bnb_4bit_quant_type {v}"))),
        };
        let compute_dtype = match str_field("bnb_4bit_compute_dtype") {
            None => Kind::Float,
            Some(Ok("float32")) => Kind::Float,
            Some(Ok("float16")) => Kind::Half,
            Some(Ok("bfloat16")) => Kind::BFloat16,
            Some(other) => return Err(bad(format!("bnb_4bit_compute_dtype {other:?}"))),
        };
        match str_field("bnb_4bit_quant_storage") {
            None | Some(Ok("uint8")) => {}
            Some(other) => return Err(bad(format!("bnb_4bit_quant_storage {other:?}"))),
        }
        let double_quant = match q.get("bnb_4bit_use_double_quant") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(bad(format!("bnb_4bit_use_double_quant {v}"))),
        };
        let skip_modules = match q.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.len() <= 4096 => Some(
                a.iter()
                    .map(|v| v.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("llm_int8_skip_modules holds a non-string".into()))?,
            ),
            Some(v) => return Err(bad(format!("llm_int8_skip_modules {v}"))),
        };
        Ok(Bnb4bitConfig { quant_type, blocksize: 64, double_quant, compute_dtype, skip_modules })
    }

    /// The `quantization_config` transformers writes for this config (loadable by
    /// `from_pretrained` with bitsandbytes installed).
    pub fn to_quantization_config(&self) -> Value {
        let dtype = match self.compute_dtype {
            Kind::Half => "float16",
            Kind::BFloat16 => "bfloat16",
            _ => "float32",
        };
        let skip = match &self.skip_modules {
            None => Value::Null,
            Some(s) => json!(s),
        };
        json!({
            "quant_method": "bitsandbytes",
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": self.quant_type.name(),
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": skip,
            "llm_int8_threshold": 6.0,
        })
    }

    /// Whether the linear layer `module` (a dotted name) is quantized: every one but the skipped
    /// modules — an entry that is a prefix of the name ending at a `.` or at its end
    /// (`model.layers.1` skips `model.layers.1.mlp.up_proj`, not `model.layers.11.…`), or a
    /// suffix of it (`up_proj`) — and, without a list, `lm_head`.
    pub fn quantizes(&self, module: &str) -> bool {
        let skipped = |s: &str| {
            let prefix = module
                .strip_prefix(s)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || s.ends_with('.'));
            !s.is_empty() && (prefix || module.ends_with(s))
        };
        match &self.skip_modules {
            None => !skipped("lm_head"),
            Some(list) => !list.iter().any(|s| skipped(s)),
        }
    }
}
