// The LoRA Linear forward/backward as one autograd node (tch cannot define custom backward
// passes from Rust). Called from src/lora/fused.rs through a small C ABI; tensors cross as the
// `at::Tensor*` handles tch uses for `C_tensor`.
//
//   y = x Wᵀ + b + s · (x Aᵀ) Bᵀ        x: [N, in]   W: [out, in]   A: [r, in]   B: [out, r]
//
// Forward: the base GEMM (with bias) and the low-rank branch accumulated into it in place with
// one addmm_ (alpha = s, so no separate scaling kernel). A and B are cast to the base dtype
// (autocast-style) once and saved with h = x Aᵀ ([N, r]) for the backward.
//
// Backward, for an upstream gradient g: [N, out]:
//   dx = g (W + s·BA)        one GEMM writing dx once: W + s·BA is formed in [out, in] (cheap)
//                            instead of g W plus a full-size s·(gB)A plus an accumulation;
//   dA = s · (gB)ᵀ x         dB = s · gᵀ h          db = Σ_rows g (only if b requires grad)
//   dW = gᵀ x                (only if W requires grad, i.e. the base was not frozen)
// Gradients for A and B are returned in their own dtype (f32 masters on a bf16 base; on CUDA
// cuBLAS writes them in f32 directly).

#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  // `bias` is an empty placeholder when `has_bias` is false (autograd inputs must be defined).
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor w, at::Tensor bias,
                            bool has_bias, at::Tensor a, at::Tensor b, double scaling) {
    const auto kind = x.scalar_type();
    // A and B in the activations' dtype, cast once and saved for the backward (which then
    // casts nothing again)
    const at::Tensor ac = a.to(kind);
    const at::Tensor bc = b.to(kind);
    at::Tensor y = has_bias ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
    const at::Tensor h = at::mm(x, ac.t());
    y.addmm_(h, bc.t(), /*beta=*/1, /*alpha=*/scaling);
    ctx->save_for_backward({x, w, ac, bc, h});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["a_kind"] = static_cast<int64_t>(a.scalar_type());
    ctx->saved_data["b_kind"] = static_cast<int64_t>(b.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor& ac = saved[2];
    const at::Tensor& bc = saved[3];
    const at::Tensor& h = saved[4];
    const double s = ctx->saved_data["scaling"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto a_kind = static_cast<at::ScalarType>(ctx->saved_data["a_kind"].toInt());
    const auto b_kind = static_cast<at::ScalarType>(ctx->saved_data["b_kind"].toInt());
    const at::Tensor g = grads[0].contiguous();
    const auto kind = g.scalar_type();
    // f32 factors on a bf16/f16 CUDA base: cuBLAS writes their gradients in f32 directly
    // (`mm(..., out_dtype)`), unrounded and without a cast kernel
    const bool wide = g.is_cuda() && (kind == at::kBFloat16 || kind == at::kHalf);

    // needs_input_grad counts tensor inputs only (x, w, bias, a, b); the returned list has one
    // entry per forward argument, undefined for the non-tensor ones.
    at::Tensor dx, dw, db, da, dbm;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor w_eff = at::addmm(w, bc, ac, /*beta=*/1, /*alpha=*/s);  // W + s·BA
      dx = at::mm(g, w_eff);
    }
    if (ctx->needs_input_grad(1)) {
      dw = at::mm(g.t(), x);
    }
    if (has_bias && ctx->needs_input_grad(2)) {
      db = g.sum(0);
    }
    if (ctx->needs_input_grad(3)) {
      // s·gB in one GEMM: beta = 0 ignores the (uninitialised) placeholder input
      const at::Tensor gb = at::addmm(at::empty({1}, g.options()), g, bc, /*beta=*/0, /*alpha=*/s);
      da = wide && a_kind == at::kFloat ? at::mm(gb.t(), x, at::kFloat)
                                        : at::mm(gb.t(), x).to(a_kind);
    }
    if (ctx->needs_input_grad(4)) {
      dbm = wide && b_kind == at::kFloat ? at::mm(g.t(), h, at::kFloat).mul_(s)
                                         : at::mm(g.t(), h).mul_(s).to(b_kind);
    }
    return {dx, dw, db, at::Tensor(), da, dbm, at::Tensor()};
  }
};

char* copy_message(const char* what) {
  const size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

}  // namespace

extern "C" {

// Returns a new tensor handle (owned by the caller, freed by tch) or nullptr with *error set to
// a malloc'ed message the caller frees with tch_peft_free_error. `bias` may be null.
at::Tensor* tch_peft_lora_linear(const at::Tensor* x, const at::Tensor* w,
                                    const at::Tensor* bias, const at::Tensor* a,
                                    const at::Tensor* b, double scaling, char** error) {
  *error = nullptr;
  try {
    const bool has_bias = bias != nullptr;
    const at::Tensor b_or_empty = has_bias ? *bias : at::empty({0}, x->options());
    at::Tensor y = LoraLinearFunction::apply(*x, *w, b_or_empty, has_bias, *a, *b, scaling);
    return new at::Tensor(std::move(y));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message("unknown C++ exception in tch_peft_lora_linear");
  }
  return nullptr;
}

void tch_peft_free_error(char* error) { std::free(error); }

// Whether autograd records operations on this thread (c10::GradMode).
int tch_peft_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

}  // extern "C"
