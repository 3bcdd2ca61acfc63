// AdamW over many tensors in a few kernel launches: ATen's fused multi-tensor AdamW
// (`at::_fused_adamw_`, what torch.optim.AdamW(fused=True) calls) plus a multi-tensor increment
// of the step counters. Called from src/optim.rs; tensors cross as the `at::Tensor*` handles tch
// uses. Every list holds `n` tensors of one device and dtype (the caller groups them).

#include "tch_peft.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor* const* ts, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    v.push_back(*ts[i]);
  }
  return v;
}

}  // namespace

extern "C" {

// One AdamW step (decoupled weight decay, no amsgrad) over `n` parameters; `steps` are f32
// scalar tensors on the parameters' device, incremented here. 0 on success, else -1 with
// *error set to a malloc'ed message (freed with tch_peft_free_error).
int tch_peft_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                         at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                         at::Tensor* const* steps, int64_t n, double lr, double beta1,
                         double beta2, double weight_decay, double eps, char** error) {
  return tch_peft::guarded<int>("tch_peft_fused_adamw", error, -1, [&] {
    c10::AutoGradMode no_grad(false);
    const auto p = list(params, n);
    const auto g = list(grads, n);
    const auto m = list(exp_avgs, n);
    const auto v = list(exp_avg_sqs, n);
    const auto s = list(steps, n);
    at::_foreach_add_(s, 1);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  });
}

// Drops the gradients of `n` tensors (PyTorch's zero_grad(set_to_none=True)): no kernel runs,
// and the next backward writes fresh gradients instead of accumulating into zeroed ones.
void tch_peft_grads_to_none(at::Tensor* const* params, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    params[i]->mutable_grad() = at::Tensor();
  }
}

}  // extern "C"
