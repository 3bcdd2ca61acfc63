// The fused nodes' bandwidth-bound passes as CUDA kernels compiled at run time with NVRTC (see
// cuda_kernels.h). For DoRA, ATen runs them at about half of the H200's memory bandwidth (the
// broadcast product G·W through its generic, non-vectorised elementwise kernel; the column
// reduction Σ_rows g_y ⊙ y through batch norm's backward reduction) and needs ~10 launches for
// the norm's small steps; these read 16 bytes per thread and load, several loads in flight per
// thread. For LoRA, the thin product s·h·Bᵀ (+ bias) that the base GEMM then accumulates into
// is a pure write of the [N, out] output: cuBLAS's thin GEMM writes it at ~3.1 TB/s on an H200
// (slower with its bias epilogue), one launch per layer; this kernel at up to ~4 TB/s, one
// launch per group of layers (benches/gpu/thin_probe.py).
//
// No CUDA library of our own is linked: NVRTC is the one torch loads (or the PyPI wheel's, found
// beside libtorch), the driver API comes from libcuda.so.1 through dlopen. Kernels are compiled
// once per device, on first use.

#include "cuda_kernels.h"
#include "model_kernels_source.h"
#include "tch_peft.h"

#ifdef TCH_PEFT_CUDA
#include <ATen/Context.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace at::cuda {
// exported by libtorch_cuda (ATen/cuda/CUDAContextLight.h, whose other includes need CUDA
// headers the wheels do not ship)
cudaDeviceProp* getCurrentDeviceProperties();
}  // namespace at::cuda
#endif

namespace tch_peft::kernels {

#ifdef TCH_PEFT_CUDA
namespace {

const char* kSource = R"(
typedef unsigned int u32;

__device__ __forceinline__ float lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

// two floats rounded to bf16 (nearest even) and packed, `a` in the low half: the conversion
// ATen's CUDA kernels use
__device__ __forceinline__ u32 pack(float a, float b) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}

// DoRA's weight-side part after its two small GEMMs, one warp per row o of W ([out, in] bf16):
//   ‖W_o + s·B_o A‖² = ‖W_o‖² + Σ_k B[o,k]·(2s·(WA_hi + WA_lo)[o,k] + s²·Σ_j B[o,j]·AAᵀ[j,k])
//   g[o] = m[o] / ‖·‖ (the square clamped at 0),  inv_m[o] = 1/m[o] (0 where not finite),
//   W_g[o,:] = bf16(W[o,:] · bf16(g[o])),  B_g[o,:] = bf16(B[o,:] · g[o])
// wa2: [out, 2r] = W·[A_hi; A_lo]ᵀ (f32), b: [out, r], aat: [r, r], m, w_sq: [out] (all f32).
// The row of W streams through the warp in 16-byte vectors, four per lane in flight.
extern "C" __global__ void __launch_bounds__(256) dora_scale(
    const uint4* __restrict__ w, const float* __restrict__ wa2, const float* __restrict__ b,
    const float* __restrict__ aat, const float* __restrict__ m, const float* __restrict__ w_sq,
    float s, int r, int vec_per_row, int rows, uint4* __restrict__ w_g,
    unsigned short* __restrict__ b_g, float* __restrict__ g_out, float* __restrict__ inv_m) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  for (int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); o < rows; o += warps) {
    const float* bo = b + (size_t)o * r;
    float term = 0.f;
    for (int k = lane; k < r; k += 32) {
      float baat = 0.f;
      for (int j = 0; j < r; ++j) baat += bo[j] * aat[j * r + k];
      const float cross =
          2.f * s * (wa2[(size_t)o * 2 * r + k] + wa2[(size_t)o * 2 * r + r + k]) + s * s * baat;
      term += bo[k] * cross;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) term += __shfl_xor_sync(0xffffffffu, term, off);
    const float g = m[o] * rsqrtf(fmaxf(w_sq[o] + term, 0.f));
    if (lane == 0) {
      g_out[o] = g;
      const float inv = 1.f / m[o];
      inv_m[o] = isfinite(inv) ? inv : 0.f;
    }
    for (int k = lane; k < r; k += 32) {
      b_g[(size_t)o * r + k] = (unsigned short)pack(bo[k] * g, 0.f);
    }
    const float gs = lo(pack(g, 0.f));
    const uint4* wo = w + (size_t)o * vec_per_row;
    uint4* out = w_g + (size_t)o * vec_per_row;
    for (int base = lane; base < vec_per_row; base += 32 * 4) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (base + 32 * u < vec_per_row) v[u] = wo[base + 32 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (base + 32 * u < vec_per_row) {
          uint4 q;
          q.x = pack(lo(v[u].x) * gs, hi(v[u].x) * gs);
          q.y = pack(lo(v[u].y) * gs, hi(v[u].y) * gs);
          q.z = pack(lo(v[u].z) * gs, hi(v[u].z) * gs);
          q.w = pack(lo(v[u].w) * gs, hi(v[u].w) * gs);
          out[base + 32 * u] = q;
        }
      }
    }
  }
}

template <bool SUM>
__device__ __forceinline__ void accumulate(float* d, float* s, const float* b, uint4 gv,
                                           uint4 yv) {
  const u32 ga[4] = {gv.x, gv.y, gv.z, gv.w};
  const u32 ya[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float g0 = lo(ga[j]), g1 = hi(ga[j]);
    d[2 * j] += g0 * (lo(ya[j]) - b[2 * j]);
    d[2 * j + 1] += g1 * (hi(ya[j]) - b[2 * j + 1]);
    if (SUM) {
      s[2 * j] += g0;
      s[2 * j + 1] += g1;
    }
  }
}

// Block: 8 warps; lane t owns the 8 columns of vector blockIdx.x·32 + t, warp w every 8th row
// of the block's row chunk (four rows per iteration: eight 16-byte loads in flight per thread).
// The 8 warps' sums are added in shared memory and written, times scale, to row blockIdx.y of
// the partial-sum outputs [chunks, C] (summed over chunks by the caller).
template <bool SUM>
__device__ void column_dot(const uint4* __restrict__ g, const uint4* __restrict__ y,
                           const float* __restrict__ bias, const float* __restrict__ scale,
                           float* __restrict__ part_dot, float* __restrict__ part_sum,
                           int n_rows, int vec_cols, int rows_per_chunk) {
  const int t = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int v = blockIdx.x * 32 + t;
  const int r0 = blockIdx.y * rows_per_chunk;
  const int r1 = min(n_rows, r0 + rows_per_chunk);
  float d[8], s[8], b[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    d[k] = 0.f;
    s[k] = 0.f;
    b[k] = 0.f;
  }
  if (v < vec_cols) {
    if (bias != nullptr) {
#pragma unroll
      for (int k = 0; k < 8; ++k) b[k] = bias[8 * v + k];
    }
    int r = r0 + w;
    for (; r + 24 < r1; r += 32) {
      uint4 gv[4], yv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const size_t idx = (size_t)(r + 8 * u) * vec_cols + v;
        gv[u] = g[idx];
        yv[u] = y[idx];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) accumulate<SUM>(d, s, b, gv[u], yv[u]);
    }
    for (; r < r1; r += 8) {
      const size_t idx = (size_t)r * vec_cols + v;
      accumulate<SUM>(d, s, b, g[idx], y[idx]);
    }
  }
  __shared__ float sh[8][8][33];  // [warp][column within the vector][lane]
  const int cols = vec_cols * 8;
  // thread (k = w, lane t) adds the 8 warps' values of column 8·v + k
  const int col = 8 * v + w;
#pragma unroll
  for (int k = 0; k < 8; ++k) sh[w][k][t] = d[k];
  __syncthreads();
  if (v < vec_cols) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += sh[i][w][t];
    part_dot[(size_t)blockIdx.y * cols + col] = acc * scale[col];
  }
  if (SUM) {
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 8; ++k) sh[w][k][t] = s[k];
    __syncthreads();
    if (v < vec_cols) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc += sh[i][w][t];
      part_sum[(size_t)blockIdx.y * cols + col] = acc;
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) column_dot_only(
    const uint4* g, const uint4* y, const float* bias, const float* scale, float* part_dot,
    float* part_sum, int n_rows, int vec_cols, int rows_per_chunk) {
  column_dot<false>(g, y, bias, scale, part_dot, part_sum, n_rows, vec_cols, rows_per_chunk);
}

extern "C" __global__ void __launch_bounds__(256) column_dot_sum(
    const uint4* g, const uint4* y, const float* bias, const float* scale, float* part_dot,
    float* part_sum, int n_rows, int vec_cols, int rows_per_chunk) {
  column_dot<true>(g, y, bias, scale, part_dot, part_sum, n_rows, vec_cols, rows_per_chunk);
}
// The low-rank product of a group of LoRA layers on one input, each output written once:
//   out_i[n, c] = bf16(s_i · Σ_k h[n, off_i + k]·B_i[c, k] + bias_i[c])
// h: [rows, ldh] bf16 (the group's x·[A_1; …]ᵀ), B_i: [cols_i, r_i] bf16, out_i: [rows, cols_i].
// A block (4 warps) owns 128 columns of one member (blockIdx.x runs over every member's column
// tiles) and rows_per_block rows (a multiple of 64: 256, fewer where that leaves the GPU too few
// blocks); B's tile and the bias sit in shared memory, each warp takes 16 rows at a
// time through tensor-core MMAs (m16n8k16, f32 accumulation, k zero-padded past r_i) and writes
// them through shared memory as 16-byte streaming stores (evict-first: the output is read back
// by the base GEMM only after it has streamed its operands), 256 contiguous bytes per row.
struct UpMember {
  const unsigned short* b;
  unsigned short* out;
  const unsigned short* bias;  // or null
  int cols, r, h_off, tiles_end;
  float s;
};
struct UpParams {
  const unsigned short* h;
  int ldh, rows, n, rows_per_block;
  UpMember m[8];
};

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int KS>  // k steps of 16: r_i ≤ 16·KS
__device__ void lora_up(const UpParams& p) {
  constexpr int BP = 8 * KS + 4;  // u32 pitch of B's rows in shared memory (conflict-free)
  __shared__ __align__(16) u32 bs[128 * BP];
  __shared__ float bias_s[128];
  __shared__ __align__(16) u32 st[4][16][68];
  int mi = 0;
  while (mi + 1 < p.n && (int)blockIdx.x >= p.m[mi].tiles_end) ++mi;
  const UpMember& m = p.m[mi];
  const int tile = (int)blockIdx.x - (mi == 0 ? 0 : p.m[mi - 1].tiles_end);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int col0 = tile * 128, vecs = m.r / 8;  // 16-byte vectors per row of B
  for (int i = tid; i < 128 * 2 * KS; i += 128) {
    const int row = i / (2 * KS), q = i % (2 * KS), c = col0 + row;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (c < m.cols && q < vecs) v = reinterpret_cast<const uint4*>(m.b + (size_t)c * m.r)[q];
    *reinterpret_cast<uint4*>(&bs[row * BP + 4 * q]) = v;
  }
  bias_s[tid] = m.bias != nullptr && col0 + tid < m.cols ? lo((u32)m.bias[col0 + tid]) : 0.f;
  __syncthreads();
  const int start = (int)blockIdx.y * p.rows_per_block;
  const int end = min(p.rows, start + p.rows_per_block);
  for (int row0 = start + warp * 16; row0 < end; row0 += 64) {
    u32 a[KS][4];
    const int ra = row0 + g, rb = ra + 8;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int k = 16 * ks + 2 * t;  // this lane's first column (and k + 8)
      a[ks][0] = a[ks][1] = a[ks][2] = a[ks][3] = 0;
      const u32* pa = reinterpret_cast<const u32*>(p.h + (size_t)ra * p.ldh + m.h_off + k);
      const u32* pb = reinterpret_cast<const u32*>(p.h + (size_t)rb * p.ldh + m.h_off + k);
      if (ra < end && k < m.r) a[ks][0] = pa[0];
      if (ra < end && k + 8 < m.r) a[ks][2] = pa[4];
      if (rb < end && k < m.r) a[ks][1] = pb[0];
      if (rb < end && k + 8 < m.r) a[ks][3] = pb[4];
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      const u32* bp = &bs[(8 * j + g) * BP + t];
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) mma_bf16(acc, a[ks], bp[8 * ks], bp[8 * ks + 4]);
      const float b0 = bias_s[8 * j + 2 * t], b1 = bias_s[8 * j + 2 * t + 1];
      st[warp][g][4 * j + t] = pack(acc[0] * m.s + b0, acc[1] * m.s + b1);
      st[warp][g + 8][4 * j + t] = pack(acc[2] * m.s + b0, acc[3] * m.s + b1);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int idx = i * 32 + lane, rr = idx >> 4, v = idx & 15;
      const int row = row0 + rr, col = col0 + 8 * v;
      if (row < end && col < m.cols) {
        __stcs(reinterpret_cast<uint4*>(m.out + (size_t)row * m.cols + col),
               *reinterpret_cast<const uint4*>(&st[warp][rr][4 * v]));
      }
    }
    __syncwarp();
  }
}

extern "C" __global__ void __launch_bounds__(128) lora_up_16(const UpParams p) { lora_up<1>(p); }
extern "C" __global__ void __launch_bounds__(128) lora_up_32(const UpParams p) { lora_up<2>(p); }
)";

struct Api {
  bool ok = false;  // every function below found
  // driver (libcuda)
  CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**) = nullptr;
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  // NVRTC
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int,
                                    const char* const*, const char* const*) = nullptr;
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*) = nullptr;
  nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*) = nullptr;
  nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram, char*) = nullptr;
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*) = nullptr;
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*) = nullptr;
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*) = nullptr;
};

bool debug() {
  static const bool on = std::getenv("TCH_PEFT_DEBUG_KERNELS") != nullptr;
  return on;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on([] {
    const char* v = std::getenv("TCH_PEFT_CUSTOM_KERNELS");
    return v == nullptr || std::string(v) != "0";
  }());
  return on;
}

const Api& api() {
  static const Api loaded = [] {
    Api a;
    (void)at::globalContext().getNVRTC();  // torch's NVRTC stub loads libnvrtc where it can
    void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    // NVRTC: already in the process, on the search path, or in the wheels' layout beside torch
    // (site-packages/nvidia/cu13/lib, found from where libtorch_cuda was loaded)
    void* nvrtc = nullptr;
    for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12"}) {
      if (nvrtc == nullptr) nvrtc = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
      if (nvrtc == nullptr) nvrtc = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    }
    Dl_info info;
    if (nvrtc == nullptr &&
        dladdr(reinterpret_cast<void*>(&at::cuda::getCurrentDeviceProperties), &info) != 0 &&
        info.dli_fname != nullptr) {
      std::string dir(info.dli_fname);
      dir = dir.substr(0, dir.rfind('/'));  // …/torch/lib
      for (const char* rel : {"/../../nvidia/cu13/lib/libnvrtc.so.13",
                              "/../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12"}) {
        if (nvrtc == nullptr) nvrtc = dlopen((dir + rel).c_str(), RTLD_NOW | RTLD_GLOBAL);
      }
    }
    if (debug()) {
      std::fprintf(stderr, "tch-peft kernels: libcuda %p, libnvrtc %p\n", cuda, nvrtc);
    }
    const auto get = [](void* lib, const char* name, bool& all) {
      void* f = lib == nullptr ? nullptr : dlsym(lib, name);
      all = all && f != nullptr;
      return f;
    };
    // (by the names cuda.h's macros give them: some plain driver names stand for versioned
    // symbols, e.g. cuCtxCreate for cuCtxCreate_v4)
#define TCH_PEFT_NAME2(x) #x
#define TCH_PEFT_NAME(x) TCH_PEFT_NAME2(x)
#define TCH_PEFT_LOAD(lib, fn, all) \
  a.fn = reinterpret_cast<decltype(a.fn)>(get(lib, TCH_PEFT_NAME(fn), all))
    bool driver = cuda != nullptr;
    TCH_PEFT_LOAD(cuda, cuModuleLoadData, driver);
    TCH_PEFT_LOAD(cuda, cuModuleGetFunction, driver);
    TCH_PEFT_LOAD(cuda, cuLaunchKernel, driver);
    TCH_PEFT_LOAD(cuda, cuCtxGetCurrent, driver);
    TCH_PEFT_LOAD(cuda, cuCtxSetCurrent, driver);
    TCH_PEFT_LOAD(cuda, cuDeviceGet, driver);
    TCH_PEFT_LOAD(cuda, cuDevicePrimaryCtxRetain, driver);
    bool compiler = nvrtc != nullptr;
    TCH_PEFT_LOAD(nvrtc, nvrtcCreateProgram, compiler);
    TCH_PEFT_LOAD(nvrtc, nvrtcCompileProgram, compiler);
    TCH_PEFT_LOAD(nvrtc, nvrtcGetCUBINSize, compiler);
    TCH_PEFT_LOAD(nvrtc, nvrtcGetCUBIN, compiler);
    TCH_PEFT_LOAD(nvrtc, nvrtcGetProgramLogSize, compiler);
    TCH_PEFT_LOAD(nvrtc, nvrtcGetProgramLog, compiler);
    TCH_PEFT_LOAD(nvrtc, nvrtcDestroyProgram, compiler);
#undef TCH_PEFT_LOAD
#undef TCH_PEFT_NAME
#undef TCH_PEFT_NAME2
    a.ok = driver && compiler;
    return a;
  }();
  return loaded;
}

// Makes the device's primary context (the one the CUDA runtime, hence libtorch, uses) current on
// this thread if no context is: a thread that has not run CUDA work yet has none.
bool ensure_context(int device) {
  const Api& a = api();
  CUcontext ctx = nullptr;
  if (a.cuCtxGetCurrent(&ctx) == CUDA_SUCCESS && ctx != nullptr) return true;
  CUdevice dev = 0;
  return a.cuDeviceGet(&dev, device) == CUDA_SUCCESS &&
         a.cuDevicePrimaryCtxRetain(&ctx, dev) == CUDA_SUCCESS &&
         a.cuCtxSetCurrent(ctx) == CUDA_SUCCESS;
}

// the model ops' kernels (model_kernels_source.h), looked up by name from csrc/model_ops.cpp
const char* const kModelKernelNames[] = {"rms_fwd_1", "rms_fwd_2", "rms_fwd_4", "rms_bwd_1",
                                         "rms_bwd_2", "rms_bwd_4", "swiglu",    "rope",
                                         "softmax_ce", "dequant_4bit", "gemv_4bit"};

struct Module {
  CUfunction scale = nullptr, dot_only = nullptr, dot_sum = nullptr, up16 = nullptr,
             up32 = nullptr;
  std::map<std::string, CUfunction> model;
  int sms = 0;
  bool ok() const {
    return scale && dot_only && dot_sum && up16 && up32 &&
           model.size() == std::size(kModelKernelNames);
  }
};

// The kernel source's parameter structs of lora_up, declared alike (same layout on both sides).
struct UpMember {
  const void* b;
  void* out;
  const void* bias;
  int cols, r, h_off, tiles_end;
  float s;
};
struct UpParams {
  const void* h;
  int ldh, rows, n, rows_per_block;
  UpMember m[8];
};

// The kernels on the current device, compiled and loaded once (a failure is remembered: no
// second attempt). Only where the tensors live on the current device (its context is the one
// current here).
const Module* module() {
  if (!enabled_flag().load(std::memory_order_relaxed)) return nullptr;
  const Api& a = api();
  if (!a.ok) return nullptr;
  static std::mutex mutex;
  static auto* cache = new std::map<int, Module>();
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache->find(device);
  if (found != cache->end()) return found->second.ok() ? &found->second : nullptr;
  Module mod;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  nvrtcProgram prog = nullptr;
  if (prop->major >= 8 && ensure_context(device) &&
      a.nvrtcCreateProgram(&prog, (std::string(kSource) + kModelKernelsSource).c_str(),
                           "tch_peft_kernels.cu", 0, nullptr, nullptr) == NVRTC_SUCCESS) {
    const std::string arch =
        "--gpu-architecture=sm_" + std::to_string(prop->major * 10 + prop->minor);
    const char* opts[] = {arch.c_str(), "--std=c++17", "-default-device"};
    const nvrtcResult compiled = a.nvrtcCompileProgram(prog, 3, opts);
    if (debug()) {
      size_t log_size = 0;
      a.nvrtcGetProgramLogSize(prog, &log_size);
      std::string log(log_size, '\0');
      if (log_size > 0) a.nvrtcGetProgramLog(prog, &log[0]);
      std::fprintf(stderr, "tch-peft kernels: compile for %s: %d %s\n", arch.c_str(),
                   static_cast<int>(compiled), log.c_str());
    }
    size_t size = 0;
    CUmodule cu_module = nullptr;
    if (compiled == NVRTC_SUCCESS && a.nvrtcGetCUBINSize(prog, &size) == NVRTC_SUCCESS &&
        size > 0) {
      std::string cubin(size, '\0');
      if (a.nvrtcGetCUBIN(prog, &cubin[0]) == NVRTC_SUCCESS &&
          a.cuModuleLoadData(&cu_module, cubin.data()) == CUDA_SUCCESS) {
        if (a.cuModuleGetFunction(&mod.scale, cu_module, "dora_scale") != CUDA_SUCCESS ||
            a.cuModuleGetFunction(&mod.dot_only, cu_module, "column_dot_only") != CUDA_SUCCESS ||
            a.cuModuleGetFunction(&mod.dot_sum, cu_module, "column_dot_sum") != CUDA_SUCCESS ||
            a.cuModuleGetFunction(&mod.up16, cu_module, "lora_up_16") != CUDA_SUCCESS ||
            a.cuModuleGetFunction(&mod.up32, cu_module, "lora_up_32") != CUDA_SUCCESS) {
          mod = Module();
        }
        for (const char* name : kModelKernelNames) {
          CUfunction fn = nullptr;
          if (mod.scale != nullptr &&
              a.cuModuleGetFunction(&fn, cu_module, name) == CUDA_SUCCESS) {
            mod.model[name] = fn;
          }
        }
      }
    }
    a.nvrtcDestroyProgram(&prog);
  }
  mod.sms = prop->multiProcessorCount;
  (*cache)[device] = mod;
  return mod.ok() ? &(*cache)[device] : nullptr;
}

bool on_current_device(const at::Tensor& t) {
  return t.is_cuda() && t.get_device() == c10::cuda::current_device();
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool launch(CUfunction fn, unsigned gx, unsigned gy, void** args, unsigned threads = 256) {
  if (!ensure_context(c10::cuda::current_device())) return false;
  const auto stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream().stream());
  return api().cuLaunchKernel(fn, gx, gy, 1, threads, 1, 1, 0, stream, args, nullptr) ==
         CUDA_SUCCESS;
}

}  // namespace

bool dora_scale(const at::Tensor& w, const at::Tensor& wa2, const at::Tensor& b,
                const at::Tensor& aat, const at::Tensor& m, const at::Tensor& w_sq, double s,
                at::Tensor& w_g, at::Tensor& b_g, at::Tensor& g, at::Tensor& inv_m) {
  if (w.dim() != 2 || w.scalar_type() != at::kBFloat16 || !w.is_contiguous() ||
      !on_current_device(w) || !aligned16(w) || w.size(1) % 8 != 0 ||
      w.size(0) >= (int64_t{1} << 31) || w.size(1) / 8 >= (int64_t{1} << 31)) {
    return false;
  }
  const int64_t out = w.size(0), r = b.dim() == 2 ? b.size(1) : -1;
  const auto f32_of = [&](const at::Tensor& t, std::initializer_list<int64_t> sizes) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() && t.device() == w.device() &&
           t.sizes() == at::IntArrayRef(sizes);
  };
  if (r < 1 || !f32_of(wa2, {out, 2 * r}) || !f32_of(b, {out, r}) || !f32_of(aat, {r, r}) ||
      !f32_of(m, {out}) || !f32_of(w_sq, {out})) {
    return false;
  }
  const Module* mod = module();
  if (mod == nullptr) return false;
  at::Tensor wg = at::empty_like(w);
  at::Tensor bg = at::empty({out, r}, w.options());
  at::Tensor gg = at::empty({out}, m.options());
  at::Tensor im = at::empty({out}, m.options());
  if (out > 0) {
    const float sf = static_cast<float>(s);
    const int ri = static_cast<int>(r);
    const int vec_per_row = static_cast<int>(w.size(1) / 8);
    const int rows = static_cast<int>(out);
    const unsigned blocks =
        static_cast<unsigned>(std::min<int64_t>((out + 7) / 8, int64_t{8} * mod->sms));
    const void* ptrs[] = {w.data_ptr(), wa2.data_ptr(), b.data_ptr(), aat.data_ptr(),
                          m.data_ptr(),  w_sq.data_ptr()};
    void* outs[] = {wg.data_ptr(), bg.data_ptr(), gg.data_ptr(), im.data_ptr()};
    void* args[] = {&ptrs[0], &ptrs[1], &ptrs[2], &ptrs[3], &ptrs[4], &ptrs[5],
                    const_cast<float*>(&sf), const_cast<int*>(&ri),
                    const_cast<int*>(&vec_per_row), const_cast<int*>(&rows),
                    &outs[0], &outs[1], &outs[2], &outs[3]};
    if (!launch(mod->scale, blocks, 1, args)) return false;
  }
  w_g = wg;
  b_g = bg;
  g = gg;
  inv_m = im;
  return true;
}

bool column_dot(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& bias,
                const at::Tensor& scale, bool want_sum, at::Tensor& dot, at::Tensor& sum) {
  if (gy.dim() != 2 || gy.scalar_type() != at::kBFloat16 || y.scalar_type() != at::kBFloat16 ||
      !gy.is_contiguous() || !y.is_contiguous() || y.sizes() != gy.sizes() ||
      !on_current_device(gy) || y.device() != gy.device() || !aligned16(gy) || !aligned16(y) ||
      gy.size(1) % 8 != 0 || gy.size(0) >= (int64_t{1} << 31) ||
      gy.numel() / 8 >= (int64_t{1} << 31)) {
    return false;
  }
  const int64_t n = gy.size(0), c = gy.size(1);
  const auto ok_vec = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == c &&
           t.device() == gy.device();
  };
  if ((bias.defined() && !ok_vec(bias)) || !ok_vec(scale)) return false;
  const Module* mod = module();
  if (mod == nullptr) return false;
  const auto f32 = gy.options().dtype(at::kFloat);
  if (n == 0 || c == 0) {
    dot = at::zeros({c}, f32);
    if (want_sum) sum = at::zeros({c}, f32);
    return true;
  }
  const int vec_cols = static_cast<int>(c / 8);
  const int n_rows = static_cast<int>(n);
  const int gx = (vec_cols + 31) / 32;
  // about three blocks per SM in all, each over a chunk of at least 64 rows (a multiple of 32)
  const int want_chunks = std::max(1, (3 * mod->sms + gx - 1) / gx);
  int rows_per_chunk = std::max(64, (n_rows + want_chunks - 1) / want_chunks);
  rows_per_chunk = (rows_per_chunk + 31) / 32 * 32;
  const int chunks = (n_rows + rows_per_chunk - 1) / rows_per_chunk;
  const at::Tensor part = at::empty({want_sum ? 2 : 1, chunks, c}, f32);
  const void* g_p = gy.data_ptr();
  const void* y_p = y.data_ptr();
  const void* b_p = bias.defined() ? bias.data_ptr() : nullptr;
  const void* s_p = scale.data_ptr();
  void* pd = part.data_ptr();
  void* ps = want_sum ? part[1].data_ptr() : nullptr;
  void* args[] = {&g_p, &y_p, &b_p, &s_p, &pd, &ps, const_cast<int*>(&n_rows),
                  const_cast<int*>(&vec_cols), &rows_per_chunk};
  if (!launch(want_sum ? mod->dot_sum : mod->dot_only, static_cast<unsigned>(gx),
              static_cast<unsigned>(chunks), args)) {
    return false;
  }
  if (chunks == 1) {
    dot = part[0][0];
    if (want_sum) sum = part[1][0];
  } else {
    const at::Tensor total = part.sum(1);  // [1 or 2, C], fixed order
    dot = total[0];
    if (want_sum) sum = total[1];
  }
  return true;
}

bool lora_up(const at::Tensor& h, const std::vector<UpTerm>& terms,
             std::vector<at::Tensor>& outs) {
  constexpr int64_t kMaxInt = (int64_t{1} << 31) - 1;
  if (terms.empty() || h.dim() != 2 || h.scalar_type() != at::kBFloat16 || !h.is_contiguous() ||
      !on_current_device(h) || h.size(0) > kMaxInt / 2 || h.size(1) > kMaxInt ||
      (h.size(0) + 63) / 64 > 65535 || reinterpret_cast<uintptr_t>(h.data_ptr()) % 4 != 0) {
    return false;
  }
  const int64_t rows = h.size(0);
  int max_r = 0;
  int64_t tiles = 0;
  for (const UpTerm& u : terms) {
    const at::Tensor& b = *u.b;
    if (b.dim() != 2 || b.scalar_type() != at::kBFloat16 || !b.is_contiguous() ||
        b.device() != h.device() || !aligned16(b) || b.size(1) % 8 != 0 || b.size(1) < 8 ||
        b.size(1) > 32 || b.size(0) % 8 != 0 || b.size(0) > kMaxInt || u.h_offset < 0 ||
        u.h_offset + b.size(1) > h.size(1)) {
      return false;
    }
    if (u.bias != nullptr &&
        (u.bias->scalar_type() != at::kBFloat16 || !u.bias->is_contiguous() ||
         u.bias->numel() != b.size(0) || u.bias->device() != h.device())) {
      return false;
    }
    max_r = std::max(max_r, static_cast<int>(b.size(1)));
    tiles += (b.size(0) + 127) / 128;
  }
  if (tiles > kMaxInt) return false;
  const Module* mod = module();
  if (mod == nullptr) return false;
  // 256 rows per block, fewer where that would leave fewer than two blocks per SM
  int rows_per_block = 256;
  while (rows_per_block > 64 && tiles * ((rows + rows_per_block - 1) / rows_per_block) <
                                    int64_t{2} * mod->sms) {
    rows_per_block /= 2;
  }
  std::vector<at::Tensor> ys;
  for (const UpTerm& u : terms) {
    ys.push_back(at::empty({rows, u.b->size(0)}, h.options()));
    if (!aligned16(ys.back())) return false;
  }
  // one launch per eight members (the parameter struct's capacity)
  for (size_t first = 0; first < terms.size() && rows > 0; first += 8) {
    UpParams p{};
    p.h = h.data_ptr();
    p.ldh = static_cast<int>(h.size(1));
    p.rows = static_cast<int>(rows);
    p.rows_per_block = rows_per_block;
    int end = 0;
    for (size_t i = first; i < std::min(terms.size(), first + 8); ++i) {
      const UpTerm& u = terms[i];
      UpMember& m = p.m[p.n++];
      m.b = u.b->data_ptr();
      m.out = ys[i].data_ptr();
      m.bias = u.bias != nullptr ? u.bias->data_ptr() : nullptr;
      m.cols = static_cast<int>(u.b->size(0));
      m.r = static_cast<int>(u.b->size(1));
      m.h_off = static_cast<int>(u.h_offset);
      end += (m.cols + 127) / 128;
      m.tiles_end = end;
      m.s = static_cast<float>(u.scaling);
    }
    if (end == 0) continue;  // every member has no columns
    void* args[] = {&p};
    if (!launch(max_r <= 16 ? mod->up16 : mod->up32, static_cast<unsigned>(end),
                static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), args,
                128)) {
      return false;
    }
  }
  outs = std::move(ys);
  return true;
}

void* model_function(const char* name) {
  const Module* mod = module();
  if (mod == nullptr) return nullptr;
  const auto found = mod->model.find(name);
  return found == mod->model.end() ? nullptr : reinterpret_cast<void*>(found->second);
}

bool launch_model(void* fn, unsigned blocks, void** args) {
  return fn != nullptr && launch(reinterpret_cast<CUfunction>(fn), blocks, 1, args);
}

int sm_count() {
  const Module* mod = module();
  return mod == nullptr ? 0 : mod->sms;
}

bool available() {
  if (c10::cuda::device_count() == 0) return false;
  try {
    return module() != nullptr;
  } catch (const std::exception&) {
    return false;
  }
}

void set_enabled(bool on) { enabled_flag().store(on, std::memory_order_relaxed); }

#else  // no CUDA build: the ATen ops everywhere

bool dora_scale(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, double, at::Tensor&, at::Tensor&,
                at::Tensor&, at::Tensor&) {
  return false;
}

bool column_dot(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                at::Tensor&, at::Tensor&) {
  return false;
}

bool lora_up(const at::Tensor&, const std::vector<UpTerm>&, std::vector<at::Tensor>&) {
  return false;
}

void* model_function(const char*) { return nullptr; }

bool launch_model(void*, unsigned, void**) { return false; }

int sm_count() { return 0; }

bool available() { return false; }

void set_enabled(bool) {}

#endif

}  // namespace tch_peft::kernels

extern "C" {

// Whether the run-time compiled CUDA kernels (LoRA and DoRA) can run on the current device.
int tch_peft_custom_kernels_available() { return tch_peft::kernels::available() ? 1 : 0; }

// Switches them on (1) or off (0) for the process.
void tch_peft_set_custom_kernels(int on) { tch_peft::kernels::set_enabled(on != 0); }

}  // extern "C"
