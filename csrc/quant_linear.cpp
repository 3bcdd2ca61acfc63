// The frozen 4-bit linear layer as an autograd node (called from src/quant/linear.rs through
// src/sys.rs): bitsandbytes' 4-bit weight is dequantized for the forward's GEMM and again in the
// backward, so the node keeps only the quantized parts between the two (about 0.52 bytes a
// weight), never the dense weight nor the input (nothing about the base trains):
//
//   y = x · deq(W)ᵀ + b          dx = g · deq(W)
//   deq(W)_k = quant_map[c_k] · absmax[k / blocksize]   (f32, then x's dtype), with double
//   quantization absmax_j = nested_map[a_j] · nested_absmax[j / nested_blocksize] + offset
//
// The ATen ops are those of src/quant/bnb.rs's dequantize_to, in the same order, so both give
// the same bits.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "cuda_kernels.h"
#include "tch_peft.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The most rows of x the GEMV kernel takes (decoding batches); more go dequantize-then-GEMM.
constexpr int64_t kGemvRows = 8;

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return (int64_t{1} << l) == v ? l : -1;
}

bool dense_cuda(const at::Tensor& t, at::ScalarType kind) {
  return t.is_cuda() && t.scalar_type() == kind && t.is_contiguous();
}

// The run-time compiled kernel's dequantization to bf16 (one pass), where it applies: bf16 on
// CUDA, every part contiguous on one device, element count a multiple of 16, power-of-two
// blocks, 8-byte aligned codes. Undefined where it does not.
at::Tensor dequantize_kernel(const std::vector<at::Tensor>& q, const std::vector<int64_t>& dims,
                             double offset, at::ScalarType kind) {
  const int64_t out = dims[0], in = dims[1], n = out * in;
  const bool nested = q.size() == 5;
  const int block_log2 = log2_exact(dims[2]);
  const int nested_log2 = nested ? log2_exact(dims[3]) : 0;
  // the kernel of the weight's device (the module is per device)
  const c10::DeviceGuard guard(q[0].device());
  void* fn = tch_peft::kernels::model_function("dequant_4bit");
  if (kind != at::kBFloat16 || fn == nullptr || n % 16 != 0 || n == 0 || block_log2 < 4 ||
      nested_log2 < 0 || !dense_cuda(q[0], at::kByte) ||
      reinterpret_cast<uintptr_t>(q[0].data_ptr()) % 8 != 0 ||
      !dense_cuda(q[1], nested ? at::kByte : at::kFloat) || !dense_cuda(q[2], at::kFloat) ||
      (nested && (!dense_cuda(q[3], at::kFloat) || !dense_cuda(q[4], at::kFloat)))) {
    return at::Tensor();
  }
  for (const at::Tensor& t : q) {
    if (t.device() != q[0].device()) return at::Tensor();
  }
  at::Tensor w = at::empty({out, in}, q[0].options().dtype(at::kBFloat16));
  const void* codes = q[0].data_ptr();
  const void* absmax = nested ? nullptr : q[1].data_ptr();
  const void* qabs = nested ? q[1].data_ptr() : nullptr;
  const void* nabs = nested ? q[3].data_ptr() : nullptr;
  const void* nmap = nested ? q[4].data_ptr() : nullptr;
  const void* qmap = q[2].data_ptr();
  float off = static_cast<float>(offset);
  int bl = block_log2, nl = nested_log2;
  long long groups = n / 16;
  void* outp = w.data_ptr();
  void* args[] = {&codes, &absmax, &qabs, &nabs, &nmap, &qmap, &off, &bl, &nl, &groups, &outp};
  const int64_t cap = int64_t{16} * std::max(1, tch_peft::kernels::sm_count());
  const auto blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((groups + 255) / 256, cap)));
  if (!tch_peft::kernels::launch_model(fn, blocks, args)) {
    throw std::runtime_error("the CUDA kernel dequant_4bit failed to launch");
  }
  return w;
}

}  // namespace

at::Tensor tch_peft::gemv_4bit(const std::vector<at::Tensor>& q, const std::vector<int64_t>& dims,
                               double offset, const at::Tensor& x, const at::Tensor& bias) {
  const int64_t out = dims[0], in = dims[1], rows = x.dim() == 2 ? x.size(0) : -1;
  const bool nested = q.size() == 5;
  const int block_log2 = log2_exact(dims[2]);
  const int nested_log2 = nested ? log2_exact(dims[3]) : 0;
  if (!x.is_cuda() || rows < 1 || rows > kGemvRows || x.size(1) != in || in % 16 != 0 ||
      out >= (int64_t{1} << 31) || in >= (int64_t{1} << 31) || block_log2 < 4 ||
      nested_log2 < 0 || !dense_cuda(x, at::kBFloat16) ||
      reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0 || !dense_cuda(q[0], at::kByte) ||
      reinterpret_cast<uintptr_t>(q[0].data_ptr()) % 8 != 0 ||
      !dense_cuda(q[1], nested ? at::kByte : at::kFloat) || !dense_cuda(q[2], at::kFloat) ||
      (nested && (!dense_cuda(q[3], at::kFloat) || !dense_cuda(q[4], at::kFloat))) ||
      (bias.defined() && (!dense_cuda(bias, at::kBFloat16) || bias.numel() != out))) {
    return at::Tensor();
  }
  for (const at::Tensor& t : q) {
    if (t.device() != x.device()) return at::Tensor();
  }
  const c10::DeviceGuard guard(x.device());
  void* fn = tch_peft::kernels::model_function("gemv_4bit");
  if (fn == nullptr) return at::Tensor();
  at::Tensor y = at::empty({rows, out}, x.options());
  const void* codes = q[0].data_ptr();
  const void* absmax = nested ? nullptr : q[1].data_ptr();
  const void* qabs = nested ? q[1].data_ptr() : nullptr;
  const void* nabs = nested ? q[3].data_ptr() : nullptr;
  const void* nmap = nested ? q[4].data_ptr() : nullptr;
  const void* qmap = q[2].data_ptr();
  const void* xp = x.data_ptr();
  const void* bp = bias.defined() ? bias.data_ptr() : nullptr;
  void* yp = y.data_ptr();
  float off = static_cast<float>(offset);
  int bl = block_log2, nl = nested_log2, r = static_cast<int>(rows), i = static_cast<int>(in),
      o = static_cast<int>(out);
  void* args[] = {&codes, &absmax, &qabs, &nabs, &nmap, &qmap, &off, &bl, &nl,
                  &xp,    &r,      &i,    &o,    &bp,   &yp};
  const auto blocks = static_cast<unsigned>((out + 7) / 8);
  if (!tch_peft::kernels::launch_model(fn, blocks, args)) {
    throw std::runtime_error("the CUDA kernel gemv_4bit failed to launch");
  }
  return y;
}

// q: codes, absmax (f32, or uint8 nested codes), quant_map[, nested_absmax, nested_map];
// dims: out, in, blocksize, nested_blocksize
at::Tensor tch_peft::dequantize_4bit(const std::vector<at::Tensor>& q,
                                     const std::vector<int64_t>& dims, double offset,
                                     at::ScalarType kind) {
  if (q[0].is_cuda()) {
    at::Tensor w = dequantize_kernel(q, dims, offset, kind);
    if (w.defined()) return w;
  }
  const int64_t out = dims[0], in = dims[1], blocksize = dims[2], n = out * in;
  const at::Tensor b = q[0].reshape({-1}).to(at::kInt);
  const at::Tensor idx =
      at::stack({at::floor_divide(b, 16), at::remainder(b, 16)}, 1).reshape({-1}).narrow(0, 0, n);
  const at::Tensor vals = q[2].index_select(0, idx);
  at::Tensor absmax = q[1];
  if (q.size() == 5) {
    const int64_t blocks = q[1].numel();
    const at::Tensor nested_vals = q[4].index_select(0, q[1].to(at::kInt));
    const at::Tensor nested_scale = q[3].repeat_interleave(dims[3], 0);
    absmax = nested_vals.mul(nested_scale.narrow(0, 0, blocks)).add(offset);
  }
  const at::Tensor scale = absmax.repeat_interleave(blocksize, 0);
  return vals.mul(scale.narrow(0, 0, n)).to(kind).reshape({out, in});
}

namespace {

struct Linear4bitFunction : public torch::autograd::Function<Linear4bitFunction> {
  // `bias`: empty or the bias (an undefined tensor cannot be a node input)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList bias,
                            at::TensorList q, std::vector<int64_t> dims, double offset) {
    const std::vector<at::Tensor> parts(q.begin(), q.end());
    const at::Tensor x2 = x.reshape({-1, dims[1]});
    // a few rows (decoding): the GEMV kernel reads the codes once; else dequantize, then GEMM
    at::Tensor y = tch_peft::gemv_4bit(parts, dims, offset, x2,
                                       bias.empty() ? at::Tensor() : bias[0]);
    if (!y.defined()) {
      const at::Tensor w = tch_peft::dequantize_4bit(parts, dims, offset, x.scalar_type());
      y = bias.empty() ? at::mm(x2, w.t()) : at::addmm(bias[0], x2, w.t());
    }
    ctx->save_for_backward(parts);
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["kind"] = static_cast<int64_t>(x.scalar_type());
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = dims[0];
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["n_bias"] = static_cast<int64_t>(bias.size());
    // not a view (callers may accumulate into the output in place, as LoRA does)
    return at::_unsafe_view(y, shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto parts = ctx->get_saved_variables();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const auto kind = static_cast<at::ScalarType>(ctx->saved_data["kind"].toInt());
    const at::Tensor g = grads[0].reshape({-1, dims[0]});
    if (!ctx->needs_input_grad(0)) {
      variable_list out{at::Tensor()};
      if (ctx->saved_data["n_bias"].toInt() == 1) {
        out.push_back(ctx->needs_input_grad(1) ? g.sum(0) : at::Tensor());
      }
      out.resize(out.size() + parts.size() + 2);
      return out;
    }
    const at::Tensor w = tch_peft::dequantize_4bit(parts, dims, ctx->saved_data["offset"].toDouble(), kind);
    const at::Tensor dx = at::mm(g.to(kind), w).view(ctx->saved_data["x_shape"].toIntVector());
    variable_list out{dx};
    // the bias (a LoRA layer's trained copy requires grad), then q (frozen), dims, offset
    if (ctx->saved_data["n_bias"].toInt() == 1) {
      out.push_back(ctx->needs_input_grad(1) ? g.sum(0) : at::Tensor());
    }
    out.resize(out.size() + parts.size() + 2);
    return out;
  }
};

}  // namespace

extern "C" {

int tch_peft_linear_4bit(const at::Tensor* x, const at::Tensor* bias,
                         const at::Tensor* const* q, size_t n_q, const int64_t* dims,
                         double offset, at::Tensor** out, char** error) {
  return tch_peft::guarded<int>("tch_peft_linear_4bit", error, 1, [&] {
    const c10::DeviceGuard guard(x->device());
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < n_q; ++i) parts.push_back(q[i]->detach());
    std::vector<at::Tensor> b;
    // not detached: a LoRA layer's trained bias copy (`bias = "lora_only"`) gets its gradient
    if (bias != nullptr) b.push_back(*bias);
    *out = new at::Tensor(Linear4bitFunction::apply(*x, at::TensorList(b), at::TensorList(parts),
                                                     std::vector<int64_t>(dims, dims + 4), offset));
    return 0;
  });
}

// The kernel's bf16 dequantization alone (for Bnb4bitWeight::dequantize_to on CUDA): 0 with a
// new owned handle in `out`, 2 where the kernel does not apply (nothing done), 1 on error.
int tch_peft_dequantize_4bit(const at::Tensor* const* q, size_t n_q, const int64_t* dims,
                             double offset, at::Tensor** out, char** error) {
  return tch_peft::guarded<int>("tch_peft_dequantize_4bit", error, 1, [&] {
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < n_q; ++i) parts.push_back(*q[i]);
    if (!parts[0].is_cuda()) return 2;
    const at::Tensor w = dequantize_kernel(parts, std::vector<int64_t>(dims, dims + 4), offset,
                                           at::kBFloat16);
    if (!w.defined()) return 2;
    *out = new at::Tensor(w);
    return 0;
  });
}

}  // extern "C"
