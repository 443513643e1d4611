// The routed ops (a task per sample) on CPU: all of them are in routed.h (gathered factors, batched GEMMs).
#include <torch/library.h>

#include "../routed.h"
#include "fused.h"

namespace adaptune {

TORCH_LIBRARY_IMPL(adaptune, CPU, m) {
  m.impl("lora_routed", &lora_routed_forward);
  m.impl("lora_routed_backward", &lora_routed_backward);
  m.impl("dora_routed", &dora_routed_forward);
  m.impl("dora_routed_backward", &dora_routed_backward<Cpu>);
  m.impl("bottleneck_routed", &bottleneck_routed_forward);
  m.impl("bottleneck_routed_backward", &bottleneck_routed_backward<Cpu>);
}

}  // namespace adaptune
