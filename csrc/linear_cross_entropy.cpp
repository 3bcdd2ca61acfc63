// The fused linear cross-entropy as an autograd node: the loss of a linear head over token
// states without the full [N, V] logits in memory (called from src/ops/cross_entropy.rs).
//
//   loss = Σ_{i valid} (logsumexp_v z_iv − z_i,y_i) / divisor      z = h Wᵀ (+ b)
//
// h: [N, H], W: [V, H], b: [V] or none, y: [N] int64 with `ignore_index` rows left out; divisor
// = the number of valid rows (reduction "mean", as torch's cross_entropy) or 1 ("sum").
//
// Forward runs over row chunks of `chunk` tokens. Per chunk: z = h_c Wᵀ + b in the head's dtype
// (cuBLAS accumulates in f32), then in f32 the row logsumexp, the loss terms and the logits'
// gradient g = (softmax(z) − onehot(y)) / divisor (0 on ignored rows), which goes straight into
//   dh_c = g W          dW += gᵀ h_c          db += Σ_rows g
// (each only if that input needs a gradient) — the chunk's logits are then dropped, so the peak
// is one chunk's [chunk, V] instead of N's. On CUDA with a bf16 head (V a multiple of 8) the
// softmax, the loss terms and g are one kernel over the bf16 logits, g written over them in bf16
// (model_kernels_source.h's softmax_ce), and dW accumulates in f32 straight from the bf16 GEMM
// (cuBLAS's bf16 inputs, f32 output); elsewhere they are ATen ops on an f32 copy. The gradients
// are saved; the backward scales them by the upstream gradient (a scalar), as Liger's fused
// linear cross-entropy does.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <c10/core/DeviceGuard.h>

#include "cuda_kernels.h"
#include "tch_peft.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearCrossEntropyFunction
    : public torch::autograd::Function<LinearCrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w,
                            const at::Tensor& bias, const at::Tensor& labels,
                            int64_t ignore_index, int64_t chunk, bool mean, int64_t wanted) {
    // which gradients to form: decided by the caller, where grad mode is the user's (autograd
    // runs forward with it off)
    const bool has_bias = bias.numel() > 0;
    const bool grad_h = (wanted & 1) != 0;
    const bool grad_w = (wanted & 2) != 0;
    const bool grad_b = has_bias && (wanted & 4) != 0;
    at::NoGradGuard no_grad;
    const c10::DeviceGuard device(h.device());
    const int64_t n = h.size(0), v = w.size(0);
    const at::Tensor y = labels.contiguous();
    const at::Tensor valid = y.ne(ignore_index);
    const at::Tensor count = valid.sum().to(at::kFloat);
    // mean: 1 / count (inf when nothing is valid: the loss is then 0·inf = NaN, as torch's)
    const at::Tensor inv = mean ? count.reciprocal() : at::ones({}, count.options());
    const bool half_cuda = w.is_cuda() && h.scalar_type() == w.scalar_type() &&
                           (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf);
    // the fused softmax kernel (null where it cannot run: the ATen ops below instead)
    const bool kernel_takes = half_cuda && w.scalar_type() == at::kBFloat16 && v % 8 == 0 &&
                              v / 8 <= INT32_MAX - 1024 && chunk <= INT32_MAX;
    void* const softmax_ce =
        kernel_takes ? tch_peft::kernels::model_function("softmax_ce") : nullptr;
    at::Tensor loss = at::zeros({}, h.options().dtype(at::kFloat));
    at::Tensor row_loss = softmax_ce != nullptr ? at::empty({n}, loss.options()) : at::Tensor();
    at::Tensor dh = grad_h ? at::empty(h.sizes(), h.options()) : at::Tensor();
    at::Tensor dw = grad_w ? at::zeros(w.sizes(), w.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor db = grad_b ? at::zeros(bias.sizes(), bias.options().dtype(at::kFloat))
                           : at::Tensor();
    const bool any_grad = grad_h || grad_w || grad_b;
    const at::Tensor wt = w.t();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      const at::Tensor hc = h.narrow(0, start, len);
      const at::Tensor yc = y.narrow(0, start, len);
      at::Tensor z = has_bias ? at::addmm(bias, hc, wt) : at::mm(hc, wt);
      at::Tensor g;
      if (softmax_ce != nullptr) {
        void* zp = z.data_ptr();  // mm/addmm's fresh output: contiguous
        const void* yp = yc.data_ptr();
        const void* ip = inv.data_ptr();
        void* lp = row_loss.narrow(0, start, len).data_ptr();
        int rows = static_cast<int>(len), vec = static_cast<int>(v / 8), write = any_grad;
        long long ignore = ignore_index;
        void* args[] = {&zp, &yp, &ip, &lp, &rows, &vec, &ignore, &write};
        const int64_t blocks =
            std::min<int64_t>(len, 8 * std::max(1, tch_peft::kernels::sm_count()));
        if (!tch_peft::kernels::launch_model(softmax_ce, static_cast<unsigned>(blocks), args)) {
          throw std::runtime_error("the CUDA kernel softmax_ce failed to launch");
        }
        if (!any_grad) continue;
        g = z;
        if (grad_b) db.add_(g.sum(0, false, at::kFloat));
      } else {
        const at::Tensor vc = valid.narrow(0, start, len);
        z = z.to(at::kFloat);
        const at::Tensor lse = at::logsumexp(z, {1});
        // an ignored row's label may be anything: gather at 0 there and drop the term
        const at::Tensor safe = at::where(vc, yc, at::zeros_like(yc));
        const at::Tensor target = z.gather(1, safe.unsqueeze(1)).squeeze(1);
        loss.add_(at::where(vc, lse - target, at::zeros_like(lse)).sum());
        if (!any_grad) continue;
        // g = (softmax − onehot) · inv on valid rows, 0 on the rest, in place of z
        z.sub_(lse.unsqueeze(1)).exp_();
        z.scatter_add_(1, safe.unsqueeze(1), at::full({len, 1}, -1.0, z.options()));
        // (ignored rows scaled by 0, not by inv: inv is inf when every row is ignored)
        z.mul_(at::where(vc, inv, at::zeros_like(inv)).unsqueeze(1));
        if (grad_b) db.add_(z.sum(0));
        g = z.to(w.scalar_type());
      }
      if (grad_h) {
        at::Tensor dh_c = dh.narrow(0, start, len);
        at::mm_out(dh_c, g, w);
      }
      if (grad_w) {
        if (half_cuda) {
          // dW += gᵀ h_c on tensor cores, accumulated in the f32 dW
          at::addmm_out(dw, dw, g.t(), hc, at::kFloat);
        } else {
          dw.addmm_(g.t().to(at::kFloat), hc.to(at::kFloat));
        }
      }
    }
    if (softmax_ce != nullptr) loss = row_loss.sum();
    loss.mul_(inv);
    ctx->saved_data["dh"] = dh;
    ctx->saved_data["dw"] = grad_w ? dw.to(w.scalar_type()) : at::Tensor();
    ctx->saved_data["db"] = grad_b ? db.to(bias.scalar_type()) : at::Tensor();
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor g = grads[0];
    auto scaled = [&](const char* name) {
      const at::Tensor t = ctx->saved_data[name].toTensor();
      return t.defined() ? t * g.to(t.scalar_type()) : at::Tensor();
    };
    // h, w, bias, labels, ignore_index, chunk, mean, wanted
    return {scaled("dh"), scaled("dw"), scaled("db"), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

int tch_peft_linear_cross_entropy(const at::Tensor* h, const at::Tensor* w,
                                  const at::Tensor* bias, const at::Tensor* labels,
                                  int64_t ignore_index, int64_t chunk, int mean,
                                  at::Tensor** out, char** error) {
  return tch_peft::guarded<int>("tch_peft_linear_cross_entropy", error, 1, [&] {
    // no bias: an empty tensor (the node's inputs are all defined)
    const at::Tensor b = bias != nullptr ? *bias : at::empty({0}, w->options());
    const bool grad = c10::GradMode::is_enabled();
    const int64_t wanted = (grad && h->requires_grad() ? 1 : 0) |
                           (grad && w->requires_grad() ? 2 : 0) |
                           (grad && bias != nullptr && bias->requires_grad() ? 4 : 0);
    const at::Tensor loss = LinearCrossEntropyFunction::apply(*h, *w, b, *labels, ignore_index,
                                                              chunk, mean != 0, wanted);
    *out = new at::Tensor(loss);
    return 0;
  });
}

}  // extern "C"
