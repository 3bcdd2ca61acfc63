//! One-pass kernels for the streamed merge's most common methods, over the raw bytes of the
//! inputs (f32, f16 or bf16, computed in f32): linear, task arithmetic, and the magnitude
//! family (TIES, Breadcrumbs, with or without sign election). The magnitude selection is a
//! threshold found by radix selection on the bit patterns of `|δ|` (two histogram passes, exact
//! `k`-th value) instead of mergekit's full `argsort`: the kept set is the same unless entries
//! tie at the threshold, where all of them are kept (`exact_ties: true` in the config takes
//! mergekit's order instead, through [`merge_tensor`](super::merge_tensor)). DARE draws its
//! masks from a counter-based generator (a hash of the merge's seed, the tensor's name, the
//! model and the entry) instead of libtorch's, which costs a fraction of libtorch's Bernoulli
//! draws: without the L1 rescale no mask is held (each entry is drawn in the merge pass), with
//! it the mask is drawn once into bits (one per entry) beside the rescale's sums;
//! `exact_masks: true` draws mergekit's masks (libtorch's generator, as `merge_tensor` does).
//!
//! Inputs and output are checked for non-finite values in the same pass.

use half::{bf16, f16};
use tch::Kind;

use super::geometric::slerp_coefficients;
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

macro_rules! half_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            #[inline(always)]
            fn load(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn store(x: f32) -> Self {
                <$t>::from_f32(x)
            }
        }
    )*};
}

half_elem!(bf16, f16);

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with the one-pass kernels off on this thread (merges go through
/// [`merge_tensor`](super::merge_tensor)): for tests that compare both paths with the same
/// reference.
#[doc(hidden)]
pub fn without_fused_kernels<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(false)));
    f()
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
    /// DARE: keep each `δ_i` entry with probability `density_i` (a counter-based draw per
    /// entry, [`Run::random`]), scale by [`Run::scale`], then as [`Kernel::Magnitude`].
    Random { consensus: bool, normalize: bool, lambda: f32 },
    /// The spherical and averaging methods (SLERP, flattened NuSLERP, Multi-SLERP, Karcher,
    /// Model Stock): every quantity they need of the whole tensors is an inner product, so one
    /// pass takes the Gram matrix of the inputs (of their task vectors with a base), the method
    /// runs on it in f64, and a second pass writes the result as `c₀ θ₀ + Σ c_i θ_i`.
    Spherical,
    /// `c₀ θ₀ + Σ c_i θ_i` with the coefficients in [`Run::coef`] (`base_coef` for `θ₀`).
    Combine { base_coef: f32 },
    /// SCE ([`sce`]).
    Sce { select_topk: f64 },
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
    if !ENABLED.with(|e| e.get())
        || !kinds.iter().chain([&out]).all(|&k| fusable_kind(k))
        || kinds.iter().any(|&k| k != kinds[0])
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
        MergeMethod::DareLinear | MergeMethod::DareTies if !global.exact_masks => {
            Some(Kernel::Random {
                consensus: method == MergeMethod::DareTies,
                normalize,
                lambda: global.lambda as f32,
            })
        }
        MergeMethod::Della | MergeMethod::DellaLinear if !global.exact_masks => {
            Some(Kernel::Random {
                consensus: method == MergeMethod::Della,
                normalize,
                lambda: global.lambda as f32,
            })
        }
        MergeMethod::Sce => Some(Kernel::Sce { select_topk: global.select_topk }),
        MergeMethod::Slerp | MergeMethod::Karcher => Some(Kernel::Spherical),
        MergeMethod::Multislerp if params.len() > 1 => Some(Kernel::Spherical),
        MergeMethod::Nuslerp if global.nuslerp_flatten => Some(Kernel::Spherical),
        MergeMethod::ModelStock if !global.filter_wise => Some(Kernel::Spherical),
        _ => None,
    }
}

/// The Gram matrix (row-major, `m × m`, in f64) of the inputs, or of their differences from
/// `base`: one pass over the data.
pub(crate) fn gram<I: Elem>(base: Option<&[I]>, xs: &[&[I]]) -> Vec<f64> {
    let m = xs.len();
    let n = xs.first().map_or(0, |x| x.len());
    let mut g = vec![0.0f64; m * m];
    let mut d = vec![[0.0f32; BLOCK]; m];
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        for (i, x) in xs.iter().enumerate() {
            let x = &x[start..start + len];
            match base {
                Some(b) => {
                    let b = &b[start..start + len];
                    for j in 0..len {
                        d[i][j] = x[j].load() - b[j].load();
                    }
                }
                None => {
                    for j in 0..len {
                        d[i][j] = x[j].load();
                    }
                }
            }
        }
        for i in 0..m {
            for k in i..m {
                // f32 products summed in 8 f64 lanes
                let mut lanes = [0.0f64; 8];
                for (j, (a, c)) in d[i][..len].iter().zip(&d[k][..len]).enumerate() {
                    lanes[j % 8] += (a * c) as f64;
                }
                let s: f64 = lanes.iter().sum();
                g[i * m + k] += s;
                if k != i {
                    g[k * m + i] += s;
                }
            }
        }
    }
    g
}

/// The coefficients `(c₀, c_i)` of `c₀ θ₀ + Σ c_i θ_i` that `method` gives for inputs of Gram
/// matrix `g` (of the task vectors when `has_base`), as mergekit computes them on the whole
/// tensors (same branches and thresholds; here in f64), or a config error.
pub(crate) fn spherical_coefficients(
    method: MergeMethod,
    global: &GlobalParams,
    params: &[ModelParams],
    g: &[f64],
    has_base: bool,
) -> crate::Result<(f64, Vec<f64>)> {
    let m = params.len();
    let gij = |i: usize, j: usize| g[i * m + j];
    let norm = |i: usize| gij(i, i).max(0.0).sqrt();
    // coefficients on task vectors become coefficients on the models and the base
    let from_deltas = |c: Vec<f64>| -> (f64, Vec<f64>) {
        let base = if has_base { 1.0 - c.iter().sum::<f64>() } else { 0.0 };
        (base, c)
    };
    match method {
        MergeMethod::Slerp => {
            // the base is the first input here (v0), the model the second (v1): no deltas
            let t = global.t.ok_or_else(|| crate::Error::config("t", "SLERP needs `t`"))?;
            let na = if norm(0) > 1e-8 { norm(0) } else { 1.0 };
            let nb = if norm(1) > 1e-8 { norm(1) } else { 1.0 };
            let dot = (gij(0, 1) / (na * nb)).clamp(-1.0, 1.0);
            let (ca, cb) = slerp_coefficients(t, dot, dot.abs() > 0.9995);
            Ok((0.0, vec![ca, cb]))
        }
        MergeMethod::Nuslerp => {
            let t = super::geometric::nuslerp_t(params[0].weight, params[1].weight);
            let (na, nb) = (norm(0).max(1e-7), norm(1).max(1e-7));
            let cos = (gij(0, 1) / (na * nb)).clamp(-1.0, 1.0);
            let (ca, cb) = slerp_coefficients(t, cos, 1.0 - cos * cos <= 1e-16);
            Ok(from_deltas(vec![ca, cb]))
        }
        MergeMethod::Multislerp => {
            let eps = global.eps;
            let mut w: Vec<f64> = params.iter().map(|p| p.weight).collect();
            if global.normalize_weights {
                let sum: f64 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= sum);
            }
            let scaled: Vec<f64> = (0..m).map(|i| w[i] / (norm(i) + eps)).collect();
            let mut mean2 = 0.0;
            for i in 0..m {
                for j in 0..m {
                    mean2 += scaled[i] * scaled[j] * gij(i, j);
                }
            }
            let mean_norm = mean2.max(0.0).sqrt();
            if mean_norm < eps {
                if m == 2 {
                    return Ok(from_deltas(w));
                }
                return Err(super::geometric::multislerp_no_direction());
            }
            // the tangent-space mean of mergekit's multislerp is zero up to rounding (its
            // projections cancel exactly), so the result is the mean direction, scaled
            let avg_norm: f64 = (0..m).map(|i| norm(i) * w[i]).sum();
            let c = (0..m).map(|i| scaled[i] / mean_norm * avg_norm * eps.cos()).collect();
            Ok(from_deltas(c))
        }
        MergeMethod::ModelStock => {
            let mut cos = 0.0;
            let mut pairs = 0.0;
            for i in 0..m {
                for j in i + 1..m {
                    cos += (gij(i, j) / (norm(i) * norm(j)).max(1e-6)).clamp(-1.0, 1.0);
                    pairs += 1.0;
                }
            }
            let cos = cos / pairs;
            let n = m as f64;
            let denom = 1.0 + (n - 1.0) * cos;
            let t = if denom.abs() < 1e-6 { 0.0 } else { n * cos / denom };
            Ok((1.0 - t, vec![t / n; m]))
        }
        MergeMethod::Karcher => karcher_coefficients(g, m, global.max_iter, global.tol),
        _ => unreachable!("not a spherical method"),
    }
}

/// mergekit's Karcher iteration with the mean kept as coefficients over the unit inputs (the
/// mean and every tangent stay in their span), so each step is `m × m` algebra on the Gram
/// matrix instead of passes over the tensors.
fn karcher_coefficients(
    g: &[f64],
    m: usize,
    max_iter: f64,
    tol: f64,
) -> crate::Result<(f64, Vec<f64>)> {
    let iterations = super::geometric::karcher_iterations(max_iter)?;
    if m == 1 {
        return Ok((0.0, vec![1.0])); // one input is its own mean, as in mergekit
    }
    let norms: Vec<f64> = (0..m).map(|i| g[i * m + i].max(0.0).sqrt()).collect();
    let valid: Vec<usize> = (0..m).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return Ok((0.0, vec![0.0; m]));
    }
    let v = valid.len();
    // the Gram matrix of the valid unit vectors
    let gu = |a: usize, b: usize| {
        let (i, j) = (valid[a], valid[b]);
        g[i * m + j] / (norms[i] * norms[j])
    };
    let quad = |x: &[f64]| -> f64 {
        let mut s = 0.0;
        for a in 0..v {
            for b in 0..v {
                s += x[a] * x[b] * gu(a, b);
            }
        }
        s.max(0.0).sqrt()
    };
    let alpha = vec![1.0 / v as f64; v]; // equal weights, normalised over the valid inputs
    let mut mean = alpha.clone();
    let mean_norm = quad(&mean);
    if mean_norm < tol {
        mean = vec![0.0; v];
        mean[0] = 1.0;
    } else {
        mean.iter_mut().for_each(|x| *x /= mean_norm);
    }
    for _ in 0..iterations {
        let mut tangent = vec![0.0; v];
        for i in 0..v {
            let dot: f64 = (0..v).map(|k| mean[k] * gu(k, i)).sum::<f64>().clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let c = alpha[i] * theta / theta.sin();
            for k in 0..v {
                tangent[k] -= c * dot * mean[k];
            }
            tangent[i] += c;
        }
        let tn = quad(&tangent);
        if tn < tol {
            break;
        }
        for k in 0..v {
            mean[k] = tn.cos() * mean[k] + tn.sin() * tangent[k] / tn;
        }
        let un = quad(&mean);
        if un > tol {
            mean.iter_mut().for_each(|x| *x /= un);
        }
    }
    let scale: f64 = norms.iter().map(|n| n / m as f64).sum();
    let mut c = vec![0.0; m];
    for (a, &i) in valid.iter().enumerate() {
        c[i] = scale * mean[a] / norms[i];
    }
    Ok((0.0, c))
}

/// SplitMix64's output function: a well-mixed 64-bit hash.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The draw for entry `j` under `key`: kept when below the threshold of [`keep_threshold`].
#[inline(always)]
fn draw(key: u64, j: u64) -> u64 {
    mix(key.wrapping_add(j.wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 11
}

/// The threshold a 53-bit draw must be below to keep an entry with probability `density`.
pub(crate) fn keep_threshold(density: f64) -> u64 {
    if density >= 1.0 {
        u64::MAX
    } else if density <= 0.0 {
        0
    } else {
        (density * (1u64 << 53) as f64) as u64
    }
}

/// The key of model `i`'s draws for tensor `name` in a merge seeded with `seed`.
pub(crate) fn draw_key(seed: u64, name: &str, i: usize) -> u64 {
    let h = name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    mix(seed ^ h).wrapping_add(mix(i as u64 + 1))
}

/// DARE's keep-mask of model `x` (bits, one per entry: `draw(key, j) < threshold`) and its
/// L1 rescale factor `Σ|δ| / Σ_kept |δ|` (1 when either is below 1e-7, as mergekit), in one
/// pass that draws each entry once (two threads for large tensors), so that the merge pass
/// reads the bits instead of drawing again.
pub(crate) fn dare_bits<I: Elem>(x: &[I], base: &[I], key: u64, threshold: u64) -> (Vec<u64>, f32) {
    let n = x.len();
    let mut bits = vec![0u64; n.div_ceil(64)];
    // entries `offset ..` of the tensor into their words: (Σ|δ|, Σ_kept |δ|), f32 per block
    let part = |x: &[I], base: &[I], words: &mut [u64], offset: usize| {
        let (mut before, mut after) = (0.0f64, 0.0f64);
        let blocks = x.chunks(BLOCK).zip(base.chunks(BLOCK)).zip(words.chunks_mut(BLOCK / 64));
        for (block, ((xs, bs), ws)) in blocks.enumerate() {
            let (mut b, mut a) = (0.0f32, 0.0f32);
            for (word, (w, (xs, bs))) in
                ws.iter_mut().zip(xs.chunks(64).zip(bs.chunks(64))).enumerate()
            {
                let first = (offset + block * BLOCK + word * 64) as u64;
                let mut m = 0u64;
                for (j, (x, y)) in xs.iter().zip(bs).enumerate() {
                    let d = (x.load() - y.load()).abs();
                    let kept = draw(key, first + j as u64) < threshold;
                    b += d;
                    a += if kept { d } else { 0.0 };
                    m |= (kept as u64) << j;
                }
                *w = m;
            }
            before += b as f64;
            after += a as f64;
        }
        (before, after)
    };
    let mid = if n >= PARALLEL_MIN { (n / 2).next_multiple_of(BLOCK).min(n) } else { n };
    let ((b0, a0), (b1, a1)) = {
        let (lo, hi) = bits.split_at_mut(mid.div_ceil(64)); // mid: n or a multiple of 64
        let (x_lo, x_hi) = x.split_at(mid);
        let (base_lo, base_hi) = base.split_at(mid);
        if mid == n {
            (part(x_lo, base_lo, lo, 0), (0.0, 0.0))
        } else {
            std::thread::scope(|s| {
                let second = s.spawn(|| part(x_hi, base_hi, hi, mid));
                let first = part(x_lo, base_lo, lo, 0);
                (first, second.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            })
        }
    };
    let (before, after) = (b0 + b1, a0 + a1);
    let factor = if before < 1e-7 || after < 1e-7 { 1.0 } else { (before / after) as f32 };
    (bits, factor)
}

/// DELLA's keep-mask of model `x` (bits, one per entry) and its L1 rescale factor: per row
/// (`cols` entries; a vector is one row) each entry is kept with probability
/// `density − ε + 2ε·(rank − 1)/(cols − 1)`, its rank by `|δ|` (1 the smallest; a stable radix
/// sort, so equal magnitudes rank in order), drawn under `key`.
pub(crate) fn della_bits<I: Elem>(
    x: &[I],
    base: &[I],
    cols: usize,
    density: f64,
    epsilon: f64,
    key: u64,
) -> (Vec<u64>, f32) {
    let n = x.len();
    let cols = cols.max(1);
    let rows = n / cols;
    let span = (cols.max(2) - 1) as f64;
    // the keep threshold of each rank, the same in every row
    let thresholds: Vec<u64> = (0..cols)
        .map(|rank| keep_threshold((density - epsilon) + rank as f64 / span * 2.0 * epsilon))
        .collect();
    // rows split between two threads; each part's bits start on a whole word
    let rows_per_word = 64 / gcd(64, cols);
    let mid =
        if n >= PARALLEL_MIN { (rows / 2).next_multiple_of(rows_per_word).min(rows) } else { rows };
    let part = |r0: usize, r1: usize| della_rows(x, base, cols, r0, r1, &thresholds, key);
    let ((mut bits, b0, a0), (hi, b1, a1)) = if mid == 0 || mid == rows {
        (part(0, rows), (Vec::new(), 0.0, 0.0))
    } else {
        std::thread::scope(|s| {
            let second = s.spawn(|| part(mid, rows));
            let first = part(0, mid);
            (first, second.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        })
    };
    let word = mid * cols / 64;
    for (w, h) in bits[word..].iter_mut().zip(hi) {
        *w |= h;
    }
    let (before, after) = (b0 + b1, a0 + a1);
    let factor = if before < 1e-7 || after < 1e-7 { 1.0 } else { (before / after) as f32 };
    (bits, factor)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// DELLA's bits for rows `r0 .. r1`: the whole tensor's words from `r0`'s on (the caller
/// merges them), with `Σ|δ|` and the kept part's.
fn della_rows<I: Elem>(
    x: &[I],
    base: &[I],
    cols: usize,
    r0: usize,
    r1: usize,
    thresholds: &[u64],
    key: u64,
) -> (Vec<u64>, f64, f64) {
    let first_word = r0 * cols / 64;
    let mut bits = vec![0u64; (x.len().div_ceil(64)).saturating_sub(first_word)];
    let (mut before, mut after) = (0.0f64, 0.0f64);
    let mut mags = vec![0u32; cols];
    let (mut order, mut tmp) = (vec![0u32; cols], vec![0u32; cols]);
    for row in r0..r1 {
        let start = row * cols;
        for j in 0..cols {
            mags[j] = abs_bits(x[start + j].load() - base[start + j].load());
            order[j] = j as u32;
        }
        // LSD radix sort of the indices by magnitude bits, 8 bits a pass
        for shift in [0u32, 8, 16, 24] {
            let mut count = [0usize; 257];
            for &i in &order {
                count[((mags[i as usize] >> shift) & 0xff) as usize + 1] += 1;
            }
            for b in 0..256 {
                count[b + 1] += count[b];
            }
            for &i in &order {
                let b = ((mags[i as usize] >> shift) & 0xff) as usize;
                tmp[count[b]] = i;
                count[b] += 1;
            }
            std::mem::swap(&mut order, &mut tmp);
        }
        let (mut b, mut a) = (0.0f32, 0.0f32);
        for (&i, &thr) in order.iter().zip(thresholds) {
            let j = start + i as usize;
            let d = f32::from_bits(mags[i as usize]);
            b += d;
            if draw(key, j as u64) < thr {
                bits[j / 64 - first_word] |= 1 << (j % 64);
                a += d;
            }
        }
        before += b as f64;
        after += a as f64;
    }
    (bits, before, after)
}

/// SCE over the raw inputs (mergekit's `sce_merge`, in f32): keep the entries whose variance
/// across the task vectors is among the `select_topk` fraction of the non-zero ones (by a
/// radix-selected threshold: ties at it are all kept), weight each task vector by its mean
/// square, elect signs from the unweighted sum, `θ₀ + Σ w_i τ_i [agree] / max(Σ w_i [agree],
/// 1e-6)`. Returns `(inputs finite, output finite)`.
pub(crate) fn sce<I: Elem, O: Elem>(
    base: &[I],
    xs: &[&[I]],
    out: &mut [O],
    select_topk: f64,
) -> (bool, bool) {
    let (n, m) = (base.len(), xs.len());
    let mut tv = vec![0.0f32; m];
    let fill = |j: usize, tv: &mut [f32]| {
        let b = base[j].load();
        for (t, x) in tv.iter_mut().zip(xs) {
            *t = x[j].load() - b;
        }
    };
    let variance = |tv: &[f32]| -> f32 {
        let mean = tv.iter().sum::<f32>() / m as f32;
        tv.iter().map(|t| (t - mean) * (t - mean)).sum::<f32>() / m as f32
    };
    // each entry's variance (bits of a non-negative f32), computed once
    let var: Vec<u32> = if select_topk > 0.0 && select_topk < 1.0 {
        (0..n)
            .map(|j| {
                fill(j, &mut tv);
                variance(&tv).to_bits()
            })
            .collect()
    } else {
        Vec::new()
    };
    // the variance threshold, or keep all (`Some(0)` with select_topk ≥ 1) / none
    let threshold: Option<u32> = if select_topk >= 1.0 {
        Some(0)
    } else if select_topk <= 0.0 {
        None
    } else {
        let mut hi = vec![0u64; 1 << 16];
        let mut zeros = 0u64;
        for &v in &var {
            hi[(v >> 16) as usize] += 1;
            zeros += u64::from(v == 0);
        }
        let k = ((n as u64 - zeros) as f64 * select_topk) as u64;
        if k == 0 {
            None
        } else {
            // the k-th largest: ascending rank n − k
            let rank = n as u64 - k;
            let (mut seen, mut bin) = (0u64, 0usize);
            while seen + hi[bin] <= rank {
                seen += hi[bin];
                bin += 1;
            }
            let mut lo = vec![0u64; 1 << 16];
            for &v in &var {
                if (v >> 16) as usize == bin {
                    lo[(v & 0xffff) as usize] += 1;
                }
            }
            let (mut rest, mut low) = (rank - seen, 0usize);
            while rest >= lo[low] {
                rest -= lo[low];
                low += 1;
            }
            Some(((bin as u32) << 16) | low as u32)
        }
    };
    let kept = |j: usize| match threshold {
        None => false,
        Some(_) if var.is_empty() => true,
        Some(t) => var[j] >= t,
    };
    // the task vectors' mean squares (masked), normalised
    let mut w = vec![0.0f64; m];
    let mut in_ok = true;
    for (j, b) in base.iter().enumerate() {
        fill(j, &mut tv);
        // the inputs themselves (a difference may overflow: the output check reports that)
        in_ok &= b.load().is_finite() && xs.iter().all(|x| x[j].load().is_finite());
        if kept(j) {
            for (wi, t) in w.iter_mut().zip(&tv) {
                *wi += (t * t) as f64;
            }
        }
    }
    w.iter_mut().for_each(|x| *x /= n as f64);
    let sum: f64 = w.iter().sum();
    let w: Vec<f32> = w
        .iter()
        .map(|&x| if sum.abs() < 1e-6 { 1.0 / m as f32 } else { (x / sum) as f32 })
        .collect();
    let mut out_ok = true;
    for j in 0..n {
        fill(j, &mut tv);
        let b = base[j].load();
        let v = if kept(j) {
            let total: f32 = tv.iter().sum();
            let (mut num, mut den) = (0.0f32, 0.0f32);
            for (t, wi) in tv.iter().zip(&w) {
                let agree = if total >= 0.0 { *t > 0.0 } else { *t < 0.0 };
                if agree {
                    num += t * wi;
                    den += wi;
                }
            }
            b + num / den.max(1e-6)
        } else {
            b
        };
        let stored = O::store(v);
        out_ok &= stored.load().is_finite();
        out[j] = stored;
    }
    (in_ok, out_ok)
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
    /// Per input (not the base), for [`Kernel::Random`]: its draws' key and keep threshold.
    pub random: Vec<(u64, u64)>,
    /// Per input (not the base), for [`Kernel::Random`]: the factor of its kept entries.
    pub scale: Vec<f32>,
    /// Per input (not the base), when not empty: the kept entries as bits (DELLA, and DARE
    /// with the L1 rescale), in place of the draws.
    pub masks: Vec<Vec<u64>>,
    pub out: &'a mut [O],
}

/// The part of a run over entries `offset ..` of the tensor (the slices are that part's).
struct Part<'a, 'r, I: Elem, O: Elem> {
    run: &'r RunShared,
    inputs: Vec<&'a [I]>,
    base: Option<&'a [I]>,
    out: &'r mut [O],
    offset: usize,
}

/// What every part of a run shares.
struct RunShared {
    coef: Vec<f32>,
    weights: Vec<f32>,
    keep: Vec<(u32, u32)>,
    random: Vec<(u64, u64)>,
    scale: Vec<f32>,
    masks: Vec<Vec<u64>>,
}

/// Entries below which a run stays on one thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Elements per inner block: the kernels run each step over a block of this many entries, in
/// f32 scratch, so that the loops vectorise. Non-finite inputs and outputs are caught by
/// summing `x · 0` per lane (NaN for ±∞ and NaN, else 0), which vectorises with the arithmetic.
const BLOCK: usize = 1024;

impl<I: Elem, O: Elem> Run<'_, I, O> {
    /// Runs `k`; returns `(inputs finite, output finite)`. Each block is read straight from
    /// the inputs (no staging copy: for f32 the loads are plain loads, for bf16 shifts). Large
    /// tensors are split in two halves run on two threads.
    pub fn go(self, k: Kernel) -> (bool, bool) {
        let Run { base, inputs, coef, weights, keep, random, scale, masks, out } = self;
        let shared = RunShared { coef, weights, keep, random, scale, masks };
        let n = out.len();
        if n < PARALLEL_MIN {
            return Part { run: &shared, inputs, base, out, offset: 0 }.go(k);
        }
        // halves on a multiple of 64 entries (mask words) and of BLOCK
        let mid = (n / 2).next_multiple_of(BLOCK * 64).min(n);
        let (lo, hi) = out.split_at_mut(mid);
        let (in_lo, in_hi): (Vec<&[I]>, Vec<&[I]>) = inputs.iter().map(|x| x.split_at(mid)).unzip();
        let (b_lo, b_hi) = match base {
            Some(b) => (Some(b.split_at(mid).0), Some(b.split_at(mid).1)),
            None => (None, None),
        };
        let shared = &shared;
        std::thread::scope(|s| {
            let second = s.spawn(move || {
                Part { run: shared, inputs: in_hi, base: b_hi, out: hi, offset: mid }.go(k)
            });
            let first = Part { run: shared, inputs: in_lo, base: b_lo, out: lo, offset: 0 }.go(k);
            let second = second.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            (first.0 && second.0, first.1 && second.1)
        })
    }
}

impl<I: Elem, O: Elem> Part<'_, '_, I, O> {
    fn go(self, k: Kernel) -> (bool, bool) {
        let Part { run, inputs, base, out, offset } = self;
        let RunShared { coef, weights, keep, random, scale, masks } = run;
        let n = out.len();
        let m = inputs.len();
        let mut in_chk = [0.0f32; BLOCK];
        let mut out_chk = [0.0f32; BLOCK];
        let mut acc = [0.0f32; BLOCK];
        let selective = matches!(k, Kernel::Magnitude { .. } | Kernel::Random { .. });
        let mut wd = vec![[0.0f32; BLOCK]; if selective { m } else { 0 }];
        let mut mask_bits = [0u32; BLOCK];
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
                Kernel::Spherical | Kernel::Sce { .. } => unreachable!("run before the parts"),
                Kernel::Combine { base_coef } => {
                    for j in 0..len {
                        acc[j] = bs[j].load() * base_coef;
                    }
                    for i in 0..m {
                        let (xs, c) = (&inputs[i][range.clone()], coef[i]);
                        for j in 0..len {
                            let x = xs[j].load();
                            in_chk[j] += x * 0.0;
                            acc[j] += x * c;
                        }
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
                Kernel::Magnitude { consensus, normalize, lambda }
                | Kernel::Random { consensus, normalize, lambda } => {
                    acc[..len].fill(0.0);
                    for i in 0..m {
                        let xs = &inputs[i][range.clone()];
                        let w = weights[i];
                        let wdi = &mut wd[i];
                        if let (Kernel::Random { .. }, Some(mask)) = (k, masks.get(i)) {
                            let f = scale[i] * w;
                            // the block's bits spread out first (blocks start on a whole word:
                            // parts on multiples of 64 blocks), so that the loop below has no
                            // branch on them and vectorises
                            let first = (offset + start) / 64;
                            for (c, word) in mask_bits[..len].chunks_mut(64).zip(&mask[first..]) {
                                for (b, k) in c.iter_mut().enumerate() {
                                    *k = ((word >> b) & 1) as u32;
                                }
                            }
                            for j in 0..len {
                                let x = xs[j].load();
                                in_chk[j] += x * 0.0;
                                let d = x - bs[j].load();
                                wdi[j] = if mask_bits[j] != 0 { d * f } else { 0.0 };
                                acc[j] += wdi[j];
                            }
                        } else if let Kernel::Random { .. } = k {
                            let ((key, thr), f) = (random[i], scale[i] * w);
                            for j in 0..len {
                                let x = xs[j].load();
                                in_chk[j] += x * 0.0;
                                let d = x - bs[j].load();
                                let kept = draw(key, (offset + start + j) as u64) < thr;
                                wdi[j] = if kept { d * f } else { 0.0 };
                                acc[j] += wdi[j];
                            }
                        } else {
                            let (lo, hi) = keep[i];
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
                // the stored value: f16 turns large finite f32 values into ±∞
                let stored = O::store(*a);
                *c += stored.load() * 0.0;
                *o = stored;
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
