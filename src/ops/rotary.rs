//! Rotary position embedding (RoPE) with transformers' `rotate_half` convention, q and k in one
//! fused node on CUDA bf16.
//!
//! ```text
//! inv_freq_i = θ^(−2i/D)  (i < D/2),   angle[p, i] = p · inv_freq_(i mod D/2)
//! cos, sin = cos(angle), sin(angle)                      [S, D], f32 then cast
//! y = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x₁, x₂]) = [−x₂, x₁]
//! ```
//!
//! The backward is the inverse rotation: `dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin)`. On CUDA with
//! bf16 contiguous inputs (D a multiple of 16) one kernel rotates q and k together, each way,
//! saving nothing but the tables.

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The `cos` and `sin` tables `[seq, head_dim]` for positions `0..seq` and base `theta`,
/// computed in f32 and cast to `kind` (as transformers' `LlamaRotaryEmbedding`).
pub fn rotary_tables(
    seq: i64,
    head_dim: i64,
    theta: f64,
    kind: Kind,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    if seq < 0 || head_dim < 2 || head_dim % 2 != 0 || !(theta.is_finite() && theta > 0.0) {
        return Err(Error::InvalidConfig {
            field: "rotary_tables".into(),
            reason: format!(
                "seq {seq}, head_dim {head_dim}, theta {theta}: need seq ≥ 0, an even head_dim \
                 ≥ 2 and a finite theta > 0"
            ),
        });
    }
    let exponent = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Int64, device))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(head_dim as f64)?;
    let inv_freq = Tensor::f_pow_scalar(theta, &exponent)?.f_reciprocal()?;
    let pos = Tensor::f_arange(seq, (Kind::Int64, device))?.f_to_kind(Kind::Float)?;
    let freqs = pos.f_unsqueeze(1)?.f_mul(&inv_freq.f_unsqueeze(0)?)?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
    Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
}

/// RoPE applied to `q` `[B, S, Hq, D]` and, when given, `k` `[B, S, Hk, D]` (tokens before heads:
/// the layout of a projection's output viewed per head) with tables `cos`, `sin` `[S, D]` of
/// their kind ([`rotary_tables`]). Returns the rotated `q` and `k`.
///
/// ```
/// # fn main() -> tch_peft::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// use tch_peft::ops::{apply_rotary, rotary_tables};
/// let (cos, sin) = rotary_tables(4, 8, 10_000.0, Kind::Float, Device::Cpu)?;
/// let q = Tensor::randn([1, 4, 2, 8], (Kind::Float, Device::Cpu));
/// let (q_rot, _) = apply_rotary(&q, None, &cos, &sin)?;
/// // a rotation keeps each half-pair's norm; position 0 is unrotated
/// assert!(q_rot.narrow(1, 0, 1).allclose(&q.narrow(1, 0, 1), 1e-6, 1e-6, false));
/// # Ok(()) }
/// ```
pub fn apply_rotary(
    q: &Tensor,
    k: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, s, d) = match q.size()[..] {
        [b, s, _, d] => (b, s, d),
        _ => return Err(shape("q", vec![-1, -1, -1, -1], q)),
    };
    if d % 2 != 0 {
        return Err(shape("q", vec![b, s, -1, d + 1], q));
    }
    super::check_float("q", q)?;
    if let Some(k) = k {
        match k.size()[..] {
            [kb, ks, _, kd] if kb == b && ks == s && kd == d => {}
            _ => return Err(shape("k", vec![b, s, -1, d], k)),
        }
        super::check_same_kind("k", k, q)?;
        super::check_device("k", k, q)?;
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.size() != [s, d] {
            return Err(shape(name, vec![s, d], t));
        }
        super::check_same_kind(name, t, q)?;
        super::check_device(name, t, q)?;
    }
    #[cfg(tch_peft_csrc)]
    if q.device().is_cuda() {
        if let Some(out) = crate::sys::rope(q, k, cos, sin)? {
            return Ok(out);
        }
    }
    let rotate = |x: &Tensor| apply_rotary_composed(x, cos, sin);
    Ok((rotate(q)?, k.map(rotate).transpose()?))
}

/// RoPE of one `x` `[B, S, H, D]` in composed libtorch ops (the reference of the tests).
#[doc(hidden)]
pub fn apply_rotary_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let size = x.size();
    let (s, d) = (size[1], size[3]);
    let half = d / 2;
    let rotated =
        Tensor::f_cat(&[x.f_narrow(-1, half, half)?.f_neg()?, x.f_narrow(-1, 0, half)?], -1)?;
    let (c, sn) = (cos.f_view([1, s, 1, d])?, sin.f_view([1, s, 1, d])?);
    Ok(x.f_mul(&c)?.f_add(&rotated.f_mul(&sn)?)?)
}

fn shape(name: &str, expected: Vec<i64>, t: &Tensor) -> Error {
    Error::ShapeMismatch { name: name.into(), expected, actual: t.size() }
}
