// The LoRA and DoRA Linear forward/backward as autograd nodes (tch cannot define custom
// backward passes from Rust). Called from src/lora/fused.rs through a small C ABI; tensors cross
// as the `at::Tensor*` handles tch uses for `C_tensor`.
//
// LoRA (and DoRA, further down), for one layer or several on the same input
// (LoraGroupFunction below):
//
//   y = x Wᵀ + b + s · (x Aᵀ) Bᵀ        x: [N, in]   W: [out, in]   A: [r, in]   B: [out, r]
//
// Forward: the low-rank branch s·(x Aᵀ) Bᵀ (+ bias) first, then the base GEMM accumulating into
// it in place (alpha = s on the thin GEMM, so no separate scaling kernel). A and B are cast to
// the base dtype (autocast-style) once and saved with h = x Aᵀ ([N, r]) for the backward.
// x itself is saved too, unless the caller names how its producer made it (an RMSNorm or a
// SwiGLU whose own node keeps its inputs anyway): then the backward replays that kernel, bit
// for bit, and x's [N, in] is not held between forward and backward.
//
// Backward, for an upstream gradient g: [N, out]:
//   dx = g (W + s·BA)        one GEMM against W + s·BA formed in [out, in] (cheap when out is
//                            small against N) or g W plus one thin accumulate (gB)·A, never a
//                            separate full-size product and sum;
//   dA = s · (gB)ᵀ x         dB = s · gᵀ h          db = Σ_rows g (only if b requires grad)
//   dW = gᵀ x                (only if W requires grad, i.e. the base was not frozen)
// Gradients for A and B are returned in their own dtype (f32 masters on a bf16 base; on CUDA
// cuBLAS writes them in f32 directly).

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "cuda_kernels.h"
#include "tch_peft.h"

#include <algorithm>
#include <tuple>
#include <vector>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// s·a·b in one GEMM (beta = 0 ignores the uninitialised placeholder input).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double s) {
  return at::addmm(at::empty({1}, a.options()), a, b, /*beta=*/0, /*alpha=*/s);
}

// lhs·rhs for a factor's gradient, in `kind`: on a bf16/f16 CUDA base (`wide`) with f32
// factors cuBLAS writes it in f32 directly (`mm(…, out_dtype)`), unrounded and without a cast.
at::Tensor factor_grad(const at::Tensor& lhs, const at::Tensor& rhs, at::ScalarType kind,
                       bool wide) {
  return wide && kind == at::kFloat ? at::mm(lhs, rhs, at::kFloat) : at::mm(lhs, rhs).to(kind);
}

// The low-rank outputs s_i·h_i B_iᵀ (+ bias_i) of a group's members, written before the base
// GEMMs accumulate into them in place (beta = 1): the accumulation then happens in the base
// GEMM's epilogue, in f32 and overlapped with its math, instead of a separate read-modify-write
// pass over the [N, out] output after it. One run-time compiled kernel launch for the whole
// group where it runs (bf16 on CUDA), else one cuBLAS GEMM per member (the bias through
// cuBLASLt's epilogue). h_all: [N, R], each member's columns from its term's offset.
std::vector<at::Tensor> low_rank_outputs(const at::Tensor& h_all,
                                         const std::vector<tch_peft::kernels::UpTerm>& terms) {
  std::vector<at::Tensor> ys;
  if (tch_peft::kernels::lora_up(h_all, terms, ys)) return ys;
  for (const auto& t : terms) {
    const at::Tensor h = h_all.narrow(1, t.h_offset, t.b->size(1));
    ys.push_back(t.bias != nullptr
                     ? at::addmm(*t.bias, h, t.b->t(), /*beta=*/1, /*alpha=*/t.scaling)
                     : scaled_mm(h, t.b->t(), t.scaling));
  }
  return ys;
}

// DoRA on the same layer (a DoRA member of the same node; PEFT's formula without dropout):
//
//   y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias       g = m / ‖W + s·BA‖_row   (the norm detached)
//
// The row norm comes without forming W + s·BA: ‖W_i‖² (cached by the caller while W is
// unchanged) + rowsum(B ⊙ (2s·W Aᵀ + s²·B (A Aᵀ))). On a bf16/f16 CUDA weight W Aᵀ reads W once
// in its own dtype against [A_hi; A_lo] (A split into a half-precision head and tail, f32
// accumulation), which keeps A's f32 precision.
//
// The scale g rides on the weights, not on the [N, out] activations: with W_g = G W and
// B_g = G B (G = diag(g), [out, in] and [out, r]), y = x W_gᵀ + s·h B_gᵀ + bias is the LoRA
// forward on scaled weights (no pass over the output), and W_g is saved for the backward:
//   dx = g_y (W_g + s·B_g A)     dA = s·(g_y B_g)ᵀ x     dB = s·G (g_yᵀ h)
//   dm = Σ_rows(g_y ⊙ u)/‖·‖ with u = (y − bias)/g, i.e. Σ_rows(g_y ⊙ (y − bias)) / m
//   db = Σ_rows g_y              dW = G (g_yᵀ x)           (only when they require grad)
// The output y is saved (not u): modifying it in place before the backward is an autograd
// error. A magnitude entry that is exactly 0 gets a zero gradient here (its column of u is not
// recoverable from y); the composed path (`set_fused(false)`) gives Σ_rows(g_y ⊙ u)/‖·‖.
// (The node is LoraGroupFunction's DoRA member, after the weight-side part of its forward.)

// What DoRA's forward computes from the weights alone (not from x): A in the base dtype, the
// scale g = m/‖W + s·BA‖ ([out, 1], compute kind), W_g = G·W, B_g = G·B (base dtype) and 1/m (0
// where m is 0).
struct DoraPrep {
  at::Tensor ac, g, w_g, b_g, inv_m;
};

DoraPrep dora_prep(at::ScalarType kind, const at::Tensor& w, const at::Tensor& a,
                   const at::Tensor& b, const at::Tensor& m, const at::Tensor& w_sq, double s) {
  const auto ck = w_sq.scalar_type();  // f32 (f64 for an f64 base)
  const int64_t r = a.size(0);
  const int64_t out = w.size(0);
  const at::Tensor a32 = a.to(ck);
  const at::Tensor b32 = b.to(ck);
  const auto base = w.options().dtype(kind);
  // Launches are what this costs on the host (the step is launch-bound around it), so casts
  // ride on the ops that need them: `*_out` into a tensor of the base dtype computes in the
  // promoted type and rounds once.
  DoraPrep p;
  at::Tensor cross;  // 2s·W Aᵀ + s²·B (A Aᵀ): [out, r]
  if (w.is_cuda() && kind != ck) {
    // [A_hi; A_lo] in the base dtype: A_hi = A rounded, A_lo = A − A_hi rounded
    const at::Tensor split = at::empty({2 * r, a.size(1)}, base);
    p.ac = split.narrow(0, 0, r);
    p.ac.copy_(a);
    at::Tensor lo = split.narrow(0, r, r);
    at::sub_out(lo, a32, p.ac);
    const at::Tensor wa2 = at::mm(w, split.t(), ck);  // [out, 2r]
    const at::Tensor aat = at::mm(a32, a32.t());
    // the rest (norm, scale, W_g, B_g, 1/m) in one pass over W where the kernel runs
    at::Tensor g;
    if (kind == at::kBFloat16 && tch_peft::kernels::dora_scale(w, wa2, b32, aat, m.to(ck), w_sq,
                                                                s, p.w_g, p.b_g, g, p.inv_m)) {
      p.g = g.unsqueeze(1);
      return p;
    }
    cross = at::addmm(wa2.narrow(1, 0, r), b32, aat, 2 * s, s * s);
    cross.add_(wa2.narrow(1, r, r), 2 * s);
  } else {
    p.ac = a.to(kind);
    cross = at::addmm(at::mm(w.to(ck), a32.t()), b32, at::mm(a32, a32.t()), 2 * s, s * s);
  }
  // ‖·‖² = ‖W_i‖² + B_i · cross_i, one batched product; then 1/‖·‖ (rounding can take an
  // exactly-zero row slightly negative)
  const at::Tensor inv_norm =
      at::baddbmm(w_sq.view({out, 1, 1}), b32.view({out, 1, r}), cross.view({out, r, 1}))
          .view({out})
          .clamp_min_(0)
          .rsqrt_();
  p.g = at::mul(m.to(ck), inv_norm).unsqueeze(1);
  // W_g: g rounded to the base dtype first, so the weight-sized product runs without casts
  p.w_g = at::mul(w, p.g.to(kind));
  p.b_g = at::empty({out, r}, base);
  at::mul_out(p.b_g, b32, p.g);
  p.inv_m = at::reciprocal(m.to(ck)).nan_to_num_(0.0, 0.0, 0.0);
  return p;
}

// A DoRA layer's dm = Σ_rows(g_y ⊙ (y − bias))/m and db = Σ_rows g_y (each only when wanted) in
// one pass over g_y and the saved output y: the run-time compiled kernel (bf16 on CUDA), else
// CUDA's batch-norm backward reduction (with mean = bias and invstd = 1/m it is exactly this, in
// f32; an f32 `weight` selects its mixed-precision kernel, its value unused), else composed ops.
std::pair<at::Tensor, at::Tensor> dora_reductions(const at::Tensor& gy, const at::Tensor& y,
                                                  const at::Tensor& bias,
                                                  const at::Tensor& inv_m, at::ScalarType m_kind,
                                                  bool want_dm, bool want_db) {
  const auto kind = gy.scalar_type();
  const auto ck = inv_m.scalar_type();
  const bool has_bias = bias.defined();
  // the bias in the compute kind, for both reductions that subtract it
  const at::Tensor bias_ck = has_bias && want_dm && gy.is_cuda() ? bias.to(ck) : at::Tensor();
  at::Tensor dm, db, dot, sum;
  if (want_dm && tch_peft::kernels::column_dot(gy, y, bias_ck, inv_m, want_db, dot, sum)) {
    dm = dot.to(m_kind);
    if (want_db) {
      db = sum.to(kind);
    }
  } else if (want_dm && gy.is_cuda()) {
    const at::Tensor mean = has_bias ? bias_ck : at::zeros_like(inv_m);
    auto reduced = at::batch_norm_backward_reduce(gy, y, mean, inv_m, inv_m,
                                                  /*input_g=*/false, /*weight_g=*/true, want_db);
    dm = std::get<2>(reduced).to(m_kind);
    if (want_db) {
      db = std::get<3>(reduced).to(kind);
    }
  } else {
    if (want_db) {
      db = gy.sum(0);
    }
    if (want_dm) {
      const at::Tensor centred = has_bias ? at::sub(y, bias) : y;
      dm = at::sum(at::mul(gy, centred), {0}, /*keepdim=*/false, ck).mul_(inv_m).to(m_kind);
    }
  }
  return {dm, db};
}

// LoRA and DoRA Linear layers on one input — a single layer, or several that share it (q/k/v
// of an attention block, gate/up of an MLP) — as one autograd node with one output per layer:
//
//   y_i = x W_iᵀ + b_i + s_i·(x A_iᵀ) B_iᵀ        (DoRA: W_i, B_i scaled by G_i, see above)
//
// What sharing the input saves: forward, one GEMM x·[A_1; …; A_n]ᵀ reads x once for every
// branch; backward, one GEMM [g_1 B_1 s_1 | …]ᵀ·x reads it once for every A gradient, and the
// input gradients accumulate inside the GEMMs (dx = g_1 W'_1, then beta = 1 for the others)
// instead of in separate additions; for wide groups the low-rank part of dx is one more GEMM
// for the whole group instead of a rewritten copy of every weight. Outputs nobody used get an
// undefined gradient and are skipped. A DoRA member is a LoRA member on its scaled weights
// (W_g, B_g) whose B and W gradients take one more factor G and whose magnitude gradient comes
// from dora_reductions over its saved output.
struct LoraGroupFunction : public torch::autograd::Function<LoraGroupFunction> {
  // `biases` holds the defined biases only, `bias_of[i]` is layer i's index there or -1; `ms`
  // and `w_sqs` hold the DoRA members' magnitudes and cached ‖W_i‖², `dora_of[i]` is layer i's
  // index there or -1.
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::TensorList ws,
                               at::TensorList as, at::TensorList bs, at::TensorList biases,
                               at::TensorList ms, at::TensorList w_sqs, at::TensorList from,
                               at::TensorList qs, std::vector<int64_t> bias_of,
                               std::vector<int64_t> dora_of, std::vector<double> scalings,
                               int64_t recipe, double eps, std::vector<int64_t> q_counts,
                               std::vector<int64_t> q_dims, std::vector<double> q_offsets) {
    // outputs nobody used keep an undefined gradient (skipped below) instead of zeros
    ctx->set_materialize_grads(false);
    const auto kind = x.scalar_type();
    const size_t n = ws.size();
    std::vector<int64_t> offsets(n + 1, 0);
    std::vector<DoraPrep> preps(n);
    // each member's W: its weight, or a 4-bit member's dequantized for this forward
    std::vector<at::Tensor> w_in(n);
    // a 4-bit LoRA member's x·deq(W)ᵀ by the GEMV kernel, for a few rows (decoding)
    std::vector<at::Tensor> base_out(n);
    const std::vector<at::Tensor> q_all(qs.begin(), qs.end());
    bool all_dora = true;
    for (size_t i = 0, q_next = 0; i < n; ++i) {
      offsets[i + 1] = offsets[i] + as[i].size(0);
      if (q_counts[i] > 0) {
        const std::vector<at::Tensor> parts(q_all.begin() + q_next,
                                            q_all.begin() + q_next + q_counts[i]);
        q_next += q_counts[i];
        const std::vector<int64_t> dims_i(q_dims.begin() + 4 * i, q_dims.begin() + 4 * i + 4);
        if (dora_of[i] < 0) {
          base_out[i] = tch_peft::gemv_4bit(parts, dims_i, q_offsets[i], x, at::Tensor());
        }
        if (!base_out[i].defined()) {
          w_in[i] = tch_peft::dequantize_4bit(parts, dims_i, q_offsets[i], kind);
        }
      } else {
        w_in[i] = ws[i];
      }
      const int64_t j = dora_of[i];
      if (j >= 0) {
        preps[i] = dora_prep(kind, w_in[i], as[i], bs[i], ms[j], w_sqs[j], scalings[i]);
      }
      all_dora = all_dora && j >= 0;
    }
    // [R, in] in the base dtype: the DoRA preps already hold their A cast
    at::Tensor a_all;
    if (all_dora) {
      std::vector<at::Tensor> acs;
      for (const DoraPrep& p : preps) acs.push_back(p.ac);
      a_all = n == 1 ? acs[0] : at::cat(acs);
    } else {
      a_all = (n == 1 ? as[0] : at::cat(as)).to(kind);
    }
    const at::Tensor h_all = at::mm(x, a_all.t());  // [N, R]
    std::vector<at::Tensor> w_used(n), b_used(n);
    std::vector<tch_peft::kernels::UpTerm> terms;
    for (size_t i = 0; i < n; ++i) {
      const bool dora = dora_of[i] >= 0;
      w_used[i] = dora ? preps[i].w_g : w_in[i];
      b_used[i] = dora ? preps[i].b_g : bs[i].to(kind);
      const at::Tensor* bias = bias_of[i] >= 0 ? &biases[bias_of[i]] : nullptr;
      terms.push_back({&b_used[i], bias, offsets[i], scalings[i]});
    }
    variable_list ys = low_rank_outputs(h_all, terms);
    for (size_t i = 0; i < n; ++i) {
      if (base_out[i].defined()) {
        ys[i].add_(base_out[i]);
      } else {
        ys[i].addmm_(x, w_used[i].t());  // + x W_iᵀ, beta = 1
      }
    }
    // x, unless its producer's recipe can replay it in the backward from tensors that
    // producer's own node keeps anyway (then those are saved, and x is freed after the forward)
    const std::vector<at::Tensor> from_list(from.begin(), from.end());
    const bool recompute =
        recipe != 0 && tch_peft::can_recompute_input(recipe, from_list, x.size(0), x.size(1));
    std::vector<at::Tensor> to_save{recompute ? at::Tensor() : x, a_all, h_all};
    std::vector<at::Tensor> dora_saved;
    std::vector<int64_t> m_kinds;
    for (size_t i = 0; i < n; ++i) {
      // a 4-bit member's W (or W_g) is formed again in the backward from its parts
      to_save.push_back(q_counts[i] > 0 ? at::Tensor() : w_used[i]);
      to_save.push_back(b_used[i]);
      if (dora_of[i] >= 0) {
        const at::Tensor* bias = terms[i].bias;
        // the output itself (not u = (y − bias)/g): modifying it in place before the backward
        // is an autograd error
        dora_saved.insert(dora_saved.end(), {ys[i], preps[i].g, preps[i].inv_m,
                                             bias != nullptr ? *bias : at::Tensor()});
        m_kinds.push_back(static_cast<int64_t>(ms[dora_of[i]].scalar_type()));
      }
    }
    to_save.insert(to_save.end(), dora_saved.begin(), dora_saved.end());
    if (recompute) to_save.insert(to_save.end(), from_list.begin(), from_list.end());
    ctx->saved_data["q_first"] = static_cast<int64_t>(to_save.size());
    to_save.insert(to_save.end(), q_all.begin(), q_all.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["q_counts"] = q_counts;
    ctx->saved_data["q_dims"] = q_dims;
    ctx->saved_data["q_offsets"] = q_offsets;
    ctx->saved_data["n_qs"] = static_cast<int64_t>(q_all.size());
    ctx->saved_data["recipe"] = recompute ? recipe : int64_t{0};
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["n_from"] = static_cast<int64_t>(from.size());
    ctx->saved_data["offsets"] = offsets;
    ctx->saved_data["bias_of"] = bias_of;
    ctx->saved_data["dora_of"] = dora_of;
    ctx->saved_data["scalings"] = scalings;
    std::vector<int64_t> a_kinds, b_kinds;
    for (size_t i = 0; i < n; ++i) {
      a_kinds.push_back(static_cast<int64_t>(as[i].scalar_type()));
      b_kinds.push_back(static_cast<int64_t>(bs[i].scalar_type()));
    }
    ctx->saved_data["a_kinds"] = a_kinds;
    ctx->saved_data["b_kinds"] = b_kinds;
    ctx->saved_data["m_kinds"] = m_kinds;
    ctx->saved_data["n_biases"] = static_cast<int64_t>(biases.size());
    return ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& a_all = saved[1];
    const at::Tensor& h_all = saved[2];
    const auto offsets = ctx->saved_data["offsets"].toIntVector();
    const auto bias_of = ctx->saved_data["bias_of"].toIntVector();
    const auto dora_of = ctx->saved_data["dora_of"].toIntVector();
    const auto scalings = ctx->saved_data["scalings"].toDoubleVector();
    const auto a_kinds = ctx->saved_data["a_kinds"].toIntVector();
    const auto b_kinds = ctx->saved_data["b_kinds"].toIntVector();
    const auto m_kinds = ctx->saved_data["m_kinds"].toIntVector();
    const int64_t n_biases = ctx->saved_data["n_biases"].toInt();
    const size_t n = scalings.size();
    const size_t n_dora = m_kinds.size();
    const int64_t recipe = ctx->saved_data["recipe"].toInt();
    const int64_t n_from = ctx->saved_data["n_from"].toInt();
    const auto q_counts = ctx->saved_data["q_counts"].toIntVector();
    const auto q_dims = ctx->saved_data["q_dims"].toIntVector();
    const auto q_offsets = ctx->saved_data["q_offsets"].toDoubleVector();
    const int64_t n_qs = ctx->saved_data["n_qs"].toInt();
    // where each 4-bit member's parts start among the saved tensors
    std::vector<int64_t> q_start(n, 0);
    for (size_t i = 0, next = ctx->saved_data["q_first"].toInt(); i < n; ++i) {
      q_start[i] = static_cast<int64_t>(next);
      next += q_counts[i];
    }
    const int64_t big_r = offsets[n];
    const int64_t rows = h_all.size(0);
    const auto kind = a_all.scalar_type();  // the base dtype, as x's
    const bool wide = h_all.is_cuda() && (kind == at::kBFloat16 || kind == at::kHalf);
    // x as saved, or replayed by its producer's kernel on first use (bit for bit)
    at::Tensor x_replayed;
    const auto input = [&]() -> const at::Tensor& {
      if (recipe == 0) return saved[0];
      if (!x_replayed.defined()) {
        const size_t first = 3 + 2 * n + 4 * n_dora;
        x_replayed = tch_peft::recompute_input(
            recipe, {saved[first], saved[first + 1]}, ctx->saved_data["eps"].toDouble());
      }
      return x_replayed;
    };
    // tensor inputs, flattened: x, ws (n), as (n), bs (n), biases, ms, w_sqs
    const auto w_index = [](size_t i) { return 1 + i; };
    const auto a_index = [n](size_t i) { return 1 + n + i; };
    const auto b_index = [n](size_t i) { return 1 + 2 * n + i; };
    const auto bias_index = [n](int64_t j) { return 1 + 3 * n + static_cast<size_t>(j); };
    const auto m_index = [n, n_biases](int64_t j) {
      return 1 + 3 * n + static_cast<size_t>(n_biases + j);
    };

    at::Tensor dx;
    std::vector<at::Tensor> dws(n), das(n), dbs(n), dbiases(n_biases), dms(n_dora),
        dw_sqs(n_dora);
    bool any_a = false;
    int64_t sum_out = 0;
    for (size_t i = 0; i < n; ++i) {
      any_a = any_a || ctx->needs_input_grad(a_index(i));
      sum_out += grads[i].defined() ? grads[i].size(1) : 0;
    }
    // dx = Σ g_i (W_i + s_i·B_i A_i): forming each W_i + s_i·B_i A_i copies and rewrites the
    // weights (≈ 4·Σ out_i·in element moves), while Σ g_i W_i followed by one thin accumulate of
    // [s_i·g_i B_i]·[A_i] reads and writes dx once more (≈ 2·N·in): the cheaper one is taken
    // (wide groups such as gate/up go thin)
    const bool thin = ctx->needs_input_grad(0) && rows < 2 * sum_out;
    const bool need_gb = any_a || thin;
    // s_i·g_i B_i side by side: [N, R] (zero where an output got no gradient)
    const at::Tensor gb_all =
        need_gb ? at::empty({rows, big_r}, h_all.options()) : at::Tensor();
    for (size_t i = 0; i < n; ++i) {
      const int64_t r = offsets[i + 1] - offsets[i];
      if (!grads[i].defined()) {
        if (need_gb) {
          gb_all.narrow(1, offsets[i], r).zero_();
        }
        continue;
      }
      const at::Tensor g = grads[i].contiguous();
      const size_t d = 3 + 2 * n + 4 * static_cast<size_t>(std::max<int64_t>(dora_of[i], 0));
      // W, or W_g for DoRA; a 4-bit member's dequantized again (W_g = G·W as the forward made it)
      at::Tensor w_formed;
      if (q_counts[i] > 0 && ctx->needs_input_grad(0)) {
        const std::vector<at::Tensor> parts(saved.begin() + q_start[i],
                                            saved.begin() + q_start[i] + q_counts[i]);
        w_formed = tch_peft::dequantize_4bit(
            parts, std::vector<int64_t>(q_dims.begin() + 4 * i, q_dims.begin() + 4 * i + 4),
            q_offsets[i], kind);
        if (dora_of[i] >= 0) w_formed.mul_(saved[d + 1].to(kind));
      }
      const at::Tensor& w = q_counts[i] > 0 ? w_formed : saved[3 + 2 * i];  // (dx only)
      const at::Tensor& bc = saved[4 + 2 * i];  // B in the base dtype, or B_g
      const at::Tensor ac = a_all.narrow(0, offsets[i], r);
      const at::Tensor h = h_all.narrow(1, offsets[i], r);
      const double s = scalings[i];
      const int64_t j = dora_of[i];
      // (d: where a DoRA member's saved output, scale G ([out, 1], compute kind), 1/m and bias
      // start)
      if (ctx->needs_input_grad(0)) {
        const at::Tensor w_eff =
            thin ? w : at::addmm(w, bc, ac, /*beta=*/1, /*alpha=*/s);  // W (+ s·BA)
        if (dx.defined()) {
          dx.addmm_(g, w_eff);
        } else {
          dx = at::mm(g, w_eff);
        }
      }
      if (ctx->needs_input_grad(w_index(i))) {
        dws[i] = at::mm(g.t(), input());
        if (j >= 0) {
          dws[i].mul_(saved[d + 1].to(kind));
        }
      }
      const bool want_db = bias_of[i] >= 0 && ctx->needs_input_grad(bias_index(bias_of[i]));
      if (j >= 0) {
        auto [dm, db] = dora_reductions(g, saved[d], saved[d + 3], saved[d + 2],
                                        static_cast<at::ScalarType>(m_kinds[j]),
                                        ctx->needs_input_grad(m_index(j)), want_db);
        dms[j] = dm;
        if (want_db) {
          dbiases[bias_of[i]] = db;
        }
      } else if (want_db) {
        dbiases[bias_of[i]] = g.sum(0);
      }
      if (need_gb) {
        at::Tensor gb = gb_all.narrow(1, offsets[i], r);
        at::addmm_out(gb, gb, g, bc, /*beta=*/0, /*alpha=*/s);
      }
      if (ctx->needs_input_grad(b_index(i))) {
        const auto b_kind = static_cast<at::ScalarType>(b_kinds[i]);
        if (j >= 0) {
          // dB = s·G (g_yᵀ h), in the compute kind before the cast
          const at::Tensor& scale = saved[d + 1];
          dbs[i] = factor_grad(g.t(), h, scale.scalar_type(), wide)
                       .mul_(scale)
                       .mul_(s)
                       .to(b_kind);
        } else {
          dbs[i] = factor_grad(g.t(), h, b_kind, wide).mul_(s);
        }
      }
    }
    if (thin && dx.defined()) {
      dx.addmm_(gb_all, a_all);  // + Σ s_i·(g_i B_i) A_i, one GEMM for the group
    }
    if (any_a) {
      // every A gradient from one read of x
      const auto f32 = static_cast<int64_t>(at::kFloat);
      const bool all_f32 =
          std::all_of(a_kinds.begin(), a_kinds.end(), [f32](int64_t k) { return k == f32; });
      const at::Tensor& x = input();
      const at::Tensor da_all =
          wide && all_f32 ? at::mm(gb_all.t(), x, at::kFloat) : at::mm(gb_all.t(), x);
      for (size_t i = 0; i < n; ++i) {
        // an output without gradient leaves its A without one, as separate layers would
        if (grads[i].defined() && ctx->needs_input_grad(a_index(i))) {
          const auto a_kind = static_cast<at::ScalarType>(a_kinds[i]);
          das[i] = da_all.narrow(0, offsets[i], offsets[i + 1] - offsets[i]).to(a_kind);
        }
      }
    }
    variable_list out{dx};
    for (const auto* list : {&dws, &das, &dbs, &dbiases, &dms, &dw_sqs}) {
      out.insert(out.end(), list->begin(), list->end());
    }
    // from and qs (never differentiated through here), bias_of, dora_of, scalings, recipe, eps,
    // q_counts, q_dims, q_offsets
    out.resize(out.size() + static_cast<size_t>(n_from + n_qs) + 8);
    return out;
  }
};



}  // namespace

extern "C" {

// The group node: `n` layers, arrays of `n` handles each; `biases[i]` may be null, and so may
// `ms[i]` (the magnitude [out]) with `w_sqs[i]` (the cached ‖W_i‖² [out], f32, or f64 for an f64
// base) for a LoRA member. On success writes `n` new owned handles to `out` and returns 0; else
// returns 1 with *error set to a malloc'ed message the caller frees with tch_peft_free_error.
int tch_peft_lora_group(const at::Tensor* x, size_t n, const at::Tensor* const* ws,
                        const at::Tensor* const* biases, const at::Tensor* const* as,
                        const at::Tensor* const* bs, const at::Tensor* const* ms,
                        const at::Tensor* const* w_sqs, const double* scalings, int recipe,
                        const at::Tensor* const* from, size_t n_from, double eps,
                        const int64_t* versions, const at::Tensor* const* qs,
                        const int64_t* q_counts, const int64_t* q_dims, const double* q_offsets,
                        at::Tensor** out, char** error) {
  return tch_peft::guarded<int>("tch_peft_lora_group", error, 1, [&] {
    std::vector<at::Tensor> w_list, a_list, b_list, bias_list, m_list, w_sq_list, q_list;
    std::vector<int64_t> bias_of, dora_of, counts, dims;
    std::vector<double> offsets;
    for (size_t i = 0, q_next = 0; i < n; ++i) {
      const int64_t count = q_counts != nullptr ? q_counts[i] : 0;
      counts.push_back(count);
      dims.insert(dims.end(), {0, 0, 0, 0});
      offsets.push_back(0.0);
      if (count > 0) {
        for (int64_t k = 0; k < count; ++k) q_list.push_back(qs[q_next++]->detach());
        std::copy(q_dims + 4 * i, q_dims + 4 * i + 4, dims.end() - 4);
        offsets.back() = q_offsets[i];
        // a placeholder input (never differentiated): the node forms W from the parts
        w_list.push_back(at::empty({0}, x->options()));
      } else {
        w_list.push_back(*ws[i]);
      }
      a_list.push_back(*as[i]);
      b_list.push_back(*bs[i]);
      if (biases[i] != nullptr) {
        bias_of.push_back(static_cast<int64_t>(bias_list.size()));
        bias_list.push_back(*biases[i]);
      } else {
        bias_of.push_back(-1);
      }
      if (ms[i] != nullptr) {
        dora_of.push_back(static_cast<int64_t>(m_list.size()));
        m_list.push_back(*ms[i]);
        w_sq_list.push_back(*w_sqs[i]);
      } else {
        dora_of.push_back(-1);
      }
    }
    std::vector<double> s(scalings, scalings + n);
    // detached: the node never differentiates through its recipe's tensors
    std::vector<at::Tensor> from_list;
    for (size_t i = 0; i < n_from; ++i) from_list.push_back(from[i]->detach());
    // unchanged since the op made x from them, or no replay
    bool unchanged = versions != nullptr && x->_version() == versions[n_from];
    for (size_t i = 0; unchanged && i < n_from; ++i) {
      unchanged = from[i]->_version() == versions[i];
    }
    if (!unchanged) {
      recipe = 0;
      from_list.clear();
    }
    const auto ys = LoraGroupFunction::apply(
        *x, at::TensorList(w_list), at::TensorList(a_list), at::TensorList(b_list),
        at::TensorList(bias_list), at::TensorList(m_list), at::TensorList(w_sq_list),
        at::TensorList(from_list), at::TensorList(q_list), bias_of, dora_of, s,
        static_cast<int64_t>(recipe), eps, counts, dims, offsets);
    for (size_t i = 0; i < n; ++i) {
      out[i] = new at::Tensor(ys[i]);
    }
    return 0;
  });
}

void tch_peft_free_error(char* error) { std::free(error); }

// Whether autograd records operations on this thread (c10::GradMode).
int tch_peft_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

int64_t tch_peft_tensor_version(const at::Tensor* t) {
  return t->defined() ? static_cast<int64_t>(t->_version()) : -1;
}

int tch_peft_backward_with_grad(const at::Tensor* y, const at::Tensor* grad, char** error) {
  return tch_peft::guarded<int>("tch_peft_backward_with_grad", error, 1, [&] {
    torch::autograd::backward({*y}, {*grad});
    return 0;
  });
}

}  // extern "C"
