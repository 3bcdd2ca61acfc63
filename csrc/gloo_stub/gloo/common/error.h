// Stand-in for gloo's <gloo/common/error.h>: see ../context.h.
#pragma once
#include "gloo/context.h"
