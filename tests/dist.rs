//! c10d over gloo between real processes on 127.0.0.1: the test re-executes its own binary as
//! the ranks (the `#[ignore]`d `rank` test below), every wait bounded, children killed after a
//! deadline.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use tch_peft::dist::{ProcessGroup, ReduceOp, Rendezvous};
use tch_peft::Error;

fn spawn(rank: usize, world: usize, mode: &str, dir: &Path, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["rank", "--exact", "--ignored", "--test-threads=1", "--nocapture"])
        .env("TCH_PEFT_TEST_RANK", rank.to_string())
        .env("TCH_PEFT_TEST_WORLD", world.to_string())
        .env("TCH_PEFT_TEST_MODE", mode)
        .env("TCH_PEFT_TEST_DIR", dir)
        .env("TCH_PEFT_TEST_PORT", port.to_string())
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

#[test]
fn ranks_all_reduce_broadcast_and_meet_at_a_barrier_over_tcp_and_file_stores() {
    for (mode, world) in [("tcp", 2), ("file", 3)] {
        let dir = temp(mode);
        let port = free_port();
        let children = (0..world).map(|r| spawn(r, world, mode, &dir, port)).collect();
        for (rank, (ok, text)) in wait_all(children, Duration::from_secs(120)).iter().enumerate() {
            assert!(ok, "{mode}, rank {rank} of {world} failed:\n{text}");
            assert!(text.contains("rank done"), "{mode}, rank {rank}:\n{text}");
        }
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

/// A LoRA layer on a seeded base and its AdamW steps on `rows` of a seeded batch (mean squared
/// error), the gradients averaged over `group` when given; the adapter's values after `steps`.
fn lora_run(rows: &[i64], group: Option<&ProcessGroup>, steps: usize) -> Vec<(String, Tensor)> {
    use tch::nn::{self, OptimizerConfig};
    use tch_peft::lora::{LoraConfig, LoraLinear};
    // values from formulas, not the global RNG (other tests of this binary run beside)
    let wave = |n: i64, f: f64| (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * f).sin();
    let (base_vs, adapters) =
        (nn::VarStore::new(tch::Device::Cpu), nn::VarStore::new(tch::Device::Cpu));
    let base = nn::linear(base_vs.root() / "proj", 8, 6, Default::default());
    let cfg = LoraConfig { r: 2, lora_alpha: 4.0, ..Default::default() };
    let layer = LoraLinear::new(base, &(adapters.root() / "proj"), &cfg).unwrap();
    tch::no_grad(|| {
        for (_, t) in base_vs.variables() {
            let n = t.numel() as i64;
            t.shallow_clone().copy_(&(wave(n, 0.7) * 0.3).view(t.size().as_slice()));
        }
        layer.lora_a().shallow_clone().copy_(&(wave(16, 1.3) * 0.5).view([2, 8]));
    });
    let x = wave(64, 0.37).view([8, 8]);
    let y = wave(48, 0.91).view([8, 6]);
    let idx = Tensor::from_slice(rows);
    let (x, y) = (x.index_select(0, &idx), y.index_select(0, &idx));
    let dp = group.map(|g| tch_peft::dist::DataParallel::from_var_store(g, &adapters).unwrap());
    let mut opt = nn::AdamW::default().build(&adapters, 1e-2).unwrap();
    for _ in 0..steps {
        opt.zero_grad();
        let loss = (layer.f_forward_t(&x, true).unwrap() - &y).square().mean(Kind::Float);
        loss.backward();
        if let Some(dp) = &dp {
            dp.sync_gradients().unwrap();
        }
        opt.step();
    }
    let mut v: Vec<(String, Tensor)> = adapters.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn data_parallel_lora_steps_equal_one_process_on_the_whole_batch() {
    let dir = temp("dp");
    let children = (0..2).map(|r| spawn(r, 2, "dp", &dir, 0)).collect();
    for (rank, (ok, text)) in wait_all(children, Duration::from_secs(120)).iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{text}");
    }
    let read = |r: usize| {
        let f = tch_peft::io::read_safetensors(dir.join(format!("rank{r}.safetensors"))).unwrap();
        f.tensors
    };
    let (r0, r1) = (read(0), read(1));
    let single = lora_run(&[0, 1, 2, 3, 4, 5, 6, 7], None, 3);
    for (((n0, a), (n1, b)), (ns, s)) in r0.iter().zip(&r1).zip(&single) {
        assert_eq!((n0, n1), (ns, ns));
        assert!(a.equal(b), "`{n0}` differs across ranks");
        let d = (a - s).abs().max().double_value(&[]);
        assert!(d < 1e-5, "`{n0}`: {d} off the single-process run");
        // trained: every tensor nonzero (lora_B moved off its zero init)
        assert!(a.abs().max().double_value(&[]) > 1e-4, "`{n0}`");
    }
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
    if mode == "dp" {
        let rows: Vec<i64> = tch_peft::dist::shard(&[0i64, 1, 2, 3, 4, 5, 6, 7], rank, world);
        let v = lora_run(&rows, Some(&g), 3);
        tch_peft::io::write_safetensors(dir.join(format!("rank{rank}.safetensors")), &v, None)
            .unwrap();
        g.barrier().unwrap();
        return;
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
