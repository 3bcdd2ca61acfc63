// The fused nodes' CUDA kernels compiled at run time (csrc/cuda_kernels.cpp): DoRA's weight-side
// pass and its magnitude gradient's reduction, and a LoRA group's low-rank outputs.
// Each returns false, having written nothing, where it cannot run (no CUDA build, no driver or
// NVRTC, a dtype/shape/alignment it does not handle, kernels switched off): the caller then uses
// the ATen ops, which compute the same values.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace tch_peft::kernels {

// DoRA's weight-side part after the GEMMs wa2 = W·[A_hi; A_lo]ᵀ ([out, 2r]) and aat = A·Aᵀ
// ([r, r]), in one pass over W: the scale g = m/‖W + s·BA‖_row, 1/m (0 where not finite),
// W_g = bf16(W ⊙ bf16(g)) per row (as `at::mul(w, g.to(kBFloat16))`) and B_g = bf16(B ⊙ g).
// w [out, in] bf16 contiguous; wa2, b [out, r], aat, m, w_sq [out] f32 contiguous. Outputs: w_g
// [out, in] and b_g [out, r] bf16, g and inv_m [out] f32.
bool dora_scale(const at::Tensor& w, const at::Tensor& wa2, const at::Tensor& b,
                const at::Tensor& aat, const at::Tensor& m, const at::Tensor& w_sq, double s,
                at::Tensor& w_g, at::Tensor& b_g, at::Tensor& g, at::Tensor& inv_m);

// dot[c] = scale[c] · Σ_n gy[n, c]·(y[n, c] − bias[c]) and, when `sum` is requested,
// sum[c] = Σ_n gy[n, c], in f32 (deterministic: fixed-order partial sums per row chunk):
// gy, y [N, C] bf16 contiguous; bias [C] f32 or undefined (0); scale [C] or [C, 1] f32.
bool column_dot(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& bias,
                const at::Tensor& scale, bool want_sum, at::Tensor& dot, at::Tensor& sum);

// One member of lora_up: B [out, r] bf16 contiguous (r a multiple of 8, at most 32; out a
// multiple of 8), its columns of h from h_offset, its scaling and optional bias [out] bf16.
struct UpTerm {
  const at::Tensor* b;
  const at::Tensor* bias;  // or null
  int64_t h_offset;
  double scaling;
};

// outs[i] = bf16(s_i · h[:, off_i : off_i + r_i] · B_iᵀ + bias_i) ([N, out_i], f32 accumulation
// on tensor cores) for every member, in one launch per eight members; h [N, R] bf16 contiguous.
// The thin product of a LoRA layer, which the base GEMM then accumulates into.
bool lora_up(const at::Tensor& h, const std::vector<UpTerm>& terms,
             std::vector<at::Tensor>& outs);

// For the model ops (csrc/model_ops.cpp): a kernel of model_kernels_source.h by name (null where
// the kernels cannot run), its launch on the current stream with 256 threads per block, and the
// device's SM count (0 where the kernels cannot run).
void* model_function(const char* name);
bool launch_model(void* fn, unsigned blocks, void** args);
int sm_count();

// Whether the kernels compile and load on the current device (compiling them if needed).
bool available();

// Switches the kernels on or off for the whole process (on by default unless the environment
// has TCH_PEFT_CUSTOM_KERNELS=0).
void set_enabled(bool on);

}  // namespace tch_peft::kernels
