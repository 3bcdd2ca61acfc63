//! Adding and removing a [`LoraAdapter`]'s adapters: a new named adapter on every layer its
//! config targets, deletion (with its variables), and PEFT's `merge_and_unload`.

use tch::{nn, Tensor};

use super::{check_adapter_name, module_path, LoraAdapter};
use crate::lora::config::LoraConfig;
use crate::lora::layer::{Attach, LoraStack};
use crate::{Error, Result};

impl LoraAdapter {
    /// Adds the adapter `name` with `config` to the layers built adapted (PEFT's `add_adapter`),
    /// its variables under `root` (a root no other adapter uses: a fresh store, or a sub-path).
    /// The base weights are taken as loaded: DoRA/PiSSA/OLoRA initialise from them now. The new
    /// adapter is not active (see [`set_active`](Self::set_active)).
    ///
    /// Errors: a name in use or unusable; a config that targets a layer built without LoRA (tch
    /// cannot re-wire the model: declare the adapter on the builder with
    /// [`LoraBuilder::with_adapter`](crate::lora::LoraBuilder::with_adapter) instead); a listed
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
}

/// Checks the rank bound and that the variable names are free on the picked stacks.
fn precheck<L: Attach>(
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
fn attach_all<L: Attach>(
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
        let layer =
            L::attach(s.base(), s.base_lock(), &module_path(root, s.module()), s.module(), config)?;
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
