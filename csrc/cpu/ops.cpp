// CPU implementations of every op: the generic GEMM part (ops.h) plus ATen for the fused parts.
#include <torch/library.h>

#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>

#include "../ops.h"

namespace adaptune {
namespace {

struct Cpu {
  static Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
    return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a.to(acc), b.to(acc));  // no mm.dtype on CPU
  }

  static Tensor dora_combine(const Tensor& wsq, const Tensor& WA, const Tensor& BAA, const Tensor& B, double s) {
    Tensor sq = (WA * (2 * s)).add_(BAA, s * s).mul_(B).sum(1).add_(wsq);
    return sq.clamp_min_(0).sqrt_();
  }

  static Tensor scale_of(const Tensor& m, const Tensor& n, at::ScalarType dtype) {
    return (m.to(n.scalar_type()) / n).to(dtype);  // (out,)
  }

  static Tensor dora_scale(const Tensor& z, const Tensor& m, const Tensor& n, const OptTensor& bias) {
    const Tensor g = scale_of(m, n, z.scalar_type());
    return bias ? at::addcmul(*bias, z, g) : z * g;
  }

  static std::tuple<Tensor, Tensor> dora_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& m,
                                                        const Tensor& n) {
    Tensor dm = (dy * z).sum({0}, false, n.scalar_type()).div_(n);
    return {dy * scale_of(m, n, dy.scalar_type()), dm};
  }

  static std::tuple<Tensor, Tensor> down(const Tensor& x, const Tensor& W, const OptTensor& bias, int64_t act) {
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

  static Tensor act_backward(Tensor dh, const Tensor& pre, const Tensor& h, double s, int64_t act) {
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

  static Tensor residual_bias(const Tensor& residual, const OptTensor& bias, double s) {
    return bias ? at::add(residual, *bias, s) : residual.clone(at::MemoryFormat::Contiguous);
  }
};

}  // namespace
}  // namespace adaptune

TORCH_LIBRARY_IMPL(adaptune, CPU, m) {
  ADAPTUNE_REGISTER_LORA
  ADAPTUNE_REGISTER_DORA(adaptune::Cpu)
  ADAPTUNE_REGISTER_BOTTLENECK(adaptune::Cpu)
}
