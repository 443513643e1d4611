// CPU side: the device struct for ops.h. Its members are defined next to the op that uses them
// (dora.cpp, bottleneck.cpp), with ATen for the fused elementwise parts.
#pragma once
#include "../ops.h"

namespace adaptune {

struct Cpu {
  static Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc);
  static Tensor dora_combine(const Tensor& wsq, const Tensor& WA, const Tensor& BAA, const Tensor& B, double s);
  static Tensor dora_scale(const Tensor& z, const Tensor& m, const Tensor& n, const OptTensor& bias);
  static std::tuple<Tensor, Tensor> dora_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& m,
                                                        const Tensor& n);
  static std::tuple<Tensor, Tensor> down(const Tensor& x, const Tensor& W, const OptTensor& bias, int64_t act);
  static Tensor act_backward(Tensor dh, const Tensor& pre, const Tensor& h, double s, int64_t act);
  static Tensor residual_bias(const Tensor& residual, const OptTensor& bias, double s);
};

}  // namespace adaptune
