// DoRA's bandwidth-bound passes as CUDA kernels compiled at run time with NVRTC (see
// dora_kernels.h). ATen runs them at about half of the H200's memory bandwidth (the broadcast
// product G·W through its generic, non-vectorised elementwise kernel; the column reduction
// Σ_rows g_y ⊙ y through batch norm's backward reduction) and needs ~10 launches for the norm's
// small steps. These read 16 bytes per thread and load, several loads in flight per thread.
//
// No CUDA library of our own is linked: NVRTC is the one torch loads (or the PyPI wheel's, found
// beside libtorch), the driver API comes from libcuda.so.1 through dlopen. Kernels are compiled
// once per device, on first use.

#include "dora_kernels.h"

#ifdef TCH_PEFT_CUDA
#include <ATen/Context.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <string>

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

struct Module {
  CUfunction scale = nullptr, dot_only = nullptr, dot_sum = nullptr;
  int sms = 0;
  bool ok() const { return scale && dot_only && dot_sum; }
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
      a.nvrtcCreateProgram(&prog, kSource, "tch_peft_dora.cu", 0, nullptr, nullptr) ==
          NVRTC_SUCCESS) {
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
            a.cuModuleGetFunction(&mod.dot_sum, cu_module, "column_dot_sum") != CUDA_SUCCESS) {
          mod = Module();
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

bool launch(CUfunction fn, unsigned gx, unsigned gy, void** args) {
  if (!ensure_context(c10::cuda::current_device())) return false;
  const auto stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream().stream());
  return api().cuLaunchKernel(fn, gx, gy, 1, 256, 1, 1, 0, stream, args, nullptr) ==
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

bool available() { return false; }

void set_enabled(bool) {}

#endif

}  // namespace tch_peft::kernels

extern "C" {

// Whether DoRA's run-time compiled CUDA kernels can run on the current device.
int tch_peft_custom_kernels_available() { return tch_peft::kernels::available() ? 1 : 0; }

// Switches them on (1) or off (0) for the process.
void tch_peft_set_custom_kernels(int on) { tch_peft::kernels::set_enabled(on != 0); }

}  // extern "C"
