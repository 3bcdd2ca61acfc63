// The LoRA Linear forward/backward as one autograd node (tch cannot define custom backward
// passes from Rust). Called from src/lora/fused.rs through a small C ABI; tensors cross as the
// `at::Tensor*` handles tch uses for `C_tensor`.
//
//   y = x Wᵀ + b + s · (x Aᵀ) Bᵀ        x: [N, in]   W: [out, in]   A: [r, in]   B: [out, r]
//
// Forward: the low-rank branch s·(x Aᵀ) Bᵀ (+ bias) first, then the base GEMM accumulating into
// it in place (alpha = s on the thin GEMM, so no separate scaling kernel). A and B are cast to
// the base dtype (autocast-style) once and saved with h = x Aᵀ ([N, r]) for the backward.
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

// `x Wᵀ + bias + s·h Bᵀ`: the thin product `s·h Bᵀ` (+ bias, through cuBLASLt's bias epilogue)
// is written first and the base GEMM accumulates into it in place (beta = 1). The accumulation
// then happens in the base GEMM's epilogue, in f32 and overlapped with its math, instead of a
// separate read-modify-write pass over the [N, out] output after it.
at::Tensor low_rank_then_base(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias,
                              const at::Tensor& h, const at::Tensor& bc, double s) {
  at::Tensor y = bias != nullptr
                     ? at::addmm(*bias, h, bc.t(), /*beta=*/1, /*alpha=*/s)
                     // beta = 0 ignores the (uninitialised) placeholder input
                     : at::addmm(at::empty({1}, h.options()), h, bc.t(), /*beta=*/0, /*alpha=*/s);
  y.addmm_(x, w.t());
  return y;
}

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  // `bias` is an empty placeholder when `has_bias` is false (autograd inputs must be defined).
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor w, at::Tensor bias,
                            bool has_bias, at::Tensor a, at::Tensor b, double scaling) {
    const auto kind = x.scalar_type();
    // A and B in the activations' dtype, cast once and saved for the backward (which then
    // casts nothing again)
    const at::Tensor ac = a.to(kind);
    const at::Tensor bc = b.to(kind);
    const at::Tensor h = at::mm(x, ac.t());
    at::Tensor y = low_rank_then_base(x, w, has_bias ? &bias : nullptr, h, bc, scaling);
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

// DoRA on the same layer, as one autograd node (PEFT's formula without dropout):
//
//   y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias       g = m / ‖W + s·BA‖_row   (the norm detached)
//
// The row norm comes without forming W + s·BA: ‖W_i‖² (cached by the caller while W is
// unchanged) + rowsum(B ⊙ (2s·W Aᵀ + s²·B (A Aᵀ))). On a bf16/f16 CUDA weight W Aᵀ reads W once
// in its own dtype against [A_hi; A_lo] (A split into a half-precision head and tail, f32
// accumulation), which keeps A's f32 precision.
//
// Backward, for g_y: [N, out], with u = x Wᵀ + s·h Bᵀ (saved) and G = diag(g):
//   dx = g_y · G (W + s·BA)      the scale folded into the [out, in] matrix, not into g_y
//   dA = s·(g_y (G B))ᵀ x        dB = s·G (g_yᵀ h)        dm = Σ_rows(g_y ⊙ u) / ‖·‖
//   db = Σ_rows g_y              dW = G (g_yᵀ x)           (only when they require grad)
struct DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor w, at::Tensor bias,
                            bool has_bias, at::Tensor a, at::Tensor b, at::Tensor m,
                            at::Tensor w_sq, double s) {
    const auto kind = x.scalar_type();
    const auto ck = w_sq.scalar_type();  // f32 (f64 for an f64 base)
    const int64_t r = a.size(0);
    const at::Tensor ac = a.to(kind);
    const at::Tensor bc = b.to(kind);
    const at::Tensor a32 = a.to(ck);
    const at::Tensor b32 = b.to(ck);
    // 2s·W Aᵀ + s²·B (A Aᵀ): [out, r]
    at::Tensor cross;
    if (w.is_cuda() && kind != ck) {
      const at::Tensor lo = at::sub(a32, ac.to(ck)).to(kind);
      const at::Tensor wa2 = at::mm(w, at::cat({ac, lo}).t(), ck);  // [out, 2r]
      cross = at::addmm(wa2.narrow(1, 0, r), b32, at::mm(a32, a32.t()), 2 * s, s * s);
      cross.add_(wa2.narrow(1, r, r), 2 * s);
    } else {
      const at::Tensor wa = at::mm(w.to(ck), a32.t());
      cross = at::addmm(wa, b32, at::mm(a32, a32.t()), 2 * s, s * s);
    }
    // rounding can take an exactly-zero row slightly negative
    const at::Tensor norm = at::sum(at::mul(b32, cross), {1}).add_(w_sq).clamp_min_(0).sqrt_();
    const at::Tensor g = at::div(m.to(ck), norm);
    const at::Tensor gk = g.to(kind);
    const at::Tensor h = at::mm(x, ac.t());
    const at::Tensor u = low_rank_then_base(x, w, nullptr, h, bc, s);
    at::Tensor y = has_bias ? at::addcmul(bias, u, gk) : at::mul(u, gk);
    ctx->save_for_backward({x, w, ac, bc, h, u, g, norm});
    ctx->saved_data["scaling"] = s;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["a_kind"] = static_cast<int64_t>(a.scalar_type());
    ctx->saved_data["b_kind"] = static_cast<int64_t>(b.scalar_type());
    ctx->saved_data["m_kind"] = static_cast<int64_t>(m.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor& ac = saved[2];
    const at::Tensor& bc = saved[3];
    const at::Tensor& h = saved[4];
    const at::Tensor& u = saved[5];
    const at::Tensor& g = saved[6];
    const at::Tensor& norm = saved[7];
    const double s = ctx->saved_data["scaling"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto a_kind = static_cast<at::ScalarType>(ctx->saved_data["a_kind"].toInt());
    const auto b_kind = static_cast<at::ScalarType>(ctx->saved_data["b_kind"].toInt());
    const auto m_kind = static_cast<at::ScalarType>(ctx->saved_data["m_kind"].toInt());
    const at::Tensor gy = grads[0].contiguous();
    const auto kind = gy.scalar_type();
    const auto ck = g.scalar_type();
    const bool wide = gy.is_cuda() && (kind == at::kBFloat16 || kind == at::kHalf);
    const at::Tensor gcol = g.unsqueeze(1);  // [out, 1]
    const at::Tensor gk = gcol.to(kind);

    // inputs: x 0, w 1, bias 2, a 3, b 4, m 5, w_sq 6 (tensors only, as needs_input_grad counts)
    at::Tensor dx, dw, db, da, dbm, dm;
    if (ctx->needs_input_grad(0)) {
      // G (W + s·BA): [out, in]
      const at::Tensor w_eff = at::addmm(w, bc, ac, /*beta=*/1, /*alpha=*/s).mul_(gk);
      dx = at::mm(gy, w_eff);
    }
    if (ctx->needs_input_grad(1)) {
      dw = at::mm(gy.t(), x).mul_(gk);
    }
    if (has_bias && ctx->needs_input_grad(2)) {
      db = gy.sum(0);
    }
    if (ctx->needs_input_grad(3)) {
      const at::Tensor gb =
          at::addmm(at::empty({1}, gy.options()), gy, at::mul(bc, gk), /*beta=*/0, /*alpha=*/s);
      da = wide && a_kind == at::kFloat ? at::mm(gb.t(), x, at::kFloat)
                                        : at::mm(gb.t(), x).to(a_kind);
    }
    if (ctx->needs_input_grad(4)) {
      const at::Tensor gth =
          wide && b_kind == at::kFloat ? at::mm(gy.t(), h, at::kFloat) : at::mm(gy.t(), h);
      dbm = gth.to(ck).mul_(gcol).mul_(s).to(b_kind);
    }
    if (ctx->needs_input_grad(5)) {
      dm = at::sum(at::mul(gy, u), {0}, /*keepdim=*/false, ck).div_(norm).to(m_kind);
    }
    return {dx, dw, db, at::Tensor(), da, dbm, dm, at::Tensor(), at::Tensor()};
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

// DoRA: as tch_peft_lora_linear, plus the magnitude `m` [out] and the cached ‖W_i‖² `w_sq` [out]
// (f32, or f64 for an f64 base).
at::Tensor* tch_peft_dora_linear(const at::Tensor* x, const at::Tensor* w, const at::Tensor* bias,
                                 const at::Tensor* a, const at::Tensor* b, const at::Tensor* m,
                                 const at::Tensor* w_sq, double scaling, char** error) {
  *error = nullptr;
  try {
    const bool has_bias = bias != nullptr;
    const at::Tensor b_or_empty = has_bias ? *bias : at::empty({0}, x->options());
    at::Tensor y =
        DoraLinearFunction::apply(*x, *w, b_or_empty, has_bias, *a, *b, *m, *w_sq, scaling);
    return new at::Tensor(std::move(y));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message("unknown C++ exception in tch_peft_dora_linear");
  }
  return nullptr;
}

void tch_peft_free_error(char* error) { std::free(error); }

// Whether autograd records operations on this thread (c10::GradMode).
int tch_peft_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

}  // extern "C"
