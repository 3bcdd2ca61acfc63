//! The method comparison on a sentence encoder (`bench/examples/compare`): the same model, data,
//! seeds and step budget for a zero-shot head, a linear probe, freezing, LoRA, DoRA, LoReFT and
//! full fine-tuning, plus WiSE-FT between the zero-shot and the fine-tuned weights.
//!
//! Model: BERT (e.g. all-MiniLM-L6-v2) → mean pooling → L2 normalisation → a linear head. The
//! zero-shot head's rows are 20× the embeddings of two label prompts (REAL-DATA's setup, the θ₀
//! of WiSE-FT). Training: AdamW, linear warm-up (10 %) then linear decay, batches of `batch`
//! sentences padded to the longest, validation after every epoch with early stopping (the best
//! epoch's weights are kept).

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::{shuffle, Example, TextBatcher};
use crate::{config_error, Result};
use tch_peft::freeze::{FreezePlan, GradualUnfreezing, LayerGroups, Select};
use tch_peft::lora::{LoraBuilder, LoraConfig};
use tch_peft::models::bert::{load_weights, mean_pool, Bert, BertConfig};
use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};
use tch_peft::Applicable;

/// A fine-tuning method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// The prompt head on the frozen encoder (no training).
    ZeroShot,
    /// Only the head trains.
    LinearProbe,
    /// The top `k` encoder layers and the head train.
    TopLayers(i64),
    /// ULMFiT's gradual unfreezing ([`GradualUnfreezing`]): the head and the top encoder
    /// layer train first, one more group (next layer down, finally the embeddings) every
    /// `1/(layers + 1)` of the step budget.
    GradualUnfreezing,
    /// LoRA r 8, α 16 on every linear layer of the encoder, and the head.
    Lora,
    /// DoRA with the same targets, and the head.
    Dora,
    /// LoReFT r 4 at one layer, on every position, and the head.
    LoReft,
    /// Everything trains.
    Full,
}

impl Method {
    /// A short name for tables and files.
    pub fn name(&self) -> String {
        match self {
            Method::ZeroShot => "zero-shot head".into(),
            Method::LinearProbe => "linear probe".into(),
            Method::TopLayers(k) => format!("top-{k} layers"),
            Method::GradualUnfreezing => "gradual unfreezing".into(),
            Method::Lora => "LoRA r8 all-linear".into(),
            Method::Dora => "DoRA r8 all-linear".into(),
            Method::LoReft => "LoReFT r4".into(),
            Method::Full => "full fine-tuning".into(),
        }
    }

    /// The learning rate of REAL-DATA's runs.
    pub fn default_lr(&self) -> f64 {
        match self {
            Method::ZeroShot => 0.0,
            Method::LinearProbe => 1e-2,
            Method::TopLayers(_) | Method::GradualUnfreezing => 1e-4,
            Method::Lora | Method::Dora => 5e-4,
            Method::LoReft => 2e-3,
            Method::Full => 3e-5,
        }
    }
}

/// A task: training and validation sets and named test sets (the first is in-distribution).
#[derive(Debug, Clone)]
pub struct Task {
    /// Its name.
    pub name: String,
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples for early stopping.
    pub val: Vec<Example>,
    /// `(domain, examples)`; the first is the in-distribution test set.
    pub tests: Vec<(String, Vec<Example>)>,
    /// The label prompts whose embeddings (×20) are the zero-shot head's rows, label 0 first.
    pub prompts: [String; 2],
}

/// The sentiment prompts of REAL-DATA's zero-shot head (negative, positive).
pub fn sentiment_prompts() -> [String; 2] {
    [
        "This is negative. It is bad, I hate it.".to_string(),
        "This is positive. It is good, I love it.".to_string(),
    ]
}

/// Run settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The encoder directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub model_dir: PathBuf,
    /// Epochs (upper bound with early stopping).
    pub epochs: usize,
    /// Sentences per batch.
    pub batch: usize,
    /// Token limit per sentence.
    pub max_length: usize,
    /// Seed of the shuffling and of the adapters' init.
    pub seed: u64,
    /// The device.
    pub device: Device,
    /// Epochs without validation gain before stopping.
    pub patience: usize,
}

/// What one method achieved on one seed.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The method's name.
    pub method: String,
    /// The seed.
    pub seed: u64,
    /// Trainable parameters.
    pub trainable: i64,
    /// All parameters (encoder, head and adapters).
    pub total: i64,
    /// Accuracy per test set, in order.
    pub accuracies: Vec<(String, f64)>,
    /// Median training step time in ms (0 without training).
    pub step_ms: f64,
    /// Validation accuracy after each epoch.
    pub val_curve: Vec<f64>,
    /// Bytes of the trained parameters saved as safetensors (what one would ship).
    pub adapter_bytes: u64,
    /// Peak memory while the method built, trained and evaluated ([`tch_peft::memory`]): the
    /// process's peak resident set on the CPU, the caching allocator's peak on CUDA; `None`
    /// where it cannot be measured.
    pub peak_memory_bytes: Option<u64>,
}

/// The encoder, its head and the stores they live in.
struct Classifier {
    base: nn::VarStore,
    head_vs: nn::VarStore,
    adapter_vs: nn::VarStore,
    bert: Bert,
    head: nn::Linear,
    reft: Option<ReftModel>,
    lora: Option<tch_peft::lora::LoraAdapter>,
}

fn normalized_embedding(
    c: &Classifier,
    b: &crate::data::Batch,
    train: bool,
    loc: Option<&Tensor>,
) -> Result<Tensor> {
    let hook = match (&c.reft, loc) {
        (Some(r), Some(l)) => Some(r.hook(l)),
        _ => None,
    };
    let h = c.bert.forward_hooked(
        &b.input_ids,
        Some(&b.attention_mask),
        train,
        hook.as_ref().map(|h| h as &dyn tch_peft::models::ResidualHook),
    )?;
    let e = mean_pool(&h, &b.attention_mask);
    Ok(&e / e.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12))
}

fn build(
    method: Method,
    cfg: &RunConfig,
    batcher: &TextBatcher,
    prompts: &[String; 2],
) -> Result<Classifier> {
    let bcfg = BertConfig::from_pretrained(&cfg.model_dir)?;
    let mut base = nn::VarStore::new(cfg.device);
    let adapter_vs = nn::VarStore::new(cfg.device);
    let all_linear = ["query", "key", "value", "dense"];
    let builder = match method {
        Method::Lora | Method::Dora => Some(LoraBuilder::new(
            &adapter_vs.root(),
            LoraConfig {
                r: 8,
                lora_alpha: 16.0,
                use_dora: method == Method::Dora,
                exclude_modules: Some(tch_peft::target::TargetModules::list(["pooler.dense"])),
                ..LoraConfig::for_targets(all_linear)
            },
        )?),
        _ => None,
    };
    let bert = Bert::new(&base.root(), &bcfg, builder.as_ref())?;
    let lora = builder.map(|b| b.finish()).transpose()?;
    load_weights(&base, &cfg.model_dir)?;
    if let Some(l) = &lora {
        l.init_from_base_weights()?;
    }
    base.freeze();
    let reft = match method {
        Method::LoReft => Some(ReftModel::new(
            &adapter_vs.root(),
            ReftConfig::new(
                InterventionConfig::new(InterventionKind::LoReft, bcfg.hidden_size, 4),
                ReftLayers::List(vec![(bcfg.num_hidden_layers - 2).max(0)]),
                format!("f{0}+l{0}", cfg.max_length / 2 + 1).parse()?,
            ),
            bcfg.num_hidden_layers,
        )?),
        _ => None,
    };
    let head_vs = nn::VarStore::new(cfg.device);
    let head = nn::linear(head_vs.root() / "head", bcfg.hidden_size, 2, Default::default());
    let c = Classifier { base, head_vs, adapter_vs, bert, head, reft, lora };
    // the zero-shot head: 20 × the prompt embeddings
    let prompts: Vec<Example> = prompts
        .iter()
        .map(|p| Example { text: p.to_string(), label: 0, domain: String::new() })
        .collect();
    let pb = batcher.batch(&prompts, cfg.device)?;
    let w = {
        let _off = c.lora.as_ref().map(|l| l.disable_adapters()).transpose()?;
        tch::no_grad(|| normalized_embedding(&c, &pb, false, None))?
    };
    tch::no_grad(|| {
        c.head.ws.shallow_clone().copy_(&(w * 20.0));
        if let Some(b) = &c.head.bs {
            let _ = b.shallow_clone().zero_();
        }
    });
    Ok(c)
}

fn locations(c: &Classifier, b: &crate::data::Batch, device: Device) -> Result<Option<Tensor>> {
    match &c.reft {
        Some(r) => {
            let offsets = vec![0; b.lengths.len()];
            Ok(Some(r.config().positions.batch_locations(&b.lengths, &offsets, true, device)?))
        }
        None => Ok(None),
    }
}

fn accuracy(c: &Classifier, batcher: &TextBatcher, ex: &[Example], device: Device) -> Result<f64> {
    let mut correct = 0i64;
    for chunk in ex.chunks(64) {
        let b = batcher.batch(chunk, device)?;
        let loc = locations(c, &b, device)?;
        let logits = tch::no_grad(|| {
            normalized_embedding(c, &b, false, loc.as_ref()).map(|e| e.apply(&c.head))
        })?;
        correct += logits.argmax(-1, false).eq_tensor(&b.labels).sum(Kind::Int64).int64_value(&[]);
    }
    Ok(correct as f64 / ex.len().max(1) as f64)
}

/// The trained variables: head, adapters, and the unfrozen encoder variables.
fn trained(c: &Classifier) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = Vec::new();
    for (prefix, vs) in [("head", &c.head_vs), ("adapter", &c.adapter_vs), ("encoder", &c.base)] {
        for (k, t) in vs.variables() {
            if t.requires_grad() {
                v.push((format!("{prefix}.{k}"), t));
            }
        }
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// One method set up for training: the encoder, head and adapters, which variables train, the
/// optimizers (AdamW over the head, the adapters and the encoder) and, for gradual unfreezing,
/// its schedule. [`run`] drives it; the `compare` bench times [`Trainer::step`] alone.
pub struct Trainer {
    c: Classifier,
    method: Method,
    device: Device,
    to_train: Vec<(String, Tensor)>,
    opts: Vec<nn::Optimizer>,
    schedule: Option<GradualUnfreezing>,
    steps: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("method", &self.method)
            .field("trained_variables", &self.to_train.len())
            .field("steps", &self.steps)
            .finish()
    }
}

impl Trainer {
    /// Builds `method` on the encoder of `cfg.model_dir` with a zero-shot head from `prompts`
    /// (seeded by `cfg.seed`); `total_steps` paces gradual unfreezing.
    pub fn new(
        method: Method,
        cfg: &RunConfig,
        batcher: &TextBatcher,
        prompts: &[String; 2],
        total_steps: usize,
    ) -> Result<Trainer> {
        tch::manual_seed(cfg.seed as i64);
        let mut c = build(method, cfg, batcher, prompts)?;
        match method {
            Method::ZeroShot => c.head_vs.freeze(),
            Method::Full | Method::GradualUnfreezing => c.base.unfreeze(),
            Method::TopLayers(k) => {
                let n = c.bert.config().num_hidden_layers;
                c.base.unfreeze();
                let mut plan = FreezePlan::new(
                    &c.base,
                    Select::predicate(|_| true).except(Select::layers((n - k).max(0)..n)),
                )?;
                plan.apply()?;
            }
            _ => {}
        }
        // what trains at some point (kept at the best epoch, and saved)
        let to_train = trained(&c);
        let schedule = if method == Method::GradualUnfreezing {
            let groups = LayerGroups::from_store(&c.base, &[], &[])?;
            let every = (total_steps / groups.groups.len().max(1)).max(1);
            Some(GradualUnfreezing::new(&c.base, groups, every)?)
        } else {
            None
        };
        let lr = method.default_lr();
        let opts = if method == Method::ZeroShot {
            Vec::new()
        } else {
            vec![
                nn::AdamW::default().build(&c.head_vs, lr)?,
                nn::AdamW::default().build(&c.adapter_vs, lr)?,
                nn::AdamW::default().build(&c.base, lr)?,
            ]
        };
        Ok(Trainer { c, method, device: cfg.device, to_train, opts, schedule, steps: 0 })
    }

    /// One training step on `batch` at learning rate `lr`: forward, cross-entropy, backward,
    /// AdamW, ReFT's retraction, gradual unfreezing's schedule. Returns the loss (not synced).
    pub fn step(&mut self, batch: &crate::data::Batch, lr: f64) -> Result<Tensor> {
        if self.opts.is_empty() {
            return Err(config_error("method", "the zero-shot head does not train"));
        }
        for o in self.opts.iter_mut() {
            o.set_lr(lr);
        }
        let loc = locations(&self.c, batch, self.device)?;
        let logits = normalized_embedding(&self.c, batch, true, loc.as_ref())?.apply(&self.c.head);
        let loss = logits.cross_entropy_for_logits(&batch.labels);
        if let Some(s) = self.schedule.as_mut() {
            if self.steps > 0 {
                s.advance();
            }
        }
        for o in self.opts.iter_mut() {
            o.zero_grad();
        }
        loss.backward();
        for o in self.opts.iter_mut() {
            o.step();
        }
        if let Some(r) = &self.c.reft {
            r.retract()?;
        }
        self.steps += 1;
        Ok(loss.detach())
    }

    /// Accuracy on `examples` (batches of 64, no gradients).
    pub fn accuracy(&self, batcher: &TextBatcher, examples: &[Example]) -> Result<f64> {
        accuracy(&self.c, batcher, examples, self.device)
    }
}

/// Trains `method` on `task` with `cfg` and evaluates it; returns the result and the final
/// encoder + head stores (for WiSE-FT).
pub fn run(
    method: Method,
    task: &Task,
    batcher: &TextBatcher,
    cfg: &RunConfig,
    lr: Option<f64>,
) -> Result<(RunResult, nn::VarStore, nn::VarStore)> {
    tch_peft::memory::reset_peak(cfg.device);
    let steps_per_epoch = task.train.len().div_ceil(cfg.batch.max(1));
    let total = (steps_per_epoch * cfg.epochs).max(1);
    let mut t = Trainer::new(method, cfg, batcher, &task.prompts, total)?;
    let lr = lr.unwrap_or(method.default_lr());
    let mut step_times = Vec::new();
    let mut val_curve = Vec::new();
    if method != Method::ZeroShot {
        let warm = (total / 10).max(1);
        let mut best = (-1.0f64, Vec::<Tensor>::new());
        let mut since_best = 0;
        let mut step = 0usize;
        let mut train = task.train.clone();
        // a progress bar on stderr (hidden when it is not a terminal)
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24} {bar:30} {pos}/{len} steps {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(method.name());
        for epoch in 0..cfg.epochs {
            shuffle(&mut train, cfg.seed.wrapping_add(epoch as u64));
            for chunk in train.chunks(cfg.batch) {
                let scale = if step < warm {
                    (step + 1) as f64 / warm as f64
                } else {
                    (total - step) as f64 / (total - warm).max(1) as f64
                };
                let t0 = Instant::now();
                let b = batcher.batch(chunk, cfg.device)?;
                let _loss = t.step(&b, lr * scale.max(0.0))?;
                if let Device::Cuda(i) = cfg.device {
                    tch::Cuda::synchronize(i as i64);
                }
                step_times.push(t0.elapsed().as_secs_f64() * 1e3);
                step += 1;
                bar.inc(1);
            }
            let val = t.accuracy(batcher, &task.val)?;
            val_curve.push(val);
            if val > best.0 {
                best = (val, t.to_train.iter().map(|(_, v)| v.copy()).collect());
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= cfg.patience {
                    break;
                }
            }
        }
        bar.finish_and_clear();
        // keep the best epoch
        tch::no_grad(|| {
            for ((_, v), b) in t.to_train.iter().zip(&best.1) {
                v.shallow_clone().copy_(b);
            }
        });
    }
    let to_train = std::mem::take(&mut t.to_train);
    let c = t.c;
    let accuracies = task
        .tests
        .iter()
        .map(|(n, ex)| Ok((n.clone(), accuracy(&c, batcher, ex, cfg.device)?)))
        .collect::<Result<Vec<_>>>()?;
    let peak_memory_bytes = tch_peft::memory::peak_bytes(cfg.device);
    let report = tch_peft::ParamReport::from_var_stores(&[&c.base, &c.head_vs, &c.adapter_vs]);
    let trainable = to_train.iter().map(|(_, t)| t.numel() as i64).sum();
    let to_save = to_train;
    let adapter_bytes = if to_save.is_empty() {
        0
    } else {
        let f = std::env::temp_dir()
            .join(format!("tch-peft-compare-{}.safetensors", std::process::id()));
        tch_peft::io::write_safetensors(&f, &to_save, None)?;
        let n = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&f);
        n
    };
    step_times.sort_by(f64::total_cmp);
    let step_ms = step_times.get(step_times.len() / 2).copied().unwrap_or(0.0);
    let result = RunResult {
        method: method.name(),
        seed: cfg.seed,
        trainable,
        total: report.total,
        accuracies,
        step_ms,
        val_curve,
        adapter_bytes,
        peak_memory_bytes,
    };
    Ok((result, c.base, c.head_vs))
}

/// One point of a WiSE-FT curve: `α` and the accuracy per test set.
pub type WisePoint = (f64, Vec<(String, f64)>);

/// WiSE-FT between a zero-shot and a fully fine-tuned run (encoder and head stores from
/// [`run`]): accuracy per test set at each `α`.
pub fn wise_ft_curve(
    zero: &(nn::VarStore, nn::VarStore),
    tuned: &(nn::VarStore, nn::VarStore),
    alphas: &[f64],
    task: &Task,
    batcher: &TextBatcher,
    cfg: &RunConfig,
) -> Result<Vec<WisePoint>> {
    let c = build(Method::ZeroShot, cfg, batcher, &task.prompts)?;
    let mut out = Vec::new();
    for &a in alphas {
        tch_peft::merge::wise_ft::interpolate_into(&c.base, &zero.0, &tuned.0, a, false)?;
        tch_peft::merge::wise_ft::interpolate_into(&c.head_vs, &zero.1, &tuned.1, a, false)?;
        let accs = task
            .tests
            .iter()
            .map(|(n, ex)| Ok((n.clone(), accuracy(&c, batcher, ex, cfg.device)?)))
            .collect::<Result<Vec<_>>>()?;
        out.push((a, accs));
    }
    Ok(out)
}

/// Task C of REAL-DATA: Kotzias Amazon (train 700 incl. 70 for validation, test 300) → Yelp
/// and IMDb (1000 each).
pub fn kotzias_task(dir: impl AsRef<Path>, seed: u64) -> Result<Task> {
    let dir = dir.as_ref();
    let mut amazon = crate::data::kotzias(dir, "amazon")?;
    shuffle(&mut amazon, seed);
    if amazon.len() < 1000 {
        return Err(config_error(
            "kotzias",
            format!("expected 1000 Amazon sentences, found {}", amazon.len()),
        ));
    }
    let test = amazon.split_off(700);
    let val = amazon.split_off(630);
    Ok(Task {
        name: "C: Kotzias Amazon → Yelp/IMDb".into(),
        train: amazon,
        val,
        tests: vec![
            ("amazon (ID)".into(), test),
            ("yelp".into(), crate::data::kotzias(dir, "yelp")?),
            ("imdb".into(), crate::data::kotzias(dir, "imdb")?),
        ],
        prompts: sentiment_prompts(),
    })
}

/// Task A of REAL-DATA: VADER movie-review snippets (balanced; train 2000, validation 200,
/// test 1000) → tweets, Amazon product snippets, NYT editorials (1000 each, balanced).
pub fn vader_task(dir: impl AsRef<Path>, seed: u64) -> Result<Task> {
    let dir = dir.as_ref();
    let movie = crate::data::vader(dir, "movieReviewSnippets")?;
    let mut m = crate::data::balanced(&movie, 1600, seed);
    if m.len() < 3200 {
        return Err(config_error(
            "vader",
            format!("expected 3200 balanced movie snippets, found {}", m.len()),
        ));
    }
    let test = m.split_off(2200);
    let val = m.split_off(2000);
    let mut tests = vec![("movie (ID)".to_string(), test)];
    for (name, file) in
        [("tweets", "tweets"), ("amazon", "amazonReviewSnippets"), ("nyt", "nytEditorialSnippets")]
    {
        tests
            .push((name.into(), crate::data::balanced(&crate::data::vader(dir, file)?, 500, seed)));
    }
    Ok(Task {
        name: "A: VADER movie snippets → tweets/Amazon/NYT".into(),
        train: m,
        val,
        tests,
        prompts: sentiment_prompts(),
    })
}

/// Label prompts for Task B's zero-shot head (ham, spam): REAL-DATA notes that the sentiment
/// prompts mean nothing for spam.
pub fn spam_prompts() -> [String; 2] {
    [
        "This is a normal personal or work email about a real conversation.".to_string(),
        "This is spam: an unsolicited advertisement, a scam, buy now, free money offer."
            .to_string(),
    ]
}

/// Task B of REAL-DATA: SpamAssassin early mail (easy-ham-1 + spam-1, balanced; train 630,
/// validation 70, test 300) → later mail (easy-ham-2 + spam-2, 1000 balanced) and hard ham
/// (250 ham: accuracy is specificity).
pub fn spam_task(dir: impl AsRef<Path>, seed: u64) -> Result<Task> {
    let dir = dir.as_ref();
    let mut early = crate::data::spam(dir, "easy-ham-1")?;
    early.extend(crate::data::spam(dir, "spam-1")?);
    let mut e = crate::data::balanced(&early, 500, seed);
    if e.len() < 1000 {
        return Err(config_error(
            "spam",
            format!("expected 1000 balanced early messages, found {}", e.len()),
        ));
    }
    let test = e.split_off(700);
    let val = e.split_off(630);
    let mut later = crate::data::spam(dir, "easy-ham-2")?;
    later.extend(crate::data::spam(dir, "spam-2")?);
    Ok(Task {
        name: "B: SpamAssassin early → later mail, hard ham".into(),
        train: e,
        val,
        tests: vec![
            ("early (ID)".into(), test),
            ("later".into(), crate::data::balanced(&later, 500, seed)),
            ("hard-ham".into(), crate::data::spam(dir, "hard-ham-1")?),
        ],
        prompts: spam_prompts(),
    })
}
