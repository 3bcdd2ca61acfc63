//! From a [`MergeConfig`] to the list of output tensors, each with its inputs and resolved
//! parameters, as mergekit's `MergePlanner` makes it: the `models:` form becomes one slice of
//! every model's layers (the base added when not listed), each slice's layers are numbered
//! after the previous slices', gradients run over each slice's depth, tensors outside the
//! layers come from the first slice's sources (embeddings) or the last slice's (the rest).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::Kind;

use super::config::{MergeConfig, Parameters};
use super::methods::{BasePolicy, GlobalParams, ModelParams};
use super::params;
use super::stream::{kind_from_name, ModelFiles};
use crate::{Error, Result};

/// The most layers an output may have.
pub(crate) const MAX_OUTPUT_LAYERS: u64 = 1 << 20;

/// `(prefix, layer, suffix)` of a tensor name whose module path (all but the last component)
/// has a component of ASCII digits: the first such component is the layer index.
///
/// `model.layers.11.mlp.up_proj.weight` → `("model.layers.", 11, ".mlp.up_proj.weight")`.
pub(crate) fn split_layer(name: &str) -> Option<(&str, u64, &str)> {
    let module_end = name.rfind('.')?;
    let mut start = 0;
    for part in name[..module_end].split('.') {
        let end = start + part.len();
        if !part.is_empty() && part.bytes().all(|c| c.is_ascii_digit()) {
            if let Ok(i) = part.parse::<u64>() {
                if i <= i64::MAX as u64 {
                    return Some((&name[..start], i, &name[end..]));
                }
            }
        }
        start = end + 1;
    }
    None
}

/// Whether a tensor outside the layers belongs before them (embeddings), so that a slices
/// merge takes it from the first slice's sources; the others (final norm, head) come from the
/// last slice's.
fn is_pre_layer(name: &str) -> bool {
    ["embed", "wte", "wpe"].iter().any(|k| name.contains(k))
}

/// One input of an output tensor.
#[derive(Debug, Clone)]
pub(crate) struct Input {
    /// Index into [`Plan::models`].
    pub model: usize,
    /// The tensor's name in that model.
    pub name: String,
    /// Its resolved parameters.
    pub params: ModelParams,
    /// Whether it is the method's base.
    pub is_base: bool,
}

/// One output tensor.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub name: String,
    pub shape: Vec<i64>,
    /// Whether it is merged (floating point) or copied from the first input.
    pub float: bool,
    /// The dtype the inputs are cast to before merging.
    pub work_kind: Kind,
    /// The written dtype.
    pub out_kind: Kind,
    pub inputs: Vec<Input>,
    pub global: GlobalParams,
    /// Bytes of the written tensor.
    pub bytes: u64,
}

/// A whole merge: the opened models, the output tensors in order, where the other files come
/// from, and what `config.json` needs changed.
#[derive(Debug)]
pub(crate) struct Plan {
    pub models: Vec<ModelFiles>,
    pub tensors: Vec<Planned>,
    /// The model whose `config.json` and other files are copied.
    pub donor: usize,
    /// The model whose tokenizer files are written, when `tokenizer_source` names one.
    pub tokenizer: Option<usize>,
    /// `num_hidden_layers` of the output, when `slices` set it.
    pub num_layers: Option<u64>,
}

/// A slice with model paths in place of indices: sources `(path, range, parameters)`.
struct PathSlice<'a> {
    sources: Vec<(&'a Path, Option<[i64; 2]>, &'a Parameters)>,
    base: Option<&'a Path>,
    params: &'a Parameters,
}

static NO_PARAMETERS: std::sync::OnceLock<Parameters> = std::sync::OnceLock::new();

/// The config's slices, the `models:` form as one slice of whole models (ranges `None`: every
/// layer) with the base appended when it is not listed.
fn path_slices(cfg: &MergeConfig) -> Vec<PathSlice<'_>> {
    let none = NO_PARAMETERS.get_or_init(Parameters::new);
    if !cfg.models.is_empty() {
        let mut sources: Vec<_> =
            cfg.models.iter().map(|m| (m.model.as_path(), None, &m.parameters)).collect();
        if let Some(b) = &cfg.base_model {
            if !sources.iter().any(|(p, _, _)| *p == b.as_path()) {
                sources.push((b.as_path(), None, none));
            }
        }
        return vec![PathSlice { sources, base: cfg.base_model.as_deref(), params: none }];
    }
    cfg.slices
        .iter()
        .map(|s| PathSlice {
            sources: s
                .sources
                .iter()
                .map(|src| (src.model.as_path(), Some(src.layer_range), &src.parameters))
                .collect(),
            base: s.base_model.as_deref().or(cfg.base_model.as_deref()),
            params: &s.parameters,
        })
        .collect()
}

/// The checks that need no file (mergekit's `validate_inputs` per slice): no model twice in a
/// slice, the base among the sources where the method uses it, and the method's input counts.
pub(crate) fn check_structure(cfg: &MergeConfig) -> Result<()> {
    let method = cfg.merge_method;
    let policy = method.base_policy();
    for (i, s) in path_slices(cfg).iter().enumerate() {
        let field =
            if cfg.slices.is_empty() { "models".to_string() } else { format!("slices[{i}]") };
        for (j, (p, _, _)) in s.sources.iter().enumerate() {
            if s.sources[..j].iter().any(|(q, _, _)| q == p) {
                return Err(Error::config(
                    field,
                    format!("{} is listed twice (mergekit refuses duplicate inputs)", p.display()),
                ));
            }
        }
        let base = if policy == BasePolicy::Ignored { None } else { s.base };
        let has_base = base.is_some_and(|b| s.sources.iter().any(|(p, _, _)| *p == b));
        if let Some(b) = base.filter(|_| !has_base) {
            return Err(Error::config(
                field,
                format!("the base {} is not among the sources", b.display()),
            ));
        }
        if policy == BasePolicy::Required && !has_base {
            return Err(Error::config("base_model", format!("{method:?} needs a base model")));
        }
        method.check_input_counts(s.sources.len() - usize::from(has_base), has_base, &field)?;
    }
    Ok(())
}

/// `torch.promote_types` over floating kinds (f16 with bf16 gives f32).
fn promote(a: Kind, b: Kind) -> Kind {
    use Kind::*;
    match (a, b) {
        (x, y) if x == y => x,
        (Double, _) | (_, Double) => Double,
        _ => Float,
    }
}

/// Per layer index, the `(prefix, suffix)` of each of its tensors' names.
type LayerMap = BTreeMap<u64, Vec<(String, String)>>;

fn layer_map(m: &ModelFiles) -> LayerMap {
    let mut map = LayerMap::new();
    for n in m.names() {
        if let Some((pre, i, post)) = split_layer(&n) {
            map.entry(i).or_default().push((pre.to_string(), post.to_string()));
        }
    }
    map
}

/// The inputs of a tensor of the same name in every source of `s`.
fn with_params<'a>(
    s: &PathSlice<'a>,
    ids: &[usize],
    name: &str,
) -> Vec<(usize, String, &'a Parameters)> {
    ids.iter().zip(&s.sources).map(|(m, (_, _, p))| (*m, name.to_string(), *p)).collect()
}

/// Opens the models and lays out every output tensor.
pub(crate) fn build(cfg: &MergeConfig) -> Result<Plan> {
    let method = cfg.merge_method;
    let slices = path_slices(cfg);
    // every model once, in order of first mention
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut index: HashMap<PathBuf, usize> = HashMap::new();
    let mut intern = |p: &Path, paths: &mut Vec<PathBuf>| -> usize {
        *index.entry(p.to_path_buf()).or_insert_with(|| {
            paths.push(p.to_path_buf());
            paths.len() - 1
        })
    };
    let donor_path = cfg.base_model.as_deref().unwrap_or(slices[0].sources[0].0);
    let donor = intern(donor_path, &mut paths);
    for s in &slices {
        for (p, _, _) in &s.sources {
            intern(p, &mut paths);
        }
    }
    let tokenizer = match cfg.tokenizer_source() {
        Some(super::config::TokenizerSource::Model(p)) => Some(intern(p, &mut paths)),
        Some(super::config::TokenizerSource::Base) => Some(donor),
        _ => None,
    };
    let models: Vec<ModelFiles> = paths.iter().map(ModelFiles::open).collect::<Result<_>>()?;
    let work_kind = cfg.dtype.as_deref().map(kind_from_name).transpose()?;
    let out_kind = cfg.out_dtype.as_deref().map(kind_from_name).transpose()?.or(work_kind);
    let ignored = method.base_policy() == BasePolicy::Ignored;

    let mut tensors = Vec::new();
    let mut plan_tensor = |out: String,
                           inputs: Vec<(usize, String, &Parameters)>,
                           base: Option<usize>,
                           slice_params: &Parameters,
                           t: f64|
     -> Result<()> {
        let first = &models[inputs[0].0];
        let (shape, kind0) = first.info(&inputs[0].1).ok_or_else(|| Error::MissingTensor {
            name: inputs[0].1.clone(),
            file: first.dir().into(),
        })?;
        let mut promoted = kind0;
        let mut planned_inputs = Vec::with_capacity(inputs.len());
        for (m, name, source_params) in &inputs {
            let files = &models[*m];
            let (s, k) = files.info(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: files.dir().into(),
            })?;
            if s != shape {
                return Err(Error::ShapeMismatch {
                    name: format!("{name} in {}", files.dir().display()),
                    expected: shape,
                    actual: s,
                });
            }
            promoted = promote(promoted, k);
            let is_base = !ignored && base == Some(*m);
            let settings = [*source_params, slice_params, &cfg.parameters];
            let who = format!("model `{}`", files.dir().display());
            let p = params::model(method, &settings, name, t, &who, is_base)?;
            planned_inputs.push(Input { model: *m, name: name.clone(), params: p, is_base });
        }
        let float = crate::lora::is_float(kind0);
        let (work, out_k) = if float {
            let work = work_kind.unwrap_or(promoted);
            (work, out_kind.unwrap_or(work))
        } else {
            (kind0, kind0)
        };
        let bytes = shape
            .iter()
            .try_fold(out_k.elt_size_in_bytes() as u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| Error::config("dtype", format!("`{out}` is too large")))?;
        let global = params::global(method, &[slice_params, &cfg.parameters], &out, t)?;
        tensors.push(Planned {
            name: out,
            shape,
            float,
            work_kind: work,
            out_kind: out_k,
            inputs: planned_inputs,
            global,
            bytes,
        });
        Ok(())
    };

    let ids =
        |s: &PathSlice| -> Vec<usize> { s.sources.iter().map(|(p, _, _)| index[*p]).collect() };
    // tensors outside the layers, before (from the first slice) and after (from the last)
    let first_ids = ids(&slices[0]);
    let last = slices.last().expect("validated: a slice");
    let last_ids = ids(last);
    let outside: Vec<String> =
        models[first_ids[0]].names().into_iter().filter(|n| split_layer(n).is_none()).collect();
    let base_of = |s: &PathSlice| s.base.map(|b| index[b]);
    for n in outside.iter().filter(|n| is_pre_layer(n)) {
        let inputs = with_params(&slices[0], &first_ids, n);
        plan_tensor(n.clone(), inputs, base_of(&slices[0]), slices[0].params, 0.0)?;
    }
    // the layers
    let mut out_layer: u64 = 0;
    let layer_maps: Vec<LayerMap> = models.iter().map(layer_map).collect();
    let layers_of = |m: usize| &layer_maps[m];
    for (si, s) in slices.iter().enumerate() {
        let sid = ids(s);
        let base = base_of(s);
        match s.sources[0].1 {
            None => {
                // the models form: every layer of the first model, by name; t over the depth,
                // which every model must share (mergekit: "All inputs to a slice must contain
                // the same number of layers")
                let depth = models[sid[0]].depth();
                if let Some(&m) = sid.iter().find(|&&m| models[m].depth() != depth) {
                    return Err(Error::config(
                        "models",
                        format!(
                            "{} has {} layers and {} has {depth}: all inputs must have as many \
                             (take layer ranges with `slices`)",
                            models[m].dir().display(),
                            models[m].depth(),
                            models[sid[0]].dir().display()
                        ),
                    ));
                }
                let layers: Vec<(u64, Vec<(String, String)>)> =
                    layers_of(sid[0]).iter().map(|(i, v)| (*i, v.clone())).collect();
                for (i, templates) in layers {
                    let t = if depth > 1 { i as f64 / (depth - 1) as f64 } else { 1.0 };
                    for (pre, post) in templates {
                        let name = format!("{pre}{i}{post}");
                        plan_tensor(name.clone(), with_params(s, &sid, &name), base, s.params, t)?;
                    }
                }
            }
            Some(_) => {
                let [a0, b0] = s.sources[0].1.expect("slices");
                let len = (b0 - a0) as u64;
                for ((p, range, _), &m) in s.sources.iter().zip(&sid) {
                    let [_, b] = range.expect("slices");
                    if b as u64 > models[m].depth() {
                        return Err(Error::config(
                            format!("slices[{si}].sources[{}].layer_range", p.display()),
                            format!(
                                "ends at layer {b}, past the model's {} layers",
                                models[m].depth()
                            ),
                        ));
                    }
                }
                if out_layer.saturating_add(len) > MAX_OUTPUT_LAYERS {
                    return Err(Error::config(
                        "slices",
                        format!("the output would have more than {MAX_OUTPUT_LAYERS} layers"),
                    ));
                }
                for offset in 0..len {
                    let t = if len > 1 { offset as f64 / (len - 1) as f64 } else { 1.0 };
                    let in_layer = |k: usize| s.sources[k].1.expect("slices")[0] as u64 + offset;
                    let templates =
                        layers_of(sid[0]).get(&in_layer(0)).cloned().ok_or_else(|| {
                            Error::config(
                                format!("slices[{si}]"),
                                format!(
                                    "layer {} of {} has no tensors",
                                    in_layer(0),
                                    s.sources[0].0.display()
                                ),
                            )
                        })?;
                    for (pre, post) in templates {
                        let inputs = sid
                            .iter()
                            .enumerate()
                            .map(|(k, &m)| {
                                (m, format!("{pre}{}{post}", in_layer(k)), s.sources[k].2)
                            })
                            .collect();
                        plan_tensor(format!("{pre}{out_layer}{post}"), inputs, base, s.params, t)?;
                    }
                    out_layer += 1;
                }
            }
        }
    }
    for n in outside.iter().filter(|n| !is_pre_layer(n)) {
        let inputs = with_params(last, &last_ids, n);
        plan_tensor(n.clone(), inputs, base_of(last), last.params, 0.0)?;
    }
    let num_layers = (!cfg.slices.is_empty()).then_some(out_layer);
    Ok(Plan { models, tensors, donor, tokenizer, num_layers })
}
