//! [`LoraEmbedding`]: LoRA on an embedding table, with PEFT's layout and init.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn;
use tch::Tensor;

use super::merge::{add_in_compute_kind, compute_kind, BaseLock, MergeState};
use super::{is_float, Attach, Factors, LoraLayer};
use crate::adapter::{Adapter, AdapterKind, Applicable};
use crate::lora::config::{LoraConfig, LoraInit};
use crate::{Error, Result};

/// A LoRA-adapted embedding table `W: [V, d]`.
///
/// ```text
/// y = W[ids] + s · (Aᵀ[ids]) Bᵀ          A = lora_embedding_A: [r, V],  B = lora_embedding_B: [d, r]
/// ```
///
/// As PEFT: the factors are plain parameters (keys `<module>.lora_embedding_A` and
/// `<module>.lora_embedding_B`, no `.weight`), the default init is `A = 0`, `B ~ N(0, 1)` (so the
/// layer starts equal to the base; `init_lora_weights = false` draws both from N(0, 1)), and no
/// dropout is applied. The delta weight is `s·(BA)ᵀ: [V, d]`; merging saves the original table so
/// that unmerging restores it bit-exactly.
///
/// DoRA (`use_dora`), as PEFT: the magnitude `lora_magnitude_vector: [d]` scales each embedding
/// coordinate, `y = g ⊙ (W[ids] + s·(Aᵀ[ids]) Bᵀ)` with `g = m / ‖W + s·(BA)ᵀ‖` taken over the
/// vocabulary (per column of `W`, detached), and `m` starts at that norm. The norm is computed
/// from `‖W_:j‖²`, `(BA)·W` and `A Aᵀ` without forming the `[V, d]` update.
#[derive(Debug)]
pub struct LoraEmbedding {
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Option<Tensor>,
    module: String,
    r: i64,
    scaling: f64,
    state: MergeState,
    /// Whether the DoRA magnitude was set from the loaded base table (or loaded).
    base_ready: Arc<AtomicBool>,
}

impl LoraEmbedding {
    /// Wraps the table `weight: [V, d]` (frozen by this call), registering the factors under `p`
    /// and naming the module `module`.
    pub fn new(weight: Tensor, p: &nn::Path, module: &str, config: &LoraConfig) -> Result<Self> {
        config.validate()?;
        if config.lora_bias {
            return Err(Error::Unsupported {
                field: "lora_bias".into(),
                reason: format!("a lora_B bias on the embedding `{module}` is not implemented"),
            });
        }
        if matches!(
            config.init_lora_weights,
            LoraInit::Orthogonal | LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora
        ) {
            return Err(Error::Unsupported {
                field: "init_lora_weights".into(),
                reason: format!(
                    "init {:?} on the embedding `{module}` is not implemented",
                    config.init_lora_weights
                ),
            });
        }
        let r = config.rank_for(module)?;
        let scaling = config.scaling_for(module)?;
        if weight.dim() != 2 {
            return Err(Error::ShapeMismatch {
                name: format!("{module}.weight"),
                expected: vec![-1, -1],
                actual: weight.size(),
            });
        }
        if !is_float(weight.kind()) {
            return Err(Error::DtypeMismatch {
                name: format!("{module}.weight"),
                expected: "a floating-point kind".into(),
                actual: weight.kind(),
            });
        }
        let (v, d) = (weight.size()[0], weight.size()[1]);
        if r > v.min(d) {
            return Err(Error::RankTooLarge {
                module: module.into(),
                rank: r,
                in_features: v,
                out_features: d,
            });
        }
        for name in ["lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"] {
            if p.get(name).is_some() {
                return Err(Error::DuplicateParameter(p.path(name)));
            }
        }
        let kind = compute_kind(weight.kind());
        let opts = (kind, weight.device());
        let (a, b) = tch::no_grad(|| match config.init_lora_weights {
            LoraInit::Kaiming
            | LoraInit::Gaussian
            | LoraInit::Orthogonal
            | LoraInit::Pissa
            | LoraInit::PissaNiter(_)
            | LoraInit::Olora => (Tensor::zeros([r, v], opts), Tensor::randn([d, r], opts)),
            LoraInit::Random => (Tensor::randn([r, v], opts), Tensor::randn([d, r], opts)),
        });
        let magnitude = if config.use_dora {
            let norm = tch::no_grad(|| column_norm(&weight, &a, &b, scaling))?;
            Some(p.add("lora_magnitude_vector", norm.f_to_kind(kind)?, true))
        } else {
            None
        };
        let lora_a = p.add("lora_embedding_A", a, true);
        let lora_b = p.add("lora_embedding_B", b, true);
        let _ = weight.set_requires_grad(false);
        Ok(LoraEmbedding {
            weight,
            lora_a,
            lora_b,
            magnitude,
            module: module.into(),
            r,
            scaling,
            state: MergeState::new(),
            base_ready: Arc::new(AtomicBool::new(true)),
        })
    }

    /// DoRA's magnitude `lora_magnitude_vector: [d]`, with `use_dora`.
    pub fn magnitude(&self) -> Option<&Tensor> {
        self.magnitude.as_ref()
    }

    /// Sets the DoRA magnitude to the column norm of `W + s·(BA)ᵀ` of the (loaded) base table; a
    /// no-op without DoRA. The builder defers this until the pre-trained weights are loaded (see
    /// [`LoraAdapter::init_from_base_weights`](crate::lora::LoraAdapter::init_from_base_weights)).
    pub fn init_from_base_weights(&self) -> Result<()> {
        if self.is_merged() {
            return Err(Error::MergeState { module: self.module.clone(), state: "already merged" });
        }
        if let Some(m) = &self.magnitude {
            let _guard = tch::no_grad_guard();
            let norm = column_norm(&self.weight, &self.lora_a, &self.lora_b, self.scaling)?;
            m.shallow_clone().f_copy_(&norm.f_to_kind(m.kind())?)?;
        }
        self.set_base_init_done(true);
        Ok(())
    }

    pub(crate) fn set_base_init_done(&self, ready: bool) {
        self.base_ready.store(ready, Ordering::Release);
    }

    fn check_base_init(&self) -> Result<()> {
        if self.magnitude.is_some() && !self.base_ready.load(Ordering::Acquire) {
            return Err(Error::Uninitialized {
                module: self.module.clone(),
                what: "the DoRA magnitude",
                hint: "call `init_from_base_weights()` after loading the base weights, or load a trained adapter",
            });
        }
        Ok(())
    }

    /// DoRA's `g = m / ‖W + s·(BA)ᵀ‖_col` (norm detached), `[d]`, in the adapter dtype.
    fn dora_scale(&self, m: &Tensor) -> Result<Tensor> {
        let norm =
            tch::no_grad(|| column_norm(&self.weight, &self.lora_a, &self.lora_b, self.scaling))?;
        Ok(m.f_div(&norm.f_to_kind(m.kind())?)?)
    }

    /// A second handle on the same layer (shared storage and merge state).
    pub(crate) fn share(&self) -> LoraEmbedding {
        LoraEmbedding {
            weight: self.weight.shallow_clone(),
            lora_a: self.lora_a.shallow_clone(),
            lora_b: self.lora_b.shallow_clone(),
            magnitude: self.magnitude.as_ref().map(Tensor::shallow_clone),
            module: self.module.clone(),
            r: self.r,
            scaling: self.scaling,
            state: self.state.clone(),
            base_ready: Arc::clone(&self.base_ready),
        }
    }

    /// The base table `[V, d]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `lora_embedding_A`, `[r, V]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    /// `lora_embedding_B`, `[d, r]`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }

    /// The module path.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The rank.
    pub fn rank(&self) -> i64 {
        self.r
    }

    /// The scaling `s`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Whether the adapter is active.
    pub fn is_enabled(&self) -> bool {
        self.state.is_enabled()
    }

    /// Turns the adapter on or off (disabling a merged layer unmerges it first).
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        LoraLayer::enable(self, enabled)
    }

    /// Whether the delta is folded into the table.
    pub fn is_merged(&self) -> bool {
        self.state.is_merged()
    }

    /// The update `s·(BA)ᵀ`, `[V, d]`, in the adapter dtype.
    pub fn delta_weight(&self) -> Tensor {
        self.lora_b.mm(&self.lora_a).tr() * self.scaling
    }

    fn merge_impl(&self, safe: bool) -> Result<()> {
        self.check_base_init()?;
        self.state.merge(&self.module, &self.weight, None, safe, || {
            Ok((add_in_compute_kind(&self.weight, &self.merge_delta()?)?, None))
        })
    }

    /// What merging adds to the table: `s·(BA)ᵀ`, or for DoRA `g ⊙ (W + Δ) − W`.
    fn merge_delta(&self) -> Result<Tensor> {
        Ok(match &self.magnitude {
            None => self.delta_weight(),
            Some(m) => {
                // g ⊙ (W + Δ) − W, so that the merge writes g ⊙ (W + Δ)
                let _guard = tch::no_grad_guard();
                let kind = compute_kind(self.weight.kind());
                let w = self.weight.f_to_kind(kind)?;
                let g = self.dora_scale(m)?.f_to_kind(kind)?.f_unsqueeze(0)?;
                w.f_add(&self.delta_weight().f_to_kind(kind)?)?.f_mul(&g)?.f_sub(&w)?
            }
        })
    }

    /// Folds `s·(BA)ᵀ` into the table, keeping the original for [`unmerge`](Self::unmerge).
    pub fn merge(&self) -> Result<()> {
        self.merge_impl(false)
    }

    /// As [`merge`](Self::merge), refusing non-finite results.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_impl(true)
    }

    /// Restores the original table bit-exactly.
    pub fn unmerge(&self) -> Result<()> {
        self.state.unmerge(&self.module, &self.weight, None)
    }

    /// Embeddings of `ids` (any shape of int64 indices in `[0, V)`), with the adapter applied
    /// unless it is merged or disabled.
    /// Safe beside merges on other threads (the table is read under its base lock).
    pub fn f_forward(&self, ids: &Tensor) -> Result<Tensor> {
        let _base = self.state.base_lock().read();
        let y = Tensor::f_embedding(&self.weight, ids, -1, false, false)?;
        if !self.is_enabled() || self.is_merged() {
            return Ok(y);
        }
        self.f_add_delta(ids, y)
    }

    /// Adds `s·(Aᵀ[ids]) Bᵀ` to `y`, the embeddings of `ids` so far; DoRA scales the sum by
    /// `g`, as PEFT does (`g ⊙ y + g ⊙ s·(Aᵀ[ids]) Bᵀ`).
    pub(crate) fn f_add_delta(&self, ids: &Tensor, y: Tensor) -> Result<Tensor> {
        self.check_base_init()?;
        let after_a = Tensor::f_embedding(&self.lora_a.f_tr()?, ids, -1, false, false)?;
        let delta = after_a.f_matmul(&self.lora_b.f_tr()?)?.f_mul_scalar(self.scaling)?;
        let sum = y.f_add(&delta.f_to_kind(y.kind())?)?;
        match &self.magnitude {
            None => Ok(sum),
            Some(m) => Ok(sum.f_mul(&self.dora_scale(m)?.f_to_kind(sum.kind())?)?),
        }
    }
}

/// `‖W + s·(BA)ᵀ‖` per column of `W: [V, d]` (A: `[r, V]`, B: `[d, r]`), in f32/f64: the row
/// norms of `Wᵀ + s·BA`.
fn column_norm(w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    super::dora::dora_weight_norm(&w.f_tr()?, a, b, s)
}

impl Adapter for LoraEmbedding {
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
            (format!("{}.lora_embedding_A", self.module), self.lora_a.shallow_clone()),
            (format!("{}.lora_embedding_B", self.module), self.lora_b.shallow_clone()),
        ];
        if let Some(m) = &self.magnitude {
            v.push((format!("{}.lora_magnitude_vector", self.module), m.shallow_clone()));
        }
        v
    }
}

impl Applicable for LoraEmbedding {
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

impl LoraLayer for LoraEmbedding {
    fn merge_state(&self) -> &MergeState {
        &self.state
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
            lora_b_bias: None,
        })
    }
}

impl Attach for LoraEmbedding {
    type Base = Tensor;
    fn share(&self) -> Self {
        LoraEmbedding::share(self)
    }
    fn share_base(w: &Tensor) -> Tensor {
        w.shallow_clone()
    }
    fn attach(
        w: &Tensor,
        lock: &BaseLock,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        let layer = LoraEmbedding::new(w.shallow_clone(), p, module, config)?;
        layer.state.adopt_base_lock(module, lock)?;
        Ok(layer)
    }
    fn rank_bound(w: &Tensor) -> (i64, i64) {
        (w.size()[0], w.size()[1])
    }
    fn registered(p: &nn::Path) -> Option<String> {
        p.get("lora_embedding_A").map(|_| p.path("lora_embedding_A"))
    }
}
