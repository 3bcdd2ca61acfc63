//! Saving and loading a [`LoraAdapter`]'s adapters: PEFT adapter directories
//! (`adapter_config.json` + `adapter_model.safetensors`, one directory per named adapter),
//! bare safetensors files, and the config file itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Tensor};

use super::{LoraAdapter, DEFAULT_ADAPTER_NAME};
use crate::io;
use crate::lora::config::LoraConfig;
use crate::lora::layer::is_float;
use crate::{Error, Result};

impl LoraAdapter {
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
                l.set_base_ready(true);
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
    ///
    /// The directory is replaced as a whole: a crash or a full disk leaves the old adapters or
    /// the new ones, never a new config over old weights; files in `dir` that the save does not
    /// write are kept (see [`crate::io`]).
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
        io::replace_dir(dir.as_ref(), &|_| false, |tmp| {
            for n in names {
                let dir = Self::adapter_dir(n, tmp);
                let config = self.adapter_config(n).ok_or_else(|| Error::config("adapter", *n))?;
                write_config(&dir, config)?;
                self.save_adapter_safetensors(n, dir.join(io::PEFT_WEIGHTS_NAME))?;
            }
            Ok(())
        })
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
            init_lora_weights: crate::lora::config::LoraInit::Kaiming,
            ..config.clone()
        };
        io::replace_dir(dir.as_ref(), &|_| false, |tmp| {
            let dir = Self::adapter_dir(name, tmp);
            write_config(&dir, &converted)?;
            io::write_safetensors(
                dir.join(io::PEFT_WEIGHTS_NAME),
                &tensors,
                Some(io::pt_metadata()),
            )
        })
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

impl LoraConfig {
    /// Reads `adapter_config.json` from a PEFT adapter directory (or the file itself). Refuses a
    /// `peft_type` other than `LORA`.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join(io::PEFT_CONFIG_NAME) } else { path.to_path_buf() };
        let text = io::read_config(&file)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::CorruptFile { file: file.clone(), reason: e.to_string() })?;
        match value.get("peft_type") {
            None => {}
            Some(serde_json::Value::String(t)) if t == "LORA" => {}
            Some(serde_json::Value::String(t)) => {
                return Err(Error::Unsupported {
                    field: "peft_type".into(),
                    reason: format!("`{t}` adapters are not LoRA"),
                })
            }
            Some(other) => {
                return Err(Error::config(
                    "peft_type",
                    format!("`{other}` is not a PEFT type name (expected \"LORA\")"),
                ))
            }
        }
        let config: LoraConfig = serde_json::from_value(value)
            .map_err(|e| Error::CorruptFile { file: file.clone(), reason: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }
}
