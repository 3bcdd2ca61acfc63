// The fused model ops as autograd nodes over the CUDA kernels of model_kernels_source.h (called
// from src/ops/): RMSNorm, SwiGLU and the rotary embedding of q and k, each one launch forward
// and one backward, saving only what the backward needs in the inputs' dtype (RMSNorm: x and
// the f32 row scale r; SwiGLU: g and u; RoPE: nothing but the tables).
//
// An entry point returns 2, having done nothing, where no kernel takes its inputs (not bf16 on
// the current CUDA device, not contiguous, a width the kernels do not handle, the kernels off or
// not compiled): src/ops/ then composes the same formula from libtorch ops.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "cuda_kernels.h"
#include "tch_peft.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace kernels = tch_peft::kernels;

constexpr int64_t kMaxInt = (int64_t{1} << 31) - 1;

bool bf16_cuda(const at::Tensor& t) {
  return t.defined() && t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.is_contiguous() &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// a gradient as the kernels read it: bf16, contiguous and 16-byte aligned (autograd may hand
// over a contiguous view at any offset, where the kernels' 16-byte loads would fault)
at::Tensor kernel_input(const at::Tensor& t) {
  at::Tensor c = t.to(at::kBFloat16).contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void launch_or_throw(const char* name, unsigned blocks, void** args) {
  if (!kernels::launch_model(kernels::model_function(name), blocks, args)) {
    throw std::runtime_error(std::string("the CUDA kernel ") + name + " failed to launch");
  }
}

unsigned grid_for(int64_t work_items, int per_sm) {
  const int64_t cap = int64_t{per_sm} * std::max(1, kernels::sm_count());
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(work_items, cap)));
}

// vectors of 8 per thread for a row of `h` values (0: no kernel)
int rms_vpt(int64_t h) {
  if (h % 8 != 0 || h == 0) return 0;
  const int64_t vec = h / 8;
  return vec <= 256 ? 1 : vec <= 512 ? 2 : vec <= 1024 ? 4 : 0;
}

// ---- RMSNorm ----

// y = rms_norm(s) (and r) with s = x, or s = bf16(x + res) written to `sum` where res is defined
void rms_forward(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, double eps,
                 at::Tensor& y, at::Tensor& sum, at::Tensor& rstd) {
  const int64_t h = x.size(-1), rows = x.numel() / std::max<int64_t>(h, 1);
  const int vpt = rms_vpt(h);
  y = at::empty_like(x);
  sum = res.defined() ? at::empty_like(x) : at::Tensor();
  rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return;
  const void* xp = x.data_ptr();
  const void* resp = res.defined() ? res.data_ptr() : nullptr;
  const void* wp = w.data_ptr();
  void* yp = y.data_ptr();
  void* sp = res.defined() ? sum.data_ptr() : nullptr;
  void* rp = rstd.data_ptr();
  int r = static_cast<int>(rows), vec = static_cast<int>(h / 8);
  float e = static_cast<float>(eps);
  void* args[] = {&xp, &resp, &wp, &yp, &sp, &rp, &r, &vec, &e};
  launch_or_throw(("rms_fwd_" + std::to_string(vpt)).c_str(), grid_for(rows, 8), args);
}

// dx (+ dsum where defined) and dw of the norm of the saved x (its r saved too)
std::pair<at::Tensor, at::Tensor> rms_backward(const at::Tensor& grad, const at::Tensor& x,
                                               const at::Tensor& w, const at::Tensor& rstd,
                                               const at::Tensor& dsum_in) {
  const c10::DeviceGuard guard(x.device());
  const at::Tensor dy = kernel_input(grad);
  const at::Tensor dsum =
      dsum_in.defined() ? kernel_input(dsum_in) : at::Tensor();
  const int64_t h = x.size(-1), rows = rstd.numel();
  const int vpt = rms_vpt(h);
  at::Tensor dx = at::empty_like(x);
  const unsigned blocks = grid_for(rows, 4);
  // every block writes its row of partials; with no rows nothing does, and dw must be 0
  at::Tensor part = rows > 0 ? at::empty({blocks, h}, x.options().dtype(at::kFloat))
                             : at::zeros({blocks, h}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    const void* gp = dy.data_ptr();
    const void* xp = x.data_ptr();
    const void* wp = w.data_ptr();
    const void* rp = rstd.data_ptr();
    const void* dsp = dsum.defined() ? dsum.data_ptr() : nullptr;
    void* dxp = dx.data_ptr();
    void* pp = part.data_ptr();
    int r = static_cast<int>(rows), vec = static_cast<int>(h / 8);
    void* args[] = {&gp, &xp, &wp, &rp, &dsp, &dxp, &pp, &r, &vec};
    launch_or_throw(("rms_bwd_" + std::to_string(vpt)).c_str(), blocks, args);
  }
  return {dx, part.sum(0).to(w.scalar_type())};
}

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    at::Tensor y, sum, rstd;
    rms_forward(x, at::Tensor(), w, eps, y, sum, rstd);
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw] = rms_backward(grads[0], saved[0], saved[1], saved[2], at::Tensor());
    return {dx, dw, at::Tensor()};
  }
};

// s = x + res and y = rms_norm(s) in one pass: the pre-norm residual stream's add and the next
// block's norm. Saves s (an output), w and r; the backward gives both addends bf16(dx + ds).
struct AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& res,
                               const at::Tensor& w, double eps) {
    at::Tensor y, sum, rstd;
    rms_forward(x, res, w, eps, y, sum, rstd);
    ctx->save_for_backward({sum, w, rstd});
    // an output nobody used then comes back undefined instead of as zeros (no [rows, H] read)
    ctx->set_materialize_grads(false);
    return {sum, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &w = saved[1];
    // an unused output's gradient is undefined (set_materialize_grads(false)): zero
    const at::Tensor dy = grads[1].defined() ? grads[1] : at::zeros_like(s);
    auto [dx, dw] = rms_backward(dy, s, w, saved[2], grads[0]);
    return {dx, dx, dw, at::Tensor()};
  }
};

// ---- SwiGLU ----

void swiglu_launch(const at::Tensor& g, const at::Tensor& u, const at::Tensor& dy, at::Tensor& y,
                   at::Tensor& dg, at::Tensor& du, bool backward) {
  const int64_t width = g.size(-1), rows = g.numel() / std::max<int64_t>(width, 1);
  if (rows == 0) return;
  const void* gp = g.data_ptr();
  const void* up = u.data_ptr();
  const void* dp = backward ? dy.data_ptr() : nullptr;
  void* yp = backward ? nullptr : y.data_ptr();
  void* dgp = backward ? dg.data_ptr() : nullptr;
  void* dup = backward ? du.data_ptr() : nullptr;
  long long r = rows, ld = width / 8;
  int vec = static_cast<int>(width / 8), bwd = backward ? 1 : 0;
  void* args[] = {&gp, &up, &dp, &yp, &dgp, &dup, &r, &vec, &ld, &ld, &bwd};
  launch_or_throw("swiglu", grid_for((rows * vec + 255) / 256, 16), args);
}

struct SwiGluFunction : public torch::autograd::Function<SwiGluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& u) {
    at::Tensor y = at::empty_like(g), none;
    swiglu_launch(g, u, none, y, none, none, false);
    ctx->save_for_backward({g, u});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const c10::DeviceGuard guard(saved[0].device());
    const at::Tensor dy = kernel_input(grads[0]);
    at::Tensor dg = at::empty_like(saved[0]), du = at::empty_like(saved[1]), none;
    swiglu_launch(saved[0], saved[1], dy, none, dg, du, true);
    return {dg, du};
  }
};

// ---- rotary embedding ----

void rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                 const at::Tensor& sin, at::Tensor& yq, at::Tensor& yk, bool backward) {
  const int64_t d = q.size(-1), seq = cos.size(0);
  const int64_t rows_q = q.numel() / d, rows_k = k.defined() ? k.numel() / d : 0;
  const int64_t work = (rows_q + rows_k) * (d / 16);
  if (work == 0) return;
  const void* qp = q.data_ptr();
  const void* kp = k.defined() ? k.data_ptr() : nullptr;
  const void* cp = cos.data_ptr();
  const void* sp = sin.data_ptr();
  void* yqp = yq.data_ptr();
  void* ykp = k.defined() ? yk.data_ptr() : nullptr;
  long long rq = rows_q, rk = rows_k;
  int hq = static_cast<int>(q.size(-2)), hk = k.defined() ? static_cast<int>(k.size(-2)) : 1;
  int s = static_cast<int>(seq), half_vec = static_cast<int>(d / 16), bwd = backward ? 1 : 0;
  void* args[] = {&qp, &kp, &cp, &sp, &yqp, &ykp, &rq, &rk, &hq, &hk, &s, &half_vec, &bwd};
  launch_or_throw("rope", grid_for((work + 255) / 256, 16), args);
}

// q [B, S, Hq, D], k [B, S, Hk, D] or empty; cos, sin [S, D]
struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin) {
    const bool has_k = k.numel() > 0;
    at::Tensor yq = at::empty_like(q), yk = has_k ? at::empty_like(k) : at::empty({0}, q.options());
    rope_launch(q, has_k ? k : at::Tensor(), cos, sin, yq, yk, false);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["has_k"] = has_k;
    return {yq, yk};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // autograd materialises a missing output gradient as zeros
    const auto saved = ctx->get_saved_variables();
    const bool has_k = ctx->saved_data["has_k"].toBool();
    const c10::DeviceGuard guard(saved[0].device());
    const at::Tensor gq = kernel_input(grads[0]);
    const at::Tensor gk = has_k ? kernel_input(grads[1]) : at::Tensor();
    at::Tensor dq = at::empty_like(gq), dk = has_k ? at::empty_like(gk) : at::Tensor();
    rope_launch(gq, gk, saved[0], saved[1], dq, dk, true);
    return {dq, dk, at::Tensor(), at::Tensor()};
  }
};

bool kernels_on() { return kernels::model_function("swiglu") != nullptr; }

}  // namespace

namespace tch_peft {

bool can_recompute_input(int64_t recipe, const std::vector<at::Tensor>& from, int64_t rows,
                         int64_t width) {
  if (from.size() != 2 || !kernels_on() || !bf16_cuda(from[0]) || !bf16_cuda(from[1]) ||
      from[1].device() != from[0].device() || from[0].dim() < 1 ||
      from[0].size(-1) != width || from[0].numel() != rows * width) {
    return false;
  }
  switch (recipe) {
    case 1:  // rms_norm(src, w): the shapes tch_peft_rms_norm takes
      return from[1].dim() == 1 && from[1].size(0) == width && rms_vpt(width) != 0 &&
             rows <= kMaxInt;
    case 2:  // swiglu(g, u)
      return from[1].sizes() == from[0].sizes() && width % 8 == 0 && width / 8 <= kMaxInt;
    default:
      return false;
  }
}

at::Tensor recompute_input(int64_t recipe, const std::vector<at::Tensor>& from, double eps) {
  const c10::DeviceGuard guard(from[0].device());
  at::Tensor y;
  if (recipe == 1) {
    at::Tensor sum, rstd;
    rms_forward(from[0], at::Tensor(), from[1], eps, y, sum, rstd);
  } else {
    y = at::empty_like(from[0]);
    at::Tensor none;
    swiglu_launch(from[0], from[1], none, y, none, none, false);
  }
  return y.view({-1, y.size(-1)});
}

}  // namespace tch_peft

extern "C" {

int tch_peft_rms_norm(const at::Tensor* x, const at::Tensor* w, double eps, at::Tensor** out,
                      char** error) {
  return tch_peft::guarded<int>("tch_peft_rms_norm", error, 1, [&] {
    const int64_t h = x->dim() >= 1 ? x->size(-1) : 0;
    if (!x->is_cuda()) return 2;
    const c10::DeviceGuard guard(x->device());
    if (!bf16_cuda(*x) || !bf16_cuda(*w) || w->dim() != 1 || w->size(0) != h ||
        w->device() != x->device() || rms_vpt(h) == 0 || x->numel() / h > kMaxInt ||
        !kernels_on()) {
      return 2;
    }
    *out = new at::Tensor(RmsNormFunction::apply(*x, *w, eps));
    return 0;
  });
}

int tch_peft_add_rms_norm(const at::Tensor* x, const at::Tensor* res, const at::Tensor* w,
                          double eps, at::Tensor** out_sum, at::Tensor** out_y, char** error) {
  return tch_peft::guarded<int>("tch_peft_add_rms_norm", error, 1, [&] {
    const int64_t h = x->dim() >= 1 ? x->size(-1) : 0;
    if (!x->is_cuda()) return 2;
    const c10::DeviceGuard guard(x->device());
    if (!bf16_cuda(*x) || !bf16_cuda(*res) || !bf16_cuda(*w) || x->sizes() != res->sizes() ||
        res->device() != x->device() || w->dim() != 1 || w->size(0) != h ||
        w->device() != x->device() || rms_vpt(h) == 0 || x->numel() / h > kMaxInt ||
        !kernels_on()) {
      return 2;
    }
    const variable_list ys = AddRmsNormFunction::apply(*x, *res, *w, eps);
    *out_sum = new at::Tensor(ys[0]);
    *out_y = new at::Tensor(ys[1]);
    return 0;
  });
}

int tch_peft_swiglu(const at::Tensor* g, const at::Tensor* u, at::Tensor** out, char** error) {
  return tch_peft::guarded<int>("tch_peft_swiglu", error, 1, [&] {
    const int64_t width = g->dim() >= 1 ? g->size(-1) : 0;
    if (!g->is_cuda()) return 2;
    const c10::DeviceGuard guard(g->device());
    if (!bf16_cuda(*g) || !bf16_cuda(*u) || g->sizes() != u->sizes() ||
        g->device() != u->device() || width % 8 != 0 || width == 0 || width / 8 > kMaxInt ||
        !kernels_on()) {
      return 2;
    }
    *out = new at::Tensor(SwiGluFunction::apply(*g, *u));
    return 0;
  });
}

int tch_peft_rope(const at::Tensor* q, const at::Tensor* k, const at::Tensor* cos,
                  const at::Tensor* sin, at::Tensor** out_q, at::Tensor** out_k, char** error) {
  return tch_peft::guarded<int>("tch_peft_rope", error, 1, [&] {
    const auto shaped = [&](const at::Tensor& t) {
      return bf16_cuda(t) && t.dim() == 4 && t.device() == q->device() &&
             t.size(1) == cos->size(0) && t.size(3) == cos->size(1) && t.size(0) == q->size(0) &&
             t.size(2) <= kMaxInt;
    };
    if (!q->is_cuda()) return 2;
    const c10::DeviceGuard guard(q->device());
    if (q->dim() != 4 || !shaped(*q) || (k != nullptr && !shaped(*k)) || !bf16_cuda(*cos) ||
        !bf16_cuda(*sin) || cos->dim() != 2 || cos->sizes() != sin->sizes() ||
        cos->device() != q->device() || sin->device() != q->device() || q->size(3) % 16 != 0 ||
        cos->size(0) > kMaxInt || !kernels_on()) {
      return 2;
    }
    const at::Tensor kk = k != nullptr ? *k : at::empty({0}, q->options());
    const variable_list ys = RopeFunction::apply(*q, kk, *cos, *sin);
    *out_q = new at::Tensor(ys[0]);
    *out_k = k != nullptr ? new at::Tensor(ys[1]) : nullptr;
    return 0;
  });
}

}  // extern "C"
