// Bottleneck adapter on CPU: bias + activation, activation backward, and residual + bias with ATen.
#include <torch/library.h>

#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>

#include "fused.h"

namespace adaptune {

std::tuple<Tensor, Tensor> Cpu::down(const Tensor& x, const Tensor& W, const OptTensor& bias, int64_t act) {
  Tensor pre = bias ? at::addmm(*bias, x, W.t()) : at::mm(x, W.t());  // (N, m)
  switch (act) {
    case kRelu: return {pre, at::relu(pre)};
    case kGelu: return {pre, at::gelu(pre)};
    case kGeluTanh: return {pre, at::gelu(pre, "tanh")};
    case kSilu: return {pre, at::silu(pre)};
    case kTanh: return {pre, at::tanh(pre)};
    default: return {pre, pre.clone()};
  }
}

Tensor Cpu::act_backward(Tensor dh, const Tensor& pre, const Tensor& h, double s, int64_t act) {
  if (s != 1.0) dh.mul_(s);
  switch (act) {
    case kRelu: return at::threshold_backward(dh, pre, 0);
    case kGelu: return at::gelu_backward(dh, pre);
    case kGeluTanh: return at::gelu_backward(dh, pre, "tanh");
    case kSilu: return at::silu_backward(dh, pre);
    case kTanh: return at::tanh_backward(dh, h);
    default: return dh;
  }
}

Tensor Cpu::residual_bias(const Tensor& residual, const OptTensor& bias, double s) {
  return bias ? at::add(residual, *bias, s) : residual.clone(at::MemoryFormat::Contiguous);
}

TORCH_LIBRARY_IMPL(adaptune, CPU, m) { register_bottleneck<Cpu>(m); }

}  // namespace adaptune
