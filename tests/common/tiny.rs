//! The PEFT fixture model of `scripts/make_peft_fixtures.py` and fixture helpers.

use std::path::{Path, PathBuf};

use tch::nn::{self, ModuleT};
use tch::Tensor;
use tch_peft::lora::{self, LoraBuilder, MaybeLoraLinear};
use tch_peft::{io, Result};

/// The fixture model: `sum over layers of up_proj(v_proj(gelu(q_proj(x))))`, Llama-style names.
pub struct Tiny {
    pub layers: Vec<[MaybeLoraLinear; 3]>,
}

impl Tiny {
    pub fn new(p: &nn::Path, lora: Option<&LoraBuilder>) -> Result<Self> {
        let mut layers = Vec::new();
        for i in 0..2 {
            let l = p / "model" / "layers" / i;
            let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
            layers.push([
                lora::linear(&(&l / "self_attn" / "q_proj"), 16, 16, Default::default(), lora)?,
                lora::linear(&(&l / "self_attn" / "v_proj"), 16, 8, no_bias, lora)?,
                lora::linear(&(&l / "mlp" / "up_proj"), 8, 12, Default::default(), lora)?,
            ]);
        }
        Ok(Tiny { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut out: Option<Tensor> = None;
        for [q, v, up] in &self.layers {
            let h = up.forward_t(&v.forward_t(&q.forward_t(x, false).gelu("none"), false), false);
            out = Some(match out {
                None => h,
                Some(o) => o + h,
            });
        }
        out.unwrap()
    }
}

/// `tests/fixtures/peft/<case>`.
pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft").join(case)
}

/// Every tensor of a safetensors file, by name.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, Tensor> {
    io::read_safetensors(path).unwrap().tensors.into_iter().collect()
}
