// DoRA on CPU: the factored row norm's combination and the (m / n) scaling with ATen, and the fused
// backward pass of the scaling (single-task and routed).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

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

namespace {

// For G groups of L rows (dy, z: (G·L, cols); g: (G, cols) in the accumulation dtype): dz = dy ⊙ g_group
// and sums_group = Σ_rows dy ⊙ z, in one pass over dy and z. Each group's rows are split into a fixed number
// of chunks that sum their own partials, added in chunk order afterwards, so the result does not depend
// on the number of threads.
std::tuple<Tensor, Tensor> scale_pass(const Tensor& dy, const Tensor& z, const Tensor& g, int64_t groups) {
  const Tensor dyc = dy.contiguous(), zc = z.contiguous(), gc = g.contiguous();
  const int64_t rows = dyc.numel() / std::max<int64_t>(dyc.size(-1), 1), cols = dyc.size(-1);
  const int64_t per = groups ? rows / groups : 0;  // rows per group
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>(per, 32 / std::max<int64_t>(groups, 1)));
  Tensor dz = at::empty_like(dyc);
  Tensor part = at::zeros({groups * split, cols}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dyc.scalar_type(), "dora_scale_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(g.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "adaptune: norm dtype mismatch");
    const scalar_t* pdy = dyc.const_data_ptr<scalar_t>();
    const scalar_t* pz = zc.const_data_ptr<scalar_t>();
    const acc_t* pg = gc.const_data_ptr<acc_t>();
    scalar_t* pdz = dz.mutable_data_ptr<scalar_t>();
    acc_t* pp = part.mutable_data_ptr<acc_t>();
    at::parallel_for(0, groups * split, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t group = c / split, k = c % split;
        const acc_t* gi = pg + group * cols;
        acc_t* acc = pp + c * cols;
        for (int64_t i = group * per + per * k / split; i < group * per + per * (k + 1) / split; ++i) {
          const scalar_t* dyi = pdy + i * cols;
          const scalar_t* zi = pz + i * cols;
          scalar_t* dzi = pdz + i * cols;
          for (int64_t j = 0; j < cols; ++j) {
            const acc_t d = static_cast<acc_t>(dyi[j]);
            dzi[j] = static_cast<scalar_t>(d * gi[j]);
            acc[j] += d * static_cast<acc_t>(zi[j]);
          }
        }
      }
    });
  });
  return {dz.view(dy.sizes()), part.view({groups, split, cols}).sum(1)};
}

}  // namespace

// dz = dy·(m / n) and dm = Σ_rows dy ⊙ z / n: one group of all rows.
std::tuple<Tensor, Tensor> Cpu::dora_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& m,
                                                    const Tensor& n) {
  const Tensor nf = n.to(c10::promoteTypes(n.scalar_type(), at::kFloat));  // sums in the accumulation dtype
  auto [dz, sums] = scale_pass(dy, z, scale_of(m, nf, nf.scalar_type()).unsqueeze(0), 1);
  return {dz, sums.squeeze(0).div_(nf)};
}

// The routed form: each sample its own (m / n) row, its own sum.
std::tuple<Tensor, Tensor> Cpu::routed_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& ratio) {
  return scale_pass(dy, z, ratio, dy.size(0));
}

TORCH_LIBRARY_IMPL(adaptune, CPU, m) { register_dora<Cpu>(m); }

}  // namespace adaptune
