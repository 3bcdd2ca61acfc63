// Stand-in for gloo's <gloo/transport/device.h>: see ../context.h. Declarations only.
#pragma once
#include "gloo/context.h"

namespace gloo::transport {
class Device;
class UnboundBuffer;
}  // namespace gloo::transport
