// DoRA's two bandwidth-bound passes as CUDA kernels compiled at run time (csrc/dora_kernels.cpp).
// Each returns false, having written nothing, where it cannot run (no CUDA build, no driver or
// NVRTC, a dtype/shape/alignment it does not handle, kernels switched off): the caller then uses
// the ATen ops, which compute the same values.
#pragma once

#include <ATen/ATen.h>

namespace tch_peft::kernels {

// w_g = W ⊙ bf16(g) per row, rounded to bf16 (bit-identical to `at::mul(w, g.to(kBFloat16))`):
// w [out, in] bf16 contiguous, g [out, 1] or [out] f32.
bool row_scale(const at::Tensor& w, const at::Tensor& g, at::Tensor& w_g);

// dot[c] = scale[c] · Σ_n gy[n, c]·(y[n, c] − bias[c]) and, when `sum` is requested,
// sum[c] = Σ_n gy[n, c], in f32 (deterministic: fixed-order partial sums per row chunk):
// gy, y [N, C] bf16 contiguous; bias [C] f32 or undefined (0); scale [C] or [C, 1] f32.
bool column_dot(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& bias,
                const at::Tensor& scale, bool want_sum, at::Tensor& dot, at::Tensor& sum);

// Whether the kernels compile and load on the current device (compiling them if needed).
bool available();

// Switches the kernels on or off for the whole process (on by default unless the environment
// has TCH_PEFT_CUSTOM_KERNELS=0).
void set_enabled(bool on);

}  // namespace tch_peft::kernels
