//! [`LoraAdapter`]: the LoRA adapters of a model — PEFT's `PeftModel` surface: several named
//! adapters, the active set, disable, delete, merge a subset, save and load each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Tensor};

use super::config::LoraConfig;
use super::conv2d::LoraConv2d;
use super::copy::ModuleCopy;
use super::embedding::LoraEmbedding;
use super::linear::{is_float, LoraLinear};
use super::model::{check_adapter_name, module_path, DEFAULT_ADAPTER_NAME};
use super::stack::{LoraStack, StackLayer};
use crate::adapter::{Adapter, AdapterKind, Applicable, ParamReport};
use crate::io;
use crate::{Error, Result};

/// The LoRA adapters of one model: merge, enable, activate, add, delete, save and load them.
///
/// It holds handles on the [`LoraStack`]s inside the model (shared storage and state), so what
/// is done here changes what the model computes. Each adapter has a name (`"default"` unless
/// given) and its own config; the forward sums the **active** adapters (PEFT's `set_adapter`
/// with a list). Methods without an adapter name act on the *current* adapter: the first active
/// one (or the first added when none is active), PEFT's `active_adapter`.
#[derive(Debug)]
pub struct LoraAdapter {
    adapters: Vec<(String, LoraConfig)>,
    active: Vec<String>,
    pub(crate) linears: Vec<LoraStack<LoraLinear>>,
    pub(crate) embeddings: Vec<LoraStack<LoraEmbedding>>,
    pub(crate) convs: Vec<LoraStack<LoraConv2d>>,
    /// Trainable copies of `modules_to_save` modules.
    pub(crate) copies: Vec<LoraStack<ModuleCopy>>,
    /// Layers built without LoRA (no adapter can be added to them later).
    plain: Vec<String>,
}

/// Every adapter is off while this guard lives (PEFT's `disable_adapter()` context); dropping it
/// turns back on the adapters that were on. Merged adapters were unmerged when it was made.
#[derive(Debug)]
#[must_use = "the adapters are enabled again when the guard is dropped"]
pub struct DisabledAdapters<'a> {
    adapter: &'a LoraAdapter,
    /// The enabled flag of every layer, in `for_each_layer` order.
    flags: Vec<bool>,
}

impl Drop for DisabledAdapters<'_> {
    fn drop(&mut self) {
        let mut flags = self.flags.iter();
        // enabling never fails (only disabling may unmerge); no layer was added meanwhile (the
        // guard borrows the adapter)
        let _ = self.adapter.for_each_layer(|_, _, l| match flags.next() {
            Some(true) => l.enable_dyn(true),
            _ => Ok(()),
        });
    }
}

/// Dynamic view of a layer of any type inside a stack.
trait AnyLayer {
    fn named(&self) -> Vec<(String, Tensor)>;
    fn enable_dyn(&self, on: bool) -> Result<()>;
    fn is_enabled_dyn(&self) -> bool;
    fn set_ready(&self, ready: bool);
    fn init_dyn(&self) -> Result<()>;
}

impl<L: StackLayer> AnyLayer for L {
    fn named(&self) -> Vec<(String, Tensor)> {
        self.named_tensors()
    }
    fn enable_dyn(&self, on: bool) -> Result<()> {
        self.enable(on)
    }
    fn is_enabled_dyn(&self) -> bool {
        self.enabled()
    }
    fn set_ready(&self, ready: bool) {
        self.set_base_ready(ready)
    }
    fn init_dyn(&self) -> Result<()> {
        self.init_from_base()
    }
}

/// Stack operations that do not depend on the layer type.
trait AnyStack {
    fn module(&self) -> &str;
    fn has(&self, name: &str) -> bool;
    fn merge(&self, names: &[String], safe: bool) -> Result<()>;
    fn unmerge_all(&self) -> Result<()>;
    fn set_active(&self, names: &[String]) -> Result<()>;
    fn merged_adapters(&self) -> Vec<String>;
    fn remove(&self, name: &str) -> Result<Vec<(String, Tensor)>>;
    fn merge_and_unload(&self, names: &[String]) -> Result<Vec<(String, Tensor)>>;
    fn each(&self, f: &mut dyn FnMut(&str, &str, &dyn AnyLayer) -> Result<()>) -> Result<()>;
}

impl<L: StackLayer> AnyStack for LoraStack<L> {
    fn module(&self) -> &str {
        LoraStack::module(self)
    }
    fn has(&self, name: &str) -> bool {
        LoraStack::has(self, name)
    }
    fn merge(&self, names: &[String], safe: bool) -> Result<()> {
        LoraStack::merge(self, names, safe)
    }
    fn unmerge_all(&self) -> Result<()> {
        LoraStack::unmerge_all(self)
    }
    fn set_active(&self, names: &[String]) -> Result<()> {
        LoraStack::set_active(self, names)
    }
    fn merged_adapters(&self) -> Vec<String> {
        LoraStack::merged_adapters(self)
    }
    fn remove(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        Ok(LoraStack::remove(self, name)?.map(|l| l.named_tensors()).unwrap_or_default())
    }
    fn merge_and_unload(&self, names: &[String]) -> Result<Vec<(String, Tensor)>> {
        LoraStack::merge_and_unload(self, names)
    }
    fn each(&self, f: &mut dyn FnMut(&str, &str, &dyn AnyLayer) -> Result<()>) -> Result<()> {
        let module = self.module().to_string();
        self.for_each(|n, l| f(&module, n, l))
    }
}

impl LoraAdapter {
    pub(crate) fn from_parts(
        adapters: Vec<(String, LoraConfig)>,
        linears: Vec<LoraStack<LoraLinear>>,
        embeddings: Vec<LoraStack<LoraEmbedding>>,
        convs: Vec<LoraStack<LoraConv2d>>,
        copies: Vec<LoraStack<ModuleCopy>>,
        plain: Vec<String>,
    ) -> Result<Self> {
        let active = vec![adapters[0].0.clone()];
        let a = LoraAdapter { adapters, active, linears, embeddings, convs, copies, plain };
        a.apply_active()?;
        Ok(a)
    }

    /// Every stack: embeddings, convolutions, linear layers, then module copies, each in build
    /// order.
    fn stacks(&self) -> impl Iterator<Item = &dyn AnyStack> + '_ {
        let e = self.embeddings.iter().map(|s| s as &dyn AnyStack);
        let c = self.convs.iter().map(|s| s as &dyn AnyStack);
        let l = self.linears.iter().map(|s| s as &dyn AnyStack);
        e.chain(c).chain(l).chain(self.copies.iter().map(|s| s as &dyn AnyStack))
    }

    /// The current adapter's trainable module copies (`modules_to_save`), in build order.
    pub fn module_copies(&self) -> Vec<ModuleCopy> {
        self.copies.iter().filter_map(|s| s.get(self.current())).collect()
    }

    fn for_each_layer(
        &self,
        mut f: impl FnMut(&str, &str, &dyn AnyLayer) -> Result<()>,
    ) -> Result<()> {
        self.stacks().try_for_each(|s| s.each(&mut f))
    }

    fn apply_active(&self) -> Result<()> {
        self.stacks().try_for_each(|s| s.set_active(&self.active))
    }

    fn check_known(&self, name: &str) -> Result<()> {
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let known: Vec<&str> = self.adapter_names();
        Err(Error::config(
            "adapter_name",
            format!("no adapter named `{name}` (the model has {known:?})"),
        ))
    }

    /// The current adapter's name: the first active adapter, else the first added.
    pub fn current(&self) -> &str {
        self.active.first().unwrap_or(&self.adapters[0].0)
    }

    /// The names of the adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The active adapters (their branches are summed in the forward).
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// The current adapter's config.
    pub fn config(&self) -> &LoraConfig {
        self.adapter_config(self.current()).expect("the current adapter exists")
    }

    /// The config of the adapter `name`.
    pub fn adapter_config(&self, name: &str) -> Option<&LoraConfig> {
        self.adapters.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// The per-layer stacks of adapted linear layers, in build order.
    pub fn linear_stacks(&self) -> &[LoraStack<LoraLinear>] {
        &self.linears
    }

    /// The current adapter's linear layers, in build order.
    pub fn layers(&self) -> Vec<LoraLinear> {
        self.layers_of(self.current())
    }

    /// The linear layers of the adapter `name`, in build order.
    pub fn layers_of(&self, name: &str) -> Vec<LoraLinear> {
        self.linears.iter().filter_map(|s| s.get(name)).collect()
    }

    /// The current adapter's embedding tables, in build order.
    pub fn embeddings(&self) -> Vec<LoraEmbedding> {
        self.embeddings.iter().filter_map(|s| s.get(self.current())).collect()
    }

    /// The current adapter's 2-D convolutions, in build order.
    pub fn convs(&self) -> Vec<LoraConv2d> {
        self.convs.iter().filter_map(|s| s.get(self.current())).collect()
    }

    /// The modules that any active adapter adapts (each once): embeddings, convolutions, linear
    /// layers, then module copies, each in build order. [`modules_of`](Self::modules_of) gives
    /// one adapter's.
    pub fn modules(&self) -> Vec<&str> {
        self.stacks().filter(|s| self.active.iter().any(|n| s.has(n))).map(|s| s.module()).collect()
    }

    /// The modules the adapter `name` adapts.
    pub fn modules_of(&self, name: &str) -> Vec<&str> {
        self.stacks().filter(|s| s.has(name)).map(|s| s.module()).collect()
    }

    /// The adapter's tensors with PEFT's module-relative names (`<module>.lora_A.weight`).
    fn tensors_of(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        let _ = self.for_each_layer(|_, n, l| {
            if n == name {
                v.extend(l.named());
            }
            Ok(())
        });
        v
    }

    /// PEFT's `print_trainable_parameters` for the model: every variable of the base store
    /// `base` (counted as trainable where it still requires grad) and every adapter's tensors,
    /// so `trainable%` is the share of the whole model that trains.
    ///
    /// ```
    /// use tch::nn;
    /// use tch_peft::lora::{self, LoraBuilder, LoraConfig};
    /// let (base, adapters) = (nn::VarStore::new(tch::Device::Cpu), nn::VarStore::new(tch::Device::Cpu));
    /// let builder = LoraBuilder::new(&adapters.root(), LoraConfig::for_targets(["q"]))?;
    /// let _q = lora::linear(&(base.root() / "q"), 16, 16, Default::default(), Some(&builder))?;
    /// let adapter = builder.finish()?;
    /// let report = adapter.report(&base);
    /// assert_eq!((report.trainable, report.total), (2 * 8 * 16, 16 * 16 + 16 + 2 * 8 * 16));
    /// # Ok::<(), tch_peft::Error>(())
    /// ```
    pub fn report(&self, base: &nn::VarStore) -> ParamReport {
        let mut all: Vec<(String, Tensor)> = base.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.extend(self.adapter_tensors());
        ParamReport::from_named_tensors(&all)
    }

    /// Every adapter's tensors, suffixed with the adapter's name when there are several.
    fn adapter_tensors(&self) -> Vec<(String, Tensor)> {
        self.adapters
            .iter()
            .flat_map(|(n, _)| {
                let multi = self.adapters.len() > 1;
                self.tensors_of(n)
                    .into_iter()
                    .map(move |(k, t)| (if multi { format!("{k} ({n})") } else { k }, t))
            })
            .collect()
    }

    /// Runs every layer's initialisation that depends on the pre-trained base weight (DoRA
    /// magnitudes, PiSSA/OLoRA factors and residuals, the copies of `modules_to_save`; see
    /// [`LoraLinear::init_from_base_weights`]), for every adapter. Call it after loading the
    /// pre-trained weights when training a new adapter with DoRA, PiSSA or OLoRA; loading a
    /// trained adapter marks the layers initialised instead (a PiSSA/OLoRA adapter then expects
    /// the residual base it was trained on). A no-op for the other inits.
    pub fn init_from_base_weights(&self) -> Result<()> {
        self.for_each_layer(|_, _, l| l.init_dyn())
    }

    /// Makes exactly `names` active (PEFT's `set_adapter`); their branches are summed. Merged
    /// adapters are unmerged first, as PEFT does.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.check_known(n)?;
        }
        self.unmerge()?;
        let mut active: Vec<String> = Vec::new();
        for n in names {
            if !active.iter().any(|a| a == n) {
                active.push(n.to_string());
            }
        }
        self.active = active;
        self.apply_active()
    }

    /// Turns the branches of the active adapters on, or every adapter off (disabling unmerges
    /// first). See also [`disable_adapters`](Self::disable_adapters).
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        if enabled {
            self.apply_active()
        } else {
            self.unmerge()?;
            self.stacks().try_for_each(|s| s.set_active(&[]))
        }
    }

    /// Turns every adapter off until the returned guard is dropped (PEFT's `disable_adapter()`
    /// context manager): the model computes as its base (plus what `bias = "lora_only"` trained,
    /// which the base bias does not hold). Merged adapters are unmerged first.
    ///
    /// ```
    /// # use tch::{nn, Device};
    /// # use tch_peft::lora::{LoraBuilder, LoraConfig};
    /// # let (base_vs, adapter_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    /// # let lora = LoraBuilder::new(&adapter_vs.root(), LoraConfig::for_targets(["q"]))?;
    /// # let q = lora.linear(&(base_vs.root() / "q"), 16, 16, Default::default())?;
    /// let adapter = lora.finish()?;
    /// {
    ///     let _off = adapter.disable_adapters()?;
    ///     // ... forward of the base model ...
    /// }
    /// assert!(q.as_lora().unwrap().is_enabled());
    /// # Ok::<(), tch_peft::Error>(())
    /// ```
    pub fn disable_adapters(&self) -> Result<DisabledAdapters<'_>> {
        self.unmerge()?;
        let mut flags = Vec::new();
        self.for_each_layer(|_, _, l| {
            flags.push(l.is_enabled_dyn());
            Ok(())
        })?;
        self.for_each_layer(|_, _, l| l.enable_dyn(false))?;
        Ok(DisabledAdapters { adapter: self, flags })
    }

    /// Merges the active adapters, in order.
    pub fn merge(&self) -> Result<()> {
        self.merge_names(&self.active.clone(), false)
    }

    /// Merges the active adapters, refusing non-finite results (nothing stays merged on
    /// failure).
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_names(&self.active.clone(), true)
    }

    /// Merges the named adapters, in the given order (PEFT's `merge_adapter(adapter_names)`);
    /// with `safe`, non-finite results are refused. A merged adapter is in the base weight
    /// whether or not it is active. On failure nothing merged by this call stays merged.
    pub fn merge_adapters(&self, names: &[&str], safe: bool) -> Result<()> {
        for n in names {
            self.check_known(n)?;
        }
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.merge_names(&names, safe)
    }

    fn merge_names(&self, names: &[String], safe: bool) -> Result<()> {
        let before: Vec<usize> = self.stacks().map(|s| s.merged_adapters().len()).collect();
        let result = self.stacks().try_for_each(|s| s.merge(names, safe));
        if result.is_err() {
            // leave nothing merged by this call: the stacks that merged get everything above
            // their previous count unmerged (in reverse), which restores them bit-exactly
            for (s, keep) in self.stacks().zip(before) {
                let merged = s.merged_adapters();
                if merged.len() > keep {
                    s.unmerge_all()?;
                    let again: Vec<String> = merged[..keep].to_vec();
                    s.merge(&again, false)?;
                }
            }
        }
        result
    }

    /// The adapter names merged into the base weights (over all layers, in merge order).
    pub fn merged_adapters(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.stacks() {
            for n in s.merged_adapters() {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// Unmerges every merged adapter, restoring the original weights bit-exactly.
    pub fn unmerge(&self) -> Result<()> {
        self.stacks().try_for_each(AnyStack::unmerge_all)
    }

    /// Adds the adapter `name` with `config` to the layers built adapted (PEFT's `add_adapter`),
    /// its variables under `root` (a root no other adapter uses: a fresh store, or a sub-path).
    /// The base weights are taken as loaded: DoRA/PiSSA/OLoRA initialise from them now. The new
    /// adapter is not active (see [`set_active`](Self::set_active)).
    ///
    /// Errors: a name in use or unusable; a config that targets a layer built without LoRA (tch
    /// cannot re-wire the model: declare the adapter on the builder with
    /// [`LoraBuilder::with_adapter`](super::LoraBuilder::with_adapter) instead); a listed
    /// target that matches no layer; anything the layer constructors refuse. On error nothing
    /// is added.
    pub fn add_adapter(&mut self, name: &str, root: &nn::Path, config: LoraConfig) -> Result<()> {
        self.add_adapter_impl(name, root, config, true)
    }

    pub(crate) fn add_adapter_impl(
        &mut self,
        name: &str,
        root: &nn::Path,
        config: LoraConfig,
        init: bool,
    ) -> Result<()> {
        check_adapter_name(name)?;
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Err(Error::config("adapter_name", format!("`{name}` exists already")));
        }
        config.validate()?;
        let targets = config.targets()?;
        if let Some(p) = self.plain.iter().find(|p| targets.matches(p)) {
            return Err(Error::Unsupported {
                field: "target_modules".into(),
                reason: format!(
                    "`{p}` was built without LoRA, so no adapter can be added to it; declare \
                     `{name}` on the builder (`LoraBuilder::with_adapter`) before building the \
                     model"
                ),
            });
        }
        let saves = |m: &str| config.saves_module(m);
        if let Some(p) = self.plain.iter().find(|p| saves(p)) {
            return Err(Error::Unsupported {
                field: "modules_to_save".into(),
                reason: format!(
                    "`{p}` was built without a trainable copy; declare `{name}` on the builder \
                     (`LoraBuilder::with_adapter`) before building the model"
                ),
            });
        }
        // modules copied in full are not LoRA targets (as PEFT)
        let pick = |m: &str| targets.matches(m) && !saves(m);
        let pick_e: Vec<bool> = self.embeddings.iter().map(|s| pick(s.module())).collect();
        let pick_c: Vec<bool> = self.convs.iter().map(|s| pick(s.module())).collect();
        let pick_l: Vec<bool> = self.linears.iter().map(|s| pick(s.module())).collect();
        let pick_s: Vec<bool> = self.copies.iter().map(|s| saves(s.module())).collect();
        for s in &self.copies {
            let _ = targets.matches(s.module());
        }
        targets.check_all_matched()?;
        config.check_saved_matched(self.copies.iter().map(|s| s.module()))?;
        // ranks and variable names are checked for every layer before anything is registered
        precheck(&self.embeddings, &pick_e, root, &config)?;
        precheck(&self.convs, &pick_c, root, &config)?;
        precheck(&self.linears, &pick_l, root, &config)?;
        precheck(&self.copies, &pick_s, root, &config)?;
        let r = (|| -> Result<()> {
            attach_all(&self.embeddings, &pick_e, name, root, &config, init)?;
            attach_all(&self.convs, &pick_c, name, root, &config, init)?;
            attach_all(&self.linears, &pick_l, name, root, &config, init)?;
            attach_all(&self.copies, &pick_s, name, root, &config, init)
        })();
        if let Err(e) = r {
            // take the half-added adapter off the layers again
            for s in self.stacks() {
                let _ = s.remove(name);
            }
            return Err(e);
        }
        self.adapters.push((name.into(), config));
        // not active: its layers are off
        self.apply_active()
    }

    /// Deletes the adapter `name` from every layer (PEFT's `delete_adapter`; refused while it
    /// is merged). With `store`, its variables are also removed from that VarStore, so an
    /// optimizer built later does not see them. If it was active, the remaining active
    /// adapters stay; if none remains, the first remaining adapter becomes active. The last
    /// adapter cannot be deleted (drop the model's adapter instead).
    pub fn delete_adapter(&mut self, name: &str, store: Option<&nn::VarStore>) -> Result<()> {
        self.check_known(name)?;
        if self.adapters.len() == 1 {
            return Err(Error::config(
                "adapter_name",
                format!("`{name}` is the only adapter; it cannot be deleted"),
            ));
        }
        if let Some(s) = self.stacks().find(|s| s.merged_adapters().iter().any(|n| n == name)) {
            return Err(Error::MergeState { module: s.module().into(), state: "already merged" });
        }
        let mut removed = Vec::new();
        for s in self.stacks() {
            removed.extend(s.remove(name)?);
        }
        self.adapters.retain(|(n, _)| n != name);
        self.active.retain(|n| n != name);
        if self.active.is_empty() {
            self.active.push(self.adapters[0].0.clone());
        }
        if let Some(vs) = store {
            crate::vars::remove_from_store(vs, &tensors_only(&removed));
        }
        self.apply_active()
    }

    /// PEFT's `merge_and_unload`: merges the active adapters into the base weights for good and
    /// removes every adapter from the model, which then runs as the plain base model with the
    /// merged weights (zero adapter overhead). Unlike [`merge`](Self::merge), no copy of the
    /// pre-merge weights is kept (layer by layer, so the peak is one layer's copy): there is no
    /// unmerge. With `store`, the adapters' variables also leave it.
    ///
    /// On an error (a layer that cannot merge, e.g. `lora_bias` into a layer without bias), the
    /// layers processed before the one named in the error keep their merged weights.
    ///
    /// ```
    /// # use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
    /// # use tch_peft::lora::{self, LoraBuilder, LoraConfig};
    /// let (base, adapters) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    /// let cfg = LoraConfig { r: 2, ..LoraConfig::for_targets(["proj"]) };
    /// let builder = LoraBuilder::new(&adapters.root(), cfg)?;
    /// let proj = lora::linear(&(base.root() / "proj"), 8, 4, Default::default(), Some(&builder))?;
    /// let lora = builder.finish()?;
    /// # tch::no_grad(|| { for (_, t) in adapters.variables() { let _ = t.shallow_clone().normal_(0.0, 0.1); } });
    /// let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
    /// let before = proj.forward_t(&x, false);
    /// lora.merge_and_unload(Some(&adapters))?;
    /// let after = proj.forward_t(&x, false); // the plain layer with merged weights
    /// assert!((before - after).abs().max().double_value(&[]) < 1e-5);
    /// assert!(adapters.variables().is_empty());
    /// # Ok::<(), tch_peft::Error>(())
    /// ```
    pub fn merge_and_unload(self, store: Option<&nn::VarStore>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut dropped = Vec::new();
        for s in self.stacks() {
            dropped.extend(s.merge_and_unload(&self.active)?);
        }
        if let Some(vs) = store {
            crate::vars::remove_from_store(vs, &tensors_only(&dropped));
        }
        Ok(())
    }

    /// Writes the current adapter's tensors as safetensors with PEFT's keys
    /// (`base_model.model.<module>.lora_A.weight`) and metadata `{"format": "pt"}`, atomically.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_adapter_safetensors(self.current(), path)
    }

    /// As [`save_safetensors`](Self::save_safetensors), for the adapter `name`.
    pub fn save_adapter_safetensors(&self, name: &str, path: impl AsRef<Path>) -> Result<()> {
        self.check_known(name)?;
        let tensors: Vec<(String, Tensor)> =
            self.tensors_of(name).into_iter().map(|(k, t)| (io::to_peft_key(&k), t)).collect();
        io::write_safetensors(path, &tensors, Some(io::pt_metadata()))
    }

    /// Loads the current adapter's tensors from a safetensors file (keys with or without the
    /// `base_model.model.` prefix), strictly: every tensor must be present with the right shape,
    /// and the file may hold no other tensor. Nothing is written unless everything checks.
    pub fn load_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        self.load_adapter_safetensors(self.current(), path)
    }

    /// As [`load_safetensors`](Self::load_safetensors), into the adapter `name`.
    pub fn load_adapter_safetensors(&self, name: &str, path: impl AsRef<Path>) -> Result<()> {
        self.check_known(name)?;
        let path = path.as_ref();
        let file = io::read_safetensors(path)?;
        let mut by_name = HashMap::new();
        // PEFT saves the whole base table of a targeted embedding (`save_embedding_layers`); it
        // is not part of the adapter, so it is skipped
        let embedding_bases: Vec<String> = self
            .embeddings
            .iter()
            .filter(|s| s.has(name))
            .map(|s| format!("{}.base_layer.weight", s.module()))
            .collect();
        for (k, t) in file.tensors {
            let key = io::from_peft_key(&k).to_string();
            if embedding_bases.contains(&key) {
                continue;
            }
            if by_name.insert(key, t).is_some() {
                return Err(Error::CorruptFile {
                    file: path.to_path_buf(),
                    reason: format!("tensor `{k}` appears twice (with and without prefix)"),
                });
            }
        }
        let own = self.tensors_of(name);
        let mut pairs = Vec::with_capacity(own.len());
        for (key, dst) in &own {
            let src = by_name.remove(key).ok_or_else(|| Error::MissingTensor {
                name: io::to_peft_key(key),
                file: path.to_path_buf(),
            })?;
            if src.size() != dst.size() {
                return Err(Error::ShapeMismatch {
                    name: io::to_peft_key(key),
                    expected: dst.size(),
                    actual: src.size(),
                });
            }
            if !is_float(src.kind()) {
                return Err(Error::DtypeMismatch {
                    name: io::to_peft_key(key),
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
        if let Some(s) = self.stacks().find(|s| !s.merged_adapters().is_empty()) {
            return Err(Error::MergeState { module: s.module().into(), state: "already merged" });
        }
        let _guard = tch::no_grad_guard();
        for (dst, src) in pairs {
            let mut d = dst.shallow_clone();
            d.f_copy_(&src.f_to_device(d.device())?.f_to_kind(d.kind())?)?;
        }
        self.for_each_layer(|_, n, l| {
            if n == name {
                l.set_ready(true);
            }
            Ok(())
        })
    }

    /// The directory PEFT uses for adapter `name` under `dir`: `dir` itself for `"default"`,
    /// `dir/<name>` otherwise.
    fn adapter_dir(name: &str, dir: &Path) -> PathBuf {
        if name == DEFAULT_ADAPTER_NAME {
            dir.to_path_buf()
        } else {
            dir.join(name)
        }
    }

    /// Saves every adapter as a PEFT adapter directory: `adapter_config.json` and
    /// `adapter_model.safetensors`, `"default"` in `dir` and any other adapter in `dir/<name>/`
    /// (PEFT's `save_pretrained`).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let names = self.adapter_names();
        self.save_pretrained_selected(dir, &names)
    }

    /// As [`save_pretrained`](Self::save_pretrained), for the named adapters only (PEFT's
    /// `selected_adapters`).
    pub fn save_pretrained_selected(&self, dir: impl AsRef<Path>, names: &[&str]) -> Result<()> {
        for n in names {
            self.check_known(n)?;
        }
        for n in names {
            let dir = Self::adapter_dir(n, dir.as_ref());
            write_config(&dir, self.adapter_config(n).expect("checked"))?;
            self.save_adapter_safetensors(n, dir.join(io::PEFT_WEIGHTS_NAME))?;
        }
        Ok(())
    }

    /// Saves the adapter `name` as a plain LoRA of rank `2r` that applies to the **original**
    /// base weights (PEFT's `save_pretrained(…, path_initial_model_for_weight_conversion=…)`):
    /// for PiSSA/OLoRA the base holds `W − s·B₀A₀`, so the trained update is
    /// `s·(BA − B₀A₀) = s·[B | −B₀]·[A ; A₀]`. `initial` is the adapter directory saved right
    /// after initialisation (before training), e.g. with [`save_pretrained`](Self::save_pretrained);
    /// its `A₀`, `B₀` are read from there. The written config has `r` and the rank pattern
    /// doubled, `lora_alpha` (and the alpha pattern) scaled to keep the scaling (×2, or ×√2 with
    /// rsLoRA — PEFT doubles an rsLoRA alpha pattern, which changes its scaling) and the default
    /// init, so it loads anywhere as an ordinary LoRA adapter. Written to `dir` (`dir/<name>` for
    /// a non-default adapter).
    ///
    /// Errors: `use_dora` or `lora_bias` (their tensors do not convert this way), embedding or
    /// convolution layers, or an `initial` file that lacks a factor or has other shapes.
    pub fn save_pretrained_converted(
        &self,
        name: &str,
        dir: impl AsRef<Path>,
        initial: impl AsRef<Path>,
    ) -> Result<()> {
        self.check_known(name)?;
        let config = self.adapter_config(name).expect("checked");
        for (flag, field) in [(config.use_dora, "use_dora"), (config.lora_bias, "lora_bias")] {
            if flag {
                return Err(Error::Unsupported {
                    field: field.into(),
                    reason: "only lora_A/lora_B adapters convert to a plain LoRA of rank 2r".into(),
                });
            }
        }
        if let Some(m) = self.modules_of(name).into_iter().find(|m| {
            self.embeddings.iter().any(|s| s.module() == *m)
                || self.convs.iter().any(|s| s.module() == *m)
        }) {
            return Err(Error::Unsupported {
                field: "target_modules".into(),
                reason: format!("`{m}` is not a linear layer; only linear layers are converted"),
            });
        }
        let initial = initial.as_ref().join(io::PEFT_WEIGHTS_NAME);
        let init: HashMap<String, Tensor> = io::read_safetensors(&initial)?
            .tensors
            .into_iter()
            .map(|(k, t)| (io::from_peft_key(&k).to_string(), t))
            .collect();
        let mut tensors = Vec::new();
        for l in self.layers_of(name) {
            let get = |suffix: &str, like: &Tensor| -> Result<Tensor> {
                let key = format!("{}.{suffix}", l.module());
                let t = init.get(&key).ok_or_else(|| Error::MissingTensor {
                    name: io::to_peft_key(&key),
                    file: initial.clone(),
                })?;
                if t.size() != like.size() {
                    return Err(Error::ShapeMismatch {
                        name: io::to_peft_key(&key),
                        expected: like.size(),
                        actual: t.size(),
                    });
                }
                Ok(t.f_to_kind(like.kind())?.f_to_device(like.device())?)
            };
            let (a, b) = (l.lora_a(), l.lora_b());
            let (a0, b0) = (get("lora_A.weight", a)?, get("lora_B.weight", b)?);
            let a2 = tch::no_grad(|| Tensor::f_cat(&[a.shallow_clone(), a0], 0))?;
            let b2 = tch::no_grad(|| Tensor::f_cat(&[b.shallow_clone(), b0.f_neg()?], 1))?;
            tensors.push((io::to_peft_key(&format!("{}.lora_A.weight", l.module())), a2));
            tensors.push((io::to_peft_key(&format!("{}.lora_B.weight", l.module())), b2));
        }
        let keep = if config.use_rslora { 2f64.sqrt() } else { 2.0 };
        let converted = LoraConfig {
            r: 2 * config.r,
            lora_alpha: config.lora_alpha * keep,
            rank_pattern: config.rank_pattern.iter().map(|(k, v)| (k.clone(), 2 * v)).collect(),
            alpha_pattern: config
                .alpha_pattern
                .iter()
                .map(|(k, v)| (k.clone(), v * keep))
                .collect(),
            init_lora_weights: super::config::LoraInit::Kaiming,
            ..config.clone()
        };
        let dir = Self::adapter_dir(name, dir.as_ref());
        write_config(&dir, &converted)?;
        io::write_safetensors(dir.join(io::PEFT_WEIGHTS_NAME), &tensors, Some(io::pt_metadata()))
    }

    /// Loads the weights of every adapter from a directory laid out as
    /// [`save_pretrained`](Self::save_pretrained) writes it (or PEFT does). Build the model with
    /// [`LoraConfig::from_pretrained`] first so that the shapes agree.
    pub fn load_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        for (n, _) in &self.adapters {
            let file = Self::adapter_dir(n, dir.as_ref()).join(io::PEFT_WEIGHTS_NAME);
            self.load_adapter_safetensors(n, file)?;
        }
        Ok(())
    }

    /// Adds the PEFT adapter directory `dir` (its `adapter_config.json` and
    /// `adapter_model.safetensors`) as the adapter `name`, its variables under `root` (PEFT's
    /// `load_adapter`). The new adapter is not active.
    pub fn load_adapter(
        &mut self,
        dir: impl AsRef<Path>,
        name: &str,
        root: &nn::Path,
    ) -> Result<()> {
        let dir = dir.as_ref();
        let config = LoraConfig::from_pretrained(dir)?;
        self.add_adapter_impl(name, root, config, false)?;
        if let Err(e) = self.load_adapter_safetensors(name, dir.join(io::PEFT_WEIGHTS_NAME)) {
            let _ = self.delete_adapter(name, None);
            return Err(e);
        }
        Ok(())
    }
}

/// Writes `config` as PEFT's `adapter_config.json` in `dir` (created), atomically.
fn write_config(dir: &Path, config: &LoraConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut json = serde_json::to_value(config)?;
    if let Some(map) = json.as_object_mut() {
        map.insert("peft_type".into(), "LORA".into());
        map.insert("inference_mode".into(), true.into());
        map.insert("base_model_name_or_path".into(), serde_json::Value::Null);
        map.insert("revision".into(), serde_json::Value::Null);
    }
    let text = serde_json::to_string_pretty(&json)?;
    io::write_atomic(&dir.join(io::PEFT_CONFIG_NAME), text.as_bytes())
}

/// Checks the rank bound and that the variable names are free on the picked stacks.
fn precheck<L: StackLayer>(
    stacks: &[LoraStack<L>],
    pick: &[bool],
    root: &nn::Path,
    config: &LoraConfig,
) -> Result<()> {
    for (s, on) in stacks.iter().zip(pick) {
        if !on {
            continue;
        }
        let (i, o) = L::rank_bound(s.base());
        let r = config.rank_for(s.module())?;
        if r > i.min(o) {
            return Err(Error::RankTooLarge {
                module: s.module().into(),
                rank: r,
                in_features: i,
                out_features: o,
            });
        }
        if let Some(v) = L::registered(&module_path(root, s.module())) {
            return Err(Error::DuplicateParameter(v));
        }
    }
    Ok(())
}

/// Attaches adapter `name` to the picked stacks.
fn attach_all<L: StackLayer>(
    stacks: &[LoraStack<L>],
    pick: &[bool],
    name: &str,
    root: &nn::Path,
    config: &LoraConfig,
    init: bool,
) -> Result<()> {
    for (s, on) in stacks.iter().zip(pick) {
        if !on {
            continue;
        }
        let layer = L::attach(s.base(), &module_path(root, s.module()), s.module(), config)?;
        if init {
            layer.init_from_base()?;
        } else {
            layer.set_base_ready(false);
        }
        s.push(name, layer);
    }
    Ok(())
}

fn tensors_only(named: &[(String, Tensor)]) -> Vec<Tensor> {
    named.iter().map(|(_, t)| t.shallow_clone()).collect()
}

impl Adapter for LoraAdapter {
    /// DoRA when the current adapter's config has `use_dora`, else LoRA.
    fn kind(&self) -> AdapterKind {
        if self.config().use_dora {
            AdapterKind::Dora
        } else {
            AdapterKind::Lora
        }
    }

    /// The current adapter's name.
    fn name(&self) -> &str {
        self.current()
    }

    /// The current adapter's tensors.
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.tensors_of(self.current())
    }
}

impl Applicable for LoraAdapter {
    /// [`merge`](LoraAdapter::merge): the active adapters into every layer that hosts them.
    fn apply(&mut self) -> Result<()> {
        self.merge()
    }

    /// [`unmerge`](LoraAdapter::unmerge).
    fn revert(&mut self) -> Result<()> {
        self.unmerge()
    }

    /// Whether every active adapter is merged into every layer that hosts it (what
    /// [`apply`](Applicable::apply) does).
    fn is_applied(&self) -> bool {
        let mut hosting = 0;
        for s in self.stacks() {
            let merged = s.merged_adapters();
            for name in self.active.iter().filter(|n| s.has(n)) {
                if !merged.contains(name) {
                    return false;
                }
                hosting += 1;
            }
        }
        hosting > 0
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
