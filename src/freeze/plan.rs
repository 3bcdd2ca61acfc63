//! [`FreezePlan`]: freezing or unfreezing the selected variables with an exact revert, and the
//! per-module report of a store.

use tch::nn::VarStore;
use tch::Tensor;

use super::select::{module_of, Select};
use crate::adapter::{Adapter, AdapterKind, Applicable, ParamReport};
use crate::vars::{optimizer_visible, same_tensor};
use crate::{Error, Result};

/// Sets `requires_grad` on `t`; unfreezing drops a stale gradient so that no update from an
/// earlier step leaks into the next.
pub(super) fn set_trainable(t: &Tensor, on: bool) {
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
