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

#include "tch_peft.h"

#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// q: codes, absmax (f32, or uint8 nested codes), quant_map[, nested_absmax, nested_map];
// dims: out, in, blocksize, nested_blocksize
at::Tensor dequantize(const std::vector<at::Tensor>& q, const std::vector<int64_t>& dims,
                      double offset, at::ScalarType kind) {
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

struct Linear4bitFunction : public torch::autograd::Function<Linear4bitFunction> {
  // `bias`: empty or the bias (an undefined tensor cannot be a node input)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList bias,
                            at::TensorList q, std::vector<int64_t> dims, double offset) {
    const std::vector<at::Tensor> parts(q.begin(), q.end());
    const at::Tensor w = dequantize(parts, dims, offset, x.scalar_type());
    const at::Tensor x2 = x.reshape({-1, dims[1]});
    const at::Tensor y = bias.empty() ? at::mm(x2, w.t()) : at::addmm(bias[0], x2, w.t());
    ctx->save_for_backward(parts);
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["kind"] = static_cast<int64_t>(x.scalar_type());
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = dims[0];
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["n_bias"] = static_cast<int64_t>(bias.size());
    return y.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto parts = ctx->get_saved_variables();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const auto kind = static_cast<at::ScalarType>(ctx->saved_data["kind"].toInt());
    const at::Tensor w = dequantize(parts, dims, ctx->saved_data["offset"].toDouble(), kind);
    const at::Tensor g = grads[0].reshape({-1, dims[0]});
    const at::Tensor dx = at::mm(g.to(kind), w).view(ctx->saved_data["x_shape"].toIntVector());
    variable_list out{dx};
    // bias and q (frozen), dims, offset
    out.resize(out.size() + ctx->saved_data["n_bias"].toInt() + parts.size() + 2);
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
    if (bias != nullptr) b.push_back(bias->detach());
    *out = new at::Tensor(Linear4bitFunction::apply(*x, at::TensorList(b), at::TensorList(parts),
                                                     std::vector<int64_t>(dims, dims + 4), offset));
    return 0;
  });
}

}  // extern "C"
