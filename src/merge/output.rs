//! The files of a merged model around its weights: the donor's `config.json` (with the new
//! depth and dtype) and other files, the tokenizer source's tokenizer, and the checks that the
//! output is not an input and that a tokenizer source needs no vocabulary permutation.

use std::fs::File;
use std::path::Path;

use super::config::{MergeConfig, TokenizerSource};
use super::plan::Plan;
use crate::{io, Error, Result};

/// The tokenizer files mergekit copies (`merge.py: _copy_tokenizer`).
pub(crate) const TOKENIZER_FILES: [&str; 10] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
];

/// The files that define a vocabulary: inputs must agree on them for a tokenizer source to be
/// copied without permuting the embeddings.
const VOCABULARY_FILES: [&str; 3] = ["tokenizer.json", "tokenizer.model", "added_tokens.json"];

/// With a tokenizer source, every input must carry the same vocabulary files as the source (or
/// none): mergekit would otherwise permute the embeddings to the source's vocabulary.
pub(crate) fn check_vocabularies(plan: &Plan) -> Result<()> {
    let Some(src) = plan.tokenizer else { return Ok(()) };
    let read = |dir: &Path, f: &str| -> Result<Option<Vec<u8>>> {
        let p = dir.join(f);
        match io::open_regular(&p) {
            Err(_) => Ok(None),
            Ok(_) => Ok(Some(io::read_capped(&p, 1 << 30)?)),
        }
    };
    let source_dir = plan.models[src].dir();
    for f in VOCABULARY_FILES {
        let theirs = read(source_dir, f)?;
        for m in &plan.models {
            match (read(m.dir(), f)?, &theirs) {
                (None, _) => {}
                (Some(a), Some(b)) if &a == b => {}
                _ => {
                    return Err(Error::Unsupported {
                        field: "tokenizer_source".into(),
                        reason: format!(
                            "{} has a different `{f}` than {}: its embeddings would need \
                             permuting to the source's vocabulary",
                            m.dir().display(),
                            source_dir.display()
                        ),
                    })
                }
            }
        }
    }
    Ok(())
}

/// The donor's non-weight files (config, tokenizer, …), the tokenizer source's tokenizer files
/// in place of the donor's, and `config.json` with the new depth and dtype.
pub(crate) fn copy_other_files(cfg: &MergeConfig, plan: &Plan, dir: &Path) -> Result<()> {
    let donor = plan.models[plan.donor].dir();
    let tokenizer = plan.tokenizer.map(|t| plan.models[t].dir());
    for entry in std::fs::read_dir(donor).map_err(|e| Error::io(donor, e))? {
        let p = entry.map_err(|e| Error::io(donor, e))?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        let replaced = tokenizer.is_some() && TOKENIZER_FILES.contains(&name);
        if is_weight_file(name)
            || name.starts_with('.')
            || replaced
            || io::open_regular(&p).is_err()
        {
            continue;
        }
        copy_file(&p, &dir.join(name))?;
    }
    if let Some(src) = tokenizer {
        for name in TOKENIZER_FILES {
            let p = src.join(name);
            if io::open_regular(&p).is_ok() {
                copy_file(&p, &dir.join(name))?;
            }
        }
    }
    let config = dir.join("config.json");
    let kind = cfg.out_dtype.as_deref().or(cfg.dtype.as_deref());
    if io::open_regular(&config).is_ok() && (plan.num_layers.is_some() || kind.is_some()) {
        let text = io::read_config(&config)?;
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::CorruptFile { file: config.clone(), reason: e.to_string() })?;
        if let Some(obj) = v.as_object_mut() {
            if let Some(n) = plan.num_layers {
                obj.insert("num_hidden_layers".into(), n.into());
            }
            if let Some(k) = kind {
                let name = canonical_dtype_name(k);
                let key = if obj.contains_key("torch_dtype") { "torch_dtype" } else { "dtype" };
                obj.insert(key.into(), name.into());
            }
        }
        let text = serde_json::to_string_pretty(&v)?;
        std::fs::write(&config, text).map_err(|e| Error::io(&config, e))?;
    }
    Ok(())
}

/// Copies a file by streaming (no whole-file buffer).
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let (mut src, _) = io::open_regular(from)?;
    let mut dst = File::create(to).map_err(|e| Error::io(to, e))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| Error::io(from, e))?;
    Ok(())
}

/// The name transformers writes for a dtype (`float16` for `fp16`).
pub(crate) fn canonical_dtype_name(name: &str) -> &str {
    match name {
        "fp32" => "float32",
        "fp16" => "float16",
        "bf16" => "bfloat16",
        other => other,
    }
}

/// Weights of a model directory in any format (not copied from the reference, not kept from an
/// earlier model in the output).
pub(crate) fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Every model directory a config names (base, models, slice sources and bases, tokenizer).
fn inputs_of(cfg: &MergeConfig) -> Vec<&Path> {
    let mut v: Vec<&Path> = cfg.base_model.iter().map(|p| p.as_path()).collect();
    v.extend(cfg.models.iter().map(|m| m.model.as_path()));
    for s in &cfg.slices {
        v.extend(s.base_model.iter().map(|p| p.as_path()));
        v.extend(s.sources.iter().map(|src| src.model.as_path()));
    }
    if let Some(TokenizerSource::Model(p)) = cfg.tokenizer_source() {
        v.push(p);
    }
    v
}

/// Refuses an output directory that is (or links to) one of the inputs: the merge would
/// replace its own input.
pub(crate) fn check_output_is_not_an_input(cfg: &MergeConfig, out: &Path) -> Result<()> {
    let Ok(out_c) = std::fs::canonicalize(out) else { return Ok(()) }; // not there yet
    for input in inputs_of(cfg) {
        if std::fs::canonicalize(input).is_ok_and(|c| c == out_c) {
            return Err(Error::config(
                "out",
                format!(
                    "{} is an input of the merge; write the merged model elsewhere",
                    out.display()
                ),
            ));
        }
    }
    Ok(())
}
