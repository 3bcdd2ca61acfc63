//! [`LoraEmbedding`]: LoRA on an embedding table, with PEFT's layout and init.

use tch::nn;
use tch::Tensor;

use super::config::{LoraConfig, LoraInit};
use super::linear::is_float;
use super::merge::{compute_kind, WeightMerge};
use crate::adapter::{Adapter, AdapterKind};
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
#[derive(Debug)]
pub struct LoraEmbedding {
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    module: String,
    r: i64,
    scaling: f64,
    state: WeightMerge,
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
        if config.use_dora {
            return Err(Error::Unsupported {
                field: "use_dora".into(),
                reason: format!("DoRA on the embedding `{module}` is not implemented yet"),
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
        for name in ["lora_embedding_A", "lora_embedding_B"] {
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
        let lora_a = p.add("lora_embedding_A", a, true);
        let lora_b = p.add("lora_embedding_B", b, true);
        let _ = weight.set_requires_grad(false);
        Ok(LoraEmbedding {
            weight,
            lora_a,
            lora_b,
            module: module.into(),
            r,
            scaling,
            state: WeightMerge::new(),
        })
    }

    /// A second handle on the same layer (shared storage and merge state).
    pub(crate) fn share(&self) -> LoraEmbedding {
        LoraEmbedding {
            weight: self.weight.shallow_clone(),
            lora_a: self.lora_a.shallow_clone(),
            lora_b: self.lora_b.shallow_clone(),
            module: self.module.clone(),
            r: self.r,
            scaling: self.scaling,
            state: self.state.clone(),
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
        self.state.set_enabled(enabled, &self.weight, &self.module)
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
        self.state.merge(&self.weight, &self.delta_weight(), safe, &self.module)
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
        self.state.unmerge(&self.weight, &self.module)
    }

    /// Embeddings of `ids` (any shape of int64 indices in `[0, V)`), with the adapter applied
    /// unless it is merged or disabled.
    pub fn f_forward(&self, ids: &Tensor) -> Result<Tensor> {
        let y = Tensor::f_embedding(&self.weight, ids, -1, false, false)?;
        if !self.is_enabled() || self.is_merged() {
            return Ok(y);
        }
        self.f_add_delta(ids, y)
    }

    /// Adds `s·(Aᵀ[ids]) Bᵀ` to `y`, the base embeddings of `ids`.
    pub(crate) fn f_add_delta(&self, ids: &Tensor, y: Tensor) -> Result<Tensor> {
        let after_a = Tensor::f_embedding(&self.lora_a.f_tr()?, ids, -1, false, false)?;
        let delta = after_a.f_matmul(&self.lora_b.f_tr()?)?.f_mul_scalar(self.scaling)?;
        Ok(y.f_add(&delta.f_to_kind(y.kind())?)?)
    }
}

impl Adapter for LoraEmbedding {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Lora
    }

    fn name(&self) -> &str {
        &self.module
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (format!("{}.lora_embedding_A", self.module), self.lora_a.shallow_clone()),
            (format!("{}.lora_embedding_B", self.module), self.lora_b.shallow_clone()),
        ]
    }

    fn can_apply(&self) -> bool {
        true
    }

    fn apply(&mut self) -> Result<()> {
        self.safe_merge()
    }

    fn revert(&mut self) -> Result<()> {
        self.unmerge()
    }

    fn is_applied(&self) -> bool {
        self.is_merged()
    }
}
