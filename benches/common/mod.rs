//! Helpers shared by the benches: device and dtype from the environment, CUDA synchronisation,
//! and medians of closures timed in alternation. Each bench uses a subset (hence `dead_code`).

#![allow(dead_code)]

use tch::{Device, Kind};

pub fn device() -> Device {
    match std::env::var("TCH_PEFT_BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    }
}

pub fn kind() -> Kind {
    match std::env::var("TCH_PEFT_BENCH_KIND").as_deref() {
        Ok("bf16") => Kind::BFloat16,
        Ok("f16") => Kind::Half,
        _ => Kind::Float,
    }
}

pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `f` over `rounds`, measured in alternation with the other closures so
/// that drifting machine load hits every variant alike. Returns one median per closure.
pub fn interleaved(fs: &mut [&mut dyn FnMut()], rounds: usize) -> Vec<f64> {
    if rounds == 0 {
        return vec![f64::NAN; fs.len()];
    }
    for f in fs.iter_mut() {
        for _ in 0..3 {
            f();
        }
    }
    let mut times = vec![Vec::with_capacity(rounds); fs.len()];
    for _ in 0..rounds {
        for (f, t) in fs.iter_mut().zip(times.iter_mut()) {
            let start = std::time::Instant::now();
            f();
            t.push(start.elapsed().as_secs_f64());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}
