// Device-kernel timing through libtorch's Kineto profiler (what `torch.profiler` uses), for
// src/profiler.rs. Only the device side is summarised: every kernel, copy and memset the GPU ran
// between start and stop, aggregated by name.

#include "tch_peft.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <sstream>
#include <string>

namespace {

namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

}  // namespace

extern "C" {

// Starts recording CPU ops and CUDA activity (the caller checked that there is a device).
// Returns 0, or 1 with *error set (malloc'ed).
int tch_peft_profiler_start(char** error) {
  *error = nullptr;
  try {
    const ProfilerConfig config(ProfilerState::KINETO);
    const std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    *error = tch_peft::copy_c_string(e.what());
  } catch (...) {
    *error = tch_peft::copy_c_string("unknown C++ exception in tch_peft_profiler_start");
  }
  return 1;
}

// Stops recording. Returns a malloc'ed text, one line per device activity name:
// "count<TAB>total_ns<TAB>name", preceded by "span<TAB>first start to last end in ns"; or null
// with *error set.
char* tch_peft_profiler_stop(char** error) {
  *error = nullptr;
  try {
    const std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
    std::map<std::string, std::pair<uint64_t, uint64_t>> by_name;
    uint64_t first = UINT64_MAX, last = 0;
    for (const auto& e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) {
        continue;
      }
      auto& entry = by_name[e.name()];
      entry.first += 1;
      entry.second += e.durationNs();
      first = std::min<uint64_t>(first, e.startNs());
      last = std::max<uint64_t>(last, e.startNs() + e.durationNs());
    }
    std::ostringstream out;
    out << "span\t" << (last > first ? last - first : 0) << "\n";
    for (const auto& [name, v] : by_name) {
      std::string clean = name;
      for (char& c : clean) {
        if (c == '\t' || c == '\n') c = ' ';
      }
      out << v.first << "\t" << v.second << "\t" << clean << "\n";
    }
    return tch_peft::copy_c_string(out.str());
  } catch (const std::exception& e) {
    *error = tch_peft::copy_c_string(e.what());
  } catch (...) {
    *error = tch_peft::copy_c_string("unknown C++ exception in tch_peft_profiler_stop");
  }
  return nullptr;
}

}  // extern "C"
