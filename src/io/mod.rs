//! File formats: safetensors with atomic writes, PEFT's key naming at the file boundary, and
//! reading `torch.save` state dicts ([`read_torch_dict`], for pyvene's intervention files).
//!
//! In memory, adapter tensors are named by the adapted module's path
//! (`model.layers.0.self_attn.q_proj.lora_A.weight`). PEFT's files prefix every key with
//! `base_model.model.` (the `PeftModel` wrapper's path); [`to_peft_key`] adds it on save and
//! [`from_peft_key`] strips it on load.

mod atomic;
mod files;
mod pickle;
mod safetensors;

pub(crate) use self::files::{join_inside, open_regular, read_capped, read_config};
pub use self::files::{MAX_CONFIG_BYTES, MAX_HEADER_BYTES, MAX_PICKLE_BYTES};
pub use self::pickle::{
    read_torch_dict, read_torch_dict_bytes, MAX_PICKLE_DEPTH, MAX_PICKLE_OBJECTS,
};

pub(crate) use self::atomic::{replace_dir, write_atomic};
pub use self::safetensors::{pt_metadata, read_safetensors, write_safetensors, SafetensorsFile};

static REQUIRE_FINITE: std::sync::OnceLock<std::sync::atomic::AtomicBool> =
    std::sync::OnceLock::new();

fn require_finite_flag() -> &'static std::sync::atomic::AtomicBool {
    REQUIRE_FINITE.get_or_init(|| {
        let on = std::env::var("TCH_PEFT_REQUIRE_FINITE").is_ok_and(|v| v == "1" || v == "true");
        std::sync::atomic::AtomicBool::new(on)
    })
}

/// Turns the finite check on load on or off for the whole process (off by default, as in
/// PEFT; `TCH_PEFT_REQUIRE_FINITE=1` turns it on at start). When on, every tensor file the
/// crate reads ([`read_safetensors`], [`read_torch_dict`], the streamed merge's inputs, and so
/// every adapter, ReFT, model and pyvene loader) refuses a floating-point tensor holding NaN or
/// infinity with [`Error::NonFinite`](crate::Error::NonFinite) naming it, before anything is
/// written. The check reads every value once.
pub fn set_require_finite(on: bool) {
    require_finite_flag().store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the finite check on load is on (see [`set_require_finite`]).
pub fn require_finite() -> bool {
    require_finite_flag().load(std::sync::atomic::Ordering::Relaxed)
}

/// With the finite check on, errors for the first non-finite floating-point tensor.
pub(crate) fn check_loaded_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a tch::Tensor)>,
    file: &std::path::Path,
) -> crate::Result<()> {
    if !require_finite() {
        return Ok(());
    }
    for (name, t) in tensors {
        if crate::lora::is_float(t.kind()) && !crate::lora::all_finite(t)? {
            return Err(crate::Error::NonFinite { name: name.into(), file: file.to_path_buf() });
        }
    }
    Ok(())
}

/// The prefix PEFT gives every key of `adapter_model.safetensors`.
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";

/// PEFT's file name for adapter weights.
pub const PEFT_WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// PEFT's file name for the adapter config.
pub const PEFT_CONFIG_NAME: &str = "adapter_config.json";

/// The key PEFT writes for an in-memory adapter tensor name.
///
/// ```
/// assert_eq!(
///     tch_peft::io::to_peft_key("model.layers.0.q_proj.lora_A.weight"),
///     "base_model.model.model.layers.0.q_proj.lora_A.weight"
/// );
/// ```
pub fn to_peft_key(name: &str) -> String {
    format!("{PEFT_KEY_PREFIX}{name}")
}

/// The in-memory name for a key read from a file: strips `base_model.model.` when present.
pub fn from_peft_key(key: &str) -> &str {
    key.strip_prefix(PEFT_KEY_PREFIX).unwrap_or(key)
}

/// Loads tensors from safetensors files into the variables of `vs` with the same names,
/// strictly: every variable must be found exactly once with its shape, and every tensor in the
/// files must be a variable unless `ignore(name)`. Floating-point values are converted to each
/// variable's floating dtype (integers to integers; an integer tensor for a floating variable,
/// or the reverse, is a [`DtypeMismatch`](crate::Error::DtypeMismatch)) and device and copied
/// under `no_grad`; nothing is copied unless every check passes.
pub fn load_into_var_store(
    vs: &tch::nn::VarStore,
    files: &[std::path::PathBuf],
    ignore: impl Fn(&str) -> bool,
) -> crate::Result<()> {
    use crate::Error;
    let vars = vs.variables();
    let mut found: std::collections::BTreeMap<String, (tch::Tensor, std::path::PathBuf)> =
        std::collections::BTreeMap::new();
    for file in files {
        for (name, t) in read_safetensors(file)?.tensors {
            if ignore(&name) {
                continue;
            }
            let Some(var) = vars.get(&name) else {
                return Err(Error::UnexpectedTensor { name, file: file.clone() });
            };
            check_loadable(&name, var, &t)?;
            if found.insert(name.clone(), (t, file.clone())).is_some() {
                return Err(Error::CorruptFile {
                    file: file.clone(),
                    reason: format!("tensor `{name}` appears in more than one file"),
                });
            }
        }
    }
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        if !found.contains_key(name) {
            return Err(Error::MissingTensor {
                name: name.clone(),
                file: files.first().cloned().unwrap_or_default(),
            });
        }
    }
    let _guard = tch::no_grad_guard();
    for (name, (src, _)) in found {
        let mut dst = vars[&name].shallow_clone();
        dst.f_copy_(&src.f_to_device(dst.device())?.f_to_kind(dst.kind())?)?;
    }
    Ok(())
}

/// `t` can be copied into the variable `var` named `name`: same shape, and a float where the
/// variable is a float (and the reverse); the copy converts within the class.
pub(crate) fn check_loadable(name: &str, var: &tch::Tensor, t: &tch::Tensor) -> crate::Result<()> {
    use crate::Error;
    if var.size() != t.size() {
        return Err(Error::ShapeMismatch {
            name: name.into(),
            expected: var.size(),
            actual: t.size(),
        });
    }
    if crate::lora::is_float(var.kind()) != crate::lora::is_float(t.kind()) {
        return Err(Error::DtypeMismatch {
            name: name.into(),
            expected: format!("{:?} or another kind of its class", var.kind()),
            actual: t.kind(),
        });
    }
    Ok(())
}
