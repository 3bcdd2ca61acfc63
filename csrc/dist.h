// The process group shared by csrc/dist_gloo.cpp (its store, gloo backend and collectives),
// csrc/dist_nccl.cpp (the NCCL backend, where NCCL's headers exist) and csrc/dist_reducer.cpp
// (DDP's Reducer over it). Only c10d headers that do not need gloo's: the gloo stand-ins stay on
// dist_gloo.cpp's include path alone.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <stdexcept>
#include <vector>

struct tch_peft_group {
  c10::intrusive_ptr<c10d::Store> store;
  // dispatches each collective by its tensors' device: CPU to gloo, CUDA to NCCL when added
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  c10::intrusive_ptr<c10d::Backend> gloo;
  c10::intrusive_ptr<c10d::Backend> nccl;  // null until tch_peft_group_add_nccl
  std::chrono::milliseconds timeout;
};

namespace tch_peft {

// Waits for `work` on `device`'s tensors. On the CPU (gloo) the host waits, throwing when it
// does not complete within `timeout`. On CUDA (NCCL) the current stream waits on NCCL's, the
// host goes on, and NCCL's watchdog enforces the backend's timeout (a timed-out NCCL collective
// tears the process down, as in PyTorch).
inline void wait_work(const c10::intrusive_ptr<c10d::Work>& work, const at::Device& device,
                      std::chrono::milliseconds timeout) {
  if (device.is_cuda()) {
    work->wait();
    return;
  }
  if (!work->wait(timeout)) {
    throw std::runtime_error("a collective did not complete within the timeout");
  }
}

// `n` tensor handles as a list.
inline std::vector<at::Tensor> tensor_list(const at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

}  // namespace tch_peft
