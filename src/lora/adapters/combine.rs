//! Combining LoRA adapters into a new one (PEFT's `add_weighted_adapter`), with the new
//! adapter's scaling right for rsLoRA, `lora_bias` and DoRA sources.

use tch::Tensor;

use super::LoraAdapter;
use crate::lora::config::{LoraConfig, LoraInit};
use crate::lora::layer::{compute_kind, Attach, Factors, LoraStack};
pub use crate::merge::sparsify::MajoritySign;
use crate::merge::sparsify::{magnitude_mask, random_mask, sign_consensus_mask, Ranking};
use crate::target::TargetModules;
use crate::{Error, Result};

/// How a list of same-shaped tensors `t_i` with weights `w_i` is merged (PEFT's
/// `utils/merge_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskMerge {
    /// `Σ w_i t_i` (task arithmetic).
    Linear,
    /// TIES (Yadav et al. 2023): keep the `density` fraction of largest-magnitude entries of
    /// each `t_i`, elect a sign per entry, and average the weighted entries that agree with it
    /// (divided by their count).
    Ties {
        /// Fraction of entries kept per tensor, in `[0, 1]`.
        density: f64,
        /// The sign election.
        majority_sign: MajoritySign,
    },
    /// DARE (Yu et al. 2023): drop entries with probability `1 − density`, rescale the rest by
    /// `1/density`, then `Σ w_i t_i`. Draws from the global libtorch RNG (seed it with
    /// `tch::manual_seed` for reproducible masks).
    DareLinear {
        /// Keep probability, in `[0, 1]`.
        density: f64,
    },
    /// DARE's drop-and-rescale, then TIES' sign election and disjoint mean.
    DareTies {
        /// Keep probability, in `[0, 1]`.
        density: f64,
        /// The sign election.
        majority_sign: MajoritySign,
    },
    /// Keep the `density` fraction of largest-magnitude entries of each tensor, then
    /// `Σ w_i t_i`.
    MagnitudePrune {
        /// Fraction of entries kept per tensor, in `[0, 1]`.
        density: f64,
    },
}

/// How [`LoraAdapter::add_weighted_adapter`] combines adapters (PEFT's `combination_type`).
///
/// | PEFT | here | rank | exact? |
/// |---|---|---|---|
/// | `cat` | `Cat` | `Σ r_i` | yes: `Σ w_i s_i B_i A_i` |
/// | `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` | `Factors(merge)` | `r` (equal ranks) | no: `A`s and `B`s are merged separately, `BA` has cross terms |
/// | `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` | `Svd { merge, rank, clamp }` | `rank` or `max r_i` | up to the truncation |
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combination {
    /// Concatenate the factors: `A = [w_i s_i A_i]` (rows), `B = [B_i]` (columns).
    Cat,
    /// Merge the `A`s with weights `sign(w_i s_i)·√|w_i s_i|` and the `B`s with `√|w_i s_i|`.
    Factors(TaskMerge),
    /// Merge the full updates `s_i B_i A_i` with weights `w_i`, then keep the top `rank`
    /// singular triplets: `B = U_k diag(S_k)`, `A = V_kᵀ`.
    Svd {
        /// The merge of the full updates.
        merge: TaskMerge,
        /// The new rank (default: the largest source rank on the layer).
        rank: Option<i64>,
        /// Clamp `U_k diag(S_k)` and `V_kᵀ` to `±` this quantile of their values.
        clamp: Option<f64>,
    },
}

impl Combination {
    /// PEFT's default, `"svd"`.
    pub fn svd() -> Self {
        Combination::Svd { merge: TaskMerge::Linear, rank: None, clamp: None }
    }

    /// PEFT's `"linear"`.
    pub fn linear() -> Self {
        Combination::Factors(TaskMerge::Linear)
    }
}

fn check_density(density: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&density) {
        return Err(Error::config("density", format!("{density} is not in [0, 1]")));
    }
    Ok(())
}

impl TaskMerge {
    fn validate(&self) -> Result<()> {
        match *self {
            TaskMerge::Linear => Ok(()),
            TaskMerge::Ties { density, .. }
            | TaskMerge::DareLinear { density }
            | TaskMerge::DareTies { density, .. }
            | TaskMerge::MagnitudePrune { density } => check_density(density),
        }
    }

    /// Merges `tensors` (same shape and dtype) with `weights`, as PEFT's merge utilities do
    /// (`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`).
    ///
    /// ```
    /// use tch::Tensor;
    /// use tch_peft::lora::{MajoritySign, TaskMerge};
    /// let t = [Tensor::from_slice(&[1.0f64, -2.0, 3.0]), Tensor::from_slice(&[1.0f64, 4.0, -1.0])];
    /// let ties = TaskMerge::Ties { density: 1.0, majority_sign: MajoritySign::Total };
    /// // signs elected from 2, 2, 2: entries that disagree are left out of the mean
    /// let m = ties.merge(&t, &[1.0, 1.0])?;
    /// assert_eq!(Vec::<f64>::try_from(&m).unwrap(), [1.0, 4.0, 3.0]);
    /// # Ok::<(), tch_peft::Error>(())
    /// ```
    pub fn merge(&self, tensors: &[Tensor], weights: &[f64]) -> Result<Tensor> {
        self.validate()?;
        if tensors.is_empty() || tensors.len() != weights.len() {
            return Err(Error::config(
                "weights",
                format!("{} tensors and {} weights", tensors.len(), weights.len()),
            ));
        }
        for (i, t) in tensors.iter().enumerate().skip(1) {
            if t.size() != tensors[0].size() {
                return Err(Error::ShapeMismatch {
                    name: format!("task tensor {i}"),
                    expected: tensors[0].size(),
                    actual: t.size(),
                });
            }
            if t.kind() != tensors[0].kind() {
                return Err(Error::DtypeMismatch {
                    name: format!("task tensor {i}"),
                    expected: format!("{:?}", tensors[0].kind()),
                    actual: t.kind(),
                });
            }
        }
        self.apply(tensors, weights)
    }

    fn apply(&self, tensors: &[Tensor], weights: &[f64]) -> Result<Tensor> {
        let kind = tensors[0].kind();
        let dev = tensors[0].device();
        let prune = |t: &Tensor, density: f64, random: bool| -> Result<Tensor> {
            if density >= 1.0 {
                return Ok(t.shallow_clone());
            }
            if random {
                let mask = random_mask(t, density, t.kind())?;
                return Ok(t.f_mul(&mask)?.f_div_scalar(density)?);
            }
            let k = (density * t.numel() as f64) as i64;
            Ok(t.f_mul(&magnitude_mask(t, k, t.kind(), Ranking::TopK)?)?)
        };
        let (pruned, sign) = match *self {
            TaskMerge::Linear => (tensors.iter().map(Tensor::shallow_clone).collect(), None),
            TaskMerge::MagnitudePrune { density } => {
                (tensors.iter().map(|t| prune(t, density, false)).collect::<Result<_>>()?, None)
            }
            TaskMerge::DareLinear { density } => {
                (tensors.iter().map(|t| prune(t, density, true)).collect::<Result<_>>()?, None)
            }
            TaskMerge::Ties { density, majority_sign } => (
                tensors.iter().map(|t| prune(t, density, false)).collect::<Result<_>>()?,
                Some(majority_sign),
            ),
            TaskMerge::DareTies { density, majority_sign } => (
                tensors.iter().map(|t| prune(t, density, true)).collect::<Result<_>>()?,
                Some(majority_sign),
            ),
        };
        let pruned: Vec<Tensor> = pruned;
        let stacked = Tensor::f_stack(&pruned, 0)?;
        let mut wshape = vec![weights.len() as i64];
        wshape.extend(std::iter::repeat_n(1, stacked.dim() - 1));
        let w = Tensor::from_slice(weights).f_to_kind(kind)?.f_to_device(dev)?.f_reshape(wshape)?;
        let weighted = stacked.f_mul(&w)?;
        let Some(method) = sign else {
            return Ok(weighted.f_sum_dim_intlist(0, false, kind)?);
        };
        // PEFT elects the sign from the unweighted pruned tensors; zeros never agree
        let mask = sign_consensus_mask(&stacked, method)?;
        let summed = weighted.f_mul(&mask)?.f_sum_dim_intlist(0, false, kind)?;
        let count = mask.f_sum_dim_intlist(0, false, kind)?.f_clamp_min(1.0)?;
        Ok(summed.f_div(&count)?)
    }
}

/// The new adapter's tensors on one layer.
struct Combined {
    a: Tensor,
    b: Tensor,
    magnitude: Option<Tensor>,
    lora_b_bias: Option<Tensor>,
}

/// Combines the sources present on one layer (`(factors, weight)`), in f32 (f64 for f64
/// factors).
fn combine_layer(
    sources: &[(Factors, f64)],
    how: Combination,
    module: &str,
    bound: (i64, i64),
) -> Result<Combined> {
    let kind = compute_kind(sources[0].0.a.kind());
    let cast = |t: &Tensor| t.f_to_kind(kind);
    let a_shape = sources[0].0.a.size();
    let b_shape = sources[0].0.b.size();
    let ws: Vec<f64> = sources.iter().map(|(f, w)| w * f.scaling).collect();
    let (a, b) = match how {
        Combination::Cat => {
            let a: Vec<Tensor> = sources
                .iter()
                .zip(&ws)
                .map(|((f, _), ws)| Ok(cast(&f.a)?.f_mul_scalar(*ws)?))
                .collect::<Result<_>>()?;
            let b: Vec<Tensor> =
                sources.iter().map(|(f, _)| cast(&f.b)).collect::<Result<_, _>>()?;
            (Tensor::f_cat(&a, 0)?, Tensor::f_cat(&b, 1)?)
        }
        Combination::Factors(merge) => {
            let r0 = a_shape[0];
            if let Some((f, _)) = sources.iter().find(|(f, _)| f.a.size()[0] != r0) {
                return Err(Error::Unsupported {
                    field: "combination_type".into(),
                    reason: format!(
                        "merging the factors needs equal ranks, but `{module}` has ranks {r0} \
                         and {}; use Cat or Svd",
                        f.a.size()[0]
                    ),
                });
            }
            let wa: Vec<f64> = ws.iter().map(|w| w.signum() * w.abs().sqrt()).collect();
            let wb: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
            let a: Vec<Tensor> =
                sources.iter().map(|(f, _)| cast(&f.a)).collect::<Result<_, _>>()?;
            let b: Vec<Tensor> =
                sources.iter().map(|(f, _)| cast(&f.b)).collect::<Result<_, _>>()?;
            (merge.apply(&a, &wa)?, merge.apply(&b, &wb)?)
        }
        Combination::Svd { merge, rank, clamp } => {
            let out = b_shape[0];
            let deltas: Vec<Tensor> = sources
                .iter()
                .map(|(f, _)| {
                    let r = f.a.size()[0];
                    let b2 = cast(&f.b)?.f_transpose(0, 1)?.f_reshape([r, out])?.f_tr()?;
                    let a2 = cast(&f.a)?.f_reshape([r, -1])?;
                    Ok(b2.f_mm(&a2)?.f_mul_scalar(f.scaling)?)
                })
                .collect::<Result<_>>()?;
            let w: Vec<f64> = sources.iter().map(|(_, w)| *w).collect();
            let delta = merge.apply(&deltas, &w)?;
            let max_r = sources.iter().map(|(f, _)| f.a.size()[0]).max().unwrap_or(1);
            let k = rank.unwrap_or(max_r);
            let full = delta.size();
            if k < 1 || k > full[0].min(full[1]) || k > bound.0.min(bound.1) {
                return Err(Error::RankTooLarge {
                    module: module.into(),
                    rank: k,
                    in_features: full[1],
                    out_features: full[0],
                });
            }
            // reduced SVD (tch's linalg_svd cannot pass "no driver")
            let (u, s, v) = delta.f_svd(true, true)?;
            let vh = v.f_tr()?;
            let mut u = u.f_narrow(1, 0, k)?.f_mul(&s.f_narrow(0, 0, k)?.f_unsqueeze(0)?)?;
            let mut vh = vh.f_narrow(0, 0, k)?;
            if let Some(q) = clamp {
                let dist = Tensor::f_cat(&[u.f_reshape([-1])?, vh.f_reshape([-1])?], 0)?;
                let hi = dist.f_quantile_scalar(q, None::<i64>, false, "linear")?;
                let lo = hi.f_neg()?;
                u = u.f_clamp_tensor(Some(&lo), Some(&hi))?;
                vh = vh.f_clamp_tensor(Some(&lo), Some(&hi))?;
            }
            let mut a_new = a_shape.clone();
            a_new[0] = k;
            // B = [out, k, 1, …]: U_k S_k laid out as the source B with rank k
            let mut b_new = b_shape.clone();
            b_new[1] = k;
            (vh.f_reshape(a_new)?, u.f_reshape(b_new)?)
        }
    };
    // DoRA: the weighted mean of the magnitudes (a single source keeps its own)
    let magnitude = if sources[0].0.magnitude.is_some() {
        let total: f64 = sources.iter().map(|(_, w)| w).sum();
        if total == 0.0 {
            return Err(Error::Unsupported {
                field: "weights".into(),
                reason: "DoRA adapters are combined with magnitudes averaged by weight; the \
                         weights sum to 0"
                    .into(),
            });
        }
        let mut m: Option<Tensor> = None;
        for (f, w) in sources {
            let t = cast(f.magnitude.as_ref().expect("all DoRA"))?.f_mul_scalar(*w / total)?;
            m = Some(match m {
                Some(acc) => acc.f_add(&t)?,
                None => t,
            });
        }
        m
    } else {
        None
    };
    // lora_bias: the bias of the combined branch, at scaling 1
    let mut lora_b_bias: Option<Tensor> = None;
    for ((f, _), ws) in sources.iter().zip(&ws) {
        if let Some(bb) = &f.lora_b_bias {
            let t = cast(bb)?.f_mul_scalar(*ws)?;
            lora_b_bias = Some(match lora_b_bias {
                Some(acc) => acc.f_add(&t)?,
                None => t,
            });
        }
    }
    Ok(Combined { a, b, magnitude, lora_b_bias })
}

/// Computes the combination on every layer of one type that hosts a source adapter.
fn combine_stacks<L: Attach>(
    stacks: &[LoraStack<L>],
    sources: &[(&str, f64)],
    how: Combination,
) -> Result<Vec<(String, Combined)>> {
    let mut out = Vec::new();
    for s in stacks {
        let present: Vec<(Factors, f64)> = sources
            .iter()
            .filter_map(|(n, w)| s.get(n).and_then(|l| l.factors()).map(|f| (f, *w)))
            .collect();
        if present.is_empty() {
            continue;
        }
        let combined =
            tch::no_grad(|| combine_layer(&present, how, s.module(), L::rank_bound(s.base())))?;
        out.push((s.module().to_string(), combined));
    }
    Ok(out)
}

/// Writes the combined tensors into the new adapter's layers.
fn write_stacks<L: Attach>(
    stacks: &[LoraStack<L>],
    name: &str,
    values: &[(String, Combined)],
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for s in stacks {
        let Some((_, c)) = values.iter().find(|(m, _)| m == s.module()) else { continue };
        let layer = s.get(name).expect("added to every combined layer");
        let f = layer.factors().expect("a low-rank layer");
        let copy = |dst: &Tensor, src: &Tensor| -> Result<()> {
            dst.shallow_clone().f_copy_(&src.f_to_kind(dst.kind())?)?;
            Ok(())
        };
        copy(&f.a, &c.a)?;
        copy(&f.b, &c.b)?;
        if let (Some(d), Some(m)) = (&f.magnitude, &c.magnitude) {
            copy(d, m)?;
        }
        if let Some(d) = &f.lora_b_bias {
            match &c.lora_b_bias {
                Some(bb) => copy(d, bb)?,
                None => {
                    let _ = d.shallow_clone().f_zero_()?;
                }
            }
        }
        layer.set_base_ready(true);
    }
    Ok(())
}

impl LoraAdapter {
    /// Adds the adapter `name`, the combination of the `(adapter, weight)` pairs in `sources`
    /// (PEFT's `add_weighted_adapter`), its variables under `root`. The new adapter is not
    /// active. As PEFT, a single source is always combined with [`Combination::linear`].
    ///
    /// Its config is the first source's with `r` the new rank (per-module ranks in
    /// `rank_pattern` where layers differ), `lora_alpha = r` and `use_rslora = false`, so that
    /// the scaling is exactly 1 (PEFT 0.21 keeps `use_rslora` and scales by `√r`, its issue
    /// #3761); `target_modules` lists the combined modules. With `lora_bias` sources the new
    /// `lora_B.bias` is `Σ w_i s_i b_i`; DoRA sources (all or none) give a DoRA adapter whose
    /// magnitude is the weight-averaged source magnitude. So combining one adapter with weight
    /// 1 reproduces it exactly.
    ///
    /// Errors: an unknown or repeated source, mismatched weights, a name in use, DoRA mixed with
    /// plain LoRA, unequal ranks for [`Combination::Factors`], a density outside `[0, 1]`, an SVD
    /// rank above the layer's, or a resulting rank above a layer's `min(in, out)`.
    ///
    /// ```
    /// # use tch::{nn, Device};
    /// # use tch_peft::lora::{Combination, LoraBuilder, LoraConfig};
    /// # let vs = [(); 3].map(|_| nn::VarStore::new(Device::Cpu));
    /// # let cfg = LoraConfig { r: 2, ..LoraConfig::for_targets(["q"]) };
    /// let builder = LoraBuilder::new(&vs[1].root(), cfg.clone())?.with_adapter("b", &vs[2].root(), cfg)?;
    /// let q = builder.linear(&(vs[0].root() / "q"), 8, 8, Default::default())?;
    /// let mut adapter = builder.finish()?;
    /// let both = nn::VarStore::new(Device::Cpu);
    /// adapter.add_weighted_adapter(&[("default", 0.5), ("b", 0.5)], "mix", &both.root(), Combination::Cat)?;
    /// adapter.set_active(&["mix"])?;
    /// assert_eq!(adapter.layers()[0].rank(), 4);
    /// # Ok::<(), tch_peft::Error>(())
    /// ```
    pub fn add_weighted_adapter(
        &mut self,
        sources: &[(&str, f64)],
        name: &str,
        root: &tch::nn::Path,
        how: Combination,
    ) -> Result<()> {
        if sources.is_empty() {
            return Err(Error::config("adapters", "no adapter to combine"));
        }
        for (i, (n, w)) in sources.iter().enumerate() {
            if self.adapter_config(n).is_none() {
                return Err(Error::config("adapters", format!("no adapter named `{n}`")));
            }
            if sources[..i].iter().any(|(m, _)| m == n) {
                return Err(Error::config("adapters", format!("`{n}` is listed twice")));
            }
            if !w.is_finite() {
                return Err(Error::config("weights", format!("the weight of `{n}` is {w}")));
            }
        }
        if self.adapter_config(name).is_some() {
            return Err(Error::config("adapter_name", format!("`{name}` exists already")));
        }
        let how = if sources.len() == 1 { Combination::linear() } else { how };
        match how {
            Combination::Cat => {}
            Combination::Factors(m) | Combination::Svd { merge: m, .. } => m.validate()?,
        }
        if let Combination::Svd { clamp: Some(q), .. } = how {
            if !(0.0..=1.0).contains(&q) {
                return Err(Error::config("svd_clamp", format!("{q} is not a quantile in [0, 1]")));
            }
        }
        let configs: Vec<&LoraConfig> =
            sources.iter().map(|(n, _)| self.adapter_config(n).expect("checked")).collect();
        let dora = configs[0].use_dora;
        if configs.iter().any(|c| c.use_dora != dora) {
            return Err(Error::Unsupported {
                field: "use_dora".into(),
                reason: "DoRA and plain LoRA adapters cannot be combined".into(),
            });
        }
        if let Some((n, _)) =
            sources.iter().zip(&configs).find(|(_, c)| c.modules_to_save.is_some())
        {
            return Err(Error::Unsupported {
                field: "modules_to_save".into(),
                reason: format!("`{}` has trainable module copies, which are not combined", n.0),
            });
        }
        let lora_bias = configs.iter().any(|c| c.lora_bias);
        let mut values = combine_stacks(&self.embeddings, sources, how)?;
        let n_emb = values.len();
        values.extend(combine_stacks(&self.convs, sources, how)?);
        let n_conv = values.len() - n_emb;
        values.extend(combine_stacks(&self.linears, sources, how)?);
        if values.is_empty() {
            return Err(Error::config("adapters", "the sources adapt no layer"));
        }
        let r = values[0].1.a.size()[0];
        let mut config = LoraConfig {
            r,
            lora_alpha: r as f64,
            use_rslora: false,
            init_lora_weights: LoraInit::Kaiming,
            target_modules: Some(TargetModules::list(values.iter().map(|(m, _)| m.clone()))),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            use_dora: dora,
            lora_bias,
            ..configs[0].clone()
        };
        for (m, c) in &values {
            let rm = c.a.size()[0];
            if rm != r {
                let key = regex::escape(m);
                config.rank_pattern.insert(key.clone(), rm);
                config.alpha_pattern.insert(key, rm as f64);
            }
        }
        self.add_adapter_impl(name, root, config, false)?;
        let (emb, rest) = values.split_at(n_emb);
        let (conv, lin) = rest.split_at(n_conv);
        let written = write_stacks(&self.embeddings, name, emb)
            .and_then(|_| write_stacks(&self.convs, name, conv))
            .and_then(|_| write_stacks(&self.linears, name, lin));
        if let Err(e) = written {
            let _ = self.delete_adapter(name, None);
            return Err(e);
        }
        Ok(())
    }
}
