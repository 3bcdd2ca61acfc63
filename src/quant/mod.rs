//! Quantized frozen base weights, for QLoRA: LoRA, DoRA or ReFT training on a base that stays
//! 4-bit.
//!
//! [`Bnb4bitWeight`] is a weight in bitsandbytes' 4-bit format, as transformers saves a model
//! loaded with `BitsAndBytesConfig(load_in_4bit=True)`: read from a checkpoint's tensors
//! ([`Bnb4bitWeight::from_state`]), made from a float weight exactly as bitsandbytes makes it
//! ([`Bnb4bitWeight::quantize`]), written back in the same layout ([`Bnb4bitWeight::state`]) and
//! dequantized ([`Bnb4bitWeight::dequantize`]). [`QuantLinear`] is a frozen linear layer over
//! one. [`gguf`] reads llama.cpp's GGUF files.
//!
//! ```text
//! n elements in blocks of `blocksize` (64 by default); code c_k ∈ 0..16 per element, two per
//! byte (the high nibble holds the even element)
//! w_k = quant_map[c_k] · absmax[k / blocksize]                     (f32, then the weight's dtype)
//! quantize:  absmax_b = max_{k∈b} |w_k|,   c_k = the code nearest w_k / absmax_b
//! double quantization (QLoRA's): absmax itself in 8 bits, blocks of 256, around its mean:
//!   absmax_j = dynamic_map[a_j] · nested_absmax[j / 256] + offset
//! ```
//!
//! The 4-bit code tables are bitsandbytes' `get_4bit_type`: NF4 (the quantiles of a normal
//! distribution, [`NF4_CODE`]) and FP4 (a 1-2-1 float format, [`fp4_code`]).

mod bnb;
mod config;
mod dynamic_map;
pub mod gguf;
mod linear;

pub use bnb::{Bnb4bitWeight, NestedAbsmax};
pub use config::Bnb4bitConfig;
pub use linear::QuantLinear;

/// bitsandbytes' 4-bit data types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat 4 (QLoRA's): 16 quantiles of N(0, 1), scaled to [−1, 1].
    Nf4,
    /// 4-bit float: sign, 2 exponent bits, 1 mantissa bit, scaled to [−1, 1].
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes and transformers use: `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The type named `name` (`"nf4"` or `"fp4"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The code table: the value in [−1, 1] each 4-bit code stands for.
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_CODE,
            QuantType::Fp4 => fp4_code(),
        }
    }
}

/// The NF4 code table (bitsandbytes' `get_4bit_type("nf4")`), sorted.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The FP4 code table (bitsandbytes' `get_4bit_type("fp4")`): its raw values divided by their
/// largest magnitude, 12, in f32. Code 8 is −0.
pub fn fp4_code() -> [f32; 16] {
    const RAW: [f32; 16] = [
        0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
        -3.0,
    ];
    RAW.map(|v| v / 12.0)
}
