//! One-pass kernels for the streamed merge's most common methods, over the raw bytes of the
//! inputs (f32, f16 or bf16, computed in f32): linear, task arithmetic, and the magnitude
//! family (TIES, Breadcrumbs, with or without sign election). The magnitude selection is a
//! threshold found by radix selection on the bit patterns of `|δ|` (two histogram passes, exact
//! `k`-th value) instead of mergekit's full `argsort`: the kept set is the same unless entries
//! tie at the threshold, where all of them are kept (`exact_ties: true` in the config takes
//! mergekit's order instead, through [`merge_tensor`](super::merge_tensor)).
//!
//! Inputs and output are checked for non-finite values in the same pass.

use half::{bf16, f16};
use tch::Kind;

use super::methods::{GlobalParams, MergeMethod, ModelParams};

/// An element type the kernels read and write.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn load(self) -> f32;
    fn store(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Whether the kernels take a tensor of these kinds.
fn fusable_kind(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Half | Kind::BFloat16)
}

/// What the kernel for one tensor does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kernel {
    /// `Σ w_i θ_i · scale`.
    Linear { scale: f32 },
    /// `θ₀ + Σ c_i (θ_i − θ₀)` with `c_i = λ w_i / divisor` folded in.
    TaskArithmetic,
    /// Keep `δ_i` whose `|δ_i|` ranks in `[lo_i, hi_i]`, then sum (÷ `Σ w` when normalised) or
    /// elect signs and take the disjoint mean; `θ₀ + λ·mixed`.
    Magnitude { consensus: bool, normalize: bool, lambda: f32 },
}

/// The kernel for `method` with these parameters, or `None` when the general path must run
/// (other methods, kinds, L1 rescaling, `exact_ties`).
pub(crate) fn kernel(
    method: MergeMethod,
    global: &GlobalParams,
    params: &[ModelParams],
    kinds: &[Kind],
    out: Kind,
) -> Option<Kernel> {
    if !kinds.iter().chain([&out]).all(|&k| fusable_kind(k)) || kinds.iter().any(|&k| k != kinds[0])
    {
        return None;
    }
    let normalize = global.normalize.unwrap_or(method.default_normalize());
    let rescale = global.rescale.unwrap_or(method.default_rescale());
    match method {
        MergeMethod::Linear => {
            let total: f64 = params.iter().map(|p| p.weight).sum();
            if normalize && total == 0.0 {
                return None; // the general path names the error
            }
            Some(Kernel::Linear { scale: if normalize { (1.0 / total) as f32 } else { 1.0 } })
        }
        MergeMethod::TaskArithmetic => Some(Kernel::TaskArithmetic),
        MergeMethod::Ties | MergeMethod::Breadcrumbs | MergeMethod::BreadcrumbsTies
            if !rescale && !global.exact_ties =>
        {
            Some(Kernel::Magnitude {
                consensus: method != MergeMethod::Breadcrumbs,
                normalize,
                lambda: global.lambda as f32,
            })
        }
        _ => None,
    }
}

/// The ascending rank range `[lo, hi]` (inclusive, of `n` entries) a model's `|δ|` must fall in
/// to be kept, as mergekit's `magnitude` (TIES) and `magnitude_outliers` (Breadcrumbs) choose
/// it; `None` keeps everything, an empty range (`lo > hi`) nothing.
pub(crate) fn rank_range(method: MergeMethod, p: &ModelParams, n: usize) -> Option<(u64, u64)> {
    let n64 = n as u64;
    if p.density >= 1.0 {
        return None;
    }
    match method {
        MergeMethod::Ties => {
            if p.density <= 0.0 || n == 0 {
                return Some((1, 0));
            }
            let k = ((p.density * n as f64) as u64).max(1).min(n64);
            Some((n64 - k, n64 - 1))
        }
        _ => {
            let target = ((p.density * n as f64) as i64).max(0) as u64;
            let top = ((p.gamma * n as f64) as i64).max(0) as u64;
            let bot = n64.saturating_sub(target).saturating_sub(top);
            let end = (bot + target).min(n64);
            if end == bot {
                Some((1, 0))
            } else {
                Some((bot, end - 1))
            }
        }
    }
}

#[inline(always)]
fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The `|δ|` bit patterns (monotone in the value) at ascending ranks `ranks` of `|a − b|`,
/// by radix selection: a histogram of the high 16 bits finds each rank's bucket, a second of
/// the low 16 bits within it the value.
pub(crate) fn select_ranks<E: Elem>(a: &[E], b: &[E], ranks: &[u64]) -> Vec<u32> {
    let mut hi = vec![0u64; 1 << 16];
    for (x, y) in a.iter().zip(b) {
        hi[(abs_bits(x.load() - y.load()) >> 16) as usize] += 1;
    }
    let bucket = |hist: &[u64], rank: u64| -> (usize, u64) {
        let mut seen = 0u64;
        for (i, &c) in hist.iter().enumerate() {
            if seen + c > rank {
                return (i, rank - seen);
            }
            seen += c;
        }
        (hist.len() - 1, 0)
    };
    let mut out = Vec::with_capacity(ranks.len());
    for &r in ranks {
        let (bin, rest) = bucket(&hi, r);
        let mut lo = vec![0u64; 1 << 16];
        for (x, y) in a.iter().zip(b) {
            let bits = abs_bits(x.load() - y.load());
            if (bits >> 16) as usize == bin {
                lo[(bits & 0xffff) as usize] += 1;
            }
        }
        let (low, _) = bucket(&lo, rest);
        out.push(((bin as u32) << 16) | low as u32);
    }
    out
}

/// One kernel's run: the output and whether every input and output value was finite.
pub(crate) struct Run<'a, I: Elem, O: Elem> {
    pub base: Option<&'a [I]>,
    pub inputs: Vec<&'a [I]>,
    /// Per input (not the base): its coefficient (`w_i`, or `λ w_i / divisor` for task
    /// arithmetic) and, for the magnitude family, its kept `|δ|` bit range.
    pub coef: Vec<f32>,
    pub weights: Vec<f32>,
    pub keep: Vec<(u32, u32)>,
    pub out: &'a mut [O],
}

/// Elements per inner block: the kernels run each step over a block of this many entries, in
/// f32 scratch, so that the loops vectorise. Non-finite inputs and outputs are caught by
/// summing `x · 0` per lane (NaN for ±∞ and NaN, else 0), which vectorises with the arithmetic.
const BLOCK: usize = 1024;

impl<I: Elem, O: Elem> Run<'_, I, O> {
    /// Runs `k`; returns `(inputs finite, output finite)`. Each block is read straight from
    /// the inputs (no staging copy: for f32 the loads are plain loads, for bf16 shifts).
    pub fn go(self, k: Kernel) -> (bool, bool) {
        let Run { base, inputs, coef, weights, keep, out } = self;
        let n = out.len();
        let m = inputs.len();
        let mut in_chk = [0.0f32; BLOCK];
        let mut out_chk = [0.0f32; BLOCK];
        let mut acc = [0.0f32; BLOCK];
        let mut wd =
            vec![[0.0f32; BLOCK]; if matches!(k, Kernel::Magnitude { .. }) { m } else { 0 }];
        let total: f32 = weights.iter().sum();
        let total = if total.abs() < 1e-8 { 1.0 } else { total };
        let zero = [I::store(0.0); BLOCK];
        for start in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - start);
            let range = start..start + len;
            let bs: &[I] = match base {
                Some(b) => &b[range.clone()],
                None => &zero[..len],
            };
            for (c, b) in in_chk.iter_mut().zip(bs) {
                *c += b.load() * 0.0;
            }
            match k {
                Kernel::Linear { scale } => {
                    acc[..len].fill(0.0);
                    for i in 0..m {
                        let (xs, c) = (&inputs[i][range.clone()], coef[i]);
                        for j in 0..len {
                            let x = xs[j].load();
                            in_chk[j] += x * 0.0;
                            acc[j] += x * c;
                        }
                    }
                    for a in &mut acc[..len] {
                        *a *= scale;
                    }
                }
                Kernel::TaskArithmetic => {
                    for j in 0..len {
                        acc[j] = bs[j].load();
                    }
                    for i in 0..m {
                        let (xs, c) = (&inputs[i][range.clone()], coef[i]);
                        for j in 0..len {
                            let x = xs[j].load();
                            in_chk[j] += x * 0.0;
                            acc[j] += (x - bs[j].load()) * c;
                        }
                    }
                }
                Kernel::Magnitude { consensus, normalize, lambda } => {
                    acc[..len].fill(0.0);
                    for i in 0..m {
                        let xs = &inputs[i][range.clone()];
                        let (lo, hi, w) = (keep[i].0, keep[i].1, weights[i]);
                        let wdi = &mut wd[i];
                        for j in 0..len {
                            let x = xs[j].load();
                            in_chk[j] += x * 0.0;
                            let d = x - bs[j].load();
                            let bits = abs_bits(d);
                            let kept = bits >= lo && bits <= hi;
                            wdi[j] = if kept { d * w } else { 0.0 };
                            acc[j] += wdi[j];
                        }
                    }
                    if consensus {
                        // acc holds the election sum; num and den per entry of the block
                        let mut num = [0.0f32; BLOCK];
                        let mut den = [0.0f32; BLOCK];
                        for i in 0..m {
                            let (wdi, w) = (&wd[i], weights[i]);
                            for j in 0..len {
                                let agree = if acc[j] >= 0.0 { wdi[j] > 0.0 } else { wdi[j] < 0.0 };
                                num[j] += if agree { wdi[j] } else { 0.0 };
                                den[j] += if agree { w } else { 0.0 };
                            }
                        }
                        for j in 0..len {
                            let mixed = if normalize {
                                num[j] / if den[j] == 0.0 { 1.0 } else { den[j] }
                            } else {
                                num[j]
                            };
                            acc[j] = bs[j].load() + lambda * mixed;
                        }
                    } else {
                        let div = if normalize { total } else { 1.0 };
                        for j in 0..len {
                            acc[j] = bs[j].load() + lambda * (acc[j] / div);
                        }
                    }
                }
            }
            for ((o, a), c) in out[range].iter_mut().zip(&acc[..len]).zip(out_chk.iter_mut()) {
                *c += a * 0.0;
                *o = O::store(*a);
            }
        }
        let finite = |c: &[f32; BLOCK]| c.iter().all(|v| *v == 0.0);
        (finite(&in_chk), finite(&out_chk))
    }
}

/// `bytes` as a slice of `T` (length `bytes.len() / size_of::<T>()`).
///
/// # Safety
/// `bytes` must be aligned for `T`, and every bit pattern must be a valid `T` (true of f32,
/// f16 and bf16).
pub(crate) unsafe fn cast<T: Elem>(bytes: &[u8]) -> &[T] {
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / std::mem::size_of::<T>())
}

/// `bytes` as a mutable slice of `T`.
///
/// # Safety
/// As [`cast`].
pub(crate) unsafe fn cast_mut<T: Elem>(bytes: &mut [u8]) -> &mut [T] {
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    std::slice::from_raw_parts_mut(
        bytes.as_mut_ptr().cast(),
        bytes.len() / std::mem::size_of::<T>(),
    )
}
