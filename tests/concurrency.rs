//! Forwards on several threads through every public handle — the model's stacks, the
//! `LoraLinear` handles of `LoraAdapter::layers`, the shared-input group — while another thread
//! merges, unmerges and switches adapters: every output equals one of the states the layer can
//! be in (f64, so that merged and unmerged agree to 1e-9 while a torn read is far off).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tch::{nn, Device, Kind, Tensor};
use tch_peft::lora::{self, LoraBuilder, LoraConfig, LoraLinear, LoraStack};

fn fill(t: &Tensor, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        let mut d = t.shallow_clone();
        d.copy_(&Tensor::randn(t.size(), (Kind::Double, Device::Cpu)));
    });
}

/// `x (W + s·BA)ᵀ + b` for the given adapters of `stack`'s layer.
fn reference(stack: &LoraStack<LoraLinear>, names: &[&str], x: &Tensor) -> Tensor {
    let base = stack.base_linear().dense().unwrap();
    let mut w = base.ws.copy();
    for n in names {
        let l = stack.get(n).unwrap();
        w += l.lora_b().mm(l.lora_a()) * l.scaling();
    }
    x.linear(&w, base.bs.as_ref())
}

fn closest(y: &Tensor, refs: &[Tensor]) -> f64 {
    refs.iter().map(|r| (y - r).abs().max().double_value(&[])).fold(f64::INFINITY, f64::min)
}

#[test]
fn forwards_see_the_layer_merged_or_unmerged_never_torn() {
    let (base, va, vb) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let mut base = base;
    let cfg = |alpha| LoraConfig { r: 4, lora_alpha: alpha, ..LoraConfig::for_targets(["q", "k"]) };
    let builder = LoraBuilder::new(&va.root(), cfg(8.0))
        .unwrap()
        .with_adapter("other", &vb.root(), cfg(16.0))
        .unwrap();
    let q = lora::linear(&(base.root() / "q"), 32, 24, Default::default(), Some(&builder)).unwrap();
    let k = lora::linear(&(base.root() / "k"), 32, 16, Default::default(), Some(&builder)).unwrap();
    let mut adapter = builder.finish().unwrap();
    base.set_kind(Kind::Double);
    let mut va = va;
    let mut vb = vb;
    va.set_kind(Kind::Double);
    vb.set_kind(Kind::Double);
    for (i, (_, t)) in va.variables().into_iter().chain(vb.variables()).enumerate() {
        fill(&t, 100 + i as i64);
    }
    for (i, (_, t)) in base.variables().into_iter().enumerate() {
        fill(&t, 200 + i as i64);
    }
    let x = Tensor::randn([64, 32], (Kind::Double, Device::Cpu));
    let (qs, ks) = (q.as_stack().unwrap().clone(), k.as_stack().unwrap().clone());
    // what a forward may see: the base, the base with either adapter
    let states = |s: &LoraStack<LoraLinear>| {
        vec![reference(s, &[], &x), reference(s, &["default"], &x), reference(s, &["other"], &x)]
    };
    let (q_refs, k_refs) = (states(&qs), states(&ks));
    let done = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    let spawn = |f: Box<dyn Fn() -> Vec<(Tensor, usize)> + Send>,
                 refs: Vec<Vec<Tensor>>,
                 done: Arc<AtomicBool>,
                 checked: Arc<AtomicUsize>| {
        std::thread::spawn(move || {
            let mut worst: f64 = 0.0;
            while !done.load(Ordering::Acquire) {
                for (y, which) in f() {
                    worst = worst.max(closest(&y, &refs[which]));
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            }
            worst
        })
    };
    let xs = x.shallow_clone();
    let s = qs.clone();
    workers.push(spawn(
        Box::new(move || vec![(s.f_forward_t(&xs, false).unwrap(), 0)]),
        vec![q_refs.iter().map(Tensor::copy).collect()],
        done.clone(),
        checked.clone(),
    ));
    let xs = x.shallow_clone();
    let handle = adapter.layers().into_iter().find(|l| l.module() == "q").unwrap();
    workers.push(spawn(
        Box::new(move || vec![(handle.f_forward_t(&xs, false).unwrap(), 0)]),
        vec![q_refs.iter().map(Tensor::copy).collect()],
        done.clone(),
        checked.clone(),
    ));
    let xs = x.shallow_clone();
    let (gq, gk) =
        (lora::MaybeLoraLinear::Lora(qs.clone()), lora::MaybeLoraLinear::Lora(ks.clone()));
    workers.push(spawn(
        Box::new(move || {
            let ys = lora::forward_shared(&[&gq, &gk], &xs, false).unwrap();
            ys.into_iter().zip([0, 1]).collect()
        }),
        vec![q_refs.iter().map(Tensor::copy).collect(), k_refs.iter().map(Tensor::copy).collect()],
        done.clone(),
        checked.clone(),
    ));
    // switch, merge and unmerge until the forwards have run a while (at most 100 000 rounds)
    for round in 0..100_000 {
        if checked.load(Ordering::Relaxed) >= 3000 {
            break;
        }
        let name = if round % 2 == 0 { "default" } else { "other" };
        adapter.set_active(&[name]).unwrap();
        adapter.merge().unwrap();
        adapter.unmerge().unwrap();
        for l in adapter.layers() {
            l.merge().unwrap();
            l.unmerge().unwrap();
        }
    }
    done.store(true, Ordering::Release);
    for w in workers {
        let worst = w.join().unwrap();
        assert!(worst < 1e-9, "a forward saw a torn state (max deviation {worst})");
    }
    assert!(checked.load(Ordering::Relaxed) >= 3000);
}

#[test]
fn embedding_forwards_see_the_table_merged_or_unmerged_never_torn() {
    let (mut base, mut va) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::for_targets(["embed"]) };
    let builder = LoraBuilder::new(&va.root(), cfg).unwrap();
    let emb = builder.embedding(&(base.root() / "embed"), 40, 12, Default::default()).unwrap();
    let adapter = builder.finish().unwrap();
    base.set_kind(Kind::Double);
    va.set_kind(Kind::Double);
    for (i, (_, t)) in va.variables().into_iter().chain(base.variables()).enumerate() {
        fill(&t, 300 + i as i64);
    }
    let ids = Tensor::from_slice(&(0..40i64).rev().collect::<Vec<_>>()).view([4, 10]);
    let handle = emb.as_lora().unwrap();
    let w = emb.weight().copy();
    let delta = handle.lora_b().mm(handle.lora_a()).tr() * handle.scaling();
    let refs = [
        Tensor::embedding(&w, &ids, -1, false, false),
        Tensor::embedding(&(&w + delta), &ids, -1, false, false),
    ];
    let lora::MaybeLoraEmbedding::Lora(stack) = &emb else { panic!("targeted") };
    let done = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for which in 0..2 {
        let (stack, handle, ids, done) =
            (stack.clone(), emb.as_lora().unwrap(), ids.shallow_clone(), done.clone());
        let refs: Vec<Tensor> = refs.iter().map(Tensor::copy).collect();
        let counter = lookups.clone();
        workers.push(std::thread::spawn(move || {
            let (mut worst, mut n): (f64, usize) = (0.0, 0);
            while !done.load(Ordering::Acquire) {
                let y = if which == 0 { stack.f_forward(&ids) } else { handle.f_forward(&ids) };
                worst = worst.max(closest(&y.unwrap(), &refs));
                n += 1;
                counter.fetch_add(1, Ordering::Relaxed);
            }
            (worst, n)
        }));
    }
    // merge and unmerge until the lookups have run a while (at most 100 000 rounds)
    for _ in 0..100_000 {
        if lookups.load(Ordering::Relaxed) >= 4000 {
            break;
        }
        adapter.merge().unwrap();
        adapter.unmerge().unwrap();
        handle.merge().unwrap();
        handle.unmerge().unwrap();
    }
    done.store(true, Ordering::Release);
    for w in workers {
        let (worst, n) = w.join().unwrap();
        assert!(worst < 1e-9, "a lookup saw a torn table (max deviation {worst})");
        assert!(n > 100, "{n} lookups");
    }
}
