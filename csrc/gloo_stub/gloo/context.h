// Stand-in for gloo's <gloo/context.h> (the PyPI torch wheel ships c10d's headers but not
// gloo's). It declares only what torch/csrc/distributed/c10d/ProcessGroupGloo.hpp names: gloo
// objects appear there behind smart pointers only, so the class layouts of c10d do not depend on
// gloo's. Used by csrc/dist_gloo.cpp alone, which must not construct a GlooStore or call
// ProcessGroupGloo::setTimeout (see ../shared/reference/DISTRIBUTED.md); libtorch_cpu holds the
// real gloo.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
