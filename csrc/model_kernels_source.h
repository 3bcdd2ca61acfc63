// The CUDA source of the fused model ops' kernels (RMSNorm, SwiGLU, rotary embedding; their
// host side is csrc/model_ops.cpp). cuda_kernels.cpp compiles it with NVRTC together with its
// own kernels, after their helpers (u32, lo, hi, pack), which this source uses.
//
// Every kernel reads and writes bf16 in 16-byte vectors (8 values) and computes in f32, rounding
// to bf16 exactly where transformers' eager bf16 graph rounds, so the outputs match the composed
// ops up to the order of f32 sums:
//   RMSNorm   n = bf16(x·r), y = bf16(w·n), r = 1/sqrt(mean(x²) + ε); with the residual add
//             fused in, x = bf16(x + res) first
//   SwiGLU    y = bf16(bf16(silu(g))·u)
//   RoPE      y_i = bf16(bf16(x_i·cos_i) + bf16(rot(x)_i·sin_i)), rot(x) = [−x₂, x₁]
// and the 4-bit dequantization of csrc/quant_linear.cpp.
#pragma once

namespace tch_peft::kernels {

inline const char* kModelKernelsSource = R"(
__device__ __forceinline__ float bf(float v) { return lo(pack(v, 0.f)); }  // round to bf16

__device__ __forceinline__ void unpack8(uint4 v, float* f) {
  f[0] = lo(v.x); f[1] = hi(v.x); f[2] = lo(v.y); f[3] = hi(v.y);
  f[4] = lo(v.z); f[5] = hi(v.z); f[6] = lo(v.w); f[7] = hi(v.w);
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 v;
  v.x = pack(f[0], f[1]); v.y = pack(f[2], f[3]); v.z = pack(f[4], f[5]); v.w = pack(f[6], f[7]);
  return v;
}

// the sum of v over the block's 256 threads, returned to every thread (sh: 8 floats of shared
// memory, free again when this returns)
__device__ __forceinline__ float block_sum(float v, float* sh) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) t += sh[i];
  __syncthreads();
  return t;
}

// the maximum of v over the block's 256 threads, returned to every thread (sh as block_sum)
__device__ __forceinline__ float block_max(float v, float* sh) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = sh[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) t = fmaxf(t, sh[i]);
  __syncthreads();
  return t;
}

// RMSNorm forward, one row of H = 8·vec values per block iteration; thread t owns the vectors
// t + 256·j (j < VPT). Writes y [rows, H] and r [rows] (f32). With a residual `res` (non-null)
// the row normalised is s = bf16(x + res), written to `sum` (the residual add fused in).
template <int VPT>
__device__ void rms_fwd(const uint4* __restrict__ x, const uint4* __restrict__ res,
                        const uint4* __restrict__ w, uint4* __restrict__ y,
                        uint4* __restrict__ sum, float* __restrict__ rstd, int rows, int vec,
                        float eps) {
  __shared__ float sh[8];
  float wf[VPT][8];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int v = threadIdx.x + 256 * j;
    if (v < vec) unpack8(w[v], wf[j]);
  }
  const float inv_h = 1.f / (8.f * vec);
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    float xf[VPT][8];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = threadIdx.x + 256 * j;
      if (v < vec) {
        unpack8(x[(size_t)row * vec + v], xf[j]);
        if (res != nullptr) {
          float rf[8];
          unpack8(res[(size_t)row * vec + v], rf);
#pragma unroll
          for (int k = 0; k < 8; ++k) xf[j][k] = bf(xf[j][k] + rf[k]);
          sum[(size_t)row * vec + v] = pack8(xf[j]);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) ss += xf[j][k] * xf[j][k];
      }
    }
    const float r = rsqrtf(block_sum(ss, sh) * inv_h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = threadIdx.x + 256 * j;
      if (v < vec) {
        float o[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) o[k] = wf[j][k] * bf(xf[j][k] * r);
        y[(size_t)row * vec + v] = pack8(o);
      }
    }
  }
}

// RMSNorm backward: with x̂ = x·r, dn = bf16(dy·w):
//   dx = bf16(r·(dn − x̂·mean(dn·x̂))),  dw_part[block] = Σ_{block's rows} dy·bf16(x̂)  (f32)
// With `dsum` (non-null: the gradient reaching a fused add's sum from elsewhere) the row written
// is bf16(dx + dsum), the gradient of both addends.
template <int VPT>
__device__ void rms_bwd(const uint4* __restrict__ dy, const uint4* __restrict__ x,
                        const uint4* __restrict__ w, const float* __restrict__ rstd,
                        const uint4* __restrict__ dsum, uint4* __restrict__ dx,
                        float* __restrict__ dw_part, int rows, int vec) {
  __shared__ float sh[8];
  float wf[VPT][8], acc[VPT][8];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int v = threadIdx.x + 256 * j;
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[j][k] = 0.f;
    if (v < vec) unpack8(w[v], wf[j]);
  }
  const float inv_h = 1.f / (8.f * vec);
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    float xh[VPT][8], dn[VPT][8];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = threadIdx.x + 256 * j;
      if (v < vec) {
        float gf[8];
        unpack8(x[(size_t)row * vec + v], xh[j]);
        unpack8(dy[(size_t)row * vec + v], gf);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          xh[j][k] *= r;
          acc[j][k] += gf[k] * bf(xh[j][k]);
          dn[j][k] = bf(gf[k] * wf[j][k]);
          dot += dn[j][k] * xh[j][k];
        }
      }
    }
    const float mean = block_sum(dot, sh) * inv_h;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = threadIdx.x + 256 * j;
      if (v < vec) {
        float o[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) o[k] = r * (dn[j][k] - xh[j][k] * mean);
        if (dsum != nullptr) {
          float sf[8];
          unpack8(dsum[(size_t)row * vec + v], sf);
#pragma unroll
          for (int k = 0; k < 8; ++k) o[k] = bf(o[k]) + sf[k];
        }
        dx[(size_t)row * vec + v] = pack8(o);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int v = threadIdx.x + 256 * j;
    if (v < vec) {
      float* out = dw_part + (size_t)blockIdx.x * vec * 8 + (size_t)v * 8;
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] = acc[j][k];
    }
  }
}

#define TCH_PEFT_RMS(VPT)                                                                     \
  extern "C" __global__ void __launch_bounds__(256) rms_fwd_##VPT(                            \
      const uint4* x, const uint4* res, const uint4* w, uint4* y, uint4* sum, float* rstd,    \
      int rows, int vec, float eps) {                                                         \
    rms_fwd<VPT>(x, res, w, y, sum, rstd, rows, vec, eps);                                    \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256) rms_bwd_##VPT(                            \
      const uint4* dy, const uint4* x, const uint4* w, const float* rstd, const uint4* dsum,  \
      uint4* dx, float* dw_part, int rows, int vec) {                                         \
    rms_bwd<VPT>(dy, x, w, rstd, dsum, dx, dw_part, rows, vec);                               \
  }
TCH_PEFT_RMS(1)
TCH_PEFT_RMS(2)
TCH_PEFT_RMS(4)
#undef TCH_PEFT_RMS

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// SwiGLU over [rows, 8·vec]: g and u rows at strides ldg and ldu (16-byte vectors), y, dg, du
// contiguous. Forward y = bf16(bf16(silu(g))·u); backward (dy given, backward != 0)
//   du = bf16(dy·bf16(silu(g))),  dg = bf16(bf16(dy·u)·σ(g)·(1 + g·(1 − σ(g))))
extern "C" __global__ void __launch_bounds__(256) swiglu(
    const uint4* __restrict__ g, const uint4* __restrict__ u, const uint4* __restrict__ dy,
    uint4* __restrict__ y, uint4* __restrict__ dg, uint4* __restrict__ du, long long rows,
    int vec, long long ldg, long long ldu, int backward) {
  const long long total = rows * vec;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / vec;
    const int v = (int)(i - row * vec);
    float gf[8], uf[8];
    unpack8(g[row * ldg + v], gf);
    unpack8(u[row * ldu + v], uf);
    if (!backward) {
      float o[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = bf(gf[k] * sigmoid(gf[k])) * uf[k];
      y[i] = pack8(o);
    } else {
      float df[8], og[8], ou[8];
      unpack8(dy[i], df);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float s = sigmoid(gf[k]);
        ou[k] = df[k] * bf(gf[k] * s);
        og[k] = bf(df[k] * uf[k]) * (s * (1.f + gf[k] * (1.f - s)));
      }
      dg[i] = pack8(og);
      du[i] = pack8(ou);
    }
  }
}

// Rotary embedding of q [n_q rows of D] and k [n_k rows of D] (rows = (batch, position, head)
// in that order, contiguous), cos and sin [S, D] bf16 contiguous; position = (row / heads) % S.
// Each thread takes 8 values of the first half and their 8 partners in the second half.
//   forward   y_i = bf16(x_i·c_i) + bf16(−x_{i+h}·s_i)  (i < h),  bf16(x_i·c_i) + bf16(x_{i−h}·s_i)
//   backward  dx_i = bf16(dy_i·c_i) + bf16(dy_{i+h}·s_{i+h})  (i < h),  … − bf16(dy_{i−h}·s_{i−h})
// (each sum rounded to bf16), written to yq, yk.
extern "C" __global__ void __launch_bounds__(256) rope(
    const uint4* __restrict__ q, const uint4* __restrict__ k, const uint4* __restrict__ cs,
    const uint4* __restrict__ sn, uint4* __restrict__ yq, uint4* __restrict__ yk,
    long long rows_q, long long rows_k, int heads_q, int heads_k, int seq, int half_vec,
    int backward) {
  const long long work_q = rows_q * half_vec, total = work_q + rows_k * half_vec;
  const int dvec = 2 * half_vec;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const bool is_q = i < work_q;
    const long long j = is_q ? i : i - work_q;
    const long long row = j / half_vec;
    const int v = (int)(j - row * half_vec);
    const int pos = (int)((row / (is_q ? heads_q : heads_k)) % seq);
    const uint4* x = is_q ? q : k;
    uint4* y = is_q ? yq : yk;
    float a[8], b[8], c1[8], s1[8], c2[8], s2[8], o1[8], o2[8];
    unpack8(x[row * dvec + v], a);
    unpack8(x[row * dvec + v + half_vec], b);
    unpack8(cs[(long long)pos * dvec + v], c1);
    unpack8(sn[(long long)pos * dvec + v], s1);
    unpack8(cs[(long long)pos * dvec + v + half_vec], c2);
    unpack8(sn[(long long)pos * dvec + v + half_vec], s2);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (!backward) {
        o1[t] = bf(a[t] * c1[t]) + bf(-b[t] * s1[t]);
        o2[t] = bf(b[t] * c2[t]) + bf(a[t] * s2[t]);
      } else {
        o1[t] = bf(a[t] * c1[t]) + bf(b[t] * s2[t]);
        o2[t] = bf(b[t] * c2[t]) - bf(a[t] * s1[t]);
      }
    }
    y[row * dvec + v] = pack8(o1);
    y[row * dvec + v + half_vec] = pack8(o2);
  }
}

// Softmax cross-entropy over one chunk of bf16 logits z [rows, V = 8·vec], in f32, one row per
// block iteration (csrc/linear_cross_entropy.cpp):
//   lse = log Σ_v exp(z_v)   (one pass: a running maximum and the sum rescaled to it)
//   loss[row] = lse − z_y on a valid row (label ≠ ignore_index), 0 on an ignored one
//   z ← bf16((softmax(z) − onehot(y))·inv) on a valid row, 0 on an ignored one (write_grad)
// in place: the logits' gradient for dh = g·W and dW = gᵀ·h. `inv` is a device scalar (the mean's
// 1/count, or 1), read there so that the host never waits for it. Labels are checked in range
// by the caller.
extern "C" __global__ void __launch_bounds__(256) softmax_ce(
    uint4* __restrict__ z, const long long* __restrict__ labels, const float* __restrict__ inv,
    float* __restrict__ loss, int rows, int vec, long long ignore_index, int write_grad) {
  __shared__ float sh[8];
  const float scale = *inv;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    uint4* zr = z + (size_t)row * vec;
    const long long y = labels[row];
    const bool valid = y != ignore_index && y >= 0 && y < 8LL * vec;
    // the label's logit, read before any thread of the block overwrites the row
    const float zy = valid ? __uint_as_float(
        ((unsigned)reinterpret_cast<const unsigned short*>(zr)[y]) << 16) : 0.f;
    float m = -3.402823466e38f, s = 0.f;  // −FLT_MAX: a −∞ logit then adds exp(−∞) = 0
    // four 16-byte loads in flight per thread before any is used
    for (int v0 = threadIdx.x; v0 < vec; v0 += 1024) {
      uint4 raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (v0 + 256 * u < vec) raw[u] = zr[v0 + 256 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (v0 + 256 * u >= vec) break;
        float f[8];
        unpack8(raw[u], f);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (f[k] > m) {
            s = s * __expf(m - f[k]) + 1.f;
            m = f[k];
          } else {
            s += __expf(f[k] - m);
          }
        }
      }
    }
    const float mx = block_max(m, sh);
    const float total = block_sum(s == 0.f ? 0.f : s * __expf(m - mx), sh);
    const float lse = mx + logf(total);
    if (threadIdx.x == 0) loss[row] = valid ? lse - zy : 0.f;
    if (!write_grad) continue;
    const int yv = valid ? (int)(y >> 3) : -1, yk = (int)(y & 7);
    for (int v0 = threadIdx.x; v0 < vec; v0 += 1024) {
      uint4 raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (valid && v0 + 256 * u < vec) raw[u] = zr[v0 + 256 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int v = v0 + 256 * u;
        if (v >= vec) break;
        float f[8];
        if (valid) {
          unpack8(raw[u], f);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            f[k] = (__expf(f[k] - lse) - (v == yv && k == yk ? 1.f : 0.f)) * scale;
          }
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) f[k] = 0.f;
        }
        zr[v] = pack8(f);
      }
    }
  }
}

// bitsandbytes' 4-bit weight to bf16 (csrc/quant_linear.cpp): 16 elements per thread from 8
// code bytes (high nibble first), one absmax each (blocks are multiples of 16). The products
// and the nested absmax's add are rounded one by one (no contraction into FMAs), as ATen's
// separate ops round them:
//   s = nested_map[qabs[b]] · nested_absmax[b >> nested_log2] + offset   (or absmax[b])
//   w_e = bf16(quant_map[code_e] · s),   b = e >> block_log2
extern "C" __global__ void __launch_bounds__(256) dequant_4bit(
    const uint2* __restrict__ codes, const float* __restrict__ absmax,
    const unsigned char* __restrict__ qabs, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_map, const float* __restrict__ quant_map, float offset,
    int block_log2, int nested_log2, long long groups, uint4* __restrict__ out) {
  __shared__ float qm[16];
  if (threadIdx.x < 16) qm[threadIdx.x] = quant_map[threadIdx.x];
  __syncthreads();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < groups;
       i += (long long)gridDim.x * blockDim.x) {
    const long long b = (i * 16) >> block_log2;
    const float s = qabs != nullptr
        ? __fadd_rn(__fmul_rn(nested_map[qabs[b]], nested_absmax[b >> nested_log2]), offset)
        : absmax[b];
    const uint2 c = codes[i];
    float f[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const unsigned byte = ((k < 4 ? c.x : c.y) >> (8 * (k & 3))) & 0xFFu;
      f[2 * k] = __fmul_rn(qm[byte >> 4], s);
      f[2 * k + 1] = __fmul_rn(qm[byte & 15u], s);
    }
    out[2 * i] = pack8(f);
    out[2 * i + 1] = pack8(f + 8);
  }
}

// y = x · deq(W)ᵀ (+ bias) for a few rows of x (decoding): the 4-bit weight is read once, half a
// byte a weight, and never written out dense. One warp per output feature o (8 per block); lane
// l takes the groups of 16 weights l, l + 32, … of row o (8 bytes of codes each, one absmax),
// forms them as dequant_4bit does (bf16(quant_map[c] · s)), and accumulates their products with
// every row of x in f32; a warp reduction and one bf16 rounding per output. x: bf16 [rows, in]
// (rows ≤ 8, in a multiple of 16); bias: bf16 [out] or null; y: bf16 [rows, out].
extern "C" __global__ void __launch_bounds__(256) gemv_4bit(
    const uint2* __restrict__ codes, const float* __restrict__ absmax,
    const unsigned char* __restrict__ qabs, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_map, const float* __restrict__ quant_map, float offset,
    int block_log2, int nested_log2, const uint4* __restrict__ x, int rows, int in_features,
    int out_features, const unsigned short* __restrict__ bias, unsigned short* __restrict__ y) {
  __shared__ float qm[16];
  if (threadIdx.x < 16) qm[threadIdx.x] = quant_map[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (o >= out_features) return;
  const int groups = in_features >> 4;
  const int xvec = in_features >> 3;  // 16-byte vectors per row of x
  float acc[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) acc[r] = 0.f;
  for (int g = lane; g < groups; g += 32) {
    const long long gi = (long long)o * groups + g;
    const long long b = (gi * 16) >> block_log2;
    const float s = qabs != nullptr
        ? __fadd_rn(__fmul_rn(nested_map[qabs[b]], nested_absmax[b >> nested_log2]), offset)
        : absmax[b];
    const uint2 c = codes[gi];
    float w[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const unsigned byte = ((k < 4 ? c.x : c.y) >> (8 * (k & 3))) & 0xFFu;
      w[2 * k] = bf(__fmul_rn(qm[byte >> 4], s));
      w[2 * k + 1] = bf(__fmul_rn(qm[byte & 15u], s));
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      if (r < rows) {
        float xf[16];
        unpack8(x[(size_t)r * xvec + 2 * g], xf);
        unpack8(x[(size_t)r * xvec + 2 * g + 1], xf + 8);
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 16; ++k) t = fmaf(w[k], xf[k], t);
        acc[r] += t;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && r < rows) {
      if (bias != nullptr) v += lo((unsigned)bias[o]);
      y[(size_t)r * out_features + o] = (unsigned short)(pack(v, 0.f) & 0xFFFFu);
    }
  }
}
)";

}  // namespace tch_peft::kernels
