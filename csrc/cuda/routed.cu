// The routed ops (a task per sample) on CUDA: gathered factors and batched GEMMs (cuBLAS bmm, one launch for
// all tasks) from routed.h; the activation backward is the fused kernel of bottleneck.cu; DoRA's routed scale
// backward is ATen here.
#include <torch/library.h>

#include "../routed.h"
#include "fused.cuh"

namespace adaptune {

// dz = dy ⊙ ratio_n and Σ_rows dy ⊙ z per sample, with ATen (two passes).
std::tuple<Tensor, Tensor> Cuda::routed_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& ratio) {
  const Tensor r = ratio.unsqueeze(1);
  return {dy * r.to(dy.scalar_type()), (dy.to(ratio.scalar_type()) * z.to(ratio.scalar_type())).sum(1)};
}

TORCH_LIBRARY_IMPL(adaptune, CUDA, m) { register_routed<Cuda>(m); }

}  // namespace adaptune
