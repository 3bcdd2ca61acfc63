//! Layer freezing for any tch model, through its `VarStore` names: freeze plans by target,
//! layer index or predicate, gradual unfreezing (ULMFiT), layer-wise learning-rate decay
//! (timm), frozen BatchNorm statistics.
//!
//! **The optimizer rule.** tch's optimizers skip a parameter whose gradient is undefined, and a
//! frozen variable (`requires_grad = false`) gets no gradient. So: change what is frozen
//! *before* `zero_grad`/`backward_step`, never between `backward` and `step` (a variable frozen
//! after `backward` still holds the gradient just computed and would be stepped). The safe path
//! is [`FreezePlan::apply`] (or a [`GradualUnfreezing`] call) at the start of a step, then
//! `opt.backward_step(&loss)`; unfreezing zeroes the stale gradient, so nothing from an earlier
//! step leaks into the first update. A variable registered non-trainable
//! (`nn::Path::zeros_no_train`, BatchNorm running statistics) is not in the optimizer at all;
//! unfreezing it is an error. Layer-wise learning rates use optimizer groups, which tch fixes
//! when the optimizer first sees a variable: assign them ([`LayerwiseLr::assign_groups`])
//! before building the optimizer.
//!
//! ```
//! use tch::{nn, Device};
//! use tch_peft::freeze::{FreezePlan, Select};
//! use tch_peft::Applicable;
//! let vs = nn::VarStore::new(Device::Cpu);
//! for i in 0..4 {
//!     let _ = nn::linear(vs.root() / "layers" / i / "fc", 8, 8, Default::default());
//! }
//! let _ = nn::linear(vs.root() / "head", 8, 2, Default::default());
//! // freeze the first two blocks
//! let mut plan = FreezePlan::new(&vs, Select::layers(0..2))?;
//! plan.apply()?;
//! let report = tch_peft::ParamReport::from_var_stores(&[&vs]);
//! assert_eq!(report.trainable, 2 * (8 * 8 + 8) + (8 * 2 + 2));
//! plan.revert()?; // everything trains again
//! # Ok::<(), tch_peft::Error>(())
//! ```

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn::{self, ModuleT, VarStore};
use tch::Tensor;

use crate::adapter::{Adapter, AdapterKind, Applicable, ParamReport};
use crate::target::{TargetModules, Targets};
use crate::vars::{optimizer_visible, same_tensor};
use crate::{Error, Result};

/// Which variables a plan acts on, by the module they belong to (a variable `a.b.weight` is in
/// module `a.b`).
pub enum Select {
    /// Every variable.
    All,
    /// PEFT's `target_modules` rules on the module names (exact or `.suffix` list, full-match
    /// regex); a listed name that matches nothing is an error.
    Targets(TargetModules),
    /// Modules whose block index ([`block_index`]: the first numeric path component, or the one
    /// after one of `layers_pattern`) is in the range.
    Layers {
        /// The indices.
        range: Range<i64>,
        /// The path component before the index (`"layers"`, `"h"`); empty for PEFT's default.
        layers_pattern: Vec<String>,
    },
    /// Variables whose full name satisfies the predicate.
    Predicate(Box<dyn Fn(&str) -> bool + Send + Sync>),
    /// Variables selected by the first and not by the second.
    Except(Box<Select>, Box<Select>),
    /// Variables selected by any.
    Any(Vec<Select>),
}

impl std::fmt::Debug for Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Select::All => write!(f, "All"),
            Select::Targets(t) => write!(f, "Targets({t:?})"),
            Select::Layers { range, layers_pattern } => {
                write!(f, "Layers({range:?}, {layers_pattern:?})")
            }
            Select::Predicate(_) => write!(f, "Predicate(..)"),
            Select::Except(a, b) => write!(f, "Except({a:?}, {b:?})"),
            Select::Any(v) => write!(f, "Any({v:?})"),
        }
    }
}

/// The module a variable belongs to: its name without the last component.
fn module_of(var: &str) -> &str {
    var.rsplit_once('.').map_or("", |(m, _)| m)
}

impl Select {
    /// Modules listed by name (exact or `.suffix`, PEFT's list rules).
    pub fn modules<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Select::Targets(TargetModules::list(names))
    }

    /// Blocks with an index in `range` (PEFT's default index rule).
    pub fn layers(range: Range<i64>) -> Self {
        Select::Layers { range, layers_pattern: Vec::new() }
    }

    /// The first `n` blocks.
    pub fn first_layers(n: i64) -> Self {
        Select::layers(0..n)
    }

    /// Variables whose name satisfies `f`.
    pub fn predicate(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Select::Predicate(Box::new(f))
    }

    /// This selection without what `other` selects.
    pub fn except(self, other: Select) -> Self {
        Select::Except(Box::new(self), Box::new(other))
    }

    /// The names of `names` this selects, in order. Errors: an invalid regex or layer pattern;
    /// a listed target, or a layer range, that matches nothing.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<String>> {
        let mask = self.mask(names)?;
        Ok(names.iter().zip(mask).filter(|(_, m)| *m).map(|(n, _)| n.clone()).collect())
    }

    fn mask(&self, names: &[String]) -> Result<Vec<bool>> {
        Ok(match self {
            Select::All => vec![true; names.len()],
            Select::Targets(t) => {
                if *t == TargetModules::all_linear() {
                    return Err(Error::Unsupported {
                        field: "target_modules".into(),
                        reason: "`all-linear` needs module types, which a VarStore does not \
                                 have; list the modules"
                            .into(),
                    });
                }
                let targets = Targets::new(Some(t), None, None, None)?;
                let mask: Vec<bool> = names.iter().map(|n| targets.matches(module_of(n))).collect();
                targets.check_all_matched()?;
                mask
            }
            Select::Layers { range, layers_pattern } => {
                let mut mask = Vec::with_capacity(names.len());
                for n in names {
                    let idx = block_index(n, layers_pattern);
                    mask.push(idx.is_some_and(|i| range.contains(&i)));
                }
                if !range.is_empty() && !mask.iter().any(|&m| m) {
                    return Err(Error::UnmatchedTarget {
                        field: "layers".into(),
                        target: format!("{range:?}"),
                        checked: names.len(),
                    });
                }
                mask
            }
            Select::Predicate(f) => names.iter().map(|n| f(n)).collect(),
            Select::Except(a, b) => {
                let (ma, mb) = (a.mask(names)?, b.mask(names)?);
                ma.into_iter().zip(mb).map(|(x, y)| x && !y).collect()
            }
            Select::Any(v) => {
                let mut out = vec![false; names.len()];
                for s in v {
                    for (o, m) in out.iter_mut().zip(s.mask(names)?) {
                        *o |= m;
                    }
                }
                out
            }
        })
    }
}

/// The block index of a variable: the first numeric component of its module path, or the
/// component after one of `layers_pattern` (`h` in `transformer.h.3.attn.weight`). Unlike
/// PEFT's module-key regex, a block index right at the start (`layers.0.fc.weight`, `0.conv`)
/// counts too, since VarStore names have no wrapper prefix.
pub(crate) fn block_index(var: &str, layers_pattern: &[String]) -> Option<i64> {
    let parts: Vec<&str> = module_of(var).split('.').collect();
    if layers_pattern.is_empty() {
        return parts.iter().find_map(|p| p.parse().ok());
    }
    parts
        .windows(2)
        .find(|w| layers_pattern.iter().any(|p| p == w[0]) && w[1].parse::<i64>().is_ok())
        .and_then(|w| w[1].parse().ok())
}

/// Sets `requires_grad` on `t`; unfreezing drops a stale gradient so that no update from an
/// earlier step leaks into the next.
fn set_trainable(t: &Tensor, on: bool) {
    if on && !t.requires_grad() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let _ = t.set_requires_grad(on);
}

/// Freezes or unfreezes variables chosen by a [`Select`], remembering their previous state so
/// that [`revert`](Applicable::revert) restores it exactly. Implements [`Adapter`] and [`Applicable`]
/// (`apply` = freeze, or unfreeze for a plan made with [`FreezePlan::unfreeze`]).
#[derive(Debug)]
pub struct FreezePlan {
    name: String,
    freeze: bool,
    vars: Vec<(String, Tensor)>,
    previous: Option<Vec<bool>>,
}

impl FreezePlan {
    /// A plan that freezes what `select` chooses among the variables of `vs`. Errors as
    /// [`Select::resolve`].
    pub fn new(vs: &VarStore, select: Select) -> Result<Self> {
        Self::build(vs, select, true)
    }

    /// A plan that unfreezes what `select` chooses. Errors also when a chosen variable was
    /// registered non-trainable (no optimizer would see it).
    pub fn unfreeze(vs: &VarStore, select: Select) -> Result<Self> {
        Self::build(vs, select, false)
    }

    fn build(vs: &VarStore, select: Select, freeze: bool) -> Result<Self> {
        let all = vs.variables();
        let mut names: Vec<String> = all.keys().cloned().collect();
        names.sort();
        let chosen = select.resolve(&names)?;
        if !freeze {
            let visible = optimizer_visible(vs);
            if let Some(n) =
                chosen.iter().find(|n| !visible.iter().any(|v| same_tensor(v, &all[*n])))
            {
                return Err(Error::Unsupported {
                    field: "unfreeze".into(),
                    reason: format!(
                        "`{n}` was registered non-trainable (a buffer such as a running \
                         statistic); no optimizer would update it"
                    ),
                });
            }
        }
        let vars = chosen.into_iter().map(|n| (n.clone(), all[&n].shallow_clone())).collect();
        let name = if freeze { "freeze" } else { "unfreeze" };
        Ok(FreezePlan { name: name.into(), freeze, vars, previous: None })
    }

    /// The variables the plan acts on.
    pub fn variables(&self) -> Vec<&str> {
        self.vars.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Per-variable report (name, shape, params, trainable) of the plan's variables, with
    /// PEFT's one-line summary; see [`module_report`] for the whole store by module.
    pub fn report(&self) -> ParamReport {
        ParamReport::from_named_tensors(&self.vars)
    }
}

impl Adapter for FreezePlan {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Freeze
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

impl Applicable for FreezePlan {
    /// Freezes (or unfreezes) the plan's variables, keeping their previous state.
    fn apply(&mut self) -> Result<()> {
        if self.previous.is_some() {
            return Err(Error::MergeState { module: self.name.clone(), state: "already applied" });
        }
        self.previous = Some(self.vars.iter().map(|(_, t)| t.requires_grad()).collect());
        for (_, t) in &self.vars {
            set_trainable(t, !self.freeze);
        }
        Ok(())
    }

    /// Restores every variable's previous `requires_grad`.
    fn revert(&mut self) -> Result<()> {
        let Some(prev) = self.previous.take() else {
            return Err(Error::MergeState { module: self.name.clone(), state: "not applied" });
        };
        for ((_, t), p) in self.vars.iter().zip(prev) {
            set_trainable(t, p);
        }
        Ok(())
    }

    fn is_applied(&self) -> bool {
        self.previous.is_some()
    }
}

/// One module of a [`ModuleReport`]: its variables (grouped by module path) and how much of it
/// trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRow {
    /// The module's path (`layers.0.fc`).
    pub module: String,
    /// Its variables, relative to the module (`weight`), with their shapes.
    pub variables: Vec<(String, Vec<i64>)>,
    /// Its number of scalars.
    pub params: i64,
    /// How many of them currently receive gradients.
    pub trainable: i64,
}

impl ModuleRow {
    /// `"yes"`, `"no"` or `"partly"`.
    pub fn trains(&self) -> &'static str {
        match self.trainable {
            t if t == self.params => "yes",
            0 => "no",
            _ => "partly",
        }
    }
}

/// What [`module_report`] returns: a row per module and PEFT's one-line summary over the store.
/// `Display` prints the table, then the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleReport {
    /// The modules in name order.
    pub modules: Vec<ModuleRow>,
    /// The per-variable report and its summary line.
    pub summary: ParamReport,
}

impl std::fmt::Display for ModuleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.modules.iter().map(|r| r.module.len()).max().unwrap_or(6).max(6);
        writeln!(f, "{:<width$}  {:>12}  trainable  shapes", "module", "params")?;
        for r in &self.modules {
            let shapes: Vec<String> =
                r.variables.iter().map(|(n, shape)| format!("{n}{shape:?}")).collect();
            writeln!(
                f,
                "{:<width$}  {:>12}  {:<9}  {}",
                r.module,
                crate::adapter::thousands(r.params),
                r.trains(),
                shapes.join(", ")
            )?;
        }
        write!(f, "{}", self.summary)
    }
}

/// The variables of `vs` grouped by module path (name, shapes, parameter count, how much
/// trains), with PEFT's one-line summary; print it for a table.
pub fn module_report(vs: &VarStore) -> ModuleReport {
    let summary = ParamReport::from_var_stores(&[vs]);
    let mut modules: Vec<ModuleRow> = Vec::new();
    for e in &summary.entries {
        let m = module_of(&e.name);
        let var = (e.name[m.len()..].trim_start_matches('.').to_string(), e.shape.clone());
        let trainable = if e.trainable { e.numel } else { 0 };
        match modules.last_mut() {
            Some(r) if r.module == m => {
                r.variables.push(var);
                r.params += e.numel;
                r.trainable += trainable;
            }
            _ => modules.push(ModuleRow {
                module: m.to_string(),
                variables: vec![var],
                params: e.numel,
                trainable,
            }),
        }
    }
    ModuleReport { modules, summary }
}

/// The variables of `vs` in ordered groups for gradual unfreezing and layer-wise learning
/// rates: group 0 holds what precedes the blocks (embeddings; every variable without a layer
/// index that is not in the head), groups 1..=N the blocks by index, group N+1 the head
/// (variables of the modules listed in `head`; empty head: no such group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGroups {
    /// Variable names per group, bottom (embeddings) to top (head).
    pub groups: Vec<Vec<String>>,
}

impl LayerGroups {
    /// Groups the variables of `vs`; `layers_pattern` as PEFT's (empty: the first numeric path
    /// component), `head` module names (exact or `.suffix`).
    pub fn from_store(vs: &VarStore, layers_pattern: &[&str], head: &[&str]) -> Result<Self> {
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        let pats: Vec<String> = layers_pattern.iter().map(|s| s.to_string()).collect();
        let in_head = |n: &str| {
            let m = module_of(n);
            head.iter().any(|h| m == *h || m.ends_with(&format!(".{h}")))
        };
        let mut stem = Vec::new();
        let mut blocks: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
        let mut top = Vec::new();
        for n in names {
            if in_head(&n) {
                top.push(n);
            } else if let Some(i) = block_index(&n, &pats) {
                blocks.entry(i).or_default().push(n);
            } else {
                stem.push(n);
            }
        }
        if !head.is_empty() && top.is_empty() {
            return Err(Error::UnmatchedTarget {
                field: "head".into(),
                target: head.join(", "),
                checked: stem.len() + blocks.values().map(Vec::len).sum::<usize>(),
            });
        }
        let mut groups = vec![stem];
        groups.extend(blocks.into_values());
        if !top.is_empty() {
            groups.push(top);
        }
        Ok(LayerGroups { groups })
    }

    /// The group of a variable.
    pub fn group_of(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.iter().any(|n| n == name))
    }
}

/// ULMFiT's gradual unfreezing (Howard & Ruder 2018): training starts with only the top group
/// trainable, and one more group (from the top down) is unfrozen every `every` calls of
/// [`advance`](Self::advance) (epochs or steps, as the loop decides). Variables registered
/// non-trainable are left alone.
///
/// ```
/// # use tch::{nn, Device};
/// use tch_peft::freeze::{GradualUnfreezing, LayerGroups};
/// # let vs = nn::VarStore::new(Device::Cpu);
/// # let _ = nn::embedding(vs.root() / "embed", 10, 4, Default::default());
/// # for i in 0..2 { let _ = nn::linear(vs.root() / "layers" / i / "fc", 4, 4, Default::default()); }
/// # let _ = nn::linear(vs.root() / "head", 4, 2, Default::default());
/// let groups = LayerGroups::from_store(&vs, &[], &["head"])?; // embed | layers.0 | layers.1 | head
/// let mut schedule = GradualUnfreezing::new(&vs, groups, 1)?; // only `head` trains
/// assert_eq!(schedule.trainable_groups(), 1);
/// schedule.advance(); // epoch 1: layers.1 and head
/// assert_eq!(schedule.trainable_groups(), 2);
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug)]
pub struct GradualUnfreezing {
    groups: Vec<Vec<Tensor>>,
    every: usize,
    calls: usize,
    trainable: usize,
}

impl GradualUnfreezing {
    /// Freezes every group but the top one. `every ≥ 1`.
    pub fn new(vs: &VarStore, groups: LayerGroups, every: usize) -> Result<Self> {
        if every == 0 {
            return Err(Error::config("every", "must be at least 1"));
        }
        let all = vs.variables();
        let visible = optimizer_visible(vs);
        let groups: Vec<Vec<Tensor>> = groups
            .groups
            .iter()
            .map(|g| {
                g.iter()
                    .filter_map(|n| all.get(n))
                    .filter(|t| visible.iter().any(|v| same_tensor(v, t)))
                    .map(Tensor::shallow_clone)
                    .collect()
            })
            .collect();
        let s = GradualUnfreezing { groups, every, calls: 0, trainable: 1 };
        s.sync();
        Ok(s)
    }

    fn sync(&self) {
        let n = self.groups.len();
        for (i, g) in self.groups.iter().enumerate() {
            let on = i + self.trainable >= n;
            for t in g {
                set_trainable(t, on);
            }
        }
    }

    /// Counts one epoch (or step); every `every` calls one more group becomes trainable.
    /// Returns the number of trainable groups. Call it before the step's `zero_grad`.
    pub fn advance(&mut self) -> usize {
        self.calls += 1;
        if self.calls.is_multiple_of(self.every) && self.trainable < self.groups.len() {
            self.trainable += 1;
            self.sync();
        }
        self.trainable
    }

    /// How many groups (from the top) train now.
    pub fn trainable_groups(&self) -> usize {
        self.trainable
    }
}

/// Layer-wise learning-rate decay with timm's semantics: a variable of layer `id` (0 for the
/// stem, `i + 1` for block `i`, `N + 1` for the head) gets `lr · max(min_scale,
/// decay^(N + 1 − id))`, and 1-D variables (biases, norms) get no weight decay. tch's optimizer
/// groups carry it: [`assign_groups`](Self::assign_groups) before building the optimizer,
/// [`configure`](Self::configure) after.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerwiseLr {
    /// `(lr scale, weight decay applies)` per optimizer group.
    pub groups: Vec<(f64, bool)>,
}

impl LayerwiseLr {
    /// Assigns an optimizer group to every trainable-registered variable of `vs` from its layer
    /// group (see [`LayerGroups`]) and dimensionality. Errors when `decay` is not in (0, 1].
    pub fn assign_groups(
        vs: &VarStore,
        layers: &LayerGroups,
        decay: f64,
        min_scale: f64,
    ) -> Result<Self> {
        if !(decay > 0.0 && decay <= 1.0) {
            return Err(Error::config("layer_decay", format!("{decay} is not in (0, 1]")));
        }
        let top = layers.groups.len().saturating_sub(1) as i32;
        let named = vs.variables();
        let mut groups: Vec<(f64, bool)> = Vec::new();
        let mut vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
        for v in vars.trainable_variables.iter_mut() {
            // a variable tied under several names (tied embeddings) takes its lowest layer
            // group, as the first of them in a PyTorch model's registration order would
            let id = named
                .iter()
                .filter(|(_, t)| same_tensor(t, &v.tensor))
                .filter_map(|(n, _)| layers.group_of(n))
                .min()
                .unwrap_or(0) as i32;
            let scale = decay.powi(top - id).max(min_scale);
            let wd = v.tensor.dim() > 1;
            let key = (scale, wd);
            let g = match groups.iter().position(|k| *k == key) {
                Some(g) => g,
                None => {
                    groups.push(key);
                    groups.len() - 1
                }
            };
            v.group = g;
        }
        Ok(LayerwiseLr { groups })
    }

    /// Sets each group's learning rate (`base_lr · scale`) and weight decay (`weight_decay`, or
    /// 0 for 1-D variables) on an optimizer built from the store after
    /// [`assign_groups`](Self::assign_groups).
    pub fn configure(&self, opt: &mut nn::Optimizer, base_lr: f64, weight_decay: f64) {
        // the optimizer registers the store's variables (and their groups) on first use
        opt.zero_grad();
        for (g, (scale, wd)) in self.groups.iter().enumerate() {
            opt.set_lr_group(g, base_lr * scale);
            opt.set_weight_decay_group(g, if *wd { weight_decay } else { 0.0 });
        }
    }
}

/// A BatchNorm whose running statistics can be frozen: while frozen it normalises with the
/// stored statistics and never updates them, also in training mode (timm's `FrozenBatchNorm2d`;
/// a frozen backbone must not drift). Its affine weight and bias freeze through the store as
/// any other variable. Clones share the flag.
#[derive(Debug)]
pub struct FreezableBatchNorm {
    bn: nn::BatchNorm,
    frozen: Arc<AtomicBool>,
}

impl FreezableBatchNorm {
    /// Wraps a tch BatchNorm (trainable statistics until [`set_frozen`](Self::set_frozen)).
    pub fn new(bn: nn::BatchNorm) -> Self {
        FreezableBatchNorm { bn, frozen: Arc::new(AtomicBool::new(false)) }
    }

    /// Freezes or unfreezes the running statistics.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }

    /// Whether the running statistics are frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// The wrapped BatchNorm.
    pub fn inner(&self) -> &nn::BatchNorm {
        &self.bn
    }
}

impl ModuleT for FreezableBatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(xs, train && !self.is_frozen())
    }
}

#[cfg(test)]
mod tests {
    use super::block_index;

    #[test]
    fn block_index_finds_the_first_numeric_component_or_the_pattern() {
        assert_eq!(block_index("layers.3.fc.weight", &[]), Some(3));
        assert_eq!(block_index("model.layers.11.mlp.up_proj.weight", &[]), Some(11));
        assert_eq!(block_index("transformer.h.2.attn.weight", &["h".into()]), Some(2));
        assert_eq!(block_index("transformer.wte.weight", &["h".into()]), None);
        assert_eq!(block_index("head.weight", &[]), None);
        assert_eq!(block_index("fc.7", &[]), None, "the parameter name is not a block");
    }
}
