// The whole C ABI between tch-peft's Rust side (src/sys.rs, its only caller) and the C++ that
// build.rs compiles against libtorch. Every .cpp in csrc/ includes this header, so a signature
// that drifts from its declaration fails to compile.
//
// Tensors cross as the `at::Tensor*` handles that tch uses for `C_tensor`: borrowed for a call,
// or new owned handles (`new at::Tensor`) that Rust takes over. No C++ exception crosses the
// boundary: entry points that can fail return a status and set `*error` to a malloc'ed message
// that the caller frees with tch_peft_free_error (guarded() below does this).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

extern "C" {

// --- lora_linear.cpp: the LoRA/DoRA group autograd node ---

// `n` layers on the shared 2-D input `x`, arrays of `n` handles each; `biases[i]` may be null, and
// so may `ms[i]` (the DoRA magnitude [out]) with `w_sqs[i]` (the cached ‖W_i‖² [out]) for a LoRA
// member. On success writes `n` new owned handles to `out` and returns 0; else 1 with *error set.
//
// `recipe` says how the node may recompute `x` in its backward instead of saving it (see
// tch_peft::recompute_input below): 0 saves `x`; 1 (`x` = rms_norm(from[0], from[1], eps)) and
// 2 (`x` = swiglu(from[0], from[1])) save the `n_from` tensors of `from` instead, which the
// producing op's own node keeps anyway. `versions` (n_from + 1 values, or null without a recipe)
// are the version counters of `from` and of `x` when the op made `x`: a tensor changed in place
// since, or a recipe the kernels cannot replay, is ignored (`x` saved).
//
// A member with a 4-bit base (QLoRA) has `ws[i]` null and `q_counts[i]` > 0: its quantized parts
// are the next `q_counts[i]` handles of `qs` (as tch_peft_linear_4bit's `q`), `q_dims[4i..4i+4]`
// and `q_offsets[i]` their dims and nested offset. Its W is dequantized in the forward and again
// in the backward; the node keeps only the parts. `q_counts` may be null when no member is
// 4-bit.
int tch_peft_lora_group(const at::Tensor* x, size_t n, const at::Tensor* const* ws,
                        const at::Tensor* const* biases, const at::Tensor* const* as,
                        const at::Tensor* const* bs, const at::Tensor* const* ms,
                        const at::Tensor* const* w_sqs, const double* scalings, int recipe,
                        const at::Tensor* const* from, size_t n_from, double eps,
                        const int64_t* versions, const at::Tensor* const* qs,
                        const int64_t* q_counts, const int64_t* q_dims, const double* q_offsets,
                        at::Tensor** out, char** error);

// --- dist_gloo.cpp: a c10d process group over gloo ---

// An opaque group (csrc/dist.h): its store, and a c10d ProcessGroup whose CPU backend is gloo
// and whose CUDA backend, once added, NCCL.
struct tch_peft_group;

// A group of `size` ranks, this one `rank`: rendezvous through a FileStore at `file` when it is
// not null, else a TCPStore at host:port (`is_server`: this process hosts it); gloo's device on
// `device_host`'s address ("if:eth0,eth1": those interfaces; "": the default device); every
// wait bounded by `timeout_ms`. 0 with *out set, else 1.
int tch_peft_group_new(const char* host, int port, const char* file, int rank, int size,
                       int64_t timeout_ms, int is_server, const char* device_host,
                       tch_peft_group** out, char** error);
void tch_peft_group_free(tch_peft_group* g);
// In place over `n` tensors as one flat buffer: op 0 sum, 1 average.
int tch_peft_group_all_reduce(tch_peft_group* g, const at::Tensor* const* ts, size_t n, int op,
                              char** error);
int tch_peft_group_broadcast(tch_peft_group* g, const at::Tensor* const* ts, size_t n, int root,
                             char** error);
int tch_peft_group_barrier(tch_peft_group* g, char** error);

// --- dist_nccl.cpp (where NCCL's headers were found): the group's CUDA backend ---
int tch_peft_group_add_nccl(tch_peft_group* g, int device, char** error);

// --- dist_reducer.cpp: DDP's Reducer over a group ---

struct tch_peft_reducer;

// Over `n` parameters (leaves that require grad, named by `names`), with DDP's options; bf16
// compression registers a bf16_compress_hook. 0 with *out set, else 1.
int tch_peft_reducer_new(tch_peft_group* g, const at::Tensor* const* params, size_t n,
                         const char* const* names, int64_t bucket_cap_bytes,
                         int64_t first_bucket_cap_bytes, int find_unused, int grad_as_bucket_view,
                         int static_graph, int bf16_compress, tch_peft_reducer** out,
                         char** error);
void tch_peft_reducer_free(tch_peft_reducer* r);
int tch_peft_reducer_pre_forward(tch_peft_reducer* r, int sync, int* rebuilt, char** error);
int tch_peft_reducer_post_forward(tch_peft_reducer* r, const at::Tensor* const* outs, size_t n,
                                  int sync, char** error);
int tch_peft_reducer_buckets(tch_peft_reducer* r, size_t cap, int64_t* params, int64_t* numels,
                             size_t* count, char** error);

// --- quant_linear.cpp: the frozen 4-bit linear layer's node ---

// y = x · deq(W)ᵀ + bias for bitsandbytes' 4-bit W: `q` holds `n_q` handles (codes, absmax,
// quant_map, and with double quantization nested_absmax, nested_map), `dims` out, in, blocksize,
// nested_blocksize; `bias` may be null. Shapes checked by the caller. On success writes a new
// owned handle to `out` and returns 0; else 1 with *error set.
int tch_peft_linear_4bit(const at::Tensor* x, const at::Tensor* bias,
                         const at::Tensor* const* q, size_t n_q, const int64_t* dims,
                         double offset, at::Tensor** out, char** error);

// deq(W) in bf16 by the CUDA kernel, same arguments: 0 with a new owned handle in `out`, 2 where
// the kernel does not apply (nothing done), 1 with *error set.
int tch_peft_dequantize_4bit(const at::Tensor* const* q, size_t n_q, const int64_t* dims,
                             double offset, at::Tensor** out, char** error);

// --- linear_cross_entropy.cpp: the fused linear cross-entropy node ---

// The loss of `h Wᵀ + bias` ([N, H] by [V, H], `bias` [V] or null) against `labels` ([N] int64,
// `ignore_index` rows left out), `chunk` rows at a time, the mean over valid rows when `mean`
// is non-zero, else the sum. On success writes a new owned f32 scalar to `out` and returns 0;
// else 1 with *error set.
int tch_peft_linear_cross_entropy(const at::Tensor* h, const at::Tensor* w,
                                  const at::Tensor* bias, const at::Tensor* labels,
                                  int64_t ignore_index, int64_t chunk, int mean,
                                  at::Tensor** out, char** error);

// --- model_ops.cpp: the fused model ops' autograd nodes (bf16 on CUDA) ---
// Each returns 0 with new owned handles in its outputs, 2 (nothing written) where its kernels do
// not take these inputs, or 1 with *error set.

// RMSNorm of x [..., H] with weight w [H].
int tch_peft_rms_norm(const at::Tensor* x, const at::Tensor* w, double eps, at::Tensor** out,
                      char** error);

// s = x + res and the RMSNorm of s (weight w [H]) in one pass: *out_sum = s, *out_y = the norm.
int tch_peft_add_rms_norm(const at::Tensor* x, const at::Tensor* res, const at::Tensor* w,
                          double eps, at::Tensor** out_sum, at::Tensor** out_y, char** error);

// bf16(silu(g))·u for g, u of one shape.
int tch_peft_swiglu(const at::Tensor* g, const at::Tensor* u, at::Tensor** out, char** error);

// The rotary embedding of q [B, S, Hq, D] and k [B, S, Hk, D] (or null: then *out_k stays null)
// with tables cos, sin [S, D].
int tch_peft_rope(const at::Tensor* q, const at::Tensor* k, const at::Tensor* cos,
                  const at::Tensor* sin, at::Tensor** out_q, at::Tensor** out_k, char** error);

// Frees a message or text handed to Rust.
void tch_peft_free_error(char* error);

// Whether autograd records operations on this thread (c10::GradMode).
int tch_peft_grad_enabled();

// The version counter of `t` (bumped by every in-place change).
int64_t tch_peft_tensor_version(const at::Tensor* t);

// torch::autograd::backward of `y` with upstream gradient `grad` (of y's shape), accumulating
// into the leaves' .grad as Tensor::backward does. 0 on success; else 1 with *error set.
int tch_peft_backward_with_grad(const at::Tensor* y, const at::Tensor* grad, char** error);

// --- cuda_kernels.cpp: the NVRTC-compiled CUDA kernels ---

// Whether the run-time compiled CUDA kernels (LoRA and DoRA) can run on the current device.
int tch_peft_custom_kernels_available();

// Switches them on (1) or off (0) for the process.
void tch_peft_set_custom_kernels(int on);

// --- optim.cpp: multi-tensor AdamW ---

// One AdamW step (decoupled weight decay, no amsgrad) over `n` parameters of one device and
// dtype; `steps` are f32 scalar tensors on that device, incremented here. 0, or -1 with *error.
int tch_peft_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                         at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                         at::Tensor* const* steps, int64_t n, double lr, double beta1,
                         double beta2, double weight_decay, double eps, char** error);

// Drops the gradients of `n` tensors (zero_grad(set_to_none=True)); cannot fail.
void tch_peft_grads_to_none(at::Tensor* const* params, int64_t n);

// --- memory.cpp: the CUDA caching allocator's statistics ---

// Bytes allocated on `device` (all pools): the peak since the last reset when `peak` is non-zero,
// else the current value; -1 when unavailable.
int64_t tch_peft_cuda_allocated(int device, int peak);

// Resets the peaks to the current values; 0, or -1 when unavailable.
int tch_peft_cuda_reset_peak(int device);

// --- profiler.cpp: device-kernel times from Kineto ---

// Starts recording CPU ops and CUDA activity. 0, or 1 with *error set.
int tch_peft_profiler_start(char** error);

// Stops recording: a malloc'ed text ("span\t<ns>", then "count\ttotal_ns\tname" per device
// activity name), or null with *error set.
char* tch_peft_profiler_stop(char** error);

}  // extern "C"

namespace tch_peft {

// The input of a LoRA group node, recomputed in its backward bit for bit as the forward's CUDA
// kernel made it (model_ops.cpp): recipe 1 is rms_norm(from[0], weight from[1], eps), recipe 2
// swiglu(from[0], from[1]). can_recompute_input says whether the kernels replay `recipe` on
// `from` for an `x` of `rows` × `width` (else the node saves `x`).
bool can_recompute_input(int64_t recipe, const std::vector<at::Tensor>& from, int64_t rows,
                         int64_t width);
at::Tensor recompute_input(int64_t recipe, const std::vector<at::Tensor>& from, double eps);

// bitsandbytes' 4-bit weight dequantized to `kind` (quant_linear.cpp): q = codes, absmax,
// quant_map[, nested_absmax, nested_map]; dims = out, in, blocksize, nested_blocksize.
at::Tensor dequantize_4bit(const std::vector<at::Tensor>& q, const std::vector<int64_t>& dims,
                           double offset, at::ScalarType kind);

// x · deq(W)ᵀ (+ bias) by the GEMV kernel (quant_linear.cpp) for bf16 x [rows ≤ 8, in] on CUDA:
// the codes read once, W never formed. Undefined where the kernel does not apply (other
// dtypes, devices, shapes or alignments, more rows, kernels off).
at::Tensor gemv_4bit(const std::vector<at::Tensor>& q, const std::vector<int64_t>& dims,
                     double offset, const at::Tensor& x, const at::Tensor& bias);

// A malloc'ed copy of `s` for Rust (null if malloc fails).
inline char* copy_c_string(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs `f` for a C entry point: its result, or `failed` with *error set to a malloc'ed message
// when it throws.
template <typename T, typename F>
T guarded(const char* what, char** error, T failed, F&& f) {
  *error = nullptr;
  try {
    return f();
  } catch (const std::exception& e) {
    *error = copy_c_string(e.what());
  } catch (...) {
    *error = copy_c_string(std::string("unknown C++ exception in ") + what);
  }
  return failed;
}

}  // namespace tch_peft
