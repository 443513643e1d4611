// LoRA on CPU: y = x·Wᵀ + b, then s·(xd·Aᵀ)·Bᵀ added in place (at::addmm_); all of it is in ops.h.
#include <torch/library.h>

#include "../ops.h"

namespace adaptune {

TORCH_LIBRARY_IMPL(adaptune, CPU, m) { register_lora(m); }

}  // namespace adaptune
