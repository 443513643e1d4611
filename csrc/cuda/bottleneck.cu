// Bottleneck adapter on CUDA: bias + activation, activation backward, and residual + bias fused.
#include <torch/library.h>

#include "fused.cuh"

namespace adaptune {
namespace {

// pre += b_j (in place); h = act(pre)
template <typename T, typename A>
__global__ void bias_act_kernel(T* pre, const T* bias, T* h, int64_t total, int64_t cols, int64_t act) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    A v = static_cast<A>(pre[i]);
    if (bias != nullptr) {
      const T stored = static_cast<T>(v + static_cast<A>(bias[i % cols]));  // pre as the reference stores it
      pre[i] = stored;
      v = static_cast<A>(stored);
    }
    h[i] = static_cast<T>(act_forward<A>(v, act));
  }
}

// dh = s·dh·act'(pre) (in place)
template <typename T, typename A>
__global__ void act_backward_kernel(T* dh, const T* pre, const T* h, int64_t total, A s, int64_t act) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const A d = act_derivative<A>(static_cast<A>(pre[i]), static_cast<A>(h[i]), act);
    dh[i] = static_cast<T>(s * static_cast<A>(dh[i]) * d);
  }
}

// y = residual + s·b_j over a contiguous (rows, cols) residual
template <typename T, typename A>
__global__ void residual_bias_kernel(const T* residual, const T* bias, T* y, int64_t total, int64_t cols, A s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = static_cast<T>(static_cast<A>(residual[i]) + s * static_cast<A>(bias[i % cols]));
}

}  // namespace

std::tuple<Tensor, Tensor> Cuda::down(const Tensor& x, const Tensor& W, const OptTensor& bias, int64_t act) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  Tensor pre = at::mm(x, W.t());  // (N, m), contiguous
  Tensor h = at::empty_like(pre);
  const Tensor bc = bias ? bias->to(pre.scalar_type()).contiguous() : Tensor();
  if (pre.numel() == 0) return {pre, h};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "adaptune_bias_act", [&] {
    using A = typename Acc<scalar_t>::type;
    bias_act_kernel<scalar_t, A><<<blocks_for(pre.numel(), kThreads), kThreads, 0, stream()>>>(
        pre.data_ptr<scalar_t>(), bias ? bc.data_ptr<scalar_t>() : nullptr, h.data_ptr<scalar_t>(), pre.numel(),
        pre.size(1), act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pre, h};
}

Tensor Cuda::act_backward(Tensor dh, const Tensor& pre, const Tensor& h, double s, int64_t act) {
  const c10::cuda::OptionalCUDAGuard guard(dh.device());
  dh = dh.contiguous();  // our own (N, m) GEMM result: already contiguous, written in place
  const Tensor pc = pre.contiguous(), hc = h.contiguous();
  if (dh.numel() == 0) return dh;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dh.scalar_type(), "adaptune_act_bwd", [&] {
    using A = typename Acc<scalar_t>::type;
    act_backward_kernel<scalar_t, A><<<blocks_for(dh.numel(), kThreads), kThreads, 0, stream()>>>(
        dh.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), dh.numel(), static_cast<A>(s), act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dh;
}

Tensor Cuda::residual_bias(const Tensor& residual, const OptTensor& bias, double s) {
  if (!bias || !residual.is_contiguous()) {
    return bias ? at::add(residual, *bias, s) : residual.clone(at::MemoryFormat::Contiguous);
  }
  const c10::cuda::OptionalCUDAGuard guard(residual.device());
  const Tensor bc = bias->to(residual.scalar_type()).contiguous();
  Tensor y = at::empty_like(residual);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "adaptune_residual_bias", [&] {
    using A = typename Acc<scalar_t>::type;
    residual_bias_kernel<scalar_t, A><<<blocks_for(y.numel(), kThreads), kThreads, 0, stream()>>>(
        residual.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), y.numel(), y.size(1),
        static_cast<A>(s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

TORCH_LIBRARY_IMPL(adaptune, CUDA, m) { register_bottleneck<Cuda>(m); }

}  // namespace adaptune
