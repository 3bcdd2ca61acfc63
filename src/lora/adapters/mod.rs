//! [`LoraAdapter`]: the LoRA adapters of a model — PEFT's `PeftModel` surface: several named
//! adapters, the active set, disable, delete, merge a subset (this file), save and load each
//! (`io.rs`), combine several into a new one (`combine.rs`).

mod combine;
mod io;
mod lifecycle;

pub use combine::{Combination, MajoritySign, TaskMerge};

use tch::{nn, Tensor};

use super::config::LoraConfig;
use super::layer::{
    Attach, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, LoraStack, ModuleCopy,
};
use crate::adapter::{Adapter, AdapterKind, Applicable, ParamReport};
use crate::{Error, Result};

/// The name PEFT gives an adapter when none is given.
pub const DEFAULT_ADAPTER_NAME: &str = "default";

/// Refuses adapter names that cannot be a directory or a path component.
pub(crate) fn check_adapter_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.contains(['.', '/', '\\'])
        || name.chars().any(char::is_whitespace)
        || name == ".."
        // PEFT's key remapping breaks on names contained in its prefix (its issue #2699)
        || "lora_".contains(name);
    if bad {
        return Err(Error::config(
            "adapter_name",
            format!(
                "`{name}` is not a usable adapter name: it must be non-empty, without dots, \
                 slashes or spaces, and not part of `lora_`"
            ),
        ));
    }
    Ok(())
}

/// The path `root/<module components>`.
pub(crate) fn module_path<'a>(root: &nn::Path<'a>, module: &str) -> nn::Path<'a> {
    module.split('.').fold(root.clone(), |p, c| p / c)
}

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
            Some(true) => l.enable(true),
            _ => Ok(()),
        });
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
    fn each(&self, f: &mut dyn FnMut(&str, &str, &dyn LoraLayer) -> Result<()>) -> Result<()>;
}

impl<L: Attach> AnyStack for LoraStack<L> {
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
    fn each(&self, f: &mut dyn FnMut(&str, &str, &dyn LoraLayer) -> Result<()>) -> Result<()> {
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
        mut f: impl FnMut(&str, &str, &dyn LoraLayer) -> Result<()>,
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
                v.extend(l.named_tensors());
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
    ///
    /// A tensor counts once: adapter tensors that live in `base` too (one store for both) and
    /// variables tied under two names are not counted twice.
    pub fn report(&self, base: &nn::VarStore) -> ParamReport {
        let mut all: Vec<(String, Tensor)> = Vec::new();
        let mut vars: Vec<(String, Tensor)> = base.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars.into_iter().chain(self.adapter_tensors()) {
            if !all.iter().any(|(_, seen)| crate::vars::same_tensor(seen, &t)) {
                all.push((name, t));
            }
        }
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
        self.for_each_layer(|_, _, l| l.init_from_base())
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
            flags.push(l.enabled());
            Ok(())
        })?;
        self.for_each_layer(|_, _, l| l.enable(false))?;
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
