//! Attaching LoRA to a model the caller builds ([`LoraBuilder`]) and handling all of a model's
//! LoRA layers at once ([`LoraAdapter`]: merge, enable, save, load).

use std::path::Path;
use std::sync::Mutex;

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::config::LoraConfig;
use super::conv2d::{Conv2dConfig, LoraConv2d};
use super::embedding::LoraEmbedding;
use super::linear::{path_name, LoraLinear};
use crate::adapter::{Adapter, AdapterKind, ParamReport};
use crate::io;
use crate::target::Targets;
use crate::{Error, Result};

/// What [`LoraAdapter`] does with each adapted layer, whatever its type.
trait LoraLayer: Adapter {
    fn module(&self) -> &str;
    fn merge_layer(&self, safe: bool) -> Result<()>;
    fn unmerge_layer(&self) -> Result<()>;
    fn merged(&self) -> bool;
    fn enable(&self, enabled: bool) -> Result<()>;
}

/// The three layer types expose the same merge/enable surface under the same names.
macro_rules! impl_lora_layer {
    ($($t:ty),*) => {$(
        impl LoraLayer for $t {
            fn module(&self) -> &str {
                <$t>::module(self)
            }
            fn merge_layer(&self, safe: bool) -> Result<()> {
                if safe {
                    self.safe_merge()
                } else {
                    self.merge()
                }
            }
            fn unmerge_layer(&self) -> Result<()> {
                self.unmerge()
            }
            fn merged(&self) -> bool {
                self.is_merged()
            }
            fn enable(&self, enabled: bool) -> Result<()> {
                self.set_enabled(enabled)
            }
        }
    )*};
}

impl_lora_layer!(LoraLinear, LoraEmbedding, LoraConv2d);

/// The name PEFT gives an adapter when none is given.
pub const DEFAULT_ADAPTER_NAME: &str = "default";

/// A linear layer that is LoRA-adapted or not, as the config's targets decided at build time.
#[derive(Debug)]
pub enum MaybeLoraLinear {
    /// Not targeted: the plain base layer.
    Plain(nn::Linear),
    /// Targeted: the base layer with a LoRA adapter.
    Lora(LoraLinear),
}

impl MaybeLoraLinear {
    /// The LoRA layer, if this one was targeted.
    pub fn as_lora(&self) -> Option<&LoraLinear> {
        match self {
            MaybeLoraLinear::Lora(l) => Some(l),
            MaybeLoraLinear::Plain(_) => None,
        }
    }

    /// The base layer.
    pub fn base(&self) -> &nn::Linear {
        match self {
            MaybeLoraLinear::Plain(l) => l,
            MaybeLoraLinear::Lora(l) => l.base(),
        }
    }

    /// Forward with input checks (see [`LoraLinear::f_forward_t`]).
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            MaybeLoraLinear::Plain(l) => {
                let in_features = l.ws.size()[1];
                if xs.size().last() != Some(&in_features) {
                    return Err(Error::ShapeMismatch {
                        name: "input of linear layer".into(),
                        expected: vec![-1, in_features],
                        actual: xs.size(),
                    });
                }
                Ok(xs.f_linear(&l.ws, l.bs.as_ref())?)
            }
            MaybeLoraLinear::Lora(l) => l.f_forward_t(xs, train),
        }
    }
}

impl ModuleT for MaybeLoraLinear {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            MaybeLoraLinear::Plain(l) => xs.linear(&l.ws, l.bs.as_ref()),
            MaybeLoraLinear::Lora(l) => l.forward_t(xs, train),
        }
    }
}

/// A 2-D convolution that is LoRA-adapted or not, as the config's targets decided.
#[derive(Debug)]
pub enum MaybeLoraConv2d {
    /// Not targeted: the plain convolution.
    Plain(nn::Conv2D),
    /// Targeted: the convolution with a LoRA adapter.
    Lora(LoraConv2d),
}

impl MaybeLoraConv2d {
    /// The LoRA layer, if this one was targeted.
    pub fn as_lora(&self) -> Option<&LoraConv2d> {
        match self {
            MaybeLoraConv2d::Lora(l) => Some(l),
            MaybeLoraConv2d::Plain(_) => None,
        }
    }
}

impl ModuleT for MaybeLoraConv2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            MaybeLoraConv2d::Plain(c) => xs.apply(c),
            MaybeLoraConv2d::Lora(l) => l.forward_t(xs, train),
        }
    }
}

/// An embedding table that is LoRA-adapted or not, as the config's targets decided.
#[derive(Debug)]
pub enum MaybeLoraEmbedding {
    /// Not targeted: the plain table `[V, d]`.
    Plain(Tensor),
    /// Targeted: the table with a LoRA adapter.
    Lora(LoraEmbedding),
}

impl MaybeLoraEmbedding {
    /// The base table `[V, d]` (merged values while the adapter is merged).
    pub fn weight(&self) -> &Tensor {
        match self {
            MaybeLoraEmbedding::Plain(w) => w,
            MaybeLoraEmbedding::Lora(l) => l.weight(),
        }
    }

    /// The LoRA layer, if this one was targeted.
    pub fn as_lora(&self) -> Option<&LoraEmbedding> {
        match self {
            MaybeLoraEmbedding::Lora(l) => Some(l),
            MaybeLoraEmbedding::Plain(_) => None,
        }
    }

    /// Embeddings of `ids`; an index outside `[0, V)` is an error (on the CPU; on CUDA it is a
    /// device-side assert, so check indices first there).
    pub fn f_forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            MaybeLoraEmbedding::Plain(w) => Ok(Tensor::f_embedding(w, ids, -1, false, false)?),
            MaybeLoraEmbedding::Lora(l) => l.f_forward(ids),
        }
    }
}

/// Build-time targeting: a model calls [`LoraBuilder::linear`] where it would call
/// `nn::linear`, and gets a plain or LoRA layer according to the config's `target_modules`
/// matched against the layer's path — PEFT's `get_peft_model` for a graph tch cannot walk.
///
/// Adapter variables go to the adapter root given at construction, under the same path as the
/// base layer (the two-store pattern: the base store stays frozen and loads strictly, the
/// optimizer sees only the adapter store).
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use tch_peft::lora::{LoraBuilder, LoraConfig};
///
/// let base_vs = nn::VarStore::new(Device::Cpu);
/// let adapter_vs = nn::VarStore::new(Device::Cpu);
/// let lora = LoraBuilder::new(&adapter_vs.root(), LoraConfig::for_targets(["q_proj"]))?;
/// let p = base_vs.root() / "layers" / 0;
/// let q = lora.linear(&(&p / "q_proj"), 32, 32, Default::default())?; // adapted
/// let k = lora.linear(&(&p / "k_proj"), 32, 32, Default::default())?; // plain
/// let adapter = lora.finish()?;
/// assert!(q.as_lora().is_some() && k.as_lora().is_none());
/// assert_eq!(adapter.modules(), ["layers.0.q_proj"]);
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug)]
pub struct LoraBuilder<'a> {
    root: nn::Path<'a>,
    name: String,
    config: LoraConfig,
    targets: Targets,
    layers: Mutex<Vec<LoraLinear>>,
    embeddings: Mutex<Vec<LoraEmbedding>>,
    convs: Mutex<Vec<LoraConv2d>>,
}

impl<'a> LoraBuilder<'a> {
    /// A builder for the adapter named `"default"`, registering adapter variables under `root`.
    /// Validates the config; `target_modules` must be set.
    pub fn new(root: &nn::Path<'a>, config: LoraConfig) -> Result<Self> {
        Self::named(root, DEFAULT_ADAPTER_NAME, config)
    }

    /// A builder for a named adapter.
    pub fn named(root: &nn::Path<'a>, name: &str, config: LoraConfig) -> Result<Self> {
        config.validate()?;
        let targets = config.targets()?;
        Ok(LoraBuilder {
            root: root.clone(),
            name: name.to_string(),
            config,
            targets,
            layers: Mutex::new(Vec::new()),
            embeddings: Mutex::new(Vec::new()),
            convs: Mutex::new(Vec::new()),
        })
    }

    /// The config.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Builds `nn::linear(base_path, in_dim, out_dim, c)` and wraps it with LoRA when the
    /// config targets `base_path`'s dotted name.
    pub fn linear(
        &self,
        base_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        c: nn::LinearConfig,
    ) -> Result<MaybeLoraLinear> {
        let base = nn::linear(base_path, in_dim, out_dim, c);
        self.wrap(&path_name(base_path), base)
    }

    /// Wraps an existing layer named `module` when the config targets it. Either way the base
    /// layer's weight and bias stop requiring grad (PEFT freezes everything but the adapters;
    /// freeze the rest of the base store yourself, e.g. `base_vs.freeze()`).
    pub fn wrap(&self, module: &str, base: nn::Linear) -> Result<MaybeLoraLinear> {
        if !self.targets.matches(module) {
            // as PEFT's `_mark_only_adapters_as_trainable`: what is not adapter is frozen
            let _ = base.ws.set_requires_grad(false);
            if let Some(bs) = &base.bs {
                let _ = bs.set_requires_grad(false);
            }
            return Ok(MaybeLoraLinear::Plain(base));
        }
        let p = module.split('.').fold(self.root.clone(), |p, c| p / c);
        let layer = LoraLinear::with_module_name(base, &p, module, &self.config)?;
        // the base weight is (usually) loaded after the model is built: DoRA magnitudes must be
        // initialised from it, or loaded, before use
        layer.set_base_init_done(false);
        self.layers.lock().unwrap_or_else(|e| e.into_inner()).push(layer.share());
        Ok(MaybeLoraLinear::Lora(layer))
    }

    /// Creates a GPT-2 style `Conv1D` layer (`base_path/weight: [in_dim, out_dim]`,
    /// `base_path/bias: [out_dim]`, `y = x W + b`) and wraps it with LoRA when the config targets
    /// `base_path` (see [`LoraLinear::from_conv1d`]). The plain layer is returned as an
    /// `nn::Linear` whose weight is the transposed view of the stored one.
    pub fn conv1d(
        &self,
        base_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
    ) -> Result<MaybeLoraLinear> {
        let weight =
            base_path.var("weight", &[in_dim, out_dim], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let bias = base_path.zeros("bias", &[out_dim]);
        let module = path_name(base_path);
        let _ = weight.set_requires_grad(false);
        let _ = bias.set_requires_grad(false);
        if !self.targets.matches(&module) {
            return Ok(MaybeLoraLinear::Plain(nn::Linear { ws: weight.f_tr()?, bs: Some(bias) }));
        }
        let p = module.split('.').fold(self.root.clone(), |p, c| p / c);
        let layer = LoraLinear::from_conv1d(weight, Some(bias), &p, &module, &self.config)?;
        self.layers.lock().unwrap_or_else(|e| e.into_inner()).push(layer.share());
        Ok(MaybeLoraLinear::Lora(layer))
    }

    /// Builds `nn::conv2d(base_path, in_dim, out_dim, ksize, c)` and wraps it with LoRA when the
    /// config targets `base_path` (see [`LoraConv2d`]).
    pub fn conv2d(
        &self,
        base_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        ksize: i64,
        c: nn::ConvConfig,
    ) -> Result<MaybeLoraConv2d> {
        let base = nn::conv2d(base_path, in_dim, out_dim, ksize, c);
        let module = path_name(base_path);
        if !self.targets.matches(&module) {
            let _ = base.ws.set_requires_grad(false);
            if let Some(bs) = &base.bs {
                let _ = bs.set_requires_grad(false);
            }
            return Ok(MaybeLoraConv2d::Plain(base));
        }
        let conv = Conv2dConfig {
            stride: [c.stride; 2],
            padding: [c.padding; 2],
            dilation: [c.dilation; 2],
            groups: c.groups,
            bias: c.bias,
            ws_init: c.ws_init,
            bs_init: c.bs_init,
            padding_mode: c.padding_mode,
        };
        let p = module.split('.').fold(self.root.clone(), |p, c| p / c);
        let layer = LoraConv2d::new(base, conv, &p, &module, &self.config)?;
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).push(layer.share());
        Ok(MaybeLoraConv2d::Lora(layer))
    }

    /// Creates the table `base_path/weight: [num, dim]` (initialised as `nn::embedding` does) and
    /// wraps it with LoRA when the config targets `base_path`'s dotted name.
    pub fn embedding(
        &self,
        base_path: &nn::Path,
        num: i64,
        dim: i64,
        c: nn::EmbeddingConfig,
    ) -> Result<MaybeLoraEmbedding> {
        let weight = nn::embedding(base_path, num, dim, c).ws;
        self.wrap_embedding(&path_name(base_path), weight)
    }

    /// Wraps an existing table `[V, d]` named `module` when the config targets it. Either way
    /// the table stops requiring grad.
    pub fn wrap_embedding(&self, module: &str, weight: Tensor) -> Result<MaybeLoraEmbedding> {
        if !self.targets.matches(module) {
            let _ = weight.set_requires_grad(false);
            return Ok(MaybeLoraEmbedding::Plain(weight));
        }
        let p = module.split('.').fold(self.root.clone(), |p, c| p / c);
        let layer = LoraEmbedding::new(weight, &p, module, &self.config)?;
        self.embeddings.lock().unwrap_or_else(|e| e.into_inner()).push(layer.share());
        Ok(MaybeLoraEmbedding::Lora(layer))
    }

    /// Ends the build: errors when a listed target (or layer index) matched no layer, and
    /// returns the handle on every adapted layer.
    pub fn finish(self) -> Result<LoraAdapter> {
        self.targets.check_all_matched()?;
        let layers = self.layers.into_inner().unwrap_or_else(|e| e.into_inner());
        let embeddings = self.embeddings.into_inner().unwrap_or_else(|e| e.into_inner());
        let convs = self.convs.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(LoraAdapter { name: self.name, config: self.config, layers, embeddings, convs })
    }
}

/// Builds a plain `nn::linear`, or a LoRA layer when `lora` is given and targets the path: the
/// one-line change a model makes to accept an optional LoRA config.
pub fn linear(
    base_path: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    c: nn::LinearConfig,
    lora: Option<&LoraBuilder>,
) -> Result<MaybeLoraLinear> {
    match lora {
        Some(b) => b.linear(base_path, in_dim, out_dim, c),
        None => Ok(MaybeLoraLinear::Plain(nn::linear(base_path, in_dim, out_dim, c))),
    }
}

/// An embedding table that is LoRA-adapted when `lora` targets the path: the embedding twin of
/// [`linear`].
pub fn embedding(
    base_path: &nn::Path,
    num: i64,
    dim: i64,
    c: nn::EmbeddingConfig,
    lora: Option<&LoraBuilder>,
) -> Result<MaybeLoraEmbedding> {
    match lora {
        Some(b) => b.embedding(base_path, num, dim, c),
        None => Ok(MaybeLoraEmbedding::Plain(nn::embedding(base_path, num, dim, c).ws)),
    }
}

/// All LoRA layers of one adapter in a model: merge, enable, save and load them together.
///
/// It holds handles that share storage and state with the layers inside the model, so merging
/// here changes what the model computes.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    config: LoraConfig,
    layers: Vec<LoraLinear>,
    embeddings: Vec<LoraEmbedding>,
    convs: Vec<LoraConv2d>,
}

impl LoraAdapter {
    /// The config the adapter was built with.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapted linear layers, in build order.
    pub fn layers(&self) -> &[LoraLinear] {
        &self.layers
    }

    /// The adapted embedding tables, in build order.
    pub fn embeddings(&self) -> &[LoraEmbedding] {
        &self.embeddings
    }

    /// The adapted 2-D convolutions, in build order.
    pub fn convs(&self) -> &[LoraConv2d] {
        &self.convs
    }

    /// Every adapted layer: embeddings, convolutions, then linear layers, each in build order.
    fn all(&self) -> impl Iterator<Item = &dyn LoraLayer> + '_ {
        let embeddings = self.embeddings.iter().map(|e| e as &dyn LoraLayer);
        let convs = self.convs.iter().map(|c| c as &dyn LoraLayer);
        embeddings.chain(convs).chain(self.layers.iter().map(|l| l as &dyn LoraLayer))
    }

    /// The adapted module paths: embeddings, convolutions, then linear layers, each in build
    /// order.
    pub fn modules(&self) -> Vec<&str> {
        self.all().map(LoraLayer::module).collect()
    }

    fn is_any_merged(&self) -> bool {
        self.all().any(LoraLayer::merged)
    }

    /// Parameter report over the adapter's own tensors.
    pub fn report(&self) -> ParamReport {
        ParamReport::from_named_tensors(&self.named_tensors())
    }

    /// Runs every layer's initialisation that depends on the pre-trained base weight (DoRA
    /// magnitudes, PiSSA/OLoRA factors and residuals; see
    /// [`LoraLinear::init_from_base_weights`]). Call it after loading the pre-trained weights when
    /// training a new adapter with DoRA, PiSSA or OLoRA; loading a trained adapter marks the
    /// layers initialised instead (a PiSSA/OLoRA adapter then expects the residual base it was
    /// trained on). A no-op for the other inits.
    pub fn init_from_base_weights(&self) -> Result<()> {
        self.layers.iter().try_for_each(LoraLinear::init_from_base_weights)
    }

    /// Merges every layer. On failure the layers merged so far are unmerged again.
    pub fn merge(&self) -> Result<()> {
        self.merge_all(false)
    }

    /// Merges every layer, refusing non-finite results (nothing stays merged on failure).
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_all(true)
    }

    fn merge_all(&self, safe: bool) -> Result<()> {
        let result = self.all().try_for_each(|l| l.merge_layer(safe));
        if result.is_err() {
            // leave nothing merged
            self.unmerge()?;
        }
        result
    }

    /// Unmerges every merged layer, restoring the original weights bit-exactly.
    pub fn unmerge(&self) -> Result<()> {
        self.all().filter(|l| l.merged()).try_for_each(LoraLayer::unmerge_layer)
    }

    /// Turns the adapter branch of every layer on or off (disabling unmerges first).
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        self.all().try_for_each(|l| l.enable(enabled))
    }

    /// Writes the adapter's tensors as safetensors with PEFT's keys
    /// (`base_model.model.<module>.lora_A.weight`) and metadata `{"format": "pt"}`, atomically.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> =
            self.state_dict().into_iter().map(|(k, t)| (io::to_peft_key(&k), t)).collect();
        io::write_safetensors(path, &tensors, Some(io::pt_metadata()))
    }

    /// Loads the adapter's tensors from a safetensors file (keys with or without the
    /// `base_model.model.` prefix), strictly: every tensor must be present with the right shape,
    /// and the file may hold no other tensor. Nothing is written unless everything checks.
    pub fn load_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = io::read_safetensors(path)?;
        let mut by_name = std::collections::HashMap::new();
        // PEFT saves the whole base table of a targeted embedding (`save_embedding_layers`); it
        // is not part of the adapter, so it is skipped
        let embedding_bases: Vec<String> =
            self.embeddings.iter().map(|e| format!("{}.base_layer.weight", e.module())).collect();
        for (k, t) in file.tensors {
            let name = io::from_peft_key(&k).to_string();
            if embedding_bases.contains(&name) {
                continue;
            }
            if by_name.insert(name, t).is_some() {
                return Err(Error::CorruptFile {
                    file: path.to_path_buf(),
                    reason: format!("tensor `{k}` appears twice (with and without prefix)"),
                });
            }
        }
        let own = self.state_dict();
        let mut pairs = Vec::with_capacity(own.len());
        for (name, dst) in &own {
            let src = by_name.remove(name).ok_or_else(|| Error::MissingTensor {
                name: io::to_peft_key(name),
                file: path.to_path_buf(),
            })?;
            if src.size() != dst.size() {
                return Err(Error::ShapeMismatch {
                    name: io::to_peft_key(name),
                    expected: dst.size(),
                    actual: src.size(),
                });
            }
            if !super::linear::is_float(src.kind()) {
                return Err(Error::DtypeMismatch {
                    name: io::to_peft_key(name),
                    expected: "a floating-point kind".into(),
                    actual: src.kind(),
                });
            }
            pairs.push((dst, src));
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(Error::UnexpectedTensor {
                name: io::to_peft_key(extra),
                file: path.to_path_buf(),
            });
        }
        if self.is_any_merged() {
            return Err(Error::MergeState { module: self.name.clone(), state: "already merged" });
        }
        let _guard = tch::no_grad_guard();
        for (dst, src) in pairs {
            let mut d = dst.shallow_clone();
            d.f_copy_(&src.f_to_device(d.device())?.f_to_kind(d.kind())?)?;
        }
        for l in &self.layers {
            l.set_base_init_done(true);
        }
        Ok(())
    }

    /// The directory PEFT uses for this adapter under `dir`: `dir` itself for `"default"`,
    /// `dir/<name>` otherwise.
    fn adapter_dir(&self, dir: &Path) -> std::path::PathBuf {
        if self.name == DEFAULT_ADAPTER_NAME {
            dir.to_path_buf()
        } else {
            dir.join(&self.name)
        }
    }

    /// Saves as a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`
    /// (a non-default adapter goes to `dir/<name>/`, as PEFT does).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = self.adapter_dir(dir.as_ref());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut json = serde_json::to_value(&self.config)?;
        if let Some(map) = json.as_object_mut() {
            map.insert("peft_type".into(), "LORA".into());
            map.insert("task_type".into(), serde_json::Value::Null);
            map.insert("inference_mode".into(), true.into());
            map.insert("base_model_name_or_path".into(), serde_json::Value::Null);
            map.insert("revision".into(), serde_json::Value::Null);
        }
        let text = serde_json::to_string_pretty(&json)?;
        io::write_atomic(&dir.join(io::PEFT_CONFIG_NAME), text.as_bytes())?;
        self.save_safetensors(dir.join(io::PEFT_WEIGHTS_NAME))
    }

    /// Loads the weights of a PEFT adapter directory written by
    /// [`save_pretrained`](Self::save_pretrained) (or by PEFT) into this adapter. Build the
    /// model with [`LoraConfig::from_pretrained`] first so that the shapes agree.
    pub fn load_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.load_safetensors(self.adapter_dir(dir.as_ref()).join(io::PEFT_WEIGHTS_NAME))
    }
}

impl LoraConfig {
    /// Reads `adapter_config.json` from a PEFT adapter directory (or the file itself). Refuses a
    /// `peft_type` other than `LORA`.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join(io::PEFT_CONFIG_NAME) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::CorruptFile { file: file.clone(), reason: e.to_string() })?;
        if let Some(t) = value.get("peft_type").and_then(|v| v.as_str()) {
            if t != "LORA" {
                return Err(Error::Unsupported {
                    field: "peft_type".into(),
                    reason: format!("`{t}` adapters are not LoRA"),
                });
            }
        }
        let config: LoraConfig = serde_json::from_value(value)
            .map_err(|e| Error::CorruptFile { file: file.clone(), reason: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }
}

impl Adapter for LoraAdapter {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Lora
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.all().flat_map(|l| l.named_tensors()).collect()
    }

    fn can_apply(&self) -> bool {
        true
    }

    /// A [`safe_merge`](LoraAdapter::safe_merge) of every layer.
    fn apply(&mut self) -> Result<()> {
        self.safe_merge()
    }

    fn revert(&mut self) -> Result<()> {
        self.unmerge()
    }

    fn is_applied(&self) -> bool {
        self.all().next().is_some() && self.all().all(LoraLayer::merged)
    }
}
