// The process group shared by csrc/dist_gloo.cpp (its store, gloo backend and collectives),
// csrc/dist_nccl.cpp (the NCCL backend, where NCCL's headers exist) and csrc/dist_reducer.cpp
// (DDP's Reducer over it). Only c10d headers that do not need gloo's: the gloo stand-ins stay on
// dist_gloo.cpp's include path alone.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <stdexcept>

struct tch_peft_group {
  c10::intrusive_ptr<c10d::Store> store;
  // dispatches each collective by its tensors' device: CPU to gloo, CUDA to NCCL when added
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  c10::intrusive_ptr<c10d::Backend> gloo;
  c10::intrusive_ptr<c10d::Backend> nccl;  // null until tch_peft_group_add_nccl
  std::chrono::milliseconds timeout;
};

namespace tch_peft {

// Waits for `work`, throwing when it does not complete within `timeout`.
inline void wait_work(const c10::intrusive_ptr<c10d::Work>& work,
                      std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("a collective did not complete within the timeout");
  }
}

}  // namespace tch_peft
