//! [`LoraConv2d`]: LoRA on a 2-D convolution, with PEFT's layout.

use tch::nn::{self, ConvConfigND, PaddingMode};
use tch::Tensor;

use super::merge::{add_in_compute_kind, compute_kind, BaseLock, MergeState};
use super::{is_float, Attach, Factors, LoraLayer};
use crate::adapter::{Adapter, AdapterKind, Applicable};
use crate::lora::config::{LoraConfig, LoraInit};
use crate::{Error, Result};

/// The configuration of a 2-D convolution (tch's `nn::Conv2D` keeps its own private).
pub type Conv2dConfig = ConvConfigND<[i64; 2]>;

/// A LoRA-adapted 2-D convolution `W: [out, in, kh, kw]`.
///
/// ```text
/// y = conv(x, W) + b + s · conv1x1(conv(x, A), B)      A = lora_A: [r, in, kh, kw],  B = lora_B: [out, r, 1, 1]
/// ```
///
/// `A` uses the base layer's kernel size, stride, padding **and dilation** (PEFT drops the
/// dilation and crashes on dilated convolutions, its issue #3697); a non-zero padding mode pads
/// the input once for both, so that merging stays exact. The delta weight is
/// `s · (B·A)` reshaped to `[out, in, kh, kw]`. `groups = 1` only; no DoRA, no `lora_bias` yet.
#[derive(Debug)]
pub struct LoraConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    conv: Conv2dConfig,
    lora_a: Tensor,
    lora_b: Tensor,
    module: String,
    r: i64,
    scaling: f64,
    state: MergeState,
}

impl LoraConv2d {
    /// Wraps `base`, built with `conv` (pass the same config), registering the factors under
    /// `p` and naming the module `module`. The base weight and bias stop requiring grad.
    pub fn new(
        base: nn::Conv2D,
        conv: Conv2dConfig,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        let nn::Conv2D { ws, bs, .. } = base;
        Self::from_parts(ws, bs, conv, p, module, config)
    }

    /// As [`new`](Self::new), from the base weight and bias.
    pub(crate) fn from_parts(
        ws: Tensor,
        bs: Option<Tensor>,
        conv: Conv2dConfig,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        config.validate()?;
        let unsupported =
            |field: &str, reason: String| Error::Unsupported { field: field.into(), reason };
        if config.use_dora {
            return Err(unsupported(
                "use_dora",
                format!("DoRA on the convolution `{module}` is not implemented yet"),
            ));
        }
        if config.lora_bias {
            return Err(unsupported(
                "lora_bias",
                format!("a lora_B bias on the convolution `{module}` is not implemented yet"),
            ));
        }
        if matches!(
            config.init_lora_weights,
            LoraInit::Orthogonal | LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora
        ) {
            return Err(unsupported(
                "init_lora_weights",
                format!(
                    "init {:?} on the convolution `{module}` is not implemented",
                    config.init_lora_weights
                ),
            ));
        }
        if conv.groups != 1 {
            return Err(unsupported(
                "groups",
                format!("`{module}` has groups = {}; only 1 is supported", conv.groups),
            ));
        }
        if ws.dim() != 4 {
            return Err(Error::ShapeMismatch {
                name: format!("{module}.weight"),
                expected: vec![-1, -1, -1, -1],
                actual: ws.size(),
            });
        }
        if !is_float(ws.kind()) {
            return Err(Error::DtypeMismatch {
                name: format!("{module}.weight"),
                expected: "a floating-point kind".into(),
                actual: ws.kind(),
            });
        }
        let size = ws.size();
        let (out_c, in_c, kh, kw) = (size[0], size[1], size[2], size[3]);
        let r = config.rank_for(module)?;
        if r > (in_c * kh * kw).min(out_c) {
            return Err(Error::RankTooLarge {
                module: module.into(),
                rank: r,
                in_features: in_c * kh * kw,
                out_features: out_c,
            });
        }
        for sub in ["lora_A", "lora_B"] {
            if (p / sub).get("weight").is_some() {
                return Err(Error::DuplicateParameter((p / sub).path("weight")));
            }
        }
        let kind = compute_kind(ws.kind());
        let opts = (kind, ws.device());
        let (a, b) = tch::no_grad(|| {
            // kaiming_uniform_(a=√5) on the [r, in, kh, kw] conv weight: U(±1/√(in·kh·kw))
            let bound = 1.0 / ((in_c * kh * kw) as f64).sqrt();
            let a = match config.init_lora_weights {
                LoraInit::Gaussian => {
                    Tensor::empty([r, in_c, kh, kw], opts).normal_(0.0, 1.0 / r as f64)
                }
                _ => Tensor::empty([r, in_c, kh, kw], opts).uniform_(-bound, bound),
            };
            let b = match config.init_lora_weights {
                LoraInit::Random => {
                    let bound_r = 1.0 / (r as f64).sqrt();
                    Tensor::empty([out_c, r, 1, 1], opts).uniform_(-bound_r, bound_r)
                }
                _ => Tensor::zeros([out_c, r, 1, 1], opts),
            };
            (a, b)
        });
        let lora_a = (p / "lora_A").add("weight", a, true);
        let lora_b = (p / "lora_B").add("weight", b, true);
        if let Some(b) = &bs {
            if b.size() != [out_c] {
                return Err(Error::ShapeMismatch {
                    name: format!("{module}.bias"),
                    expected: vec![out_c],
                    actual: b.size(),
                });
            }
            let _ = b.set_requires_grad(false);
        }
        let _ = ws.set_requires_grad(false);
        Ok(LoraConv2d {
            weight: ws,
            bias: bs,
            conv,
            lora_a,
            lora_b,
            module: module.into(),
            r,
            scaling: config.scaling_for(module)?,
            state: MergeState::new(),
        })
    }

    /// A second handle on the same layer (shared storage and state).
    pub(crate) fn share(&self) -> LoraConv2d {
        LoraConv2d {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            conv: self.conv,
            lora_a: self.lora_a.shallow_clone(),
            lora_b: self.lora_b.shallow_clone(),
            module: self.module.clone(),
            r: self.r,
            scaling: self.scaling,
            state: self.state.clone(),
        }
    }

    /// The base weight `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The base bias `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `lora_A`, `[r, in, kh, kw]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    /// `lora_B`, `[out, r, 1, 1]`.
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

    /// Whether the delta is folded into the base weight.
    pub fn is_merged(&self) -> bool {
        self.state.is_merged()
    }

    /// The update `s·(B·A)` as a `[out, in, kh, kw]` kernel, in the adapter dtype.
    pub fn delta_weight(&self) -> Tensor {
        let size = self.lora_a.size();
        let a = self.lora_a.reshape([self.r, -1]);
        let b = self.lora_b.reshape([-1, self.r]);
        (b.mm(&a) * self.scaling).reshape([-1, size[1], size[2], size[3]])
    }

    fn merge_impl(&self, safe: bool) -> Result<()> {
        self.state.merge(&self.module, &self.weight, None, safe, || {
            Ok((add_in_compute_kind(&self.weight, &self.delta_weight())?, None))
        })
    }

    /// Folds the delta into the base kernel, keeping the original for [`unmerge`](Self::unmerge).
    pub fn merge(&self) -> Result<()> {
        self.merge_impl(false)
    }

    /// As [`merge`](Self::merge), refusing non-finite results.
    pub fn safe_merge(&self) -> Result<()> {
        self.merge_impl(true)
    }

    /// Restores the original kernel bit-exactly.
    pub fn unmerge(&self) -> Result<()> {
        self.state.unmerge(&self.module, &self.weight, None)
    }

    /// Forward of `xs: [batch, in, h, w]` (or `[in, h, w]`), checked before libtorch is called.
    /// Safe beside merges on other threads (the kernel is read under its base lock).
    pub fn f_forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor> {
        let (xs, padding) = conv_input(&self.weight, &self.conv, &self.module, xs)?;
        let _base = self.state.base_lock().read();
        let c = &self.conv;
        let y = xs.f_conv2d(&self.weight, self.bias.as_ref(), c.stride, padding, c.dilation, 1)?;
        if !self.is_enabled() || self.is_merged() {
            return Ok(y);
        }
        self.f_add_delta(&xs, padding, y)
    }

    /// Adds `s·conv1x1(conv(x, A), B)` to `y`, the base output for the input `xs` as prepared by
    /// [`conv_input`] (padded for a non-zero padding mode, with the `padding` it returned).
    pub(crate) fn f_add_delta(&self, xs: &Tensor, padding: [i64; 2], y: Tensor) -> Result<Tensor> {
        let c = &self.conv;
        let kind = xs.kind();
        let cast =
            |t: &Tensor| if t.kind() == kind { Ok(t.shallow_clone()) } else { t.f_to_kind(kind) };
        let h =
            xs.f_conv2d::<Tensor>(&cast(&self.lora_a)?, None, c.stride, padding, c.dilation, 1)?;
        let lora = h.f_conv2d::<Tensor>(&cast(&self.lora_b)?, None, [1, 1], [0, 0], [1, 1], 1)?;
        Ok(y.f_add(&lora.f_mul_scalar(self.scaling)?)?)
    }
}

/// Checks `xs` against a convolution with kernel `weight` and pads it once for a non-zero padding
/// mode: returns the input to convolve and the padding to pass.
pub(crate) fn conv_input(
    weight: &Tensor,
    c: &Conv2dConfig,
    module: &str,
    xs: &Tensor,
) -> Result<(Tensor, [i64; 2])> {
    let in_c = weight.size()[1];
    let size = xs.size();
    if !(size.len() == 4 || size.len() == 3) || size[size.len() - 3] != in_c {
        return Err(Error::ShapeMismatch {
            name: format!("input of `{module}`"),
            expected: vec![-1, in_c, -1, -1],
            actual: size,
        });
    }
    if xs.kind() != weight.kind() {
        return Err(Error::DtypeMismatch {
            name: format!("input of `{module}`"),
            expected: format!("{:?} (the base weight's kind)", weight.kind()),
            actual: xs.kind(),
        });
    }
    Ok(match c.padding_mode {
        PaddingMode::Zeros => (xs.shallow_clone(), c.padding),
        mode => {
            // F.pad order (left, right, top, bottom), as PyTorch's Conv2d builds it (tch's own
            // Conv2D interleaves them, which only matters for ph != pw)
            let [ph, pw] = c.padding;
            (mode.f_pad(xs, &[pw, pw, ph, ph])?, [0, 0])
        }
    })
}

impl nn::ModuleT for LoraConv2d {
    /// # Panics
    /// On an input that does not fit the layer, with the message of the typed error
    /// [`LoraConv2d::f_forward_t`] returns.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(y) => y,
            Err(e) => panic!("{e}"),
        }
    }
}

impl Adapter for LoraConv2d {
    fn kind(&self) -> AdapterKind {
        AdapterKind::Lora
    }

    fn name(&self) -> &str {
        &self.module
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (format!("{}.lora_A.weight", self.module), self.lora_a.shallow_clone()),
            (format!("{}.lora_B.weight", self.module), self.lora_b.shallow_clone()),
        ]
    }
}

impl Applicable for LoraConv2d {
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

/// A convolution's weight, bias and config: what a new adapter on it needs.
#[derive(Debug)]
pub struct ConvBase {
    pub(crate) ws: Tensor,
    pub(crate) bs: Option<Tensor>,
    pub(crate) conv: Conv2dConfig,
}

impl LoraLayer for LoraConv2d {
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
        Ok(())
    }
    fn set_base_ready(&self, _ready: bool) {}
    fn factors(&self) -> Option<Factors> {
        Some(Factors {
            a: self.lora_a.shallow_clone(),
            b: self.lora_b.shallow_clone(),
            scaling: self.scaling,
            magnitude: None,
            lora_b_bias: None,
        })
    }
}

impl Attach for LoraConv2d {
    type Base = ConvBase;
    fn share(&self) -> Self {
        LoraConv2d::share(self)
    }
    fn share_base(b: &ConvBase) -> ConvBase {
        ConvBase {
            ws: b.ws.shallow_clone(),
            bs: b.bs.as_ref().map(Tensor::shallow_clone),
            conv: b.conv,
        }
    }
    fn attach(
        b: &ConvBase,
        lock: &BaseLock,
        p: &nn::Path,
        module: &str,
        config: &LoraConfig,
    ) -> Result<Self> {
        let bs = b.bs.as_ref().map(Tensor::shallow_clone);
        let layer = LoraConv2d::from_parts(b.ws.shallow_clone(), bs, b.conv, p, module, config)?;
        layer.state.adopt_base_lock(module, lock)?;
        Ok(layer)
    }
    fn rank_bound(b: &ConvBase) -> (i64, i64) {
        let s = b.ws.size();
        (s[1..].iter().product(), s[0])
    }
    fn registered(p: &nn::Path) -> Option<String> {
        let a = p / "lora_A";
        a.get("weight").map(|_| a.path("weight"))
    }
}
