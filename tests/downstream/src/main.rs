//! A user's binary: a model built with `lora::linear`, one training step, the adapter saved and
//! reloaded, as the README shows. Then the link checks: libtorch_cuda is loaded (Linux, where
//! libtorch has it) and, with a GPU, CUDA is seen and a fused kernel of the crate runs.
//!
//! `--require-cuda` makes a missing GPU an error (for the GPU host).

use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_peft::lora::{self, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::{Adapter, ParamReport};

type Failure = Box<dyn std::error::Error>;

struct Block {
    q: MaybeLoraLinear,
    v: MaybeLoraLinear,
}

impl Block {
    fn new(p: &nn::Path, lora: Option<&LoraBuilder>) -> tch_peft::Result<Self> {
        Ok(Block {
            q: lora::linear(&(p / "q_proj"), 32, 32, Default::default(), lora)?,
            v: lora::linear(&(p / "v_proj"), 32, 32, Default::default(), lora)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.q.forward_t(x, true) + self.v.forward_t(x, true)
    }
}

/// The README's flow on `device`: returns the adapter's output before saving and after reloading.
fn train_save_reload(device: Device) -> Result<(), Failure> {
    tch::manual_seed(0);
    let base_vs = nn::VarStore::new(device);
    let adapter_vs = nn::VarStore::new(device);
    let config = LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::for_targets(["q_proj"]) };
    let builder = LoraBuilder::new(&adapter_vs.root(), config)?;
    let block = Block::new(&(base_vs.root() / "layers" / 0), Some(&builder))?;
    let adapter = builder.finish()?;
    println!("{}", ParamReport::from_var_stores(&[&base_vs, &adapter_vs]));

    let mut opt = nn::AdamW::default().build(&adapter_vs, 1e-2)?;
    let x = Tensor::randn([8, 32], (Kind::Float, device));
    opt.backward_step(&block.forward(&x).square().mean(Kind::Float));
    let trained = tch::no_grad(|| block.forward(&x));

    let dir = std::env::temp_dir().join(format!("tch-peft-downstream-{}", std::process::id()));
    adapter.save_pretrained(&dir)?;
    let b = adapter_vs.variables()["layers.0.q_proj.lora_B.weight"].shallow_clone();
    tch::no_grad(|| {
        let _ = b.shallow_clone().zero_();
    });
    adapter.load_pretrained(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    let reloaded = tch::no_grad(|| block.forward(&x));
    if !trained.allclose(&reloaded, 0.0, 0.0, false) {
        return Err("the reloaded adapter gives other outputs".into());
    }
    if adapter.num_trainable_parameters() != 4 * 32 * 2 {
        return Err(format!("{} trainable parameters", adapter.num_trainable_parameters()).into());
    }
    println!("trained one step, saved and reloaded the adapter on {device:?}");
    Ok(())
}

/// Whether this process mapped `libtorch_cuda.so`, when the libtorch it loaded has one (Linux);
/// `None` where there is nothing to check.
fn torch_cuda_loaded() -> Option<bool> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let cpu = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))?;
    let dir = std::path::Path::new(cpu).parent()?;
    dir.join("libtorch_cuda.so").exists().then(|| maps.contains("/libtorch_cuda.so"))
}

/// A bf16 LoRA layer on the GPU through the crate's fused node: the number of launches of its
/// `lora_up` kernel (run-time compiled) in one forward.
fn fused_kernel_launches() -> Result<u64, Failure> {
    let device = Device::Cuda(0);
    let (base_vs, adapter_vs) = (nn::VarStore::new(device), nn::VarStore::new(device));
    let config = LoraConfig { r: 16, lora_alpha: 32.0, ..LoraConfig::for_targets(["q_proj"]) };
    let builder = LoraBuilder::new(&adapter_vs.root(), config)?;
    let q =
        lora::linear(&(base_vs.root() / "q_proj"), 256, 256, Default::default(), Some(&builder))?;
    let _adapter = builder.finish()?;
    let mut base_vs = base_vs;
    base_vs.bfloat16();
    let x = Tensor::randn([512, 256], (Kind::BFloat16, device));
    let (y, profile) = tch_peft::profiler::profile_device(|| {
        let y = tch::no_grad(|| q.f_forward_t(&x, false));
        tch::Cuda::synchronize(0);
        y
    })?;
    let y = y?;
    if y.size() != [512, 256] {
        return Err(format!("output shape {:?}", y.size()).into());
    }
    Ok(profile.kernels.iter().filter(|k| k.name.contains("lora_up")).map(|k| k.count).sum())
}

fn main() -> Result<(), Failure> {
    let require_cuda = std::env::args().any(|a| a == "--require-cuda");
    train_save_reload(Device::Cpu)?;
    match torch_cuda_loaded() {
        Some(true) => println!("libtorch_cuda is loaded"),
        Some(false) => {
            return Err("libtorch_cuda is not loaded: CUDA would report unavailable".into())
        }
        None => {}
    }
    if tch::Cuda::is_available() {
        train_save_reload(Device::Cuda(0))?;
        let available = lora::custom_cuda_kernels_available();
        let launches = fused_kernel_launches()?;
        println!("CUDA: {} device(s); custom kernels: {available}; lora_up launches in one forward: {launches}", tch::Cuda::device_count());
        if !available || launches == 0 {
            return Err("the crate's CUDA kernels did not run".into());
        }
    } else if require_cuda {
        return Err("--require-cuda: no CUDA device is visible".into());
    } else {
        println!("CUDA: no device visible");
    }
    println!("downstream: ok");
    Ok(())
}
