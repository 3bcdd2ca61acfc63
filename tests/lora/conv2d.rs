//! LoRA on Conv2d: stride, padding and dilation honoured (PEFT crashes on dilation, its issue
//! #3697), merge equal to the unmerged forward, bit-exact unmerge, errors. (PEFT parity:
//! `tests/peft_parity.rs`.)

use crate::common::*;
use tch::nn::{self, ModuleT, PaddingMode};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{Conv2dConfig, LoraConfig, LoraConv2d};
use tch_peft::Error;

fn conv_cfg(stride: i64, padding: i64, dilation: i64, mode: PaddingMode) -> Conv2dConfig {
    Conv2dConfig {
        stride: [stride; 2],
        padding: [padding; 2],
        dilation: [dilation; 2],
        groups: 1,
        bias: true,
        ws_init: nn::init::DEFAULT_KAIMING_UNIFORM,
        bs_init: nn::Init::Const(0.0),
        padding_mode: mode,
    }
}

fn layer(vb: &nn::VarStore, va: &nn::VarStore, name: &str, conv: Conv2dConfig) -> LoraConv2d {
    let base = nn::conv(vb.root() / name, 4, 6, [3, 3], conv);
    let cfg = LoraConfig { r: 3, lora_alpha: 6.0, ..Default::default() };
    let l = LoraConv2d::new(base, conv, &(va.root() / name), name, &cfg).unwrap();
    set(l.lora_b(), &randn(&[6, 3, 1, 1], Kind::Double));
    l
}

#[test]
fn dilated_strided_padded_conv_lora_equals_the_conv_with_the_merged_kernel() {
    tch::manual_seed(0);
    let mut vb = nn::VarStore::new(Device::Cpu);
    vb.set_kind(Kind::Double);
    let va = nn::VarStore::new(Device::Cpu);
    for (i, conv) in [
        conv_cfg(1, 1, 1, PaddingMode::Zeros),
        conv_cfg(2, 2, 2, PaddingMode::Zeros),
        conv_cfg(1, 3, 3, PaddingMode::Reflect),
        conv_cfg(2, 1, 1, PaddingMode::Circular),
    ]
    .into_iter()
    .enumerate()
    {
        let l = layer(&vb, &va, &format!("c{i}"), conv);
        assert_eq!(l.lora_a().size(), [3, 4, 3, 3]);
        let x = randn(&[2, 4, 11, 11], Kind::Double);
        let y = l.forward_t(&x, false);
        // the same convolution with W + s·(B·A) reshaped as a kernel
        let w = l.weight() + l.delta_weight();
        let (xp, pad) = match conv.padding_mode {
            PaddingMode::Zeros => (x.shallow_clone(), conv.padding),
            m => {
                let p = conv.padding[0];
                (m.pad(&x, &[p, p, p, p]), [0, 0])
            }
        };
        let expected = xp.conv2d(&w, l.bias(), conv.stride, pad, conv.dilation, 1);
        assert_eq!(y.size(), expected.size());
        assert!(max_abs_diff(&y, &expected) < 1e-10, "case {i}");
        let original = l.weight().copy();
        l.merge().unwrap();
        assert!(max_abs_diff(&l.forward_t(&x, false), &y) < 1e-10, "merged case {i}");
        l.unmerge().unwrap();
        assert!(bit_equal(l.weight(), &original));
    }
}

#[test]
fn zero_init_b_leaves_the_convolution_unchanged_and_grads_reach_only_the_factors() {
    tch::manual_seed(1);
    let vb = nn::VarStore::new(Device::Cpu);
    let va = nn::VarStore::new(Device::Cpu);
    let conv = conv_cfg(1, 1, 1, PaddingMode::Zeros);
    let base = nn::conv(vb.root() / "c", 4, 6, [3, 3], conv);
    let x = randn(&[1, 4, 7, 7], Kind::Float);
    let expected = x.apply(&base);
    let l = LoraConv2d::new(
        base,
        conv,
        &(va.root() / "c"),
        "c",
        &LoraConfig { r: 2, ..Default::default() },
    )
    .unwrap();
    assert!(bit_equal(&l.forward_t(&x, true), &expected));
    l.forward_t(&x, true).sum(Kind::Float).backward();
    assert!(l.lora_b().grad().defined() && !l.weight().grad().defined());
}

#[test]
fn grouped_convolutions_and_bad_inputs_are_typed_errors() {
    let vb = nn::VarStore::new(Device::Cpu);
    let va = nn::VarStore::new(Device::Cpu);
    let grouped = Conv2dConfig { groups: 2, ..conv_cfg(1, 1, 1, PaddingMode::Zeros) };
    let base = nn::conv(vb.root() / "g", 4, 6, [3, 3], grouped);
    let err = LoraConv2d::new(base, grouped, &(va.root() / "g"), "g", &LoraConfig::default())
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { ref field, .. } if field == "groups"), "{err}");
    let conv = conv_cfg(1, 1, 1, PaddingMode::Zeros);
    let base = nn::conv(vb.root() / "c", 4, 6, [3, 3], conv);
    let l = LoraConv2d::new(
        base,
        conv,
        &(va.root() / "c"),
        "c",
        &LoraConfig { r: 2, ..Default::default() },
    )
    .unwrap();
    let err =
        l.f_forward_t(&Tensor::zeros([1, 5, 7, 7], (Kind::Float, Device::Cpu)), false).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}
