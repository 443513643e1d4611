// The routed ops: a task per sample. x (N, L, in) holds N samples of L rows each; index (N,) gives each
// sample's task t in [0, T), -1 for none. Each sample's factors are gathered from the stacked task tables
// (index_select: r·in + out·r values per sample, not x) and the low-rank and bottleneck GEMMs run batched
// over the samples (bmm), one launch for all tasks, in any order of the samples: x is never copied or
// regrouped. Gradients of the tables are the per-sample ones summed into their task's rows (index_add_).
// Device-generic ATen; register_routed (below) is called by cpu/routed.cpp and cuda/routed.cu.
#pragma once
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros_like.h>

#include "ops.h"

namespace adaptune {

// One task table gathered per sample, and each sample's scale (0 where index is -1: no update).
struct Gathered {
  Tensor idx, scale;  // (N,) clamped indices; (N, 1, 1) in the compute dtype
  Tensor take(const Tensor& table) const { return table.index_select(0, idx); }
};

inline Gathered gather(const Tensor& index, const Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK(index.dim() == 1 && scale.dim() == 1, "adaptune: index (N,) and scale (T,) expected; got index ",
              index.sizes(), ", scale ", scale.sizes());
  Tensor idx = index.clamp_min(0);
  Tensor s = scale.index_select(0, idx).mul(index.ge(0)).to(dtype).view({-1, 1, 1});
  return {idx, s};
}

inline Tensor samples(const Tensor& x, int64_t n) {  // (N, ...) -> (N, L, last)
  TORCH_CHECK(x.dim() >= 1 && x.size(0) == n, "adaptune: x must have the route's ", n, " samples first; got ",
              x.sizes());
  return x.reshape({n, -1, x.size(-1)});
}

inline void check_tables(const Tensor& x, const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& scale) {
  TORCH_CHECK(W.dim() == 2 && A.dim() == 3 && B.dim() == 3 && A.size(0) == B.size(0) && A.size(0) == scale.size(0) &&
              A.size(2) == W.size(1) && B.size(1) == W.size(0) && B.size(2) == A.size(1) && x.size(-1) == W.size(1),
              "adaptune: routed shapes: x ", x.sizes(), ", weight ", W.sizes(), ", A (T, r, in) ", A.sizes(),
              ", B (T, out, r) ", B.sizes(), ", scale (T,) ", scale.sizes());
}

// y = x·Wᵀ (+ b) + s_n·(xs_n·A_nᵀ)·B_nᵀ per sample n: (y (N·L, out), h (N, L, r) with the scale in it).
inline std::tuple<Tensor, Tensor> routed_low_rank(const Tensor& x3, const Tensor& xs3, const Tensor& W,
                                                  const OptTensor& bias, const Tensor& A, const Tensor& B,
                                                  const Gathered& g) {
  const Tensor x2 = x3.reshape({-1, x3.size(-1)});
  Tensor y = bias ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());                 // (N·L, out)
  Tensor h = at::bmm(xs3, g.take(A).transpose(1, 2)).mul_(g.scale);                    // (N, L, r)
  y.view({x3.size(0), x3.size(1), W.size(0)}).baddbmm_(h, g.take(B).transpose(1, 2));  // += h·B_nᵀ
  return {y, h};
}

// Gradients of routed_low_rank given dz (N, L, out): (dx, dxd, dA, dB).
inline std::tuple<Tensor, Tensor, Tensor, Tensor> routed_low_rank_grads(const Tensor& dz3, const Tensor& xs3,
    const Tensor& W, const Tensor& A, const Tensor& B, const Gathered& g, const Tensor& h, bool dropped, bool need_dx,
    at::IntArrayRef x_sizes) {
  const Tensor Bg = g.take(B);
  Tensor t = at::bmm(dz3, Bg).mul_(g.scale);                                           // (N, L, r): d(xs·Aᵀ)
  Tensor dA = at::zeros_like(A).index_add_(0, g.idx, at::bmm(t.transpose(1, 2), xs3));  // rows of -1 add zeros
  Tensor dB = at::zeros_like(B).index_add_(0, g.idx, at::bmm(dz3.transpose(1, 2), h));
  Tensor dx = empty0(xs3), dxd = empty0(xs3);
  if (need_dx) {
    dx = at::mm(dz3.reshape({-1, W.size(0)}), W).view(xs3.sizes());                    // (N, L, in)
    Tensor low = at::bmm(t, g.take(A));
    if (dropped) dxd = low.view(x_sizes);
    else dx.add_(low);
    dx = dx.view(x_sizes);
  }
  return {dx, dxd, dA, dB};
}

inline std::tuple<Tensor, Tensor> lora_routed_forward(const Tensor& x, const Tensor& W, const OptTensor& bias,
    const Tensor& A, const Tensor& B, const Tensor& scale, const Tensor& index, const OptTensor& xd) {
  check_tables(x, W, A, B, scale);
  const int64_t n = index.size(0);
  const Gathered g = gather(index, scale, x.scalar_type());
  auto [y, h] = routed_low_rank(samples(x, n), xd ? samples(*xd, n) : samples(x, n), W, bias, A, B, g);
  return {at::_unsafe_view(y, with_last(x.sizes(), W.size(0))), h};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> lora_routed_backward(const Tensor& dy, const Tensor& xs,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& scale, const Tensor& index, const Tensor& h,
    bool dropped, bool need_dx) {
  const int64_t n = index.size(0);
  const Gathered g = gather(index, scale, xs.scalar_type());
  return routed_low_rank_grads(samples(dy, n), samples(xs, n), W, A, B, g, h, dropped, need_dx, xs.sizes());
}

// Each sample's m / n row (N, 1, out) in the compute dtype, 1 where index is -1.
inline Tensor routed_ratio(const Tensor& m, const Tensor& norm, const Gathered& g, const Tensor& index,
                           at::ScalarType dtype) {
  Tensor ratio = (m.to(norm.scalar_type()) / norm).index_select(0, g.idx);                 // (N, out)
  return at::where(index.ge(0).unsqueeze(1), ratio, at::ones({}, ratio.options())).to(dtype).unsqueeze(1);
}

// y = (m_t / n_t) ⊙ z + b, z = x·Wᵀ + s_t·(xd·Aᵀ)·B_tᵀ  ->  (y, h (N, L, r), z (N, L, out))
inline std::tuple<Tensor, Tensor, Tensor> dora_routed_forward(const Tensor& x, const Tensor& W, const OptTensor& bias,
    const Tensor& A, const Tensor& B, const Tensor& m, const Tensor& norm, const Tensor& scale, const Tensor& index,
    const OptTensor& xd) {
  check_tables(x, W, A, B, scale);
  TORCH_CHECK(m.sizes() == norm.sizes() && m.dim() == 2 && m.size(0) == A.size(0) && m.size(1) == W.size(0),
              "adaptune: magnitude and norm must be (T, out) = (", A.size(0), ", ", W.size(0), ")");
  const int64_t n = index.size(0);
  const Gathered g = gather(index, scale, x.scalar_type());
  const Tensor x3 = samples(x, n);
  auto [z, h] = routed_low_rank(x3, xd ? samples(*xd, n) : x3, W, std::nullopt, A, B, g);
  Tensor z3 = at::_unsafe_view(z, {n, x3.size(1), W.size(0)});  // saved for backward, not a view
  const Tensor ratio = routed_ratio(m, norm, g, index, z.scalar_type());
  Tensor y = bias ? at::addcmul(*bias, z3, ratio) : z3 * ratio;                        // one pass
  return {at::_unsafe_view(y, with_last(x.sizes(), W.size(0))), h, z3};
}

// -> (dx, dxd, dA, dB, dmagnitude (T, out), dnorm (T, out)); dz and each sample's d(m / n) in one pass (K)
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dora_routed_backward(const Tensor& dy,
    const Tensor& xs, const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& m, const Tensor& norm,
    const Tensor& scale, const Tensor& index, const Tensor& h, const Tensor& z, bool dropped, bool need_dx,
    bool need_dnorm) {
  const int64_t n = index.size(0);
  const Gathered g = gather(index, scale, xs.scalar_type());
  const auto ct = c10::promoteTypes(norm.scalar_type(), at::kFloat);                   // the accumulation dtype
  const Tensor nf = norm.to(ct);
  auto [dz3, dr] = K::routed_scale_backward(samples(dy, n), z, routed_ratio(m, nf, g, index, ct).squeeze(1));
  auto [dx, dxd, dA, dB] = routed_low_rank_grads(dz3, samples(xs, n), W, A, B, g, h, dropped, need_dx, xs.sizes());
  dr.mul_(index.ge(0).unsqueeze(1));                                                   // (N, out): d(m/n) per sample
  Tensor dratio = at::zeros_like(nf).index_add_(0, g.idx, dr);                        // (T, out)
  Tensor dm = dratio / nf;
  Tensor dnorm = need_dnorm ? (-dm * m.to(ct) / nf).to(norm.scalar_type()) : empty0(norm);
  return {dx, dxd, dA, dB, dm.to(m.scalar_type()), dnorm};
}

inline Tensor activate(const Tensor& pre, int64_t act) {
  switch (act) {
    case kRelu: return at::relu(pre);
    case kGelu: return at::gelu(pre);
    case kGeluTanh: return at::gelu(pre, "tanh");
    case kSilu: return at::silu(pre);
    case kTanh: return at::tanh(pre);
    default: return pre.clone();
  }
}

// y = residual + s_t·up_t(act(down_t(x)))  ->  (y, pre (N, L, m), h = act(pre))
inline std::tuple<Tensor, Tensor, Tensor> bottleneck_routed_forward(const Tensor& x, const Tensor& residual,
    const Tensor& Wd, const Tensor& bd, const Tensor& Wu, const Tensor& bu, const Tensor& scale, const Tensor& index,
    c10::string_view act) {
  const int64_t code = act_code(act), n = index.size(0);
  TORCH_CHECK(Wd.dim() == 3 && Wu.dim() == 3 && bd.dim() == 2 && bu.dim() == 2 && Wd.size(2) == x.size(-1) &&
              Wu.size(2) == Wd.size(1) && Wu.size(1) == residual.size(-1) && bd.size(1) == Wd.size(1) &&
              bu.size(1) == Wu.size(1) && scale.size(0) == Wd.size(0), "adaptune: routed bottleneck shapes: x ",
              x.sizes(), ", residual ", residual.sizes(), ", down (T, m, d) ", Wd.sizes(), ", up (T, d, m) ", Wu.sizes());
  const Gathered g = gather(index, scale, x.scalar_type());
  const Tensor x3 = samples(x, n), r3 = samples(residual, n);
  TORCH_CHECK(x3.size(1) == r3.size(1), "adaptune: x and residual must have the same rows");
  Tensor pre = at::baddbmm(g.take(bd).unsqueeze(1), x3, g.take(Wd).transpose(1, 2));  // (N, L, m)
  Tensor h = activate(pre, code);
  Tensor y = at::baddbmm(g.take(bu).unsqueeze(1), h, g.take(Wu).transpose(1, 2)).mul_(g.scale).add_(r3);
  return {at::_unsafe_view(y, residual.sizes()), pre, h};
}

// -> (dx, d down (T, m, d), d down_bias (T, m), d up (T, d, m), d up_bias (T, d)); d residual = dy
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_routed_backward(const Tensor& dy, const Tensor& x,
    const Tensor& pre, const Tensor& h, const Tensor& Wd, const Tensor& Wu, const Tensor& scale, const Tensor& index,
    c10::string_view act, bool need_dx) {
  const int64_t code = act_code(act), n = index.size(0);
  const Gathered g = gather(index, scale, x.scalar_type());
  const Tensor dys = samples(dy, n) * g.scale, x3 = samples(x, n);                    // (N, L, d) scaled
  Tensor dWu = at::zeros_like(Wu).index_add_(0, g.idx, at::bmm(dys.transpose(1, 2), h));
  Tensor dbu = at::zeros({Wu.size(0), Wu.size(1)}, Wu.options()).index_add_(0, g.idx, dys.sum(1));
  Tensor dh = at::bmm(dys, g.take(Wu));                                                // (N, L, m)
  Tensor da = K::act_backward(dh.reshape({-1, dh.size(-1)}), pre.reshape({-1, pre.size(-1)}),
                              h.reshape({-1, h.size(-1)}), 1.0, code).view(dh.sizes());
  Tensor dWd = at::zeros_like(Wd).index_add_(0, g.idx, at::bmm(da.transpose(1, 2), x3));
  Tensor dbd = at::zeros({Wd.size(0), Wd.size(1)}, Wd.options()).index_add_(0, g.idx, da.sum(1));
  Tensor dx = need_dx ? at::bmm(da, g.take(Wd)).view(x.sizes()) : empty0(x);
  return {dx, dWd, dbd, dWu, dbu};
}

// The routed family's ops for device struct K (as the other families' at the end of ops.h).
template <class K>
void register_routed(torch::Library& m) {
  m.impl("lora_routed", &lora_routed_forward);
  m.impl("lora_routed_backward", &lora_routed_backward);
  m.impl("dora_routed", &dora_routed_forward);
  m.impl("dora_routed_backward", &dora_routed_backward<K>);
  m.impl("bottleneck_routed", &bottleneck_routed_forward);
  m.impl("bottleneck_routed_backward", &bottleneck_routed_backward<K>);
}

}  // namespace adaptune
