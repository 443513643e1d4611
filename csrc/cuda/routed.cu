// The routed ops (a task per sample) on CUDA: gathered factors and batched GEMMs (cuBLAS bmm, one launch for
// all tasks) from routed.h; the activation backward is the fused kernel of bottleneck.cu.
#include <torch/library.h>

#include "../routed.h"
#include "fused.cuh"

namespace adaptune {

TORCH_LIBRARY_IMPL(adaptune, CUDA, m) {
  m.impl("lora_routed", &lora_routed_forward);
  m.impl("lora_routed_backward", &lora_routed_backward);
  m.impl("dora_routed", &dora_routed_forward);
  m.impl("dora_routed_backward", &dora_routed_backward);
  m.impl("bottleneck_routed", &bottleneck_routed_forward);
  m.impl("bottleneck_routed_backward", &bottleneck_routed_backward<Cuda>);
}

}  // namespace adaptune
