// Stand-in for gloo's <gloo/algorithm.h>: see context.h.
#pragma once
#include "gloo/context.h"
