// LoRA on CUDA: y = x·Wᵀ + b, then s·(xd·Aᵀ)·Bᵀ added in place (at::addmm_ on the current stream).
// Both GEMMs and the epilogue are cuBLAS calls; there is no elementwise part left to fuse.
#include <torch/library.h>

#include "../ops.h"

namespace adaptune {

TORCH_LIBRARY_IMPL(adaptune, CUDA, m) { register_lora(m); }

}  // namespace adaptune
