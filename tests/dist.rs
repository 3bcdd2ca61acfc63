//! c10d over gloo between real processes on 127.0.0.1: the test re-executes its own binary as
//! the ranks (the `#[ignore]`d `rank` test below), every wait bounded, children killed after a
//! deadline.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tch_peft::dist::{
    DdpOptions, DistributedDataParallel, GradCompression, ProcessGroup, ReduceOp, Rendezvous,
};
use tch_peft::Error;

fn spawn(rank: usize, world: usize, mode: &str, dir: &Path, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["rank", "--exact", "--ignored", "--test-threads=1", "--nocapture"])
        .env("TCH_PEFT_TEST_RANK", rank.to_string())
        .env("TCH_PEFT_TEST_WORLD", world.to_string())
        .env("TCH_PEFT_TEST_MODE", mode)
        .env("TCH_PEFT_TEST_DIR", dir)
        .env("TCH_PEFT_TEST_PORT", port.to_string())
        // gloo on loopback, also for the file store (whose ranks would take the default device)
        .env("GLOO_SOCKET_IFNAME", "lo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every child (killing all after `deadline`) and returns their outputs.
fn wait_all(children: Vec<Child>, deadline: Duration) -> Vec<(bool, String)> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut out = vec![(false, String::new()); children.len()];
    while children.iter().any(Option::is_some) {
        for (i, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                if c.try_wait().unwrap().is_some() || start.elapsed() > deadline {
                    let _ = c.kill();
                    let o = slot.take().unwrap().wait_with_output().unwrap();
                    let text = String::from_utf8_lossy(&o.stdout).to_string()
                        + &String::from_utf8_lossy(&o.stderr);
                    out[i] = (o.status.success(), text);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tch-peft-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `world` ranks in `mode` (a temporary directory of that name, a free port), every one of
/// which must succeed and print "rank done" before `deadline`: the directory and their outputs.
fn run_ranks(mode: &str, world: usize, deadline: Duration) -> (std::path::PathBuf, Vec<String>) {
    let dir = temp(mode);
    let port = free_port();
    let children = (0..world).map(|r| spawn(r, world, mode, &dir, port)).collect();
    let texts: Vec<String> = wait_all(children, deadline)
        .into_iter()
        .enumerate()
        .map(|(rank, (ok, text))| {
            assert!(ok, "{mode}, rank {rank} of {world} failed:\n{text}");
            assert!(text.contains("rank done"), "{mode}, rank {rank}:\n{text}");
            text
        })
        .collect();
    (dir, texts)
}

#[test]
fn ranks_all_reduce_broadcast_and_meet_at_a_barrier_over_tcp_and_file_stores() {
    for (mode, world) in [("tcp", 2), ("file", 3)] {
        let (dir, _) = run_ranks(mode, world, Duration::from_secs(120));
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_rank_that_never_arrives_is_a_timeout_error() {
    let dir = temp("missing");
    // a world of two, one rank started: its rendezvous (or first collective) times out
    let children = vec![spawn(0, 2, "missing", &dir, free_port())];
    let (ok, text) = &wait_all(children, Duration::from_secs(120))[0];
    assert!(ok, "{text}");
    assert!(text.contains("timed out as expected"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_are_typed_errors() {
    let r = Rendezvous::File(std::env::temp_dir().join("never-used"));
    assert!(matches!(
        ProcessGroup::new(r.clone(), 2, 2, Duration::from_secs(1)),
        Err(Error::Distributed { .. })
    ));
    assert!(matches!(ProcessGroup::new(r, 0, 1, Duration::ZERO), Err(Error::Distributed { .. })));
}

/// How a run keeps its ranks in step.
enum Sync<'g> {
    /// One process.
    Local,
    /// `DataParallel`'s flat all-reduce after the backward.
    Flat(&'g ProcessGroup),
    /// DDP's Reducer.
    Ddp(&'g ProcessGroup, DdpOptions),
}

/// What a run ends with: the adapters' values, and under DDP its buckets.
type Run = (Vec<(String, Tensor)>, Option<Vec<tch_peft::dist::Bucket>>);

/// Two LoRA layers (8→8→6) on a seeded base and their SGD steps (plain SGD: a gradient summed
/// instead of averaged would show, as it would not under AdamW) on `micro` (this rank's rows
/// of a seeded batch, as micro-batches whose gradients accumulate: under DDP all but the last in
/// `no_sync`), mean squared error; `skip_second` leaves the second layer out of the forward.
fn lora_run(micro: &[Vec<i64>], sync: Sync, steps: usize, skip_second: bool) -> Result<Run, Error> {
    lora_run_with(micro, sync, steps, skip_second, false)
}

/// As [`lora_run`]; `checkpointed`: each backward through `checkpoint::backward_checkpointed`
/// (one backward pass per layer, then the loss's).
fn lora_run_with(
    micro: &[Vec<i64>],
    sync: Sync,
    steps: usize,
    skip_second: bool,
    checkpointed: bool,
) -> Result<Run, Error> {
    use tch::nn::{self, OptimizerConfig};
    use tch_peft::lora::{LoraConfig, LoraLinear};
    // values from formulas, not the global RNG (other tests of this binary run beside)
    let wave = |n: i64, f: f64| (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * f).sin();
    let (base_vs, adapters) =
        (nn::VarStore::new(tch::Device::Cpu), nn::VarStore::new(tch::Device::Cpu));
    let cfg = LoraConfig { r: 2, lora_alpha: 4.0, ..Default::default() };
    let base1 = nn::linear(base_vs.root() / "up", 8, 8, Default::default());
    let base2 = nn::linear(base_vs.root() / "down", 8, 6, Default::default());
    let up = LoraLinear::new(base1, &(adapters.root() / "up"), &cfg).unwrap();
    let down = LoraLinear::new(base2, &(adapters.root() / "down"), &cfg).unwrap();
    tch::no_grad(|| {
        let mut base: Vec<(String, Tensor)> = base_vs.variables().into_iter().collect();
        base.sort_by(|a, b| a.0.cmp(&b.0)); // a HashMap's order differs between processes
        for (k, (_, t)) in base.into_iter().enumerate() {
            let n = t.numel() as i64;
            t.shallow_clone()
                .copy_(&(wave(n, 0.7 + 0.1 * k as f64) * 0.3).view(t.size().as_slice()));
        }
        up.lora_a().shallow_clone().copy_(&(wave(16, 1.3) * 0.5).view([2, 8]));
        down.lora_a().shallow_clone().copy_(&(wave(16, 0.4) * 0.5).view([2, 8]));
    });
    let x = wave(64, 0.37).view([8, 8]);
    let y = wave(48, 0.91).view([8, 6]);
    let loss_of = |rows: &[i64]| {
        let idx = Tensor::from_slice(rows);
        let (x, y) = (x.index_select(0, &idx), y.index_select(0, &idx));
        let h = up.f_forward_t(&x, true).unwrap();
        let out = if skip_second {
            h.narrow(1, 0, 6)
        } else {
            down.f_forward_t(&h.tanh(), true).unwrap()
        };
        (out - y).square().mean(Kind::Float) / micro.len() as f64
    };
    let flat = match &sync {
        Sync::Flat(g) => Some(tch_peft::dist::DataParallel::from_var_store(g, &adapters)?),
        _ => None,
    };
    let mut ddp = match &sync {
        Sync::Ddp(g, o) => Some(DistributedDataParallel::from_var_store(g, &adapters, *o)?),
        _ => None,
    };
    let mut opt = nn::Sgd::default().build(&adapters, 0.5).unwrap();
    for _ in 0..steps {
        match &ddp {
            Some(d) => d.zero_grad(),
            None => opt.zero_grad(),
        }
        for (i, rows) in micro.iter().enumerate() {
            let last = i + 1 == micro.len();
            if checkpointed {
                let idx = Tensor::from_slice(rows);
                let (x, y) = (x.index_select(0, &idx), y.index_select(0, &idx));
                let f1 = |x: &Tensor| up.f_forward_t(x, true);
                let f2 = |h: &Tensor| down.f_forward_t(&h.tanh(), true);
                let loss = |o: &Tensor| Ok((o - &y).square().mean(Kind::Float));
                if let Some(d) = ddp.as_mut() {
                    // several backward passes: the Reducer readied before the first
                    d.pre_forward()?;
                    d.post_forward(&[])?;
                }
                let _loss = tch_peft::checkpoint::backward_checkpointed(&x, &[&f1, &f2], &loss)?;
                continue;
            }
            let loss = match ddp.as_mut() {
                Some(d) if !last => d.no_sync(|d| d.forward(|| loss_of(rows)))?,
                Some(d) => d.forward(|| loss_of(rows))?,
                None => loss_of(rows),
            };
            loss.f_backward()?;
            if let (Some(d), false) = (&ddp, last) {
                // no_sync: nothing travelled, each rank holds its own micro-batch's gradients
                let g = d.group();
                let grads: Vec<Tensor> = d.params().iter().map(|(_, t)| t.grad().copy()).collect();
                let rank0: Vec<Tensor> = grads.iter().map(|t| t.copy()).collect();
                g.broadcast(&rank0.iter().collect::<Vec<_>>(), 0)?;
                let same = grads.iter().zip(&rank0).all(|(a, b)| a.equal(b));
                assert_eq!(same, g.rank() == 0, "after a no_sync backward on rank {}", g.rank());
            }
        }
        if let Some(dp) = &flat {
            dp.sync_gradients()?;
        }
        opt.step();
    }
    let buckets = ddp.as_ref().map(|d| d.buckets()).transpose()?;
    if let Some(d) = &ddp {
        assert_eq!(d.buckets_rebuilt(), steps > 1 && !d.options().find_unused_parameters);
    }
    let mut v: Vec<(String, Tensor)> = adapters.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((v, buckets))
}

/// The DDP runs of the `ddp` ranks: (file tag, options, tolerance against one process).
fn ddp_variants() -> Vec<(&'static str, DdpOptions, f64)> {
    // caps of a few hundred bytes, so that the rebuilt buckets are several
    let small = DdpOptions {
        bucket_cap_mb: 100.0 / 1048576.0,
        first_bucket_cap_mb: 50.0 / 1048576.0,
        ..Default::default()
    };
    vec![
        ("ddp", small, 1e-5),
        ("view", DdpOptions { gradient_as_bucket_view: true, ..small }, 1e-5),
        ("static", DdpOptions { static_graph: true, ..small }, 1e-5),
        ("unused", DdpOptions { find_unused_parameters: true, ..small }, 1e-5),
        ("default", DdpOptions::default(), 1e-5),
        // bf16 keeps ~3 significant digits of each gradient: the SGD steps move the adapters
        // by lr × that error
        ("bf16", DdpOptions { compression: GradCompression::Bf16, ..small }, 2e-3),
    ]
}

fn read(dir: &Path, tag: &str, rank: usize) -> Vec<(String, Tensor)> {
    tch_peft::io::read_safetensors(dir.join(format!("{tag}-rank{rank}.safetensors")))
        .unwrap()
        .tensors
}

fn assert_same(tag: &str, ranks: &[Vec<(String, Tensor)>], single: &[(String, Tensor)], tol: f64) {
    for r in ranks {
        assert_eq!(r.len(), single.len(), "{tag}");
        for ((n, a), (n0, b)) in r.iter().zip(&ranks[0]) {
            assert_eq!(n, n0);
            assert!(a.equal(b), "{tag}: `{n}` differs across ranks");
        }
        for ((n, a), (ns, s)) in r.iter().zip(single) {
            assert_eq!(n, ns);
            let d = (a - s).abs().max().double_value(&[]);
            assert!(d < tol, "{tag}: `{n}` is {d} off the single-process run");
        }
    }
}

#[test]
fn data_parallel_lora_steps_equal_one_process_on_the_whole_batch() {
    let (dir, _) = run_ranks("dp", 2, Duration::from_secs(120));
    let all: Vec<i64> = (0..8).collect();
    let (single, _) = lora_run(&[all], Sync::Local, 3, false).unwrap();
    assert_same("flat", &[read(&dir, "flat", 0), read(&dir, "flat", 1)], &single, 1e-5);
    // trained: every tensor nonzero (lora_B moved off its zero init)
    for (n, t) in &single {
        assert!(t.abs().max().double_value(&[]) > 1e-4, "`{n}`");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ddp_reducer_steps_equal_one_process_and_agree_across_ranks() {
    let (dir, _) = run_ranks("ddp", 2, Duration::from_secs(180));
    let all: Vec<i64> = (0..8).collect();
    let (single, _) = lora_run(std::slice::from_ref(&all), Sync::Local, 3, false).unwrap();
    for (tag, _, tol) in ddp_variants() {
        assert_same(tag, &[read(&dir, tag, 0), read(&dir, tag, 1)], &single, tol);
    }
    assert_same("ckpt", &[read(&dir, "ckpt", 0), read(&dir, "ckpt", 1)], &single, 1e-5);
    // with the second layer left out: its adapter stays where it started, the first trains
    let (skipped, _) = lora_run(&[all], Sync::Local, 3, true).unwrap();
    assert_same("skip", &[read(&dir, "skip", 0), read(&dir, "skip", 1)], &skipped, 1e-5);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ranks_given_other_tensors_or_options_all_fail_together() {
    // far less than the group's 60 s timeout: nobody waits for a rank that gave up
    let start = Instant::now();
    let (dir, texts) = run_ranks("mismatch", 2, Duration::from_secs(40));
    for (rank, text) in texts.iter().enumerate() {
        if rank == 1 {
            assert!(text.contains("other options than rank 0"), "{text}");
            assert!(text.contains("has 2 tensors, rank 0 1"), "{text}");
            assert!(text.contains("another name"), "{text}");
            assert!(text.contains("not a leaf"), "{text}");
        } else {
            assert!(text.contains("disagree with rank 0"), "{text}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(40));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn no_sync_accumulation_over_three_ranks_equals_one_big_batch_and_rank0_saves() {
    let (dir, _) = run_ranks("nosync", 3, Duration::from_secs(180));
    let all: Vec<i64> = (0..6).collect();
    let (single, _) = lora_run(&[all], Sync::Local, 2, false).unwrap();
    let saved = tch_peft::io::read_safetensors(dir.join("adapter.safetensors")).unwrap().tensors;
    assert_same("no_sync", &[saved], &single, 1e-5);
    std::fs::remove_dir_all(&dir).ok();
}

/// One rank (run by the tests above as a child process).
#[test]
#[ignore = "a rank of the tests above"]
fn rank() {
    let var = |k: &str| std::env::var(k).unwrap();
    let (rank, world): (usize, usize) =
        (var("TCH_PEFT_TEST_RANK").parse().unwrap(), var("TCH_PEFT_TEST_WORLD").parse().unwrap());
    let dir = std::path::PathBuf::from(var("TCH_PEFT_TEST_DIR"));
    let mode = var("TCH_PEFT_TEST_MODE");
    let rendezvous = match mode.as_str() {
        "tcp" => Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port: var("TCH_PEFT_TEST_PORT").parse().unwrap(),
            agent_store: false,
        },
        _ => Rendezvous::File(dir.join("store")),
    };
    if mode == "missing" {
        let timeout = Duration::from_secs(3);
        let r = ProcessGroup::new(rendezvous, rank, world, timeout)
            .and_then(|g| g.barrier().map(|_| g));
        match r {
            Err(Error::Distributed { what, .. }) => println!("timed out as expected: {what}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        return;
    }
    let g = ProcessGroup::new(rendezvous, rank, world, Duration::from_secs(60)).unwrap();
    assert_eq!((g.rank(), g.world_size()), (rank, world));
    let save = |tag: &str, v: &[(String, Tensor)]| {
        tch_peft::io::write_safetensors(dir.join(format!("{tag}-rank{rank}.safetensors")), v, None)
            .unwrap()
    };
    let rows: Vec<i64> = tch_peft::dist::shard(&(0..8).collect::<Vec<i64>>(), rank, world);
    match mode.as_str() {
        "dp" => {
            save("flat", &lora_run(&[rows], Sync::Flat(&g), 3, false).unwrap().0);
            g.barrier().unwrap();
            println!("rank done");
            return;
        }
        "ddp" => {
            for (tag, o, _) in ddp_variants() {
                let (v, buckets) =
                    lora_run(std::slice::from_ref(&rows), Sync::Ddp(&g, o), 3, false).unwrap();
                let buckets = buckets.unwrap();
                println!("{tag}: buckets {buckets:?}");
                let n: usize = buckets.iter().map(|b| b.params).sum();
                assert_eq!(n, 4, "{tag}");
                if o.bucket_cap_mb < 1e-3 && !o.find_unused_parameters {
                    // rebuilt in ready order under caps of 100 bytes (first 50): one bucket per
                    // tensor or pair, several in all
                    assert!(buckets.len() >= 3, "{tag}: {buckets:?}");
                }
                save(tag, &v);
            }
            // activation checkpointing: one backward pass per layer, the Reducer across them
            let small = ddp_variants()[0].1;
            let (v, _) =
                lora_run_with(std::slice::from_ref(&rows), Sync::Ddp(&g, small), 3, false, true)
                    .unwrap();
            save("ckpt", &v);
            // a static graph's first step needs an output to hang its delayed all-reduce on
            let st = DdpOptions { static_graph: true, ..small };
            match lora_run_with(std::slice::from_ref(&rows), Sync::Ddp(&g, st), 1, false, true) {
                Err(Error::Distributed { reason, .. }) => {
                    assert!(reason.contains("output"), "{reason}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            // a parameter that gets no gradient: with find_unused_parameters it is marked ready
            let unused = DdpOptions { find_unused_parameters: true, ..Default::default() };
            save(
                "skip",
                &lora_run(std::slice::from_ref(&rows), Sync::Ddp(&g, unused), 3, true).unwrap().0,
            );
            // without it, the next forward reports the unfinished reduction, naming the tensors
            match lora_run(&[rows], Sync::Ddp(&g, DdpOptions::default()), 2, true) {
                Err(Error::Distributed { reason, .. }) => {
                    assert!(reason.contains("finished reduction"), "{reason}");
                    println!("unused parameter refused: {}", reason.lines().next().unwrap_or(""));
                }
                other => panic!("expected an unfinished-reduction error, got {other:?}"),
            }
            g.barrier().unwrap();
            println!("rank done");
            return;
        }
        "mismatch" => {
            let cpu = (Kind::Float, tch::Device::Cpu);
            let w = Tensor::zeros([3], cpu).set_requires_grad(true);
            let distributed = |r: Result<(), Error>, what: &str| match r {
                Err(Error::Distributed { reason, .. }) => println!("{what}: {reason}"),
                other => panic!("{what} on rank {rank}: expected an error, got {other:?}"),
            };
            // other options on rank 1: every rank errs, none waits for the others
            let o = DdpOptions { bucket_cap_mb: 25.0 + rank as f64, ..Default::default() };
            let r = DistributedDataParallel::new(&g, vec![("w".into(), w.shallow_clone())], o);
            distributed(r.map(|_| ()), "options");
            // another count, then another name
            let mut ps = vec![("w".to_string(), w.shallow_clone())];
            if rank == 1 {
                ps.push(("v".into(), Tensor::zeros([2], cpu).set_requires_grad(true)));
            }
            distributed(tch_peft::dist::DataParallel::new(&g, ps).map(|_| ()), "count");
            let ps = vec![(format!("w{rank}"), w.shallow_clone())];
            distributed(tch_peft::dist::DataParallel::new(&g, ps).map(|_| ()), "name");
            // a problem of rank 1's own (not a leaf that requires grad)
            let p = if rank == 1 { Tensor::zeros([3], cpu) } else { w.shallow_clone() };
            let r = DistributedDataParallel::new(&g, vec![("w".into(), p)], DdpOptions::default());
            distributed(r.map(|_| ()), "leaf");
            // the ranks are still in step
            let t = Tensor::ones([2], cpu);
            g.all_reduce(&[&t], ReduceOp::Sum).unwrap();
            assert!(t.equal(&(Tensor::ones([2], cpu) * world as f64)));
            println!("rank done");
            return;
        }
        "nosync" => {
            // rows r and r + 3 of six, as two micro-batches: the first under no_sync
            let micro = vec![vec![rank as i64], vec![rank as i64 + 3]];
            let (v, _) = lora_run(&micro, Sync::Ddp(&g, DdpOptions::default()), 2, false).unwrap();
            let path = dir.join("adapter.safetensors");
            tch_peft::dist::on_rank0(&g, || tch_peft::io::write_safetensors(&path, &v, None))
                .unwrap();
            // after the barrier every rank sees rank 0's whole file, equal to its own values
            let saved = tch_peft::io::read_safetensors(&path).unwrap().tensors;
            for ((n, a), (_, b)) in saved.iter().zip(&v) {
                assert!(a.equal(b), "`{n}` on rank {rank}");
            }
            println!("rank done");
            return;
        }
        _ => {}
    }
    // sums and means over ranks, several tensors as one buffer
    let a = Tensor::full([1000], (rank + 1) as f64, (Kind::Float, tch::Device::Cpu));
    let b = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]) * (rank as f64);
    g.all_reduce(&[&a, &b], ReduceOp::Sum).unwrap();
    let n = world as f64;
    assert!(a.equal(&Tensor::full([1000], n * (n + 1.0) / 2.0, (Kind::Float, tch::Device::Cpu))));
    let want_b =
        Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]) * (n * (n - 1.0) / 2.0);
    assert!(b.equal(&want_b));
    let c = Tensor::full([3], rank as f64, (Kind::Float, tch::Device::Cpu));
    g.all_reduce(&[&c], ReduceOp::Average).unwrap();
    assert!(c.allclose(
        &Tensor::full([3], (n - 1.0) / 2.0, (Kind::Float, tch::Device::Cpu)),
        1e-6,
        1e-6,
        false
    ));
    // rank 0's values everywhere
    let d = Tensor::full([5], 10.0 + rank as f64, (Kind::Double, tch::Device::Cpu));
    g.broadcast(&[&d], 0).unwrap();
    assert!(d.equal(&Tensor::full([5], 10.0, (Kind::Double, tch::Device::Cpu))));
    // mixed dtypes are refused before any collective
    assert!(matches!(g.all_reduce(&[&a, &d], ReduceOp::Sum), Err(Error::DtypeMismatch { .. })));
    g.barrier().unwrap();
    println!("rank done");
}
