// Peak-memory statistics of libtorch's device caching allocator (what torch.cuda's
// max_memory_allocated / reset_peak_memory_stats read), through c10's device-generic
// DeviceAllocator interface: no CUDA headers needed. Called from src/memory.rs.
//
// Every function returns -1 when the allocator of that device type is missing (a CPU-only
// libtorch) or throws; none lets a C++ exception cross into Rust.

#include "tch_peft.h"

#include <c10/core/Allocator.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

namespace {

c10::DeviceAllocator* cuda_allocator() {
  c10::Allocator* a = c10::GetAllocator(c10::DeviceType::CUDA);
  return a == nullptr ? nullptr : dynamic_cast<c10::DeviceAllocator*>(a);
}

}  // namespace

extern "C" {

// Bytes handed out (`allocated_bytes`, all pools): the peak since the last reset when `peak` is
// non-zero, else the current value; -1 when unavailable.
int64_t tch_peft_cuda_allocated(int device, int peak) {
  try {
    c10::DeviceAllocator* a = cuda_allocator();
    if (a == nullptr) return -1;
    const auto stats = a->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto& stat =
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return peak != 0 ? stat.peak : stat.current;
  } catch (...) {
    return -1;
  }
}

// Resets the peaks to the current values; 0 on success, -1 otherwise.
int tch_peft_cuda_reset_peak(int device) {
  try {
    c10::DeviceAllocator* a = cuda_allocator();
    if (a == nullptr) return -1;
    a->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
