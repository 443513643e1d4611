// The routed ops (a task per sample) on CPU: all of them are in routed.h (gathered factors, batched GEMMs).
#include <torch/library.h>

#include "../routed.h"
#include "fused.h"

namespace adaptune {

TORCH_LIBRARY_IMPL(adaptune, CPU, m) { register_routed<Cpu>(m); }

}  // namespace adaptune
