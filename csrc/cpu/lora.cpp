// LoRA on CPU: y = x·Wᵀ + b, then s·(xd·Aᵀ)·Bᵀ added in place (at::addmm_); all of it is in ops.h.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(adaptune, CPU, m) {
  ADAPTUNE_REGISTER_LORA
}
