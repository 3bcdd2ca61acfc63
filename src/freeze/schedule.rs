//! Schedules over layer groups: ULMFiT's gradual unfreezing ([`GradualUnfreezing`]) and timm's
//! layer-wise learning-rate decay ([`LayerwiseLr`]), both over [`LayerGroups`].

use tch::nn::{self, VarStore};
use tch::Tensor;

use super::plan::set_trainable;
use super::select::{block_index, module_of};
use crate::vars::{optimizer_visible, same_tensor};
use crate::{Error, Result};

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
