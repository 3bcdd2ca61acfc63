//! The crate's one error type.
//!
//! Every variant names the thing that is wrong (a tensor, a module path, a config field, a file),
//! so that a user mistake reads as a sentence instead of a libtorch stack trace. Shapes and dtypes
//! are checked before calling into libtorch; libtorch's own errors arrive wrapped as [`Error::Tch`].

use std::path::PathBuf;

/// The result type of every fallible function in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `tch-peft`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === configuration ===
    /// A configuration field holds a value that is not allowed.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// The field's name as it appears in the serialized config (e.g. `lora_dropout`).
        field: String,
        /// Why the value is refused.
        reason: String,
    },
    /// A configuration field asks for something this version does not implement.
    #[error("config field `{field}` is not supported: {reason}")]
    Unsupported {
        /// The field's name as it appears in the serialized config (e.g. `use_dora`).
        field: String,
        /// What is not supported, and what to use instead where there is an alternative.
        reason: String,
    },
    /// A regular expression in a config (`target_modules`, `rank_pattern`, ...) does not compile.
    #[error("invalid regex `{pattern}` in `{field}`: {source}")]
    InvalidRegex {
        /// The config field holding the pattern.
        field: String,
        /// The pattern as written.
        pattern: String,
        /// The regex crate's diagnosis.
        source: regex::Error,
    },

    // === target selection ===
    /// A target listed in a config matched no module of the model.
    #[error("target `{target}` in `{field}` matched no module (checked {checked} module names)")]
    UnmatchedTarget {
        /// The config field (`target_modules`, `layers_to_transform`, ...).
        field: String,
        /// The target entry that matched nothing.
        target: String,
        /// How many module names were checked against it.
        checked: usize,
    },

    // === shapes, ranks, dtypes, devices ===
    /// A tensor's shape differs from the one required.
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// The tensor or input (e.g. `model.layers.0.q_proj.lora_A.weight`, or `input of q_proj`).
        name: String,
        /// The expected shape; `-1` stands for "any size".
        expected: Vec<i64>,
        /// The shape that was given.
        actual: Vec<i64>,
    },
    /// The LoRA rank is larger than the layer it adapts allows.
    #[error("rank {rank} of `{module}` exceeds min(in_features={in_features}, out_features={out_features})")]
    RankTooLarge {
        /// The adapted module's path.
        module: String,
        /// The requested rank.
        rank: i64,
        /// The layer's input features.
        in_features: i64,
        /// The layer's output features.
        out_features: i64,
    },
    /// A tensor has a dtype that cannot be used there.
    #[error("dtype mismatch for `{name}`: expected {expected}, got {actual:?}")]
    DtypeMismatch {
        /// The tensor or input.
        name: String,
        /// What is accepted (e.g. `a floating-point kind`).
        expected: String,
        /// The dtype that was given.
        actual: tch::Kind,
    },
    /// Two tensors that must share a device do not.
    #[error("device mismatch for `{name}`: expected {expected:?}, got {actual:?}")]
    DeviceMismatch {
        /// The tensor or input.
        name: String,
        /// The device of the layer.
        expected: tch::Device,
        /// The device of the tensor given.
        actual: tch::Device,
    },
    /// A token id lies outside the model's vocabulary.
    #[error("token id outside [0, {vocab_size}) in `{input}`")]
    TokenOutOfRange {
        /// The input holding the id (`input_ids`).
        input: &'static str,
        /// The model's vocabulary size.
        vocab_size: i64,
    },
    /// A variable of that name already exists in the `VarStore` (tch would silently rename it).
    #[error("variable `{0}` already exists in the var store")]
    DuplicateParameter(String),

    // === adapter state ===
    /// The operation needs the adapter unmerged, but it is merged (or the other way round).
    #[error("adapter `{module}` is {state}")]
    MergeState {
        /// The adapted module's path.
        module: String,
        /// `already merged`, `not merged`, `merged for good …` (nothing to restore), `already
        /// applied` or `not applied`.
        state: &'static str,
    },
    /// A tensor must be initialised from the loaded base weights before use (DoRA magnitudes of
    /// layers built before the base weights were loaded).
    #[error("`{module}`: {what} is not initialised; {hint}")]
    Uninitialized {
        /// The adapted module's path.
        module: String,
        /// What is missing.
        what: &'static str,
        /// How to initialise it.
        hint: &'static str,
    },
    /// A safe merge produced NaN or infinite weights; nothing was written.
    #[error("merging the adapter into `{module}` gives non-finite weights; the base weight is unchanged")]
    NonFiniteMerge {
        /// The module whose merged weight was not finite.
        module: String,
    },
    // === files ===
    /// A tensor the adapter needs is not in the file.
    #[error("tensor `{name}` is missing from `{}`", file.display())]
    MissingTensor {
        /// The expected key.
        name: String,
        /// The file read.
        file: PathBuf,
    },
    /// The file holds a tensor the adapter does not know (strict loading).
    #[error("unexpected tensor `{name}` in `{}`", file.display())]
    UnexpectedTensor {
        /// The key found in the file.
        name: String,
        /// The file read.
        file: PathBuf,
    },
    /// The file is not a valid safetensors/JSON file, or holds a dtype we cannot read.
    #[error("corrupt or unreadable file `{}`: {reason}", file.display())]
    CorruptFile {
        /// The file read.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor from a file holds NaN or infinite values where finite ones are required (the
    /// opt-in finite check on load, or the inputs of a merge).
    #[error("tensor `{name}` from `{}` holds NaN or infinite values", file.display())]
    NonFinite {
        /// The tensor's name.
        name: String,
        /// The file (or model directory) it came from.
        file: PathBuf,
    },
    /// A quantized weight whose state is malformed or inconsistent (a bitsandbytes 4-bit weight's
    /// codes, absmax, code tables or `quant_state` JSON), or a weight that cannot be quantized.
    #[error("quantized weight `{name}`: {reason}")]
    Quantization {
        /// The weight's name (its key prefix in the checkpoint).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A distributed operation failed: a rendezvous or a collective that did not complete (a
    /// rank that never arrived, within the timeout), or arguments the ranks disagree on.
    #[error("distributed {what}: {reason}")]
    Distributed {
        /// The operation (and the store or rank it concerns).
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// An I/O error on a named file.
    #[error("i/o error on `{}`: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// An I/O error without a path: what `?` makes of a `std::io::Error` in code that returns
    /// this crate's [`Result`] (the crate's own file errors are [`Error::Io`], naming the path).
    #[error("i/o error: {0}")]
    IoUnnamed(#[from] std::io::Error),

    // === wrapped ===
    /// An error reported by libtorch through `tch`.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// A JSON (de)serialisation error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidConfig`].
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field: field.into(), reason: reason.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
