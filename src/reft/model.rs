//! [`ReftModel`]: interventions at chosen layers and positions of a model's residual stream.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::intervention::{Intervention, InterventionConfig, LowRankIntervention};
use super::positions::Positions;
use crate::adapter::{Adapter, AdapterKind, ParamReport};
use crate::io;
use crate::models::ResidualHook;
use crate::{Error, Result};

/// Which blocks are intervened on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReftLayers {
    /// Every block (`"all"`).
    All(AllLayers),
    /// These block indices.
    List(Vec<i64>),
}

/// The string `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllLayers {
    /// `"all"`.
    #[serde(rename = "all")]
    All,
}

impl ReftLayers {
    /// Every block.
    pub fn all() -> Self {
        ReftLayers::All(AllLayers::All)
    }

    /// The indices for a model of `num_layers` blocks; errors on an index out of range or twice.
    pub fn resolve(&self, num_layers: i64) -> Result<Vec<i64>> {
        match self {
            ReftLayers::All(_) => Ok((0..num_layers).collect()),
            ReftLayers::List(v) => {
                for (i, &l) in v.iter().enumerate() {
                    if l < 0 || l >= num_layers {
                        return Err(Error::UnmatchedTarget {
                            field: "layers".into(),
                            target: l.to_string(),
                            checked: num_layers as usize,
                        });
                    }
                    if v[..i].contains(&l) {
                        return Err(Error::config("layers", format!("layer {l} is listed twice")));
                    }
                }
                Ok(v.clone())
            }
        }
    }
}

/// A ReFT configuration: one intervention config applied at a set of blocks and positions.
/// Serialises to the JSON saved next to the weights (all fields kept, unlike pyreft's
/// `config.json`, which loses dropout, activation and dtype).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReftConfig {
    /// The intervention at each position group of each layer.
    pub intervention: InterventionConfig,
    /// The blocks (pyreft's `-l all` or `"2;10;18;26"`).
    pub layers: ReftLayers,
    /// The prompt positions (`"f7+l7"`).
    pub positions: Positions,
    /// Tied weights (pyreft's `share_weights`): one intervention per layer for all positions;
    /// untied, a two-sided spec gets one for the first and one for the last positions.
    pub share_weights: bool,
}

impl ReftConfig {
    /// `intervention` at `layers` and `positions`, tied.
    pub fn new(intervention: InterventionConfig, layers: ReftLayers, positions: Positions) -> Self {
        ReftConfig { intervention, layers, positions, share_weights: true }
    }

    /// Position groups per layer: 1 tied (or one-sided), 2 untied two-sided.
    pub fn groups(&self) -> usize {
        if self.share_weights || !self.positions.splits() {
            1
        } else {
            2
        }
    }
}

/// The key suffix of the raw rotation parameter `V` in our own weights file (next to pyreft's
/// materialised `rotate_layer` = `Rᵀ`).
const RAW_ROTATION: &str = "rotate_layer.parameter";

/// The file names of a saved ReFT directory.
pub const REFT_CONFIG_NAME: &str = "reft_config.json";
/// The weights file of a saved ReFT directory.
pub const REFT_WEIGHTS_NAME: &str = "reft_model.safetensors";

/// Interventions on a model's residual stream: one per (layer, position group), variables under
/// `p/layers/<l>/<group>/…` of the caller's store (only they train; the model stays frozen).
///
/// Per batch, compute the positions with [`Positions::batch_locations`] and pass
/// [`hook`](Self::hook)`(&locations)` to the model's hooked forward (e.g.
/// [`Llama::forward_hooked`](crate::models::Llama::forward_hooked)). Only the intervened positions
/// are computed: they are gathered, edited and added back (`scatter_add` of the edit).
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_peft::models::ResidualHook;
/// use tch_peft::reft::{InterventionConfig, InterventionKind, ReftConfig, ReftLayers, ReftModel};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let cfg = ReftConfig::new(
///     InterventionConfig::new(InterventionKind::LoReft, 16, 2),
///     ReftLayers::List(vec![0]),
///     "f1+l1".parse()?,
/// );
/// let reft = ReftModel::new(&vs.root(), cfg, 2)?;
/// assert_eq!(reft.num_params(), 2 * 16 * 2 + 2);
/// let h = Tensor::randn([1, 6, 16], (Kind::Float, Device::Cpu));
/// let loc = reft.config().positions.batch_locations(&[6], &[0], true, Device::Cpu)?;
/// let out = reft.hook(&loc).after_block(0, &h, false)?;
/// // positions 1..5 are untouched
/// assert!(out.narrow(1, 1, 4).equal(&h.narrow(1, 1, 4)));
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug)]
pub struct ReftModel {
    config: ReftConfig,
    /// `(layer, group, intervention)`.
    interventions: Vec<(i64, usize, LowRankIntervention)>,
    name: String,
}

impl ReftModel {
    /// Interventions for a model of `num_layers` blocks, variables under `p`.
    pub fn new(p: &nn::Path, config: ReftConfig, num_layers: i64) -> Result<Self> {
        config.intervention.validate()?;
        let layers = config.layers.resolve(num_layers)?;
        let mut interventions = Vec::new();
        for l in layers {
            for g in 0..config.groups() {
                let ip = p / "layers" / l / g;
                interventions.push((l, g, LowRankIntervention::new(&ip, config.intervention)?));
            }
        }
        Ok(ReftModel { config, interventions, name: "reft".into() })
    }

    /// The config.
    pub fn config(&self) -> &ReftConfig {
        &self.config
    }

    /// The interventions: `(layer, position group, intervention)`.
    pub fn interventions(&self) -> impl Iterator<Item = (i64, usize, &LowRankIntervention)> {
        self.interventions.iter().map(|(l, g, i)| (*l, *g, i))
    }

    /// Trainable parameters (`(2dr + r)` per LoReFT intervention).
    pub fn num_params(&self) -> i64 {
        self.interventions.len() as i64 * self.config.intervention.num_params()
    }

    /// Puts every `R` back on the manifold after an optimizer step (one batched QR; a no-op for
    /// [`Orthogonality::Parametrized`](super::orthogonal::Orthogonality) and kinds without `R`).
    pub fn retract(&self) -> Result<()> {
        let vs: Vec<Tensor> = self
            .interventions
            .iter()
            .filter(|(_, _, iv)| {
                iv.config().orthogonality == super::orthogonal::Orthogonality::Retraction
            })
            .filter_map(|(_, _, iv)| iv.rotation_variable().map(Tensor::shallow_clone))
            .collect();
        if vs.is_empty() {
            return Ok(());
        }
        let stacked = Tensor::f_stack(&vs, 0)?;
        super::orthogonal::retract(&stacked)?;
        let _guard = tch::no_grad_guard();
        for (i, v) in vs.iter().enumerate() {
            v.shallow_clone().f_copy_(&stacked.f_get(i as i64)?)?;
        }
        Ok(())
    }

    /// One training step: `opt.backward_step(loss)`, then [`retract`](Self::retract).
    pub fn step(&self, opt: &mut nn::Optimizer, loss: &Tensor) -> Result<()> {
        opt.backward_step(loss);
        self.retract()
    }

    /// The largest `‖RᵀR − I‖` over the interventions (a check; one host sync each).
    pub fn orthonormality_error(&self) -> Result<f64> {
        let mut worst: f64 = 0.0;
        for (_, _, iv) in &self.interventions {
            if let Some(r) = tch::no_grad(|| iv.rotation())? {
                worst = worst.max(super::orthogonal::orthonormality_error(&r)?);
            }
        }
        Ok(worst)
    }

    /// Parameter report over the interventions' variables.
    pub fn report(&self) -> ParamReport {
        ParamReport::from_named_tensors(&self.named_tensors())
    }

    /// The hook that applies the interventions at `locations` (`[groups, batch, slots]` int64,
    /// `-1` = no intervention; see [`Positions::batch_locations`]). The gather/scatter indices
    /// are prepared once per hook, on first use, and shared by every layer.
    pub fn hook<'a>(&'a self, locations: &'a Tensor) -> ReftHook<'a> {
        ReftHook { model: self, locations, prepared: std::cell::OnceCell::new() }
    }

    /// Checks `h` and `locations` and builds, per position group, the gather index
    /// `[batch, slots, d]` and the validity mask `[batch, slots, 1]` (h's dtype and device).
    fn prepare(&self, h: &Tensor, locations: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let size = h.size();
        let d = self.config.intervention.embed_dim;
        if size.len() != 3 || size[2] != d {
            return Err(Error::ShapeMismatch {
                name: "hidden states".into(),
                expected: vec![-1, -1, d],
                actual: size,
            });
        }
        let ls = locations.size();
        let groups = self.config.groups() as i64;
        if ls.len() != 3 || ls[0] != groups || ls[1] != size[0] {
            return Err(Error::ShapeMismatch {
                name: "intervention locations".into(),
                expected: vec![groups, size[0], -1],
                actual: ls,
            });
        }
        if locations.kind() != Kind::Int64 {
            return Err(Error::DtypeMismatch {
                name: "intervention locations".into(),
                expected: "Int64".into(),
                actual: locations.kind(),
            });
        }
        let locations = locations.f_to_device(h.device())?;
        (0..groups)
            .map(|g| {
                let idx = locations.f_get(g)?; // [b, p]
                let valid = idx.f_ge(0)?.f_unsqueeze(-1)?.f_to_kind(h.kind())?;
                let idx = idx.f_clamp_min(0)?.f_unsqueeze(-1)?.f_expand([size[0], -1, d], false)?;
                Ok((idx, valid))
            })
            .collect()
    }

    fn apply_prepared(
        &self,
        layer: i64,
        h: &Tensor,
        prepared: &[(Tensor, Tensor)],
        train: bool,
    ) -> Result<Tensor> {
        let mut out = h.shallow_clone();
        for (_, g, iv) in self.interventions.iter().filter(|(l, _, _)| *l == layer) {
            let (idx, valid) = &prepared[*g];
            if idx.size()[0] != h.size()[0] || h.size().get(2) != idx.size().get(2) {
                return Err(Error::ShapeMismatch {
                    name: format!("hidden states at layer {layer}"),
                    expected: idx.size(),
                    actual: h.size(),
                });
            }
            let gathered = out.f_gather(1, idx, false)?;
            let delta = iv.f_delta_t(&gathered, train)?.f_mul(valid)?;
            out = out.f_scatter_add(1, idx, &delta)?;
        }
        Ok(out)
    }

    /// Applies the interventions of `layer` to `h: [batch, seq, d]` at `locations`.
    pub fn apply(&self, layer: i64, h: &Tensor, locations: &Tensor, train: bool) -> Result<Tensor> {
        if !self.interventions.iter().any(|(l, _, _)| *l == layer) {
            return Ok(h.shallow_clone());
        }
        let prepared = self.prepare(h, locations)?;
        self.apply_prepared(layer, h, &prepared, train)
    }

    /// Saves as a directory: `reft_config.json` (the whole config) and `reft_model.safetensors`
    /// (each intervention's pyreft state dict under `layers.<l>.<group>.`, plus the raw rotation
    /// parameter as `….rotate_layer.parameter` so that a reload is bit-exact). The directory is
    /// replaced as a whole (the old files or the new ones after a crash; see [`crate::io`]).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.config)?;
        let mut tensors = Vec::new();
        for (l, g, iv) in &self.interventions {
            for (k, t) in iv.state_dict_pyreft()? {
                tensors.push((format!("layers.{l}.{g}.{k}"), t));
            }
            // the raw parameter too, so that a reload reproduces R bit for bit
            if let Some((_, v)) = iv.variables().into_iter().find(|(k, _)| k == "rotate_layer") {
                tensors.push((format!("layers.{l}.{g}.{RAW_ROTATION}"), v.detach()));
            }
        }
        io::replace_dir(dir.as_ref(), &|_| false, |tmp| {
            io::write_atomic(&tmp.join(REFT_CONFIG_NAME), text.as_bytes())?;
            io::write_safetensors(tmp.join(REFT_WEIGHTS_NAME), &tensors, Some(io::pt_metadata()))
        })
    }

    /// Reads the config of a directory written by [`save`](Self::save).
    pub fn config_from_dir(dir: impl AsRef<Path>) -> Result<ReftConfig> {
        let file = dir.as_ref().join(REFT_CONFIG_NAME);
        let text = io::read_config(&file)?;
        serde_json::from_str(&text).map_err(|e| Error::CorruptFile { file, reason: e.to_string() })
    }

    /// Builds the interventions of a saved directory (variables under `p`) and loads them.
    pub fn load(p: &nn::Path, dir: impl AsRef<Path>, num_layers: i64) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Self::config_from_dir(dir)?;
        let file = dir.join(REFT_WEIGHTS_NAME);
        let weights = io::read_safetensors(&file)?;
        // the config may not ask for more parameters than the file holds, before any is made
        let held: i64 = weights.tensors.iter().map(|(_, t)| t.numel() as i64).sum();
        let wanted = config.layers.resolve(num_layers)?.len() as i64
            * config.groups() as i64
            * config.intervention.validate().map(|_| config.intervention.num_params())?;
        if wanted > held {
            return Err(Error::CorruptFile {
                file,
                reason: format!("the config asks for {wanted} parameters, the file holds {held}"),
            });
        }
        let model = ReftModel::new(p, config, num_layers)?;
        model.load_tensors(weights.tensors.into_iter().collect(), &file)?;
        Ok(model)
    }

    /// Loads the weights file of a saved directory into these interventions, strictly.
    pub fn load_weights(&self, file: impl AsRef<Path>) -> Result<()> {
        let file = file.as_ref();
        self.load_tensors(io::read_safetensors(file)?.tensors.into_iter().collect(), file)
    }

    fn load_tensors(&self, mut all: HashMap<String, Tensor>, file: &Path) -> Result<()> {
        let mut per = Vec::new();
        for (l, g, iv) in &self.interventions {
            let prefix = format!("layers.{l}.{g}.");
            let keys: Vec<String> =
                all.keys().filter(|k| k.starts_with(&prefix)).cloned().collect();
            let mut own: HashMap<String, Tensor> = keys
                .into_iter()
                .map(|k| {
                    let t = all.remove(&k).expect("listed");
                    (k[prefix.len()..].to_string(), t)
                })
                .collect();
            let raw = own.remove(RAW_ROTATION);
            per.push((iv, own, prefix, raw));
        }
        if let Some(extra) = all.keys().min() {
            return Err(Error::UnexpectedTensor { name: extra.clone(), file: file.to_path_buf() });
        }
        // check everything before writing anything
        for (iv, own, prefix, raw) in &per {
            if let (Some(raw), Some((_, v))) =
                (raw, iv.variables().into_iter().find(|(k, _)| k == "rotate_layer"))
            {
                if raw.size() != v.size() {
                    return Err(Error::ShapeMismatch {
                        name: format!("{prefix}{RAW_ROTATION}"),
                        expected: v.size(),
                        actual: raw.size(),
                    });
                }
            }
            if let Some(raw) = raw.as_ref().filter(|r| !crate::lora::is_float(r.kind())) {
                return Err(Error::DtypeMismatch {
                    name: format!("{prefix}{RAW_ROTATION}"),
                    expected: "a floating-point kind".into(),
                    actual: raw.kind(),
                });
            }
            iv.check_pyreft(own, file).map_err(|e| prefixed(e, prefix))?;
        }
        for (iv, own, _, raw) in per {
            iv.load_pyreft(&own, file)?;
            if let (Some(raw), Some((_, v))) =
                (raw, iv.variables().into_iter().find(|(k, _)| k == "rotate_layer"))
            {
                tch::no_grad(|| v.shallow_clone().f_copy_(&raw.f_to_kind(v.kind())?))?;
            }
        }
        Ok(())
    }
}

/// The error of an intervention's check, its tensor named with the intervention's `prefix`.
fn prefixed(e: Error, prefix: &str) -> Error {
    match e {
        Error::MissingTensor { name, file } => {
            Error::MissingTensor { name: format!("{prefix}{name}"), file }
        }
        Error::UnexpectedTensor { name, file } => {
            Error::UnexpectedTensor { name: format!("{prefix}{name}"), file }
        }
        Error::ShapeMismatch { name, expected, actual } => {
            Error::ShapeMismatch { name: format!("{prefix}{name}"), expected, actual }
        }
        Error::DtypeMismatch { name, expected, actual } => {
            Error::DtypeMismatch { name: format!("{prefix}{name}"), expected, actual }
        }
        other => other,
    }
}

/// A layer index from a pyvene component: `"block_output"` uses the representation's layer;
/// a path such as `"model.layers[15].output"` names it.
fn pyvene_layer(layer: i64, component: &str) -> Result<i64> {
    if component == "block_output" {
        return Ok(layer);
    }
    let in_brackets = component.split_once("layers[").and_then(|(_, r)| r.split_once(']'));
    match in_brackets {
        Some((n, ".output")) => n
            .parse()
            .map_err(|_| Error::config("component", format!("`{component}`: no layer index"))),
        _ => Err(Error::Unsupported {
            field: "component".into(),
            reason: format!(
                "`{component}`: only the residual stream after a block (`block_output` or \
                 `…layers[N].output`) is a hook point here"
            ),
        }),
    }
}

/// The other pyvene key naming for the same intervention: pyvene ≥ 2025-02 writes
/// `layer_0_comp_block_output_unit_pos_nunit_1#0`, earlier releases
/// `layer.0.comp.block_output.unit.pos.nunit.1#0`.
fn pyvene_other_key(key: &str) -> String {
    let (body, collision) = key.split_once('#').unwrap_or((key, "0"));
    let other = if body.contains('.') {
        body.replace('.', "_")
    } else {
        // the component itself may hold underscores: rebuild from the known field names
        let mut out = body.to_string();
        for f in ["layer_", "_comp_", "_unit_", "_nunit_"] {
            out = out.replacen(f, &f.replace('_', "."), 1);
        }
        out
    };
    format!("{other}#{collision}")
}

impl ReftModel {
    /// Imports a pyvene/pyreft save directory (`config.json` + one `intkey_<key>.bin` torch
    /// pickle per intervention, as `ReftModel.save` writes it; both pyvene's pre- and post-2025
    /// key naming), its variables under `p`. pyvene does not save positions, dropout or the
    /// activation: give them (`positions`, `act_fn`, `dropout`). A layer listed twice is an
    /// untied pair (first positions, then last positions), as pyreft builds it. All
    /// interventions must share one type, dimension and rank.
    pub fn from_pyvene(
        p: &nn::Path,
        dir: impl AsRef<Path>,
        num_layers: i64,
        positions: Positions,
        act_fn: super::intervention::Activation,
        dropout: f64,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let file = dir.join("config.json");
        let text = io::read_config(&file)?;
        let corrupt = |reason: String| Error::CorruptFile { file: file.clone(), reason };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let list = |name: &str| -> Result<Vec<serde_json::Value>> {
            json.get(name)
                .and_then(|v| v.as_array())
                .cloned()
                .ok_or_else(|| corrupt(format!("`{name}` is missing or not a list")))
        };
        let (reps, types, dims, keys) = (
            list("representations")?,
            list("intervention_types")?,
            list("intervention_dimensions")?,
            list("sorted_keys")?,
        );
        let n = reps.len();
        if types.len() != n || dims.len() != n || keys.len() != n || n == 0 {
            return Err(corrupt("the intervention lists differ in length or are empty".into()));
        }
        let mut entries = Vec::with_capacity(n); // (layer, key, kind, d, r)
        for i in 0..n {
            let rep = reps[i].as_array().ok_or_else(|| corrupt(format!("representation {i}")))?;
            let layer = rep.first().and_then(|v| v.as_i64());
            let component = rep.get(1).and_then(|v| v.as_str());
            let r = rep.get(4).and_then(|v| v.as_i64());
            let (Some(layer), Some(component), Some(r)) = (layer, component, r) else {
                return Err(corrupt(format!("representation {i} lacks layer, component or rank")));
            };
            let kind = super::intervention::InterventionKind::from_pyreft_class(
                types[i].as_str().unwrap_or_default(),
            )?;
            let d = dims[i].as_i64().ok_or_else(|| corrupt(format!("dimension {i}")))?;
            let key = keys[i].as_str().ok_or_else(|| corrupt(format!("key {i}")))?.to_string();
            entries.push((pyvene_layer(layer, component)?, key, kind, d, r));
        }
        let (_, _, kind, d, r) = entries[0].clone();
        if let Some(e) = entries.iter().find(|e| (e.2, e.3, e.4) != (kind, d, r)) {
            return Err(Error::Unsupported {
                field: "intervention_types".into(),
                reason: format!(
                    "mixed interventions ({kind:?} d {d} r {r} and {:?} d {} r {}) in one model",
                    e.2, e.3, e.4
                ),
            });
        }
        let mut layers: Vec<i64> = Vec::new();
        for e in &entries {
            if !layers.contains(&e.0) {
                layers.push(e.0);
            }
        }
        let counts: Vec<usize> =
            layers.iter().map(|l| entries.iter().filter(|e| e.0 == *l).count()).collect();
        let groups = counts[0];
        if counts.iter().any(|&c| c != groups) || groups > 2 {
            return Err(Error::Unsupported {
                field: "representations".into(),
                reason: "every layer must have the same one (tied) or two (untied) interventions"
                    .into(),
            });
        }
        // load every state dict first, to learn add_bias and to fail before building anything
        let mut states = Vec::with_capacity(n);
        for (_, key, ..) in &entries {
            let mut f = io::join_inside(dir, &format!("intkey_{key}.bin"), &file)?;
            if !f.is_file() {
                f = io::join_inside(dir, &format!("intkey_{}.bin", pyvene_other_key(key)), &file)?;
            }
            let t: HashMap<String, Tensor> = io::read_torch_dict(&f)?.into_iter().collect();
            states.push((f, t));
        }
        let add_bias = states[0].1.contains_key("proj_layer.bias");
        let intervention =
            InterventionConfig { dropout, act_fn, add_bias, ..InterventionConfig::new(kind, d, r) };
        let config = ReftConfig {
            intervention,
            layers: ReftLayers::List(layers.clone()),
            positions,
            share_weights: groups == 1,
        };
        if config.groups() != groups {
            return Err(Error::config(
                "positions",
                format!(
                    "{groups} interventions per layer, but `{positions}` gives {}",
                    config.groups()
                ),
            ));
        }
        intervention.validate()?;
        if let Some((f, t)) = states.iter().find(|(_, t)| {
            t.values().map(|x| x.numel() as i64).sum::<i64>() < intervention.num_params()
        }) {
            return Err(Error::CorruptFile {
                file: f.clone(),
                reason: format!(
                    "holds {} parameters, fewer than the {} the config's {kind:?} d {d} r {r} has",
                    t.values().map(|x| x.numel() as i64).sum::<i64>(),
                    intervention.num_params()
                ),
            });
        }
        let model = ReftModel::new(p, config, num_layers)?;
        // entries of a layer in file order are its groups 0, 1
        let mut pairs = Vec::with_capacity(model.interventions.len());
        for (l, g, iv) in &model.interventions {
            let idx = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.0 == *l)
                .nth(*g)
                .map(|(i, _)| i)
                .ok_or_else(|| corrupt(format!("no intervention {g} for layer {l}")))?;
            let (f, t) = &states[idx];
            iv.check_pyreft(t, f)?;
            pairs.push((iv, t, f));
        }
        for (iv, t, f) in pairs {
            iv.load_pyreft(t, f)?;
        }
        Ok(model)
    }
}

/// [`ReftModel`] with the locations of one batch: the [`ResidualHook`] a model calls.
#[derive(Debug)]
pub struct ReftHook<'a> {
    model: &'a ReftModel,
    locations: &'a Tensor,
    /// Gather indices and masks per group, built on first use (they are the same at every
    /// layer).
    prepared: std::cell::OnceCell<Vec<(Tensor, Tensor)>>,
}

impl ResidualHook for ReftHook<'_> {
    fn edits_block(&self, layer: i64) -> bool {
        self.model.interventions.iter().any(|(l, _, _)| *l == layer)
    }

    fn draws_random(&self, train: bool) -> bool {
        self.model.interventions.iter().any(|(_, _, i)| i.draws_dropout(train))
    }

    fn after_block(&self, layer: i64, hidden: &Tensor, train: bool) -> Result<Tensor> {
        if !self.edits_block(layer) {
            return Ok(hidden.shallow_clone());
        }
        let prepared = match self.prepared.get() {
            Some(p) => p,
            None => {
                let p = self.model.prepare(hidden, self.locations)?;
                self.prepared.get_or_init(|| p)
            }
        };
        self.model.apply_prepared(layer, hidden, prepared, train)
    }
}

impl Adapter for ReftModel {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Reft
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.interventions
            .iter()
            .flat_map(|(l, g, iv)| {
                iv.variables().into_iter().map(move |(k, t)| (format!("layers.{l}.{g}.{k}"), t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyvene_components_and_key_namings() {
        assert_eq!(pyvene_layer(3, "block_output").unwrap(), 3);
        assert_eq!(pyvene_layer(0, "model.layers[15].output").unwrap(), 15);
        assert_eq!(pyvene_layer(0, "base_model.model.model.layers[2].output").unwrap(), 2);
        assert!(pyvene_layer(0, "model.layers[2].mlp.output").is_err());
        assert!(pyvene_layer(0, "model.layers[x].output").is_err());
        let new = "layer_0_comp_block_output_unit_pos_nunit_1#1";
        let old = "layer.0.comp.block_output.unit.pos.nunit.1#1";
        assert_eq!(pyvene_other_key(new), old);
        assert_eq!(pyvene_other_key(old), new);
    }
}
