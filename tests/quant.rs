//! bitsandbytes 4-bit weights against bitsandbytes 0.50.2 itself (fixtures made by
//! `scripts/make_bnb_fixtures.py` with its CPU backend): reading transformers' layout,
//! dequantization, quantization (codes and absmax bit for bit, double quantization included),
//! the round trip through the saved layout, and typed errors for malformed states.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};
use tch_peft::quant::{fp4_code, Bnb4bitWeight, QuantLinear, QuantType, NF4_CODE};
use tch_peft::{io, Error};

const CASES: [(&str, QuantType, i64, bool); 5] = [
    ("nf4_dq", QuantType::Nf4, 64, true),
    ("fp4", QuantType::Fp4, 64, false),
    ("nf4_bf16", QuantType::Nf4, 128, true),
    ("nf4_tail", QuantType::Nf4, 64, true),
    ("fp4_dq_big", QuantType::Fp4, 64, true),
];

fn fixtures() -> BTreeMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb/weights.safetensors");
    io::read_safetensors(path).unwrap().tensors.into_iter().collect()
}

fn lookup(t: &BTreeMap<String, Tensor>) -> impl Fn(&str) -> Option<Tensor> + '_ {
    |k: &str| t.get(k).map(Tensor::shallow_clone)
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

#[test]
fn code_tables_are_bitsandbytes_tables() {
    let t = fixtures();
    assert!(same_bits(&t["nf4_dq.weight.quant_map"], &Tensor::from_slice(&NF4_CODE)));
    assert!(same_bits(&t["fp4.weight.quant_map"], &Tensor::from_slice(&fp4_code())));
    assert_eq!(QuantType::from_name("fp4"), Some(QuantType::Fp4));
    assert_eq!(QuantType::Nf4.name(), "nf4");
}

#[test]
fn saved_weights_dequantize_exactly_as_bitsandbytes() {
    let t = fixtures();
    for (case, q, bs, nested) in CASES {
        let w = Bnb4bitWeight::from_state(&format!("{case}.weight"), &lookup(&t)).unwrap();
        assert_eq!(
            (w.quant_type(), w.blocksize(), w.nested().is_some()),
            (q, bs, nested),
            "{case}"
        );
        assert_eq!(w.shape(), t[&format!("{case}.input")].size().as_slice(), "{case}");
        let want = &t[&format!("{case}.dequantized")];
        let got = w.dequantize().unwrap();
        assert!(same_bits(&got, want), "{case}: dequantized weights differ");
        assert!(Bnb4bitWeight::is_quantized(&format!("{case}.weight"), &lookup(&t)));
    }
    assert!(!Bnb4bitWeight::is_quantized("nf4_dq.input", &lookup(&t)));
}

#[test]
fn quantizing_gives_bitsandbytes_codes_and_absmax() {
    let t = fixtures();
    for (case, q, bs, nested) in CASES {
        let input = &t[&format!("{case}.input")];
        let w = Bnb4bitWeight::quantize(input, q, bs, nested).unwrap();
        let name = format!("{case}.weight");
        let mine: BTreeMap<String, Tensor> = w.state(&name).unwrap().into_iter().collect();
        for (key, tensor) in &mine {
            if key.contains("quant_state") {
                continue;
            }
            assert!(same_bits(tensor, &t[key]), "{case}: `{key}` differs from bitsandbytes'");
        }
        // the JSON parses back to the same state, and the state dequantizes as bitsandbytes'
        let back = Bnb4bitWeight::from_state(&name, &lookup(&mine)).unwrap();
        if let (Some(a), Some(b)) = (back.nested(), w.nested()) {
            assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{case}");
        }
        assert!(same_bits(&back.dequantize().unwrap(), &t[&format!("{case}.dequantized")]));
        let keys_theirs: Vec<_> = t.keys().filter(|k| k.starts_with(name.as_str())).collect();
        let keys_mine: Vec<_> = mine.keys().collect();
        assert_eq!(keys_mine, keys_theirs, "{case}: the saved layout's keys");
    }
}

#[test]
fn malformed_states_are_typed_errors() {
    let t = fixtures();
    let name = "nf4_dq.weight";
    let with = |key: &str, value: Option<Tensor>| {
        let mut m: BTreeMap<String, Tensor> =
            t.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        match value {
            Some(v) => m.insert(key.to_string(), v),
            None => m.remove(key),
        };
        m
    };
    let state = |json: &str| Some(Tensor::from_slice(json.as_bytes()));
    let key = "nf4_dq.weight.quant_state.bitsandbytes__nf4";
    let good = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [48, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.01}"#;
    let cases: Vec<(&str, BTreeMap<String, Tensor>)> = vec![
        ("missing absmax", with("nf4_dq.weight.absmax", None)),
        (
            "absmax of the wrong size",
            with("nf4_dq.weight.absmax", Some(Tensor::zeros([3], (Kind::Uint8, tch::Device::Cpu)))),
        ),
        (
            "codes of the wrong dtype",
            with(name, Some(Tensor::zeros([2304, 1], (Kind::Float, tch::Device::Cpu)))),
        ),
        (
            "a NaN in the code table",
            with(
                "nf4_dq.weight.quant_map",
                Some(Tensor::full([16], f64::NAN, (Kind::Float, tch::Device::Cpu))),
            ),
        ),
        ("not JSON", with(key, state("{not json"))),
        ("a huge shape", with(key, state(&good.replace("[48, 96]", "[9223372036854775807, 9]")))),
        ("a negative shape", with(key, state(&good.replace("[48, 96]", "[-48, -96]")))),
        ("a shape the codes do not hold", with(key, state(&good.replace("[48, 96]", "[48, 97]")))),
        (
            "an odd blocksize",
            with(key, state(&good.replace("\"blocksize\": 64", "\"blocksize\": 63"))),
        ),
        (
            "an integer dtype",
            with(key, state(&good.replace("\"float32\", \"shape\"", "\"int8\", \"shape\""))),
        ),
        ("a type under the other key", with(key, state(&good.replace("\"nf4\"", "\"fp4\"")))),
        ("no nested offset", with(key, state(&good.replace(", \"nested_offset\": 0.01", "")))),
        ("an infinite offset", with(key, state(&good.replace("0.01}", "1e300}")))),
        (
            "a state that is not bytes",
            with(key, Some(Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)))),
        ),
    ];
    for (what, m) in cases {
        match Bnb4bitWeight::from_state(name, &lookup(&m)) {
            Err(Error::Quantization { name: n, reason }) => {
                assert_eq!(n, name, "{what}: {reason}");
            }
            other => panic!("{what}: expected a quantization error, got {other:?}"),
        }
    }
    // the good state itself reads (the offset differs, so the values do, but it is valid)
    assert!(Bnb4bitWeight::from_state(name, &lookup(&with(key, state(good)))).is_ok());
    // quantize refuses what bitsandbytes refuses
    let w = Tensor::from_slice(&[1.0f32, f32::NAN]);
    assert!(matches!(
        Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, false),
        Err(Error::Quantization { .. })
    ));
    let w = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
    assert!(matches!(
        Bnb4bitWeight::quantize(&w, QuantType::Nf4, 48, false),
        Err(Error::Quantization { .. })
    ));
    let w = Tensor::ones([4], (Kind::Double, tch::Device::Cpu));
    assert!(matches!(
        Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, false),
        Err(Error::Quantization { .. })
    ));
}

#[test]
fn storage_is_about_four_bits_a_weight_with_double_quantization() {
    let w = Tensor::randn([256, 1024], (Kind::Float, tch::Device::Cpu));
    let q = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true).unwrap();
    // 4 bits of code, 8 bits of absmax per 64 weights, an f32 nested absmax per 256 blocks, and
    // the tables (16 and 256 f32): 4.127 bits per weight once the tables are amortised
    let n = q.numel() as u64;
    assert_eq!(q.storage_bytes(), n / 2 + n / 64 + 4 * (n / 64 / 256) + 4 * (16 + 256));
}

fn dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb").join(name)
}

#[test]
fn a_transformers_4bit_checkpoint_reads_and_quantize_on_load_matches_it() {
    // transformers' save_pretrained of a Llama loaded with BitsAndBytesConfig(nf4, double
    // quantization): every linear layer of the blocks is a 4-bit weight, the rest stays float;
    // quantizing the bf16 source checkpoint ourselves gives the same codes and absmax
    let saved: BTreeMap<String, Tensor> = io::read_safetensors(dir("llama-nf4/model.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .collect();
    let source: BTreeMap<String, Tensor> = io::read_safetensors(dir("llama-src/model.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .collect();
    let mut quantized = 0;
    for (name, w) in &source {
        let q = Bnb4bitWeight::is_quantized(name, &lookup(&saved));
        let linear = name.contains("_proj.");
        assert_eq!(q, linear, "{name}");
        if !q {
            continue;
        }
        quantized += 1;
        let theirs = Bnb4bitWeight::from_state(name, &lookup(&saved)).unwrap();
        assert_eq!(theirs.shape(), w.size().as_slice());
        let mine =
            Bnb4bitWeight::quantize(&w.to_kind(Kind::Float), QuantType::Nf4, 64, true).unwrap();
        let mine: BTreeMap<String, Tensor> = mine.state(name).unwrap().into_iter().collect();
        for (key, t) in &mine {
            if !key.contains("quant_state") {
                assert!(same_bits(t, &saved[key]), "`{key}` differs");
            }
        }
        // the layer computes x · deq(W)ᵀ and its input gradient through deq(W)
        let layer = QuantLinear::new(theirs, None).unwrap();
        let x = Tensor::randn([3, layer.in_features()], (Kind::Float, tch::Device::Cpu))
            .set_requires_grad(true);
        let y = layer.f_forward(&x).unwrap();
        let dense = layer.dense_weight(Kind::Float).unwrap();
        assert!(!dense.requires_grad());
        assert!(y.allclose(&x.detach().matmul(&dense.tr()), 1e-6, 1e-6, false));
        y.sum(Kind::Float).backward();
        assert!(x.grad().allclose(
            &dense.sum_dim_intlist(0, true, Kind::Float).expand([3, -1], false),
            1e-5,
            1e-5,
            false
        ));
        assert_eq!(layer.num_parameters(), w.numel() as i64);
        assert_eq!(layer.num_parameters_bnb(), w.numel() as i64 / 2);
    }
    assert_eq!(quantized, 2 * 7);
}

#[test]
fn quantized_linear_refuses_bad_inputs() {
    let w = Tensor::randn([8, 64], (Kind::Float, tch::Device::Cpu));
    let q = || Bnb4bitWeight::quantize(&w, QuantType::Fp4, 64, false).unwrap();
    let layer =
        QuantLinear::new(q(), Some(Tensor::zeros([8], (Kind::Float, tch::Device::Cpu)))).unwrap();
    let bad_width = Tensor::zeros([2, 63], (Kind::BFloat16, tch::Device::Cpu));
    assert!(matches!(layer.f_forward(&bad_width), Err(Error::ShapeMismatch { .. })));
    let bad_kind = Tensor::zeros([2, 64], (Kind::Double, tch::Device::Cpu));
    assert!(matches!(layer.f_forward(&bad_kind), Err(Error::DtypeMismatch { .. })));
    let ints = Tensor::zeros([2, 64], (Kind::Int64, tch::Device::Cpu));
    assert!(matches!(layer.f_forward(&ints), Err(Error::DtypeMismatch { .. })));
    let y = layer.f_forward(&Tensor::ones([2, 64], (Kind::BFloat16, tch::Device::Cpu))).unwrap();
    assert_eq!((y.size(), y.kind()), (vec![2, 8], Kind::BFloat16));
    let bad_bias = Some(Tensor::zeros([7], (Kind::Float, tch::Device::Cpu)));
    assert!(matches!(QuantLinear::new(q(), bad_bias), Err(Error::ShapeMismatch { .. })));
    let int_bias = Some(Tensor::zeros([8], (Kind::Int64, tch::Device::Cpu)));
    assert!(matches!(QuantLinear::new(q(), int_bias), Err(Error::DtypeMismatch { .. })));
    let flat = Bnb4bitWeight::quantize(&w.reshape([-1]), QuantType::Nf4, 64, false).unwrap();
    assert!(matches!(QuantLinear::new(flat, None), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn the_4bit_node_keeps_only_the_quantized_weight_and_matches_the_composed_ops() {
    for (q, nested, kind) in
        [(QuantType::Nf4, true, Kind::Float), (QuantType::Fp4, false, Kind::BFloat16)]
    {
        let w = Tensor::randn([24, 128], (Kind::Float, tch::Device::Cpu));
        let bias = Tensor::randn([24], (Kind::Float, tch::Device::Cpu));
        let layer =
            QuantLinear::new(Bnb4bitWeight::quantize(&w, q, 64, nested).unwrap(), Some(bias))
                .unwrap();
        let x = Tensor::randn([2, 5, 128], (kind, tch::Device::Cpu));
        let run = |composed: bool| {
            let xg = x.detach().set_requires_grad(true);
            let y = if composed { layer.f_forward_composed(&xg) } else { layer.f_forward(&xg) }
                .unwrap();
            let g = y.ones_like().cumsum(-1, kind);
            (&y * &g).sum(Kind::Float).backward();
            (y.detach(), xg.grad())
        };
        let ((y, dx), (y_ref, dx_ref)) = (run(false), run(true));
        assert_eq!(y.size(), [2, 5, 24]);
        let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
        assert!(common_rel(&y, &y_ref) < tol && common_rel(&dx, &dx_ref) < tol, "{q:?} {kind:?}");
    }
}

fn common_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    d / b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1e-30)
}

mod gguf_files {
    use super::*;
    use crate::common;
    use common::temp_dir;
    use tch_peft::quant::gguf::{GgmlType, GgufFile, GgufValue};

    fn fixture() -> std::path::PathBuf {
        dir("../gguf/types.gguf")
    }

    #[test]
    fn every_type_dequantizes_as_gguf_py_and_metadata_reads_back() {
        let f = GgufFile::open(fixture()).unwrap();
        assert_eq!(f.version(), 3);
        let want: BTreeMap<String, Tensor> =
            io::read_safetensors(dir("../gguf/expected.safetensors"))
                .unwrap()
                .tensors
                .into_iter()
                .collect();
        assert_eq!(f.tensors().len(), want.len());
        for info in f.tensors() {
            let got = f.tensor(&info.name).unwrap();
            assert!(same_bits(&got, &want[&info.name]), "{} ({:?})", info.name, info.ggml_type);
        }
        assert_eq!(f.info("q8_0_3d").unwrap().shape(), [2, 3, 32]);
        assert_eq!(f.info("q6_k").unwrap().ggml_type, GgmlType::Q6K);
        let m = f.metadata();
        assert_eq!(m["general.architecture"].as_str(), Some("llama"));
        assert_eq!(m["llama.context_length"].as_u64(), Some(2048));
        assert_eq!(m["test.u8"], GgufValue::U8(200));
        assert_eq!(m["test.i8"], GgufValue::I8(-100));
        assert_eq!(m["test.u16"], GgufValue::U16(60000));
        assert_eq!(m["test.i16"], GgufValue::I16(-30000));
        assert_eq!(m["test.u32"], GgufValue::U32(4_000_000_000));
        assert_eq!(m["test.i32"], GgufValue::I32(-2_000_000_000));
        assert_eq!(m["test.u64"], GgufValue::U64(1 << 60));
        assert_eq!(m["test.i64"], GgufValue::I64(-(1 << 60)));
        assert_eq!(m["test.f32"], GgufValue::F32(0.15625));
        assert_eq!(m["test.f64"], GgufValue::F64(-2.5e-300));
        assert_eq!(m["test.bool"], GgufValue::Bool(true));
        assert_eq!(m["test.string"].as_str(), Some("héllo"));
        let s = |v: &str| GgufValue::String(v.into());
        assert_eq!(m["test.strings"], GgufValue::Array(vec![s("a"), s("bc"), s("")]));
        let nested = &m["test.nested"];
        let GgufValue::Array(rows) = nested else { panic!("{nested:?}") };
        assert_eq!(rows.len(), 2);
        assert!(matches!(f.tensor("absent"), Err(Error::MissingTensor { .. })));
    }

    /// Where tensor `name`'s type id sits in the file.
    fn type_offset(bytes: &[u8], name: &str) -> usize {
        let mut key = (name.len() as u64).to_le_bytes().to_vec();
        key.extend(name.as_bytes());
        let pos = bytes.windows(key.len()).position(|w| w == key.as_slice()).unwrap();
        let dims_at = pos + key.len();
        let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
        dims_at + 4 + 8 * n_dims
    }

    fn open_bytes(bytes: &[u8], tag: &str) -> tch_peft::Result<GgufFile> {
        let path = temp_dir(tag).join("f.gguf");
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path)
    }

    #[test]
    fn truncated_and_corrupted_files_are_errors_never_panics() {
        let good = std::fs::read(fixture()).unwrap();
        // every prefix is an error, but for those that cut only the final alignment padding:
        // those read every tensor whole
        let path = temp_dir("gguf-truncated").join("f.gguf");
        let mut opened_prefixes = 0;
        for len in 0..good.len() {
            std::fs::write(&path, &good[..len]).unwrap();
            if let Ok(f) = GgufFile::open(&path) {
                opened_prefixes += 1;
                for t in f.tensors() {
                    assert!(f.tensor(&t.name).is_ok(), "prefix of {len} bytes: {}", t.name);
                }
            }
        }
        assert!(opened_prefixes < 32, "{opened_prefixes} prefixes opened");
        // bytes overwritten at random: a typed error or a file whose tensors read or fail cleanly
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut opened = 0;
        for _ in 0..1500 {
            let mut bad = good.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % bad.len() as u64) as usize;
                bad[i] = next() as u8;
            }
            std::fs::write(&path, &bad).unwrap();
            if let Ok(f) = GgufFile::open(&path) {
                opened += 1;
                for t in f.tensors() {
                    let _ = f.tensor(&t.name);
                }
            }
        }
        assert!(opened > 0, "no corrupted file opened at all: the flips never hit tensor data");
        // named errors for the common cases
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(open_bytes(&bad, "gguf-magic"), Err(Error::CorruptFile { .. })));
        let mut bad = good.clone();
        bad[4] = 1;
        let err = open_bytes(&bad, "gguf-version").unwrap_err();
        assert!(err.to_string().contains("version 1"), "{err}");
        let mut bad = good.clone();
        let at = type_offset(&bad, "q4_k");
        bad[at..at + 4].copy_from_slice(&10u32.to_le_bytes()); // Q2_K
        let err = open_bytes(&bad, "gguf-type").unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported { reason, .. } if reason.contains("q4_k") && reason.contains("Q2_K")),
            "{err}"
        );
        let mut bad = good.clone();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(matches!(open_bytes(&bad, "gguf-count"), Err(Error::CorruptFile { .. })));
        let mut bad = good.clone();
        let at = type_offset(&bad, "f32") - 8 * 2; // ne[0] of `f32`
        bad[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(open_bytes(&bad, "gguf-dims"), Err(Error::CorruptFile { .. })));
    }
}

/// LoRA and DoRA on a 4-bit base (QLoRA): the same values and gradients as the same adapters on
/// a float layer holding the dequantized weight, on the fused node and the composed ops; merges
/// quantize `deq(W) + s·BA` again exactly as bitsandbytes would and unmerge restores the codes.
mod qlora {
    use super::*;
    use tch::nn;
    use tch_peft::lora::{LoraBuilder, LoraConfig, LoraInit, LoraLinear};

    fn quantized(seed: i64) -> (QuantLinear, Tensor, Tensor) {
        tch::manual_seed(seed);
        let w = Tensor::randn([24, 128], (Kind::Float, tch::Device::Cpu)) * 0.1;
        let bias = Tensor::randn([24], (Kind::Float, tch::Device::Cpu));
        let q = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true).unwrap();
        let layer = QuantLinear::new(q, Some(bias.copy())).unwrap();
        let dense = layer.dense_weight(Kind::Float).unwrap();
        (layer, dense, bias)
    }

    fn cfg(dora: bool) -> LoraConfig {
        LoraConfig { r: 4, lora_alpha: 8.0, use_dora: dora, ..Default::default() }
    }

    /// The two layers with the same random A and B.
    fn pair(dora: bool) -> (LoraLinear, LoraLinear, [nn::VarStore; 2]) {
        let (layer, dense, bias) = quantized(3);
        let (va, vb) = (nn::VarStore::new(tch::Device::Cpu), nn::VarStore::new(tch::Device::Cpu));
        let q = LoraLinear::new(layer, &(va.root() / "p"), &cfg(dora)).unwrap();
        let base = nn::Linear { ws: dense, bs: Some(bias) };
        let d = LoraLinear::new(base, &(vb.root() / "p"), &cfg(dora)).unwrap();
        tch::no_grad(|| {
            let a = Tensor::randn(q.lora_a().size(), (Kind::Float, tch::Device::Cpu));
            let b = Tensor::randn(q.lora_b().size(), (Kind::Float, tch::Device::Cpu)) * 0.1;
            for l in [&q, &d] {
                l.lora_a().shallow_clone().copy_(&a);
                l.lora_b().shallow_clone().copy_(&b);
            }
        });
        (q, d, [va, vb])
    }

    fn run(l: &LoraLinear, x: &Tensor) -> Vec<Tensor> {
        let xg = x.detach().set_requires_grad(true);
        let y = l.f_forward_t(&xg, true).unwrap();
        let g = y.ones_like().cumsum(-1, Kind::Float) / 24.0;
        (&y * &g).sum(Kind::Float).backward();
        let mut out = vec![y.detach(), xg.grad(), l.lora_a().grad(), l.lora_b().grad()];
        if let Some(m) = l.magnitude() {
            out.push(m.grad());
        }
        out
    }

    #[test]
    fn lora_and_dora_on_a_4bit_base_match_the_float_layer_of_its_dequantized_weight() {
        for dora in [false, true] {
            for fused in [true, false] {
                let (q, d, _stores) = pair(dora);
                q.set_fused(fused);
                d.set_fused(fused);
                if let (Some(mq), Some(md)) = (q.magnitude(), d.magnitude()) {
                    assert!(mq.allclose(md, 1e-6, 1e-6, false), "magnitude from deq(W)");
                }
                let x = Tensor::randn([2, 5, 128], (Kind::Float, tch::Device::Cpu));
                let (got, want) = (run(&q, &x), run(&d, &x));
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(a.defined() && b.defined(), "dora {dora} fused {fused}: #{i}");
                    let rel = common_rel(a, b);
                    assert!(rel < 1e-5, "dora {dora} fused {fused}: output/grad #{i} off by {rel}");
                }
                // the base stays frozen and 4-bit
                assert!(q.base().quantized().is_some() && q.base().dense().is_none());
            }
        }
    }

    #[test]
    fn a_trained_bias_copy_on_a_4bit_base_gets_the_float_layers_gradient() {
        use tch_peft::lora::LoraBias;
        let (layer, dense, bias) = quantized(6);
        let cfg = LoraConfig { bias: LoraBias::LoraOnly, ..cfg(false) };
        let (va, vb) = (nn::VarStore::new(tch::Device::Cpu), nn::VarStore::new(tch::Device::Cpu));
        let q = LoraLinear::new(layer, &(va.root() / "p"), &cfg).unwrap();
        let d = LoraLinear::new(nn::Linear { ws: dense, bs: Some(bias) }, &(vb.root() / "p"), &cfg)
            .unwrap();
        let x = Tensor::randn([4, 128], (Kind::Float, tch::Device::Cpu));
        for fused in [true, false] {
            for l in [&q, &d] {
                l.set_fused(fused);
            }
            let grads = |l: &LoraLinear, vs: &nn::VarStore| {
                let y = l.f_forward_t(&x, true).unwrap();
                (&y * &y).sum(Kind::Float).backward();
                vs.variables()["p.base_layer.bias"].grad()
            };
            let (gq, gd) = (grads(&q, &va), grads(&d, &vb));
            assert!(gq.defined() && common_rel(&gq, &gd) < 1e-5, "fused {fused}");
            for vs in [&va, &vb] {
                for (_, t) in vs.variables() {
                    let mut g = t.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            }
        }
    }

    #[test]
    fn merging_a_4bit_base_quantizes_again_and_unmerging_restores_the_codes() {
        for dora in [false, true] {
            let (q, d, _stores) = pair(dora);
            let base = q.base().quantized().unwrap();
            let original = base.weight().state("w").unwrap();
            let x = Tensor::randn([3, 128], (Kind::Float, tch::Device::Cpu));
            let unmerged = q.f_forward_t(&x, false).unwrap();
            // what bitsandbytes makes of the float merged weight
            let merged_float = d.merged_dense_linear(Kind::Float).unwrap();
            let want = Bnb4bitWeight::quantize(&merged_float.ws, QuantType::Nf4, 64, true).unwrap();
            q.merge().unwrap();
            assert!(q.is_merged());
            let now: BTreeMap<String, Tensor> =
                base.weight().state("w").unwrap().into_iter().collect();
            for (k, t) in want.state("w").unwrap() {
                assert!(same_bits(&t, &now[&k]), "dora {dora}: `{k}` after the merge");
            }
            // the merged 4-bit layer computes with the re-quantized weight (lossy: close to
            // the unmerged output, not equal)
            let merged = q.f_forward_t(&x, false).unwrap();
            let direct =
                x.matmul(&want.dequantize().unwrap().tr()) + merged_float.bs.as_ref().unwrap();
            assert!(common_rel(&merged, &direct) < 1e-6, "dora {dora}");
            assert!(common_rel(&merged, &unmerged) < 0.1, "dora {dora}");
            q.unmerge().unwrap();
            for ((k, a), (_, b)) in original.iter().zip(base.weight().state("w").unwrap()) {
                assert!(same_bits(a, &b), "dora {dora}: `{k}` after the unmerge");
            }
            assert!(q.f_forward_t(&x, false).unwrap().equal(&unmerged));
            // merged_dense_linear: deq(W) + s·BA in float, the layer untouched
            let dense = q.merged_dense_linear(Kind::Float).unwrap();
            assert!(common_rel(&dense.ws, &merged_float.ws) < 1e-6, "dora {dora}");
            assert!(!q.is_merged());
        }
        // for good: a 4-bit base comes back, or a typed error where a float one is asked for
        let (q, _d, _stores) = pair(false);
        assert!(matches!(q.into_merged_linear(), Err(Error::Unsupported { .. })));
        let (q, _d, _stores) = pair(false);
        assert!(q.into_merged_base().unwrap().quantized().is_some());
    }

    #[test]
    fn inits_that_rewrite_the_base_and_copies_of_4bit_modules_are_refused() {
        let (layer, _, _) = quantized(4);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let pissa = LoraConfig { init_lora_weights: LoraInit::Pissa, ..cfg(false) };
        assert!(matches!(
            LoraLinear::new(layer, &(vs.root() / "p"), &pissa),
            Err(Error::Unsupported { .. })
        ));
        let (layer, _, _) = quantized(4);
        let saving = LoraConfig {
            modules_to_save: Some(vec!["head".into()]),
            ..LoraConfig::for_targets(["q"])
        };
        let builder = LoraBuilder::new(&vs.root(), saving).unwrap();
        assert!(matches!(builder.wrap("head", layer), Err(Error::Unsupported { .. })));
        // an untargeted 4-bit layer stays plain and computes as the layer
        let (layer, dense, bias) = quantized(5);
        let plain = builder.wrap("other", layer).unwrap();
        let x = Tensor::randn([2, 128], (Kind::Float, tch::Device::Cpu));
        let want = x.matmul(&dense.tr()) + &bias;
        assert!(common_rel(&plain.f_forward_t(&x, false).unwrap(), &want) < 1e-6);
        assert!(plain.quantized_base().is_some() && plain.base().is_none());
    }
}
