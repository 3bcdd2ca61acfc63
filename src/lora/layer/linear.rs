//! [`LoraLinear`]: LoRA on a `tch::nn::Linear`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tch::nn;
use tch::{Kind, Tensor};

use super::base::LinearBase;
use super::dora::{dora_row_sq, dora_weight_norm_with};
use super::init::init_factors;
use super::merge::{compute_kind, BaseLock, MergeState, WeightRef};
use super::{add_var, is_float, path_name, Attach, Factors, LoraLayer};
use crate::adapter::{Adapter, AdapterKind, Applicable};
use crate::lora::config::{LoraBias, LoraConfig, LoraInit};
use crate::{Error, Result};

/// State shared by every handle of one layer (the model's copy and the adapter registry's).
#[derive(Debug)]
pub(super) struct SharedState {
    /// The enabled flag and the merge state (the kept original while merged).
    pub(super) merge: MergeState,
    /// Use the fused autograd node when it is compiled in and dropout is inactive.
    pub(super) fused: AtomicBool,
    /// Whether the initialisation that needs the base weight (DoRA magnitude, PiSSA/OLoRA
    /// factors) is done, or the adapter was loaded.
    pub(super) base_init_done: AtomicBool,
    /// DoRA: `‖W_i‖²` of the frozen base weight, keyed on the weight's storage and version
    /// counter (any in-place change of `W` invalidates it).
    pub(super) row_sq: Mutex<Option<(usize, i64, Tensor)>>,
    /// Inference without autograd: A and B cast to the activations' dtype, keyed on the
    /// factors' versions and the dtype (an optimizer step or a load invalidates it).
    cast: Mutex<Option<CastCache>>,
}

/// See [`SharedState::cast`].
#[derive(Debug)]
struct CastCache {
    key: (Kind, i64, i64),
    a: Tensor,
    b: Tensor,
}

/// A LoRA-adapted linear layer.
///
/// For a base layer `y = x Wᵀ + b` with `W: [out, in]` (a float `nn::Linear`, or a 4-bit
/// [`QuantLinear`](crate::quant::QuantLinear) for QLoRA, see [`LinearBase`]), LoRA adds a
/// rank-`r` update:
///
/// ```text
/// y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ        A = lora_A: [r, in],  B = lora_B: [out, r]
/// s = lora_alpha / r    (rsLoRA: lora_alpha / √r)
/// ```
///
/// Only `A` and `B` train; the base weight and bias are frozen when wrapped. Dropout acts on the
/// adapter branch only and only in training. Merging writes `W ← W + s·BA` into the base weight
/// (computed in f32, or f64 for an f64 base) after saving the original, so unmerging restores it
/// bit-exactly in every dtype.
///
/// Hot path: the base output is computed on the flattened input (`[N, in]`) and the low-rank
/// branch is accumulated into it in place with one `addmm_`; the scaling multiplies the small
/// `[N, r]` intermediate. No dropout kernel runs when `p = 0` or in eval. A merged (or disabled)
/// layer runs the base `linear` alone.
///
/// Adapter weights are created in f32 on the base weight's device, also for a bf16/f16 base (as
/// PEFT does), and in f64 on an f64 base. On a bf16/f16 base the branch computes as
/// `torch.autocast` would: the f32 factors are cast to the base dtype (they are small), the
/// matmuls run in that dtype with f32 accumulation, and gradients reach the f32 factors through
/// the cast. PEFT instead casts the `[N, in]` activations to f32, a full-size copy per call; the
/// results agree within the base dtype's precision.
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use tch_peft::lora::{LoraConfig, LoraLinear};
///
/// let base_vs = nn::VarStore::new(Device::Cpu);
/// let adapter_vs = nn::VarStore::new(Device::Cpu);
/// let base = nn::linear(base_vs.root() / "proj", 16, 8, Default::default());
/// let cfg = LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
/// let layer = LoraLinear::new(base, &(adapter_vs.root() / "proj"), &cfg)?;
/// let y = layer.forward_t(&Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)), false);
/// assert_eq!(y.size(), [2, 5, 8]);
/// assert_eq!(adapter_vs.len(), 2); // proj.lora_A.weight, proj.lora_B.weight
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug)]
pub struct LoraLinear {
    pub(super) base: LinearBase,
    pub(super) lora_a: Tensor,
    pub(super) lora_b: Tensor,
    /// Trainable copy of the base bias when `bias = "lora_only"`.
    pub(super) bias: Option<Tensor>,
    /// DoRA's per-row magnitude `[out]`, when `use_dora`.
    pub(super) magnitude: Option<Tensor>,
    /// The bias of `lora_B` `[out]`, when `lora_bias`.
    pub(super) lora_b_bias: Option<Tensor>,
    pub(super) init: LoraInit,
    pub(super) module: String,
    pub(super) r: i64,
    pub(super) scaling: f64,
    pub(super) dropout: f64,
    pub(super) in_features: i64,
    pub(super) out_features: i64,
    pub(super) state: Arc<SharedState>,
}

impl LoraLinear {
    /// Wraps `base` with a LoRA adapter whose variables are registered under `p`
    /// (`p/lora_A/weight`, `p/lora_B/weight`). The module name used for `rank_pattern`,
    /// `alpha_pattern` and file keys is `p`'s path.
    ///
    /// The base weight and bias stop requiring grad. Errors: an invalid config, a base weight that
    /// is not a 2-D floating tensor, a bias of the wrong shape, a rank above `min(in, out)`, or
    /// adapter variables that already exist under `p`.
    pub fn new(base: impl Into<LinearBase>, p: &nn::Path, config: &LoraConfig) -> Result<Self> {
        let module = path_name(p);
        Self::with_module_name(base, p, &module, config)
    }

    /// Builds the base layer as `nn::linear(base_path, in_dim, out_dim, c)` and wraps it, with
    /// the adapter under `adapter_path` and the module named after `base_path` (the two-store
    /// pattern: base and adapter paths mirror each other in two stores).
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use tch_peft::lora::{LoraConfig, LoraLinear};
    /// let (base_vs, adapter_vs) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    /// let base_p = base_vs.root() / "layers" / 0 / "q_proj";
    /// let adapter_p = adapter_vs.root() / "layers" / 0 / "q_proj";
    /// let cfg = LoraConfig::default();
    /// let q = LoraLinear::build(&base_p, &adapter_p, 64, 64, Default::default(), &cfg)?;
    /// assert_eq!(q.module(), "layers.0.q_proj");
    /// # Ok::<(), tch_peft::Error>(())
    /// ```
    pub fn build(
        base_path: &nn::Path,
        adapter_path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        c: nn::LinearConfig,
        config: &LoraConfig,
    ) -> Result<Self> {
        config.validate()?;
        let base = crate::vars::try_linear(base_path, in_dim, out_dim, c)?;
        Self::with_module_name(base, adapter_path, &path_name(base_path), config)
    }

    /// Wraps a GPT-2 style `Conv1D` layer, whose weight is stored `[in, out]` and computes
    /// `y = x W + b` (PEFT's `fan_in_fan_out`). The factors have the usual shapes
    /// (`lora_A: [r, in]`, `lora_B: [out, r]`) and merging writes `s·(BA)ᵀ` into the `[in, out]`
    /// storage.
    pub fn from_conv1d(
        weight: Tensor,
        bias: Option<Tensor>,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        if weight.dim() != 2 {
            return Err(Error::ShapeMismatch {
                name: format!("{module}.weight"),
                expected: vec![-1, -1],
                actual: weight.size(),
            });
        }
        // freeze the stored weight itself, then view it as the [out, in] weight of a linear layer
        let _ = weight.set_requires_grad(false);
        let base = nn::Linear { ws: weight.f_tr()?, bs: bias };
        Self::with_module_name(base, p, module, config)
    }

    /// As [`new`](Self::new), with the module name given explicitly (it may differ from the
    /// adapter path, e.g. when the adapter store has a prefix).
    pub fn with_module_name(
        base: impl Into<LinearBase>,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        Self::with_module_name_sharing(base.into(), p, module, config, None)
    }

    /// As [`with_module_name`](Self::with_module_name), the base weight's lock shared with the
    /// other adapters of its stack when given.
    pub(crate) fn with_module_name_sharing(
        base: LinearBase,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
        lock: Option<&BaseLock>,
    ) -> Result<Self> {
        config.validate()?;
        let r = config.rank_for(module)?;
        let scaling = config.scaling_for(module)?;
        let weight_name = || format!("{module}.weight");
        // the dtype adapters are made in: the float weight's (f32 for half types, f64 for f64),
        // f32 on a 4-bit base
        let base_kind = match &base {
            LinearBase::Dense(l) => {
                let ws = &l.ws;
                if ws.dim() != 2 {
                    return Err(Error::ShapeMismatch {
                        name: weight_name(),
                        expected: vec![-1, -1],
                        actual: ws.size(),
                    });
                }
                if !is_float(ws.kind()) {
                    return Err(Error::DtypeMismatch {
                        name: weight_name(),
                        expected: "a floating-point kind".into(),
                        actual: ws.kind(),
                    });
                }
                ws.kind()
            }
            LinearBase::Quant(_) => {
                if config.init_lora_weights.uses_base_weight() {
                    return Err(Error::Unsupported {
                        field: "init_lora_weights".into(),
                        reason: format!(
                            "`{module}` is 4-bit: PiSSA/OLoRA rewrite the base weight with their \
                             residual, which a 4-bit base cannot hold exactly"
                        ),
                    });
                }
                Kind::Float
            }
        };
        let (out_features, in_features) = (base.out_features(), base.in_features());
        if let Some(bs) = base.bias() {
            if bs.size() != [out_features] {
                return Err(Error::ShapeMismatch {
                    name: format!("{module}.bias"),
                    expected: vec![out_features],
                    actual: bs.size(),
                });
            }
        }
        if r > in_features.min(out_features) {
            return Err(Error::RankTooLarge {
                module: module.to_string(),
                rank: r,
                in_features,
                out_features,
            });
        }
        // check every name before registering anything, so a failure registers nothing
        let with_bias = config.bias == LoraBias::LoraOnly && base.bias().is_some();
        for (sub, name) in [("lora_A", "weight"), ("lora_B", "weight"), ("base_layer", "bias")] {
            if (sub != "base_layer" || with_bias) && (p / sub).get(name).is_some() {
                return Err(Error::DuplicateParameter((p / sub).path(name)));
            }
        }
        if config.use_dora && p.get("lora_magnitude_vector").is_some() {
            return Err(Error::DuplicateParameter(p.path("lora_magnitude_vector")));
        }
        if config.lora_bias && (p / "lora_B").get("bias").is_some() {
            return Err(Error::DuplicateParameter((p / "lora_B").path("bias")));
        }
        // f32 adapters (PEFT upcasts f16/bf16 adapters), f64 on an f64 base (PEFT follows the
        // base dtype for full-precision bases).
        let adapter_kind = compute_kind(base_kind);
        let opts = (adapter_kind, base.device());
        let (a, b) = init_factors(config.init_lora_weights, r, in_features, out_features, opts);
        let bias = match base.bias() {
            Some(bs) if with_bias => Some(tch::no_grad(|| bs.to_kind(adapter_kind).copy())),
            _ => None,
        };
        let magnitude = if config.use_dora {
            let w = base.weight(Kind::Float)?;
            Some(super::dora::new_magnitude(p, &w, &a, &b, scaling)?)
        } else {
            None
        };
        let lora_a = add_var(p, "lora_A", "weight", a)?;
        let lora_b = add_var(p, "lora_B", "weight", b)?;
        // PEFT initialises lora_B's bias to zero (kept for `init_lora_weights = false` too)
        let lora_b_bias = config
            .lora_bias
            .then(|| add_var(p, "lora_B", "bias", Tensor::zeros([out_features], opts)))
            .transpose()?;
        let bias = bias.map(|t| add_var(p, "base_layer", "bias", t)).transpose()?;
        if let LinearBase::Dense(l) = &base {
            let _ = l.ws.set_requires_grad(false);
        }
        if let Some(bs) = base.bias() {
            let _ = bs.set_requires_grad(false);
        }
        let layer = LoraLinear {
            base,
            lora_a,
            lora_b,
            bias,
            magnitude,
            lora_b_bias,
            init: config.init_lora_weights,
            module: module.to_string(),
            r,
            scaling,
            dropout: config.lora_dropout,
            in_features,
            out_features,
            state: Arc::new(SharedState {
                merge: MergeState::new(),
                fused: AtomicBool::new(true),
                base_init_done: AtomicBool::new(true),
                row_sq: Mutex::new(None),
                cast: Mutex::new(None),
            }),
        };
        if let Some(lock) = lock {
            layer.state.merge.adopt_base_lock(module, lock)?;
        }
        if layer.init.uses_base_weight() {
            layer.set_base_init_done(false);
            layer.init_from_base_weights()?;
        }
        Ok(layer)
    }

    /// A second handle on the same layer: tensors are shallow clones (same storage) and the
    /// merged/enabled state is shared.
    pub(crate) fn share(&self) -> LoraLinear {
        LoraLinear {
            base: self.base.share(),
            lora_a: self.lora_a.shallow_clone(),
            lora_b: self.lora_b.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            magnitude: self.magnitude.as_ref().map(Tensor::shallow_clone),
            lora_b_bias: self.lora_b_bias.as_ref().map(Tensor::shallow_clone),
            init: self.init,
            module: self.module.clone(),
            r: self.r,
            scaling: self.scaling,
            dropout: self.dropout,
            in_features: self.in_features,
            out_features: self.out_features,
            state: Arc::clone(&self.state),
        }
    }

    /// The wrapped base layer: float or 4-bit.
    pub fn base(&self) -> &LinearBase {
        &self.base
    }

    /// The base weight as a merge writes it.
    pub(super) fn weight_ref(&self) -> WeightRef<'_> {
        match &self.base {
            LinearBase::Dense(l) => WeightRef::Dense(&l.ws),
            LinearBase::Quant(q) => WeightRef::Quant(q),
        }
    }

    /// The base weight the composed ops compute with in `kind`: the float weight itself, or
    /// the 4-bit weight dequantized.
    pub(super) fn base_weight(&self, kind: Kind) -> Result<Tensor> {
        self.base.weight(kind)
    }

    /// `lora_A`, shape `[r, in]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    /// `lora_B`, shape `[out, r]`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }

    /// The module path this adapter is named after.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The rank `r`.
    pub fn rank(&self) -> i64 {
        self.r
    }

    /// The scaling `s`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        self.out_features
    }

    /// The bias the layer uses: the trainable copy with `bias = "lora_only"`, else the base bias.
    pub(super) fn effective_bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().or(self.base.bias())
    }

    /// Whether the adapter branch is active.
    pub fn is_enabled(&self) -> bool {
        self.state.merge.is_enabled()
    }

    /// Turns the adapter branch on or off. Disabling a merged layer unmerges it first (as PEFT).
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        LoraLayer::enable(self, enabled)
    }

    /// DoRA's magnitude vector `lora_magnitude_vector: [out]`, when the config has `use_dora`.
    pub fn magnitude(&self) -> Option<&Tensor> {
        self.magnitude.as_ref()
    }

    /// Marks the base-dependent initialisation (DoRA magnitude, PiSSA/OLoRA factors) as done or
    /// pending.
    pub(crate) fn set_base_init_done(&self, ready: bool) {
        self.state.base_init_done.store(ready, Ordering::Release);
    }

    pub(super) fn check_base_init(&self) -> Result<()> {
        let pending = (self.magnitude.is_some() || self.init.uses_base_weight())
            && !self.state.base_init_done.load(Ordering::Acquire);
        if pending {
            return Err(Error::Uninitialized {
                module: self.module.clone(),
                what: "the initialisation from the base weight (DoRA magnitude, PiSSA/OLoRA factors)",
                hint: "call `init_from_base_weights()` after loading the base weights, or load a trained adapter",
            });
        }
        Ok(())
    }

    /// Chooses between the fused autograd node (the default, when
    /// [`fused_kernel_available`](crate::lora::fused_kernel_available); LoRA and DoRA) and composed tch ops for the unmerged
    /// forward. Both compute the same values and gradients, with two exceptions for DoRA's node:
    /// it saves the layer's output for the backward (modifying the output in place before the
    /// backward is then an autograd error), and a magnitude entry that is exactly 0 gets a zero
    /// gradient. Dropout in training and `lora_bias` always take the composed path.
    pub fn set_fused(&self, fused: bool) {
        self.state.fused.store(fused, Ordering::Relaxed);
    }

    /// Whether `s·BA` is currently folded into the base weight.
    pub fn is_merged(&self) -> bool {
        self.state.merge.is_merged()
    }

    /// The bias of `lora_B` `[out]`, with `lora_bias`.
    pub fn lora_b_bias(&self) -> Option<&Tensor> {
        self.lora_b_bias.as_ref()
    }

    /// The update `s·BA`, shape `[out, in]`, in the adapter dtype (f32 by default).
    pub fn delta_weight(&self) -> Tensor {
        self.lora_b.mm(&self.lora_a) * self.scaling
    }

    /// A and B in `kind`, cast once per change of the factors (their version counters).
    #[cfg(tch_peft_csrc)]
    pub(super) fn cast_factors(&self, kind: Kind) -> Result<(Tensor, Tensor)> {
        let key = (kind, self.lora_a.f_internal_version()?, self.lora_b.f_internal_version()?);
        let mut cache = self.state.cast.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.key == key) {
            return Ok((c.a.shallow_clone(), c.b.shallow_clone()));
        }
        let (a, b) = (self.lora_a.f_to_kind(kind)?, self.lora_b.f_to_kind(kind)?);
        *cache = Some(CastCache { key, a: a.shallow_clone(), b: b.shallow_clone() });
        Ok((a, b))
    }

    /// DoRA's `‖W + s·BA‖` per row of the current base weight, with `‖W_i‖²` cached while the
    /// weight is unchanged (frozen bases: computed once). No gradient.
    pub(super) fn dora_norm(&self) -> Result<Tensor> {
        let w_sq = self.dora_row_sq_cached()?;
        let w = self.base_weight(Kind::Float)?;
        tch::no_grad(|| dora_weight_norm_with(&w_sq, &w, &self.lora_a, &self.lora_b, self.scaling))
    }

    /// `‖W_i‖²` of the current base weight, cached on its storage and version counter.
    pub(super) fn dora_row_sq_cached(&self) -> Result<Tensor> {
        let key = match &self.base {
            LinearBase::Dense(l) => (l.ws.data_ptr() as usize, l.ws.f_internal_version()?),
            LinearBase::Quant(q) => q.version_key()?,
        };
        let mut cache = self.state.row_sq.lock().unwrap_or_else(|e| e.into_inner());
        match cache.as_ref() {
            Some((ptr, version, t)) if (*ptr, *version) == key => Ok(t.shallow_clone()),
            _ => {
                let w = self.base_weight(Kind::Float)?;
                let t = tch::no_grad(|| dora_row_sq(&w))?;
                *cache = Some((key.0, key.1, t.shallow_clone()));
                Ok(t)
            }
        }
    }

    /// The merged weight `W + s·BA` in the base dtype, computed in f32 (f64 for an f64 base);
    /// on a 4-bit base in f32, from the dequantized weight (the merge quantizes it again).
    pub(super) fn merged_weight(&self) -> Result<Tensor> {
        self.check_base_init()?;
        let w = &self.base_weight(Kind::Float)?;
        let compute = compute_kind(w.kind());
        let delta = self.lora_b.f_to_kind(compute)?.f_mm(&self.lora_a.f_to_kind(compute)?)?;
        let mut merged = w.f_to_kind(compute)?.f_add(&(delta * self.scaling))?;
        if let Some(m) = &self.magnitude {
            merged = self.dora_merged(m, &merged)?;
        }
        Ok(merged.f_to_kind(w.kind())?)
    }

    pub(super) fn merge_impl(&self, safe: bool) -> Result<()> {
        let (w, b) = (self.weight_ref(), self.base.bias());
        self.state
            .merge
            .merge(&self.module, w, b, safe, || Ok((self.merged_weight()?, self.merged_bias()?)))
    }

    /// The bias the merged layer carries, when it differs from the base bias: the trained copy
    /// (`bias = "lora_only"`) plus `s·lora_B.bias` (`lora_bias`), in the base dtype. Errors when
    /// a `lora_B` bias would have to merge into a layer without bias (PEFT refuses it too).
    pub(super) fn merged_bias(&self) -> Result<Option<Tensor>> {
        if self.lora_b_bias.is_none() && self.bias.is_none() {
            return Ok(None);
        }
        let Some(base_bias) = self.base.bias() else {
            return Err(Error::Unsupported {
                field: "lora_bias".into(),
                reason: format!("cannot merge into `{}`: the base layer has no bias", self.module),
            });
        };
        let kind = base_bias.kind();
        let compute = compute_kind(kind);
        let mut b = self.effective_bias().unwrap_or(base_bias).f_to_kind(compute)?;
        if let Some(bb) = &self.lora_b_bias {
            b = b.f_add(&bb.f_to_kind(compute)?.f_mul_scalar(self.scaling)?)?;
        }
        Ok(Some(b.f_to_kind(kind)?))
    }

    /// Folds `s·BA` into the base weight (and, with `bias = "lora_only"` or `lora_bias`, the
    /// trained bias into the base bias); forward then runs the base layer alone. The originals
    /// are kept so that [`unmerge`](Self::unmerge) restores them bit-exactly — in host memory
    /// when the layer lives on an accelerator, so a merged model needs no more device memory
    /// than the base model.
    pub fn merge(&self) -> Result<()> {
        self.merge_impl(false)
    }

    /// As [`merge`](Self::merge), but refuses (and leaves the weight unchanged) when the merged
    /// weight has NaN or infinite values. Costs one host sync.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_impl(true)
    }

    /// Restores the base weight saved by [`merge`](Self::merge), bit for bit.
    pub fn unmerge(&self) -> Result<()> {
        self.state.merge.unmerge(&self.module, self.weight_ref(), self.base.bias())
    }

    /// Merges for good and returns the plain base layer (`W + s·BA`; the bias with the trained
    /// copy of `bias = "lora_only"` and `s·lora_B.bias` folded in), keeping no copy of the
    /// original: zero-overhead inference.
    ///
    /// The merge is written into the base weight in place, which every handle of this layer
    /// shares (the model's and the adapter registry's): they all see the layer as merged from
    /// then on (their forward runs the base layer alone, so the update is not added twice) and
    /// can no longer [`unmerge`](Self::unmerge); the layer's [`LoraStack`](crate::lora::LoraStack)
    /// (and so the [`LoraAdapter`](crate::lora::LoraAdapter)) drops this adapter, whose update
    /// is part of the base from then on. A layer already merged is kept as it is, its saved
    /// original dropped.
    ///
    /// # Errors
    /// `Unsupported` on a 4-bit base (nothing merged): see
    /// [`into_merged_base`](Self::into_merged_base) and
    /// [`merged_dense_linear`](Self::merged_dense_linear).
    pub fn into_merged_linear(self) -> Result<nn::Linear> {
        if self.base.quantized().is_some() {
            return Err(Error::Unsupported {
                field: "into_merged_linear".into(),
                reason: format!(
                    "`{}` has a 4-bit base: `into_merged_base` merges into it (quantized again), \
                     `merged_dense_linear` gives the float layer",
                    self.module
                ),
            });
        }
        match self.into_merged_base()? {
            LinearBase::Dense(l) => Ok(l),
            LinearBase::Quant(_) => unreachable!("checked above"),
        }
    }

    /// As [`into_merged_linear`](Self::into_merged_linear), for either kind of base. On a 4-bit
    /// base the merged weight is quantized again into the base's layout, exactly as
    /// [`Bnb4bitWeight::quantize`](crate::quant::Bnb4bitWeight::quantize) (bitsandbytes) does:
    /// PEFT's merge on a bitsandbytes base, lossy (`W + s·BA` rounded to 4 bits, PEFT warns).
    /// [`merge`](Self::merge) does the same while keeping the original codes, so that
    /// [`unmerge`](Self::unmerge) restores them exactly.
    pub fn into_merged_base(self) -> Result<LinearBase> {
        self.state.merge.merge_for_good(self.weight_ref(), self.base.bias(), || {
            Ok((self.merged_weight()?, self.merged_bias()?))
        })?;
        Ok(self.base.share())
    }

    /// The merged layer in float, `kind` (f32, f16, bf16 or f64): `deq(W) + s·BA` (computed in
    /// f32, f64 for f64) and the merged bias, as new tensors; the layer itself is unchanged
    /// (PEFT's `merge_and_unload` after dequantizing a bitsandbytes base, for export). On a
    /// merged layer the update is not added twice: its base already holds it.
    pub fn merged_dense_linear(&self, kind: Kind) -> Result<nn::Linear> {
        let _guard = tch::no_grad_guard();
        let _base = self.state.merge.base_lock().read();
        let (w, b) = if self.is_merged() || !self.is_enabled() {
            let b = if self.is_merged() { self.base.bias() } else { self.effective_bias() };
            (self.base_weight(compute_kind(kind))?, b.map(Tensor::shallow_clone))
        } else {
            (
                self.merged_weight()?,
                self.merged_bias()?.or(self.base.bias().map(Tensor::shallow_clone)),
            )
        };
        let ws = w.f_to_kind(kind)?.f_detach_copy()?;
        let bs = b.map(|b| b.f_to_kind(kind)?.f_detach_copy()).transpose()?;
        Ok(nn::Linear { ws, bs })
    }
}

impl Adapter for LoraLinear {
    /// DoRA for a layer with a magnitude vector (`use_dora`), else LoRA.
    fn kind(&self) -> AdapterKind {
        if self.magnitude.is_some() {
            AdapterKind::Dora
        } else {
            AdapterKind::Lora
        }
    }

    fn name(&self) -> &str {
        &self.module
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            (format!("{}.lora_A.weight", self.module), self.lora_a.shallow_clone()),
            (format!("{}.lora_B.weight", self.module), self.lora_b.shallow_clone()),
        ];
        if let Some(b) = &self.bias {
            v.push((format!("{}.base_layer.bias", self.module), b.shallow_clone()));
        }
        if let Some(bb) = &self.lora_b_bias {
            v.push((format!("{}.lora_B.bias", self.module), bb.shallow_clone()));
        }
        if let Some(m) = &self.magnitude {
            v.push((format!("{}.lora_magnitude_vector", self.module), m.shallow_clone()));
        }
        v
    }
}

impl Applicable for LoraLinear {
    /// [`merge`](LoraLinear::merge).
    fn apply(&mut self) -> Result<()> {
        self.merge()
    }

    fn revert(&mut self) -> Result<()> {
        self.unmerge()
    }

    fn is_applied(&self) -> bool {
        self.is_merged()
    }
}

impl LoraLayer for LoraLinear {
    fn merge_state(&self) -> &MergeState {
        &self.state.merge
    }
    fn merge_layer(&self, safe: bool) -> Result<()> {
        self.merge_impl(safe)
    }
    fn unmerge_layer(&self) -> Result<()> {
        self.unmerge()
    }
    fn init_from_base(&self) -> Result<()> {
        self.init_from_base_weights()
    }
    fn set_base_ready(&self, ready: bool) {
        self.set_base_init_done(ready)
    }
    fn factors(&self) -> Option<Factors> {
        Some(Factors {
            a: self.lora_a.shallow_clone(),
            b: self.lora_b.shallow_clone(),
            scaling: self.scaling,
            magnitude: self.magnitude.as_ref().map(Tensor::shallow_clone),
            lora_b_bias: self.lora_b_bias.as_ref().map(Tensor::shallow_clone),
        })
    }
}

impl Attach for LoraLinear {
    type Base = LinearBase;
    fn share(&self) -> Self {
        LoraLinear::share(self)
    }
    fn share_base(b: &LinearBase) -> LinearBase {
        b.share()
    }
    fn attach(
        b: &LinearBase,
        lock: &BaseLock,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        LoraLinear::with_module_name_sharing(Self::share_base(b), p, module, config, Some(lock))
    }
    fn rank_bound(b: &LinearBase) -> (i64, i64) {
        (b.in_features(), b.out_features())
    }
    fn registered(p: &nn::Path) -> Option<String> {
        let a = p / "lora_A";
        a.get("weight").map(|_| a.path("weight"))
    }
}
