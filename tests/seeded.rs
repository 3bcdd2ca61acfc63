//! Reproducibility under a seed: DARE's random drops, PEFT's (`TaskMerge::DareLinear`) and
//! mergekit's (`MergeMethod::DareLinear`, with both rescales), draw the same mask after the same
//! `manual_seed`. One test in a binary of its own: libtorch's CPU generator is global, so any
//! other test thread drawing between the seed and the draw would change the mask.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use tch_peft::lora::TaskMerge;
use tch_peft::merge::{merge_tensor, GlobalParams, MergeMethod, ModelParams};

#[test]
fn dare_masks_repeat_under_the_same_seed() {
    // PEFT's DARE: same seed, same merged tensor
    let t = Tensor::ones([200, 50], (Kind::Double, Device::Cpu));
    tch::manual_seed(11);
    let merged =
        TaskMerge::DareLinear { density: 0.3 }.merge(&[t.shallow_clone()], &[1.0]).unwrap();
    tch::manual_seed(11);
    let again = TaskMerge::DareLinear { density: 0.3 }.merge(&[t], &[1.0]).unwrap();
    assert!(bit_equal(&merged, &again), "seeded");

    // mergekit's DARE: same seed, same mask, with the L1 rescale and the paper's 1/density
    let base = Tensor::zeros([400, 50], (Kind::Float, Device::Cpu));
    let a = randn(&[400, 50], Kind::Float);
    let p = ModelParams { weight: 1.0, density: 0.3, ..Default::default() };
    let g = GlobalParams::default();
    tch::manual_seed(5);
    let m = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &g).unwrap();
    let mask = m.ne(0.0);
    tch::manual_seed(5);
    let again = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &g).unwrap();
    assert!(bit_equal(&m, &again));
    tch::manual_seed(5);
    let gi = GlobalParams { inverse_density: true, ..g };
    let inv = merge_tensor(MergeMethod::DareLinear, Some(&base), &[(&a, p)], &gi).unwrap();
    assert!(bit_equal(&inv.ne(0.0), &mask), "same seed, same mask");
    let expected = a.masked_select(&mask) / 0.3;
    assert!(max_abs_diff(&inv.masked_select(&mask), &expected) < 1e-6);
}
