// LoRA on CUDA: y = x·Wᵀ + b, then s·(xd·Aᵀ)·Bᵀ added in place (at::addmm_ on the current stream).
// Both GEMMs and the epilogue are cuBLAS calls; there is no elementwise part left to fuse.
#include <torch/library.h>

#include "../ops.h"

namespace adaptune {

TORCH_LIBRARY_IMPL(adaptune, CUDA, m) {
  m.impl("lora", &lora_forward);
  m.impl("lora_backward", &lora_backward);
}

}  // namespace adaptune
