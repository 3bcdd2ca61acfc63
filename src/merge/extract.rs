//! A LoRA adapter from a fine-tuned model and its base (mergekit's `mergekit-extract-lora`):
//! per linear layer the task vector `ΔW = W_ft − W_base`, its truncated SVD
//! `ΔW ≈ U_r diag(S_r) V_rᵀ`, written as `lora_A = diag(√S_r) V_rᵀ`, `lora_B = U_r diag(√S_r)`
//! (or `A = diag(S_r) V_rᵀ`, `B = U_r` without `distribute_scale`) with `r = lora_alpha`, so
//! that PEFT's scaling is 1 and `B A = ΔW` at full rank. Embeddings, the output head and the
//! tensors of other modules (norms) go to `modules_to_save` at full rank, as mergekit does.
//!
//! Modules are told apart by name and shape (mergekit asks the model's classes): every 2-D
//! `*.weight` but the embeddings and `lm_head` is taken for a linear layer stored `[out, in]`.
//! GPT-2's `Conv1D` stores `[in, out]`: list such modules in `modules_to_save`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::{Kind, Tensor};

use super::stream::ModelFiles;
use crate::{io, Error, Result};

/// How [`extract_lora`] decomposes.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractOptions {
    /// The largest rank of a module (mergekit's `--max-rank`, default 128).
    pub max_rank: i64,
    /// Split `√S` between A and B (default true; mergekit's `--distribute-scale`).
    pub distribute_scale: bool,
    /// Drop singular values not above this (default 0: keep `max_rank`).
    pub sv_epsilon: f64,
    /// Modules (full names or their last component) saved at full rank instead.
    pub modules_to_save: Vec<String>,
    /// Leave out modules that are not linear (norms) instead of saving them at full rank.
    pub skip_undecomposable: bool,
    /// `base_model_name_or_path` in the adapter config (default: the base directory).
    pub base_model_name: Option<String>,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            max_rank: 128,
            distribute_scale: true,
            sv_epsilon: 0.0,
            modules_to_save: Vec::new(),
            skip_undecomposable: false,
            base_model_name: None,
        }
    }
}

/// What [`extract_lora`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractStats {
    /// Modules decomposed, with their rank.
    pub ranks: BTreeMap<String, i64>,
    /// Module keys saved at full rank (`modules_to_save`).
    pub modules_to_save: Vec<String>,
    /// `‖ΔW − BA‖_F / ‖ΔW‖_F` over all decomposed modules together.
    pub relative_error: f64,
}

/// How a module of the fine-tuned model is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Lora,
    Full,
    Skip,
}

/// Embeddings and the output head, by name (mergekit asks the model for them).
fn is_embedding(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    last == "lm_head" || ["embed", "wte", "wpe"].iter().any(|k| last.contains(k))
}

fn role(module: &str, shape: &[i64], opts: &ExtractOptions) -> Role {
    if listed(module, opts).is_some() || is_embedding(module) {
        Role::Full
    } else if shape.len() == 2 {
        Role::Lora
    } else if opts.skip_undecomposable {
        Role::Skip
    } else {
        Role::Full
    }
}

/// The `modules_to_save` entry that names `module` (its full name or its last component).
fn listed<'a>(module: &str, opts: &'a ExtractOptions) -> Option<&'a str> {
    let last = module.rsplit('.').next().unwrap_or(module);
    opts.modules_to_save.iter().map(String::as_str).find(|m| *m == module || *m == last)
}

/// Truncated SVD of one task vector (in f32, f64 for f64): `(A, B)` in its dtype.
fn decompose(delta: &Tensor, opts: &ExtractOptions) -> Result<(Tensor, Tensor)> {
    let kind = delta.kind();
    let work = if kind == Kind::Double { Kind::Double } else { Kind::Float };
    // torch.svd is linalg.svd(full_matrices = false) returning V
    let (u, s, v) = delta.f_to_kind(work)?.f_svd(true, true)?;
    let vh = v.f_transpose(0, 1)?;
    let mut rank = opts.max_rank.min(s.size()[0]);
    if opts.sv_epsilon > 0.0 {
        let above = s.f_gt(opts.sv_epsilon)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        rank = rank.min(above);
    }
    let s = s.f_narrow(0, 0, rank)?;
    let (sa, sb) = if opts.distribute_scale {
        let r = s.f_sqrt()?;
        (r.shallow_clone(), r)
    } else {
        (s.shallow_clone(), s.f_ones_like()?)
    };
    let a = vh.f_narrow(0, 0, rank)?.f_mul(&sa.f_unsqueeze(1)?)?;
    let b = u.f_narrow(1, 0, rank)?.f_mul(&sb.f_unsqueeze(0)?)?;
    Ok((a.f_to_kind(kind)?, b.f_to_kind(kind)?))
}

/// Extracts a PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`)
/// from `model` (fine-tuned) and `base`, both model directories as
/// [`merge_directories`](super::merge_directories) reads them. A linear layer's bias, when it changed, is written as
/// `lora_B.bias` with `lora_bias: true`. The output directory is replaced whole.
///
/// Errors when the models' tensors differ in name or shape, or `max_rank < 1`.
pub fn extract_lora(
    base: impl AsRef<Path>,
    model: impl AsRef<Path>,
    out: impl AsRef<Path>,
    opts: &ExtractOptions,
) -> Result<ExtractStats> {
    if opts.max_rank < 1 {
        return Err(Error::config("max_rank", format!("{} is not a rank", opts.max_rank)));
    }
    if !opts.sv_epsilon.is_finite() || opts.sv_epsilon < 0.0 {
        return Err(Error::config("sv_epsilon", format!("{} is not ≥ 0", opts.sv_epsilon)));
    }
    let (base_dir, out) = (base.as_ref(), out.as_ref());
    let base = ModelFiles::open(base_dir)?;
    let ft = ModelFiles::open(model.as_ref())?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut ranks = BTreeMap::new();
    let mut to_save = BTreeSet::new();
    let mut targets = BTreeSet::new();
    let (mut err2, mut norm2) = (0.0f64, 0.0f64);
    let mut lora_bias = false;
    let names = ft.names();
    for name in &names {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        let (shape, kind) = ft.info(name).expect("listed");
        if !crate::lora::is_float(kind) {
            continue;
        }
        let last = module.rsplit('.').next().unwrap_or(module).to_string();
        let bias = format!("{module}.bias");
        let has_bias = ft.contains(&bias);
        match role(module, &shape, opts) {
            Role::Skip => {}
            Role::Full => {
                // as the caller named it (PEFT matches by suffix), else the last component
                to_save.insert(listed(module, opts).map_or(last, str::to_string));
                tensors.push((format!("base_model.model.{name}"), ft.read(name)?));
                if has_bias {
                    tensors.push((format!("base_model.model.{bias}"), ft.read(&bias)?));
                }
            }
            Role::Lora => {
                let w0 = base.read(name)?;
                let w1 = ft.read(name)?;
                if w0.size() != w1.size() {
                    return Err(Error::ShapeMismatch {
                        name: format!("{name} in {}", base_dir.display()),
                        expected: w1.size(),
                        actual: w0.size(),
                    });
                }
                let delta = tch::no_grad(|| w1.f_sub(&w0))?;
                let (a, b) = tch::no_grad(|| decompose(&delta, opts))?;
                let rank = a.size()[0];
                if rank == 0 {
                    continue; // nothing above `sv_epsilon`: the module is unchanged
                }
                let approx = b.f_to_kind(Kind::Double)?.f_matmul(&a.f_to_kind(Kind::Double)?)?;
                let d = delta.f_to_kind(Kind::Double)?;
                err2 += approx.f_sub(&d)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
                norm2 += d.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
                targets.insert(last);
                ranks.insert(module.to_string(), rank);
                tensors.push((format!("base_model.model.{module}.lora_A.weight"), a));
                tensors.push((format!("base_model.model.{module}.lora_B.weight"), b));
                if has_bias {
                    let db = ft.read(&bias)?.f_sub(&base.read(&bias)?)?;
                    lora_bias = true;
                    tensors.push((format!("base_model.model.{module}.lora_B.bias"), db));
                }
            }
        }
    }
    if ranks.is_empty() {
        return Err(Error::config(
            "model",
            format!("{} has no linear layer that differs from the base", model.as_ref().display()),
        ));
    }
    let r = *ranks.values().max().expect("not empty");
    let pattern: serde_json::Map<String, serde_json::Value> =
        ranks.iter().filter(|(_, &v)| v != r).map(|(k, &v)| (k.clone(), v.into())).collect();
    let modules_to_save: Vec<String> = to_save.into_iter().collect();
    let config = serde_json::json!({
        "base_model_name_or_path": opts.base_model_name.clone()
            .unwrap_or_else(|| base_dir.display().to_string()),
        "peft_type": "LORA",
        "use_rslora": false,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "modules_to_save": modules_to_save,
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "lora_dropout": 0.0,
        "lora_bias": lora_bias,
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    let owns = |n: &str| n.starts_with("adapter_model.") || n == "adapter_config.json";
    io::replace_dir(out, &owns, |dir| {
        io::write_safetensors(
            dir.join("adapter_model.safetensors"),
            &tensors,
            Some(io::pt_metadata()),
        )?;
        let text = serde_json::to_string_pretty(&config)?;
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    })?;
    let relative_error = if norm2 > 0.0 { (err2 / norm2).sqrt() } else { 0.0 };
    Ok(ExtractStats { ranks, modules_to_save, relative_error })
}
