// DoRA on CPU: the factored row norm's combination and the (m / n) scaling with ATen.
#include <torch/library.h>

#include "fused.h"

namespace adaptune {
namespace {

Tensor scale_of(const Tensor& m, const Tensor& n, at::ScalarType dtype) {
  return (m.to(n.scalar_type()) / n).to(dtype);  // (out,)
}

}  // namespace

Tensor Cpu::mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a.to(acc), b.to(acc));  // no mm.dtype on CPU
}

Tensor Cpu::dora_combine(const Tensor& wsq, const Tensor& WA, const Tensor& BAA, const Tensor& B, double s) {
  Tensor sq = (WA * (2 * s)).add_(BAA, s * s).mul_(B).sum(1).add_(wsq);
  return sq.clamp_min_(0).sqrt_();
}

Tensor Cpu::dora_scale(const Tensor& z, const Tensor& m, const Tensor& n, const OptTensor& bias) {
  const Tensor g = scale_of(m, n, z.scalar_type());
  return bias ? at::addcmul(*bias, z, g) : z * g;
}

std::tuple<Tensor, Tensor> Cpu::dora_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& m,
                                                    const Tensor& n) {
  Tensor dm = (dy * z).sum({0}, false, n.scalar_type()).div_(n);
  return {dy * scale_of(m, n, dy.scalar_type()), dm};
}

TORCH_LIBRARY_IMPL(adaptune, CPU, m) {
  m.impl("dora_norm", &dora_norm_forward<Cpu>);
  m.impl("dora_norm_backward", &dora_norm_backward<Cpu>);
  m.impl("dora", &dora_forward<Cpu>);
  m.impl("dora_backward", &dora_backward<Cpu>);
}

}  // namespace adaptune
