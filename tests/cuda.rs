//! LoRA on a CUDA device: the fused node against the composed ops, bf16 merge/unmerge, and
//! save/load from device tensors. Needs a GPU:
//!
//! ```text
//! scripts/with-torch cargo test --features cuda-tests --test cuda
//! ```
#![cfg(feature = "cuda-tests")]

mod common;

use common::*;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{
    custom_cuda_kernels_available, set_custom_cuda_kernels, LoraBias, LoraBuilder, LoraConfig,
    LoraLinear,
};
use tch_peft::Adapter;

fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "the cuda-tests feature needs a CUDA device");
    Device::Cuda(0)
}

/// The test that switches the custom kernels off and on (a process-wide setting) runs alone.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

/// The exclusive lock; the custom kernels are switched back on when it is dropped.
struct Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>);

impl Alone {
    fn new() -> Alone {
        Alone(EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        set_custom_cuda_kernels(true);
    }
}

fn layer(kind: Kind, vb: &mut nn::VarStore, va: &nn::VarStore) -> LoraLinear {
    layer_with(kind, vb, va, false)
}

fn layer_with(kind: Kind, vb: &mut nn::VarStore, va: &nn::VarStore, dora: bool) -> LoraLinear {
    let base = nn::linear(vb.root() / "proj", 256, 192, Default::default());
    vb.set_kind(kind);
    // DoRA also trains a copy of the bias (its gradient comes from the fused reduction)
    let bias = if dora { LoraBias::LoraOnly } else { LoraBias::None };
    let cfg = LoraConfig { r: 16, lora_alpha: 32.0, use_dora: dora, bias, ..Default::default() };
    let l = LoraLinear::new(base, &(va.root() / "proj"), &cfg).unwrap();
    tch::no_grad(|| {
        let mut b = l.lora_b().shallow_clone();
        let _ = b.normal_(0.0, 0.05);
    });
    l
}

/// `x Wᵀ + b + s·(x Aᵀ) Bᵀ` in f64, on the layer's device.
fn lora_formula_f64(l: &LoraLinear, x: &Tensor) -> Tensor {
    let f = |t: &Tensor| t.to_kind(Kind::Double);
    let y = f(x).matmul(&f(&l.base().dense().unwrap().ws).tr())
        + f(x).matmul(&f(l.lora_a()).tr()).matmul(&f(l.lora_b()).tr()) * l.scaling();
    match &l.base().dense().unwrap().bs {
        Some(b) => y + f(b),
        None => y,
    }
}

/// The output, then the gradients to x and every trained tensor (see
/// `common::fused_and_composed`), for the fused node and for the composed ops.
fn fwd_bwd_both(l: &LoraLinear, x: &Tensor, g: &Tensor) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut runs = fused_and_composed(l, x, g).into_iter().map(|(y, mut grads)| {
        grads.insert(0, y.detach());
        grads
    });
    (runs.next().expect("fused"), runs.next().expect("composed"))
}

#[test]
fn fused_node_matches_composed_ops_on_cuda_in_f32_and_bf16() {
    let _lock = shared();
    let dev = cuda();
    for (kind, tol, dora) in [
        (Kind::Float, 1e-4, false),
        (Kind::BFloat16, 2e-2, false),
        (Kind::Float, 1e-4, true),
        (Kind::BFloat16, 2e-2, true),
    ] {
        tch::manual_seed(0);
        let (mut vb, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
        let l = layer_with(kind, &mut vb, &va, dora);
        assert_eq!(l.lora_a().device(), dev);
        let x = Tensor::randn([4, 33, 256], (kind, dev));
        let g = Tensor::randn([4, 33, 192], (kind, dev));
        let (fused, composed) = fwd_bwd_both(&l, &x, &g);
        for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
            assert_eq!(f.device(), dev);
            let rel = rel_diff(f, c);
            assert!(rel < tol, "{kind:?} dora={dora} output/gradient {i}: relative {rel}");
        }
        // and the f32 path against an f64 recomputation
        if kind == Kind::Float && !dora {
            let expected = lora_formula_f64(&l, &x);
            assert!(max_abs_diff(&fused[0].to_kind(Kind::Double), &expected) < 1e-3);
        }
    }
}

#[test]
fn bf16_merge_unmerge_is_bit_exact_on_cuda() {
    let _lock = shared();
    let dev = cuda();
    tch::manual_seed(1);
    let (mut vb, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
    let l = layer(Kind::BFloat16, &mut vb, &va);
    let original = l.base().dense().unwrap().ws.copy();
    let x = Tensor::randn([8, 256], (Kind::BFloat16, dev));
    let unmerged = l.forward_t(&x, false);
    for _ in 0..20 {
        l.safe_merge().unwrap();
        let merged = l.forward_t(&x, false);
        let rel = max_abs_diff(&merged, &unmerged) / unmerged.abs().max().double_value(&[]);
        assert!(rel < 2e-2, "merged output within bf16 precision: {rel}");
        l.unmerge().unwrap();
    }
    assert!(bit_equal(&l.base().dense().unwrap().ws, &original));
}

#[test]
fn adapter_saved_from_cuda_reloads_into_a_cpu_model() {
    let _lock = shared();
    let dev = cuda();
    tch::manual_seed(2);
    let dir = temp_dir("cuda-roundtrip");
    let build = |device: Device| {
        let (vb, va) = (nn::VarStore::new(device), nn::VarStore::new(device));
        let builder = LoraBuilder::new(&va.root(), LoraConfig::for_targets(["q"])).unwrap();
        let q = builder.linear(&(vb.root() / "q"), 32, 32, Default::default()).unwrap();
        let adapter = builder.finish().unwrap();
        (vb, va, q, adapter)
    };
    let (vb_gpu, _va_gpu, q_gpu, adapter_gpu) = build(dev);
    tch::no_grad(|| {
        let mut b = adapter_gpu.layers()[0].lora_b().shallow_clone();
        let _ = b.normal_(0.0, 0.1);
    });
    adapter_gpu.save_pretrained(&dir).unwrap();
    let (mut vb_cpu, _va_cpu, q_cpu, adapter_cpu) = build(Device::Cpu);
    vb_cpu.copy(&vb_gpu).unwrap();
    adapter_cpu.load_pretrained(&dir).unwrap();
    let x = Tensor::randn([5, 32], (Kind::Float, Device::Cpu));
    let y_gpu = q_gpu.forward_t(&x.to_device(dev), false).to_device(Device::Cpu);
    assert!(max_abs_diff(&y_gpu, &q_cpu.forward_t(&x, false)) < 1e-5);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn dora_row_norm_of_a_bf16_weight_is_f32_accurate_on_cuda() {
    let _lock = shared();
    // the norm reads the bf16 weight once, with A split into a bf16 head and tail
    let d = cuda();
    tch::manual_seed(2);
    let mut vb = nn::VarStore::new(d);
    let va = nn::VarStore::new(d);
    let base = nn::linear(vb.root() / "proj", 512, 384, Default::default());
    vb.set_kind(Kind::BFloat16);
    let cfg = LoraConfig { r: 16, lora_alpha: 32.0, use_dora: true, ..Default::default() };
    let l = LoraLinear::new(base, &(va.root() / "proj"), &cfg).unwrap();
    tch::no_grad(|| {
        let _ = l.lora_b().shallow_clone().normal_(0.0, 0.05);
    });
    l.init_from_base_weights().unwrap();
    // exact: W + s·BA in f64
    let w = l.base().dense().unwrap().ws.to_kind(Kind::Double);
    let delta = l.lora_b().to_kind(Kind::Double).matmul(&l.lora_a().to_kind(Kind::Double));
    let exact = (w + delta * l.scaling()).square().sum_dim_intlist(1, false, Kind::Double).sqrt();
    let m = l.magnitude().unwrap().to_kind(Kind::Double);
    let rel = ((m - &exact).abs() / &exact).max().double_value(&[]);
    assert!(rel < 1e-5, "relative error of the bf16 row norm: {rel}");
}

#[test]
fn shared_input_group_matches_separate_layers_on_cuda() {
    // LoRA and DoRA groups; DoRA over three rounds, the parameters moved in place between them
    // (the cached ‖W_i‖² and casts must follow)
    let _lock = shared();
    let dev = cuda();
    for (kind, dora) in
        [(Kind::Float, false), (Kind::BFloat16, false), (Kind::Float, true), (Kind::BFloat16, true)]
    {
        tch::manual_seed(5);
        let (mut vb, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
        let cfg = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            use_dora: dora,
            ..LoraConfig::for_targets(["q", "k", "v"])
        };
        let builder = LoraBuilder::new(&va.root(), cfg).unwrap();
        let layers: Vec<_> = [("q", 256), ("k", 64), ("v", 64)]
            .iter()
            .map(|(n, o)| builder.linear(&(vb.root() / *n), 256, *o, Default::default()).unwrap())
            .collect();
        vb.set_kind(kind);
        let adapter = builder.finish().unwrap();
        adapter.init_from_base_weights().unwrap();
        tch::no_grad(|| {
            for l in adapter.layers() {
                let _ = l.lora_b().shallow_clone().normal_(0.0, 0.05);
            }
        });
        let trained: Vec<Tensor> =
            adapter.layers().iter().flat_map(|l| l.named_tensors()).map(|(_, t)| t).collect();
        let x = Tensor::randn([4, 33, 256], (kind, dev));
        let gs: Vec<Tensor> =
            [256, 64, 64].iter().map(|o| Tensor::randn([4, 33, *o], (kind, dev))).collect();
        let run = |shared: bool| {
            let xg = x.detach().set_requires_grad(true);
            let refs: Vec<_> = layers.iter().collect();
            let ys = if shared {
                tch_peft::lora::forward_shared(&refs, &xg, true).unwrap()
            } else {
                refs.iter().map(|l| l.f_forward_t(&xg, true).unwrap()).collect()
            };
            let loss = ys.iter().zip(&gs).map(|(y, g)| (y * g).sum(Kind::Float)).sum::<Tensor>();
            let params: Vec<&Tensor> = std::iter::once(&xg).chain(&trained).collect();
            let mut out = Tensor::run_backward(&[loss], &params, false, false);
            out.extend(ys.into_iter().map(|y| y.detach()));
            out
        };
        for round in 0..if dora { 3 } else { 1 } {
            let (shared, separate) = (run(true), run(false));
            let tol = if kind == Kind::Float { 1e-4 } else { 2e-2 };
            for (i, (s, p)) in shared.iter().zip(&separate).enumerate() {
                let rel = rel_diff(s, p);
                assert!(
                    rel < tol,
                    "{kind:?} dora={dora} round {round} tensor {i}: relative difference {rel}"
                );
            }
            // the parameters move in place between rounds, as under an optimizer
            tch::no_grad(|| {
                for t in &trained {
                    let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.01));
                }
            });
        }
    }
}

#[test]
fn dora_steps_follow_in_place_updates_and_pending_backwards() {
    let _lock = shared();
    // every step must see the parameters as the optimizer left them (in place: same addresses),
    // and two forwards before one backward must each keep their own saved tensors
    let dev = cuda();
    tch::manual_seed(6);
    let (mut vb, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
    let l = layer_with(Kind::BFloat16, &mut vb, &va, true);
    let params: Vec<Tensor> = l.named_tensors().into_iter().map(|(_, t)| t).collect();
    let x = Tensor::randn([4, 33, 256], (Kind::BFloat16, dev));
    let g = Tensor::randn([4, 33, 192], (Kind::BFloat16, dev));
    for step in 0..5 {
        let (fused, composed) = fwd_bwd_both(&l, &x, &g);
        for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
            assert!(rel_diff(f, c) < 2e-2, "step {step}, tensor {i}: relative {}", rel_diff(f, c));
        }
        tch::no_grad(|| {
            for p in &params {
                let _ = p.shallow_clone().g_add_(&(p.randn_like() * 0.02));
            }
        });
    }
    // two forwards before one backward
    l.set_fused(true);
    let x2 = Tensor::randn([4, 33, 256], (Kind::BFloat16, dev));
    let run = |fused: bool| {
        l.set_fused(fused);
        let (y1, y2) = (l.forward_t(&x, true), l.forward_t(&x2, true));
        let loss = (&y1 * &g).sum(Kind::Float) + (&y2 * &g).sum(Kind::Float);
        let refs: Vec<&Tensor> = params.iter().collect();
        let mut out = Tensor::run_backward(&[loss], &refs, false, false);
        out.extend([y1.detach(), y2.detach()]);
        out
    };
    let (fused, composed) = (run(true), run(false));
    for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
        assert!(rel_diff(f, c) < 2e-2, "pending backward, tensor {i}: relative {}", rel_diff(f, c));
    }
}

#[test]
fn dora_custom_kernels_match_the_libtorch_ops_on_cuda() {
    // the same layer, input and output gradient with the kernels and with libtorch's ops: the
    // scale G differs in its last f32 bits (another summation order), which can move bf16(G)
    // and so W_g by one bf16 step in a row; everything else is the same computation
    let _alone = Alone::new();
    let dev = cuda();
    assert!(custom_cuda_kernels_available(), "NVRTC kernels should load on this GPU");
    // (rows, base bias, trained bias): the reduction's chunking for few and many rows, with and
    // without the bias and its gradient
    for (rows, base_bias, trained_bias) in
        [(132, true, true), (7, true, false), (3001, false, false), (4096, true, true)]
    {
        tch::manual_seed(11);
        let vb = nn::VarStore::new(dev);
        let va = nn::VarStore::new(dev);
        let lin = nn::LinearConfig { bias: base_bias, ..Default::default() };
        let base = nn::linear(vb.root() / "proj", 256, 192, lin);
        let mut vb = vb;
        vb.set_kind(Kind::BFloat16);
        let bias = if trained_bias { LoraBias::LoraOnly } else { LoraBias::None };
        let cfg =
            LoraConfig { r: 16, lora_alpha: 32.0, use_dora: true, bias, ..Default::default() };
        let l = LoraLinear::new(base, &(va.root() / "proj"), &cfg).unwrap();
        // a B large enough for the low-rank part to weigh in the norm
        tch::no_grad(|| {
            let _ = l.lora_b().shallow_clone().normal_(0.0, 0.3);
        });
        let x = Tensor::randn([rows, 256], (Kind::BFloat16, dev));
        let g = Tensor::randn([rows, 192], (Kind::BFloat16, dev));
        let names: Vec<String> = l.named_tensors().into_iter().map(|(n, _)| n).collect();
        set_custom_cuda_kernels(true);
        let (y_k, grads_k) = output_and_grads(&l, &x, &g);
        set_custom_cuda_kernels(false);
        let (y_a, grads_a) = output_and_grads(&l, &x, &g);
        set_custom_cuda_kernels(true);
        let rel = rel_diff(&y_k, &y_a);
        assert!(rel < 2e-3, "rows {rows}: output relative {rel}");
        // and the kernel path against the formula in f64,
        // m/‖W + s·BA‖_row ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias, within the bf16 roundings of the
        // forward (W_g, B_g, x Aᵀ, the output: ~0.6 % here); with this B the low-rank part
        // dominates the norm, so an error there would be far larger
        let f = |t: &Tensor| t.to_kind(Kind::Double);
        let w = f(&l.base().dense().unwrap().ws);
        let ba = f(l.lora_b()).matmul(&f(l.lora_a())) * l.scaling();
        let scale = f(l.magnitude().unwrap())
            / (&w + &ba).square().sum_dim_intlist(1, false, Kind::Double).sqrt();
        let mut expected = f(&x).matmul(&(&w + &ba).tr()) * scale;
        if let Some(b) = l.named_tensors().iter().find(|(n, _)| n.ends_with("bias")) {
            expected += f(&b.1);
        } else if let Some(b) = &l.base().dense().unwrap().bs {
            expected += f(b);
        }
        let rel = rel_diff(&f(&y_k), &expected);
        assert!(rel < 1e-2, "rows {rows}: output against f64, relative {rel}");
        let labels = std::iter::once("x".to_string()).chain(names);
        for ((name, k), a) in labels.zip(&grads_k).zip(&grads_a) {
            let rel = rel_diff(k, a);
            assert!(rel < 5e-3, "rows {rows}, {name}: relative {rel}");
        }
    }
}

#[test]
fn dora_kernels_run_from_threads_that_did_no_cuda_work_yet() {
    // such a thread has no current CUDA context: the kernels must load and launch there too
    let _lock = shared();
    let dev = cuda();
    let fresh = std::thread::spawn(custom_cuda_kernels_available).join().unwrap();
    assert!(fresh, "kernels from a fresh thread");
    std::thread::spawn(move || {
        tch::manual_seed(12);
        let (mut vb, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
        let l = layer_with(Kind::BFloat16, &mut vb, &va, true);
        let x = Tensor::randn([64, 256], (Kind::BFloat16, dev));
        let g = Tensor::randn([64, 192], (Kind::BFloat16, dev));
        let (fused, composed) = fwd_bwd_both(&l, &x, &g);
        for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
            assert!(rel_diff(f, c) < 2e-2, "tensor {i}: relative {}", rel_diff(f, c));
        }
    })
    .join()
    .unwrap();
}

#[test]
fn lora_group_kernel_matches_cublas_and_the_f64_formula() {
    // a group's thin products s·(x Aᵀ) Bᵀ (+ bias), written by the NVRTC kernel (one launch per
    // eight layers) before the base GEMMs accumulate into them, against cuBLAS's GEMMs and
    // against f64: ranks 8–32, outputs that are not a multiple of the kernel's 128-column tile,
    // row counts around its 64–256-row blocks, more layers than one launch takes, with and without
    // biases, in inference and in training (gradients too)
    let _alone = Alone::new();
    let dev = cuda();
    assert!(custom_cuda_kernels_available(), "NVRTC kernels should load on this GPU");
    // (rows, [(out, r, base bias)], kernel launches per forward)
    type Layers = Vec<(i64, i64, bool)>;
    let cases: Vec<(i64, Layers, u64)> = vec![
        (131, vec![(264, 16, true), (64, 16, false), (64, 16, false)], 1),
        (1, vec![(8, 8, true), (1000, 24, false)], 1),
        (300, vec![(136, 32, true), (520, 8, false)], 1),
        (129, (0..10).map(|i| (64 + 8 * i, 16, i % 2 == 0)).collect(), 2),
        // enough blocks for 256 rows per block (the others take 64 or 128), a partial last one
        (4100, vec![(4096, 16, true), (1024, 32, false)], 1),
        // an output width that is not a multiple of 8, and a rank above 32: cuBLAS for the group
        (50, vec![(100, 16, true), (64, 16, false)], 0),
        (50, vec![(64, 48, true), (64, 16, false)], 0),
    ];
    for (rows, specs, launches) in &cases {
        tch::manual_seed(13);
        let (mut vb, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
        let mut layers = Vec::new();
        let mut adapters = Vec::new();
        for (i, (o, r, bias)) in specs.iter().enumerate() {
            let name = format!("l{i}");
            let cfg =
                LoraConfig { r: *r, lora_alpha: 24.0, ..LoraConfig::for_targets([name.as_str()]) };
            let builder = LoraBuilder::new(&(va.root() / name.as_str()), cfg).unwrap();
            let lin = nn::LinearConfig { bias: *bias, ..Default::default() };
            layers.push(builder.linear(&(vb.root() / name.as_str()), 256, *o, lin).unwrap());
            adapters.push(builder.finish().unwrap());
        }
        vb.set_kind(Kind::BFloat16);
        let handles: Vec<LoraLinear> = adapters.iter().flat_map(|a| a.layers()).collect();
        tch::no_grad(|| {
            for l in &handles {
                let _ = l.lora_b().shallow_clone().normal_(0.0, 0.05);
            }
        });
        let trained: Vec<Tensor> =
            handles.iter().flat_map(|l| l.named_tensors()).map(|(_, t)| t).collect();
        let x = Tensor::randn([*rows, 256], (Kind::BFloat16, dev));
        let gs: Vec<Tensor> = specs
            .iter()
            .map(|(o, _, _)| Tensor::randn([*rows, *o], (Kind::BFloat16, dev)))
            .collect();
        let refs: Vec<_> = layers.iter().collect();
        // outputs (then, training, the gradients to x and every trained tensor) and the number
        // of kernel launches
        let run = |kernels: bool, train: bool| {
            set_custom_cuda_kernels(kernels);
            let xg = x.detach().set_requires_grad(train);
            let (ys, profile) = tch_peft::profiler::profile_device(|| {
                let ys = if train {
                    tch_peft::lora::forward_shared(&refs, &xg, true).unwrap()
                } else {
                    tch::no_grad(|| tch_peft::lora::forward_shared(&refs, &xg, false).unwrap())
                };
                tch::Cuda::synchronize(0);
                ys
            })
            .unwrap();
            let ran: u64 = profile
                .kernels
                .iter()
                .filter(|k| k.name.contains("lora_up"))
                .map(|k| k.count)
                .sum();
            let mut out: Vec<Tensor> = ys.iter().map(|y| y.detach()).collect();
            if train {
                let loss =
                    ys.iter().zip(&gs).map(|(y, g)| (y * g).sum(Kind::Float)).sum::<Tensor>();
                let params: Vec<&Tensor> = std::iter::once(&xg).chain(&trained).collect();
                out.extend(Tensor::run_backward(&[loss], &params, false, false));
            }
            (out, ran)
        };
        for train in [false, true] {
            let ((with, ran), (without, none)) = (run(true, train), run(false, train));
            assert_eq!(ran, *launches, "rows {rows} train {train}: kernel launches");
            assert_eq!(none, 0, "kernels switched off");
            for (i, (k, c)) in with.iter().zip(&without).enumerate() {
                let rel = rel_diff(k, c);
                assert!(rel < 2e-3, "rows {rows} train {train} tensor {i}: relative {rel}");
            }
            // within the bf16 roundings of the forward
            for (i, l) in handles.iter().enumerate() {
                let rel = rel_diff(&with[i].to_kind(Kind::Double), &lora_formula_f64(l, &x));
                assert!(rel < 1e-2, "rows {rows} train {train} layer {i}: against f64 {rel}");
            }
        }
    }
}

/// `f` on bf16 copies of `inputs` (requiring grad) and the gradients for upstream `g`.
fn bf16_grads(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    g: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let xs: Vec<Tensor> =
        inputs.iter().map(|t| t.to_kind(Kind::BFloat16).detach().set_requires_grad(true)).collect();
    let y = f(&xs);
    (&y * g.to_kind(Kind::BFloat16)).sum(Kind::Float).backward();
    (y.detach(), xs.iter().map(Tensor::grad).collect())
}

/// The fused op (`fused`) against the composed bf16 ops and the composed f32 ops: its output
/// and gradients are within a few bf16 steps of the composed bf16 ones and no further from the
/// f32 ones than those are (plus a bf16 step).
fn check_fused(
    what: &str,
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    g: &Tensor,
) {
    let (y_k, g_k) = bf16_grads(fused, inputs, g);
    let (y_c, g_c) = bf16_grads(composed, inputs, g);
    let xs: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_kind(Kind::BFloat16).to_kind(Kind::Float).set_requires_grad(true))
        .collect();
    let y_f = composed(&xs);
    (&y_f * g.to_kind(Kind::BFloat16).to_kind(Kind::Float)).sum(Kind::Float).backward();
    let g_f: Vec<Tensor> = xs.iter().map(Tensor::grad).collect();
    let y_f = y_f.detach();
    let outs = std::iter::once((&y_k, &y_c, &y_f))
        .chain(g_k.iter().zip(&g_c).zip(&g_f).map(|((k, c), f)| (k, c, f)));
    for (i, (k, c, f)) in outs.enumerate() {
        assert_eq!(k.kind(), Kind::BFloat16, "{what} #{i}");
        let vs_composed = rel_diff(k, c);
        let (k_f32, c_f32) = (rel_diff(k, f), rel_diff(c, f));
        assert!(vs_composed < 2e-2, "{what} #{i}: relative to composed bf16 {vs_composed}");
        assert!(k_f32 <= c_f32 * 1.5 + 4e-3, "{what} #{i}: vs f32 {k_f32} (composed {c_f32})");
    }
}

#[test]
fn fused_model_ops_match_the_composed_ops_in_bf16_on_cuda() {
    use tch_peft::ops;
    let _g = shared();
    let dev = cuda();
    assert!(custom_cuda_kernels_available(), "NVRTC kernels should load on this GPU");
    tch::manual_seed(5);
    // RMSNorm: one, two and four vectors per thread, a partial last vector group, and a width
    // the kernel does not take (composed fallback)
    for h in [2048, 264, 4096, 8192, 12] {
        let x = Tensor::randn([3, 67, h], (Kind::Float, dev)) * 3.0;
        let w = Tensor::randn([h], (Kind::Float, dev));
        let g = Tensor::randn([3, 67, h], (Kind::Float, dev));
        check_fused(
            &format!("rms_norm h {h}"),
            &|t| ops::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            &|t| ops::rms_norm_composed(&t[0], &t[1], 1e-6).unwrap(),
            &[&x, &w],
            &g,
        );
    }
    // the residual add fused in: s and its norm side by side (both outputs' gradients)
    for h in [2048, 4096, 12] {
        let x = Tensor::randn([2, 45, h], (Kind::Float, dev)) * 2.0;
        let r = Tensor::randn([2, 45, h], (Kind::Float, dev));
        let w = Tensor::randn([h], (Kind::Float, dev));
        let g = Tensor::randn([2, 45, 2 * h], (Kind::Float, dev));
        let pair = |t: &[Tensor]| {
            let (s, n) = ops::add_rms_norm(&t[0], &t[1], &t[2], 1e-6).unwrap();
            Tensor::cat(&[s, n], -1)
        };
        let apart = |t: &[Tensor]| {
            let s = &t[0] + &t[1];
            let n = ops::rms_norm_composed(&s, &t[2], 1e-6).unwrap();
            Tensor::cat(&[s, n], -1)
        };
        check_fused(&format!("add_rms_norm h {h}"), &pair, &apart, &[&x, &r, &w], &g);
    }
    for (rows, width) in [(1000, 8192), (3, 24), (5, 12)] {
        let gate = Tensor::randn([rows, width], (Kind::Float, dev)) * 4.0;
        let up = Tensor::randn([rows, width], (Kind::Float, dev));
        let g = Tensor::randn([rows, width], (Kind::Float, dev));
        check_fused(
            &format!("swiglu {rows}x{width}"),
            &|t| ops::swiglu(&t[0], &t[1]).unwrap(),
            &|t| ops::swiglu_composed(&t[0], &t[1]).unwrap(),
            &[&gate, &up],
            &g,
        );
    }
    for d in [64, 128, 16] {
        let (b, s, hq, hk) = (2, 37, 4, 2);
        let (cos, sin) = ops::rotary_tables(s, d, 10_000.0, Kind::BFloat16, dev).unwrap();
        let q = Tensor::randn([b, s, hq, d], (Kind::Float, dev));
        let k = Tensor::randn([b, s, hk, d], (Kind::Float, dev));
        let gq = Tensor::randn([b, s, hq, d], (Kind::Float, dev));
        let (c, sn) = (cos.shallow_clone(), sin.shallow_clone());
        let (c32, s32) = (cos.to_kind(Kind::Float), sin.to_kind(Kind::Float));
        let composed = |t: &[Tensor]| {
            let (c, s) = if t[0].kind() == Kind::Float { (&c32, &s32) } else { (&c, &sn) };
            let q = ops::apply_rotary_composed(&t[0], c, s).unwrap();
            let k = ops::apply_rotary_composed(&t[1], c, s).unwrap();
            // one output: q and k side by side (k's gradient through the same upstream tensor)
            Tensor::cat(&[q, k.repeat([1, 1, 2, 1])], 2)
        };
        let fused = |t: &[Tensor]| {
            let (q, k) = ops::apply_rotary(&t[0], Some(&t[1]), &c, &sn).unwrap();
            Tensor::cat(&[q, k.unwrap().repeat([1, 1, 2, 1])], 2)
        };
        let g = Tensor::cat(&[&gq, &gq], 2);
        check_fused(&format!("rope d {d}"), &fused, &composed, &[&q, &k], &g);
        // q alone, and k's output unused (its gradient materialised as zeros)
        let (yq, _) = ops::apply_rotary(&q.to_kind(Kind::BFloat16), None, &c, &sn).unwrap();
        let want = ops::apply_rotary_composed(&q.to_kind(Kind::BFloat16), &c, &sn).unwrap();
        assert!(rel_diff(&yq, &want) < 2e-2, "rope q alone, d {d}");
        let (qb, kb) = (
            q.to_kind(Kind::BFloat16).set_requires_grad(true),
            k.to_kind(Kind::BFloat16).set_requires_grad(true),
        );
        let (yq, _yk) = ops::apply_rotary(&qb, Some(&kb), &c, &sn).unwrap();
        yq.sum(Kind::Float).backward();
        let kg = kb.grad();
        assert!(!kg.defined() || kg.abs().max().double_value(&[]) == 0.0, "k unused, d {d}");
    }
}

/// The small bf16-testable Llama of the model-level CUDA tests (GQA, tied embeddings).
fn tiny_llama() -> tch_peft::models::LlamaConfig {
    tch_peft::models::LlamaConfig {
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        tie_word_embeddings: true,
        ..Default::default()
    }
}

#[test]
fn lora_nodes_replaying_their_inputs_give_the_same_gradients_with_less_memory_on_cuda() {
    // LoRA on every linear layer of a bf16 Llama: with recomputation the q/k/v, gate/up and
    // down nodes replay the norm and SwiGLU kernels instead of keeping their inputs; the
    // gradients must be the same bits and the memory held between forward and backward smaller
    // by those inputs
    use tch_peft::models::llama::Llama;
    let _alone = Alone::new();
    let dev = cuda();
    let cfg = tiny_llama();
    tch::manual_seed(4);
    let (mut vs, va) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let builder = LoraBuilder::new(
        &va.root(),
        LoraConfig { r: 8, lora_alpha: 16.0, ..LoraConfig::for_targets(targets) },
    )
    .unwrap();
    let model = Llama::new(&vs.root(), &cfg, Some(&builder)).unwrap();
    let adapter = builder.finish().unwrap();
    tch::no_grad(|| {
        for l in adapter.layers() {
            let _ = l.lora_b().shallow_clone().normal_(0.0, 0.05);
        }
    });
    vs.set_kind(Kind::BFloat16);
    vs.freeze();
    let (b, s) = (2, 64);
    let ids = Tensor::randint(cfg.vocab_size, [b, s], (Kind::Int64, dev));
    // recomputation back on however the test ends
    struct RecomputeOn;
    impl Drop for RecomputeOn {
        fn drop(&mut self) {
            tch_peft::ops::set_recompute(true);
        }
    }
    let _on = RecomputeOn;
    let run = |recompute: bool| {
        tch_peft::ops::set_recompute(recompute);
        for t in va.trainable_variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::Cuda::synchronize(0);
        let before = tch_peft::memory::current_bytes(dev).unwrap();
        let h = model.hidden_states(&ids, None, true, None).unwrap();
        let loss = model.causal_lm_loss(&h, &ids, true).unwrap();
        tch::Cuda::synchronize(0);
        let held = tch_peft::memory::current_bytes(dev).unwrap() - before;
        loss.backward();
        let mut grads: Vec<(String, Tensor)> =
            va.variables().into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (loss.double_value(&[]), grads, held)
    };
    let (loss_r, grads_r, held_r) = run(true);
    let (loss_k, grads_k, held_k) = run(false);
    assert_eq!(loss_r, loss_k);
    assert_eq!(grads_r.len(), 2 * 7 * 2);
    for ((name, r), (_, k)) in grads_r.iter().zip(&grads_k) {
        assert!(r.abs().max().double_value(&[]) > 0.0, "{name}: no gradient");
        assert!(r.equal(k), "{name}: recomputed gradient differs (relative {})", rel_diff(r, k));
    }
    // bf16, per layer: the two norm outputs [b·s, hidden] and the SwiGLU output
    // [b·s, intermediate], less the first norm's (its input, the frozen embeddings, is kept
    // instead: no norm node holds it)
    let per_layer = 2 * cfg.hidden_size + cfg.intermediate_size;
    let inputs = 2 * (b * s) as u64 * (cfg.num_hidden_layers * per_layer - cfg.hidden_size) as u64;
    let saved = held_k.saturating_sub(held_r);
    assert!(
        saved >= inputs,
        "held {held_k} B keeping the inputs, {held_r} B replaying them: {saved} B less, want ≥ {inputs}"
    );
}

#[test]
fn bf16_llama_step_with_fused_ops_matches_the_composed_step_on_cuda() {
    use tch_peft::models::llama::Llama;
    let _alone = Alone::new();
    let dev = cuda();
    let cfg = tiny_llama();
    tch::manual_seed(3);
    let mut vs = nn::VarStore::new(dev);
    let model = Llama::new(&vs.root(), &cfg, None).unwrap();
    tch::no_grad(|| {
        for (name, t) in vs.variables() {
            if name.ends_with("layernorm.weight") || name.ends_with("norm.weight") {
                let _ = t.shallow_clone().uniform_(0.5, 1.5);
            } else {
                let _ = t.shallow_clone().normal_(0.0, 0.05);
            }
        }
    });
    vs.set_kind(Kind::BFloat16);
    let ids = Tensor::randint(cfg.vocab_size, [2, 48], (Kind::Int64, dev));
    let run = |kernels: bool| {
        set_custom_cuda_kernels(kernels);
        for t in vs.trainable_variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let h = model.hidden_states(&ids, None, true, None).unwrap();
        let loss = model.causal_lm_loss(&h, &ids, true).unwrap();
        loss.backward();
        let mut grads: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (loss.double_value(&[]), grads)
    };
    let (loss_k, grads_k) = run(true);
    let (loss_c, grads_c) = run(false);
    set_custom_cuda_kernels(true);
    assert!((loss_k - loss_c).abs() < 1e-2 * loss_c.abs(), "loss {loss_k} vs {loss_c}");
    for ((name, k), (_, c)) in grads_k.iter().zip(&grads_c) {
        let rel = rel_diff(k, c);
        assert!(rel < 5e-2, "{name}: relative {rel}");
    }
}

#[test]
fn fused_linear_cross_entropy_kernel_matches_aten_and_f64_on_cuda() {
    // the bf16 head's softmax kernel (one pass over the bf16 logits, the gradient written over
    // them) and dW accumulated in f32 from bf16 GEMMs, against the ATen path (kernels off) and
    // against the f64 loss over the full logits: chunks with a partial last one, ignored rows,
    // an all-ignored chunk, with and without a bias (one with −∞ entries), the head trained or
    // frozen, the sum and the mean, and a vocabulary that is not a multiple of 8 (no kernel: the
    // ATen path)
    use tch_peft::ops::{linear_cross_entropy, linear_cross_entropy_composed};
    use tch_peft::ops::{LinearCrossEntropy, Reduction};
    let _alone = Alone::new();
    let dev = cuda();
    assert!(custom_cuda_kernels_available(), "NVRTC kernels should load on this GPU");
    tch::manual_seed(17);
    for (v, bias, train_w, reduction) in [
        (1000, false, true, Reduction::Mean),
        (4104, true, true, Reduction::Sum),
        (1000, true, false, Reduction::Mean),
        (1001, false, true, Reduction::Mean),
    ] {
        let (n, h) = (300, 64);
        let x = Tensor::randn([n, h], (Kind::Float, dev)) * 2.0;
        let w = Tensor::randn([v, h], (Kind::Float, dev)) * 0.2;
        let mut b = Tensor::randn([v], (Kind::Float, dev));
        let mut y = Tensor::randint(v, [n], (Kind::Int64, dev));
        if v == 4104 {
            // tokens masked by a −∞ bias, among the first logits each thread reads (never a
            // label: the loss would be infinite)
            let masked = Tensor::from_slice(&[0i64, 1, 5, 8, 2050]).to_device(dev);
            let _ = b.index_fill_(0, &masked, f64::NEG_INFINITY);
            y = y.clamp_min(2051);
        }
        // every third row ignored, and rows 64..128 (a whole chunk)
        let _ = y.index_fill_(0, &Tensor::arange_start_step(0, n, 3, (Kind::Int64, dev)), -100);
        let _ = y.narrow(0, 64, 64).fill_(-100);
        let opts = LinearCrossEntropy { reduction, chunk_rows: Some(64), ..Default::default() };
        let what = format!("v {v} bias {bias} train_w {train_w} {reduction:?}");
        let run = |kind: Kind, fused: bool| {
            let xs = x.to_kind(kind).set_requires_grad(true);
            let ws = w.to_kind(kind).set_requires_grad(train_w);
            let bs = b.to_kind(kind).set_requires_grad(true);
            let bias = bias.then_some(&bs);
            let loss = if fused {
                linear_cross_entropy(&xs, &ws, bias, &y, &opts).unwrap()
            } else {
                linear_cross_entropy_composed(&xs, &ws, bias, &y, &opts).unwrap()
            };
            loss.backward();
            let mut out = vec![loss.to_kind(Kind::Double), xs.grad()];
            if train_w {
                out.push(ws.grad());
            }
            if bias.is_some() {
                out.push(bs.grad());
            }
            out.iter().map(|t| t.to_kind(Kind::Double)).collect::<Vec<_>>()
        };
        set_custom_cuda_kernels(true);
        let kernel = run(Kind::BFloat16, true);
        set_custom_cuda_kernels(false);
        let aten = run(Kind::BFloat16, true);
        set_custom_cuda_kernels(true);
        // f64 inputs (the bf16-rounded ones), the softmax in f32 (the composed loss upcasts to f32)
        let exact = {
            let (xr, wr, br) = (
                x.to_kind(Kind::BFloat16).to_kind(Kind::Double),
                w.to_kind(Kind::BFloat16).to_kind(Kind::Double),
                b.to_kind(Kind::BFloat16).to_kind(Kind::Double),
            );
            let xs = xr.set_requires_grad(true);
            let ws = wr.set_requires_grad(train_w);
            let bs = br.set_requires_grad(true);
            let loss =
                linear_cross_entropy_composed(&xs, &ws, bias.then_some(&bs), &y, &opts).unwrap();
            loss.backward();
            let mut out = vec![loss.to_kind(Kind::Double), xs.grad()];
            if train_w {
                out.push(ws.grad());
            }
            if bias {
                out.push(bs.grad());
            }
            out
        };
        assert_eq!(kernel.len(), exact.len(), "{what}");
        for (i, ((k, a), e)) in kernel.iter().zip(&aten).zip(&exact).enumerate() {
            let (ke, ae) = (rel_diff(k, e), rel_diff(a, e));
            // the loss in f32 from bf16 logits; the gradients rounded to bf16 once (the kernel) or
            // after an f32 pass (ATen)
            let tol = if i == 0 { 1e-2 } else { 2e-2 };
            assert!(ke < tol, "{what} #{i}: kernel vs f64 {ke}");
            assert!(ke <= ae * 1.5 + 4e-3, "{what} #{i}: kernel {ke} vs ATen {ae} (against f64)");
        }
    }
}

#[test]
fn four_bit_dequantization_kernel_and_node_match_the_libtorch_ops_on_cuda() {
    use tch_peft::quant::{Bnb4bitWeight, QuantLinear, QuantType};
    let _alone = Alone::new();
    let dev = cuda();
    tch::manual_seed(6);
    for (q, nested, bs) in
        [(QuantType::Nf4, true, 64), (QuantType::Fp4, false, 128), (QuantType::Nf4, true, 32)]
    {
        let w = Tensor::randn([320, 192], (Kind::Float, Device::Cpu)) * 0.05;
        let cpu = Bnb4bitWeight::quantize(&w, q, bs, nested).unwrap();
        let want = cpu.dequantize_to(Kind::BFloat16).unwrap();
        let gpu = cpu.to_device(dev).unwrap();
        set_custom_cuda_kernels(true);
        let kernel = gpu.dequantize_to(Kind::BFloat16).unwrap();
        set_custom_cuda_kernels(false);
        let aten = gpu.dequantize_to(Kind::BFloat16).unwrap();
        set_custom_cuda_kernels(true);
        assert!(kernel.to_device(Device::Cpu).equal(&want), "{q:?} {bs}: kernel vs CPU");
        assert!(aten.to_device(Device::Cpu).equal(&want), "{q:?} {bs}: ATen on CUDA vs CPU");

        // the node: same forward, input gradient through deq(W), and no dense weight held
        let layer = QuantLinear::new(gpu, None).unwrap();
        let x = Tensor::randn([4, 64, 192], (Kind::BFloat16, dev));
        let run = |composed: bool| {
            let xg = x.detach().set_requires_grad(true);
            tch::Cuda::synchronize(0);
            let before = tch_peft::memory::current_bytes(dev).unwrap();
            let y = if composed { layer.f_forward_composed(&xg) } else { layer.f_forward(&xg) }
                .unwrap();
            tch::Cuda::synchronize(0);
            let held = tch_peft::memory::current_bytes(dev).unwrap() - before;
            y.sum(Kind::Float).backward();
            (y.detach(), xg.grad(), held)
        };
        let (y, dx, held) = run(false);
        let (y_ref, dx_ref, held_ref) = run(true);
        assert!(y.equal(&y_ref), "{q:?} {bs}: forward");
        assert!(rel_diff(&dx, &dx_ref) < 1e-2, "{q:?} {bs}: input gradient");
        let dense = 320 * 192 * 2;
        assert!(held + dense <= held_ref, "node holds {held} B, composed {held_ref} B");
    }
}

#[test]
fn qlora_on_cuda_matches_lora_on_the_dequantized_weight_and_the_gemv_matches_the_gemm() {
    use tch_peft::lora::{LoraConfig, LoraLinear};
    use tch_peft::quant::{Bnb4bitWeight, QuantLinear, QuantType};
    let _alone = Alone::new();
    let dev = cuda();
    tch::manual_seed(7);
    let w = Tensor::randn([320, 192], (Kind::BFloat16, dev)) * 0.05;
    let bias = Tensor::randn([320], (Kind::BFloat16, dev));
    let q = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true).unwrap();
    let layer = QuantLinear::new(q, Some(bias.copy())).unwrap();
    let dense = layer.dense_weight(Kind::BFloat16).unwrap();
    // the GEMV kernel (up to 8 rows) against dequantize-then-GEMM; the second shape has lanes
    // looping over several groups and an output count that is not a multiple of 8
    tch::no_grad(|| {
        for (out, inp) in [(320, 192), (333, 1024)] {
            let w = Tensor::randn([out, inp], (Kind::BFloat16, dev)) * 0.05;
            let b = Tensor::randn([out], (Kind::BFloat16, dev));
            let q = Bnb4bitWeight::quantize(&w, QuantType::Nf4, 64, true).unwrap();
            let l = QuantLinear::new(q, Some(b.copy())).unwrap();
            let dense = l.dense_weight(Kind::BFloat16).unwrap();
            for rows in [1, 3, 8, 9] {
                let x = Tensor::randn([rows, inp], (Kind::BFloat16, dev));
                let y = l.f_forward(&x).unwrap();
                let y_ref = x.matmul(&dense.tr()) + &b;
                let d = rel_diff(&y, &y_ref);
                assert!(d < 1e-2, "{out}x{inp}, rows {rows}: {d}");
            }
        }
    });
    // LoRA and DoRA on the 4-bit base against the float layer of its dequantized weight: 2 rows
    // take the GEMV in the group node's forward, 64 the GEMM
    for dora in [false, true] {
        for rows in [2i64, 64] {
            let cfg = LoraConfig { r: 8, lora_alpha: 16.0, use_dora: dora, ..Default::default() };
            let (va, vb) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
            let ql = LoraLinear::new(layer.share(), &(va.root() / "p"), &cfg).unwrap();
            let base = nn::Linear { ws: dense.copy(), bs: Some(bias.copy()) };
            let dl = LoraLinear::new(base, &(vb.root() / "p"), &cfg).unwrap();
            tch::no_grad(|| {
                let a = Tensor::randn(ql.lora_a().size(), (Kind::Float, dev));
                let b = Tensor::randn(ql.lora_b().size(), (Kind::Float, dev)) * 0.1;
                for l in [&ql, &dl] {
                    l.lora_a().shallow_clone().copy_(&a);
                    l.lora_b().shallow_clone().copy_(&b);
                }
            });
            let x = Tensor::randn([rows, 192], (Kind::BFloat16, dev));
            let g = Tensor::randn([rows, 320], (Kind::BFloat16, dev));
            let run = |l: &LoraLinear| {
                let xg = x.detach().set_requires_grad(true);
                let y = l.f_forward_t(&xg, true).unwrap();
                (&y * &g).sum(Kind::Float).backward();
                vec![y.detach(), xg.grad(), l.lora_a().grad(), l.lora_b().grad()]
            };
            let (got, want) = (run(&ql), run(&dl));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let d = rel_diff(a, b);
                assert!(d < 2e-2, "dora {dora} rows {rows}: #{i} off by {d}");
            }
        }
    }
}

/// Two LoRA layers (64 → 64 → 32) on CUDA and `steps` AdamW steps of a seeded batch, under DDP
/// over `group` when given: the adapters' values after them.
fn ddp_lora_on_cuda(
    group: Option<&tch_peft::dist::ProcessGroup>,
    options: tch_peft::dist::DdpOptions,
    steps: usize,
) -> Vec<(String, Tensor)> {
    use tch::nn::OptimizerConfig;
    use tch_peft::dist::DistributedDataParallel;
    let dev = cuda();
    let wave = |n: i64, f: f64| (Tensor::arange(n, (Kind::Float, dev)) * f).sin();
    let (base_vs, adapters) = (nn::VarStore::new(dev), nn::VarStore::new(dev));
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
    let up = LoraLinear::new(
        nn::linear(base_vs.root() / "up", 64, 64, Default::default()),
        &(adapters.root() / "up"),
        &cfg,
    )
    .unwrap();
    let down = LoraLinear::new(
        nn::linear(base_vs.root() / "down", 64, 32, Default::default()),
        &(adapters.root() / "down"),
        &cfg,
    )
    .unwrap();
    tch::no_grad(|| {
        let mut all: Vec<(String, Tensor)> = base_vs.variables().into_iter().collect();
        all.extend(adapters.variables());
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, (name, t)) in all.into_iter().enumerate() {
            if name.contains("lora_B") {
                continue;
            }
            let n = t.numel() as i64;
            t.shallow_clone()
                .copy_(&(wave(n, 0.3 + 0.1 * k as f64) * 0.2).view(t.size().as_slice()));
        }
    });
    let x = wave(16 * 64, 0.37).view([16, 64]);
    let y = wave(16 * 32, 0.91).view([16, 32]);
    let mut ddp =
        group.map(|g| DistributedDataParallel::from_var_store(g, &adapters, options).unwrap());
    let mut opt = nn::AdamW::default().build(&adapters, 1e-2).unwrap();
    for _ in 0..steps {
        let forward = || {
            let h = up.f_forward_t(&x, true).unwrap().tanh();
            (down.f_forward_t(&h, true).unwrap() - &y).square().mean(Kind::Float)
        };
        let loss = match ddp.as_mut() {
            Some(d) => {
                d.zero_grad();
                d.forward(forward).unwrap()
            }
            None => {
                opt.zero_grad();
                forward()
            }
        };
        loss.backward();
        opt.step();
    }
    if let Some(d) = &ddp {
        assert!(d.buckets_rebuilt() || steps < 2);
    }
    let mut v: Vec<(String, Tensor)> = adapters.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn nccl_group_of_one_reduces_on_the_gpu_and_ddp_trains_as_one_process() {
    use std::time::Duration;
    use tch_peft::dist::{DdpOptions, GradCompression, ProcessGroup, ReduceOp, Rendezvous};
    let _g = shared();
    let dev = cuda();
    assert!(tch_peft::dist::nccl_available(), "this build has no NCCL process group");
    let dir = std::env::temp_dir().join(format!("tch-peft-nccl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut group =
        ProcessGroup::new(Rendezvous::File(dir.join("store")), 0, 1, Duration::from_secs(60))
            .unwrap();
    // a CUDA tensor is refused before NCCL is added
    let a = Tensor::arange(1000, (Kind::Float, dev));
    assert!(matches!(
        group.all_reduce(&[&a], ReduceOp::Sum),
        Err(tch_peft::Error::DeviceMismatch { .. })
    ));
    group.add_nccl(0).unwrap();
    assert_eq!(group.device(), dev);
    assert!(group.add_nccl(0).is_err(), "NCCL added twice");
    // NCCL for CUDA tensors (several as one buffer), gloo for CPU ones, in the same group
    let b = Tensor::ones([3, 5], (Kind::Float, dev)) * 2.5;
    group.all_reduce(&[&a, &b], ReduceOp::Sum).unwrap();
    assert!(a.equal(&Tensor::arange(1000, (Kind::Float, dev))));
    group.all_reduce(&[&b], ReduceOp::Average).unwrap();
    assert!(b.equal(&(Tensor::ones([3, 5], (Kind::Float, dev)) * 2.5)));
    let h = Tensor::ones([4], (Kind::BFloat16, dev));
    group.broadcast(&[&h], 0).unwrap();
    assert!(h.equal(&Tensor::ones([4], (Kind::BFloat16, dev))));
    let c = Tensor::ones([4], (Kind::Float, Device::Cpu));
    group.all_reduce(&[&c], ReduceOp::Sum).unwrap();
    assert!(matches!(
        group.all_reduce(&[&a, &c], ReduceOp::Sum),
        Err(tch_peft::Error::DeviceMismatch { .. })
    ));
    group.barrier().unwrap();
    // DDP's Reducer on the GPU: at a world of one the gradients pass through unchanged
    let small = DdpOptions {
        bucket_cap_mb: 4096.0 / 1048576.0,
        first_bucket_cap_mb: 1024.0 / 1048576.0,
        ..Default::default()
    };
    let single = ddp_lora_on_cuda(None, small, 3);
    for (tag, o, tol) in [
        ("buckets", small, 0.0),
        ("view", DdpOptions { gradient_as_bucket_view: true, ..small }, 0.0),
        ("static", DdpOptions { static_graph: true, ..small }, 0.0),
        ("bf16", DdpOptions { compression: GradCompression::Bf16, ..small }, 5e-3),
    ] {
        let v = ddp_lora_on_cuda(Some(&group), o, 3);
        for ((n, a), (_, s)) in v.iter().zip(&single) {
            let d = (a - s).abs().max().double_value(&[]);
            assert!(d <= tol, "{tag}: `{n}` is {d} off the run without DDP");
        }
    }
    drop(group);
    std::fs::remove_dir_all(&dir).ok();
}
