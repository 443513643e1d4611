// The device-generic part of every op: shape checks and GEMMs (at::mm / in-place addmm_, which run
// on the current stream). The fused elementwise parts come from a device struct K (cpu/fused.h:
// Cpu, cuda/fused.cuh: Cuda) declaring the static members of ADAPTUNE_DEVICE_MEMBERS below. Each op
// family's m.impl calls are written once, in register_<family> (at the end of this file; of routed.h for
// the routed family); cpu/<family>.cpp and cuda/<family>.cu call it in their key's TORCH_LIBRARY_IMPL block.
#pragma once
#include <torch/library.h>

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

namespace adaptune {
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// What a device struct provides: declared once here, defined next to the op that uses them.
//   mm_acc(a, b, acc) -> a·b in the accumulation dtype acc, whatever a's and b's dtype
//   dora_combine(wsq, WA, BAA, B, s) -> n          dora_scale(z, m, n, bias) -> (m / n) ⊙ z + b
//   dora_scale_backward(dy, z, m, n) -> (dz, dm)   down(x, W, bias, act) -> (pre, h = act(pre))
//   act_backward(dh, pre, h, s, act) -> da          residual_bias(residual, bias, s) -> residual + s·b
//   routed_scale_backward(dy, z, ratio) -> (dy ⊙ ratio_n, Σ_rows dy ⊙ z per sample): dy, z (N, L, out),
//     ratio (N, out) in the accumulation dtype
#define ADAPTUNE_DEVICE_MEMBERS                                                                                   \
  static Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc);                                    \
  static Tensor dora_combine(const Tensor& wsq, const Tensor& WA, const Tensor& BAA, const Tensor& B, double s); \
  static Tensor dora_scale(const Tensor& z, const Tensor& m, const Tensor& n, const OptTensor& bias);            \
  static std::tuple<Tensor, Tensor> dora_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& m,      \
                                                        const Tensor& n);                                        \
  static std::tuple<Tensor, Tensor> routed_scale_backward(const Tensor& dy, const Tensor& z,                    \
                                                          const Tensor& ratio);                                  \
  static std::tuple<Tensor, Tensor> down(const Tensor& x, const Tensor& W, const OptTensor& bias, int64_t act);  \
  static Tensor act_backward(Tensor dh, const Tensor& pre, const Tensor& h, double s, int64_t act);              \
  static Tensor residual_bias(const Tensor& residual, const OptTensor& bias, double s);

enum Act : int64_t { kRelu = 0, kGelu, kGeluTanh, kSilu, kTanh, kIdentity };

inline int64_t act_code(c10::string_view act) {
  const std::string a(act.data(), act.size());
  if (a == "relu") return kRelu;
  if (a == "gelu") return kGelu;
  if (a == "gelu_tanh") return kGeluTanh;
  if (a == "silu") return kSilu;
  if (a == "tanh") return kTanh;
  if (a == "identity") return kIdentity;
  TORCH_CHECK(false, "adaptune: unknown activation '", a, "'; valid: relu, gelu, gelu_tanh, silu, tanh, identity");
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

inline Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

inline void check_low_rank(const Tensor& x, const Tensor& W, const OptTensor& bias, const Tensor& A,
                           const Tensor& B) {
  TORCH_CHECK(x.dim() >= 1 && W.dim() == 2 && A.dim() == 2 && B.dim() == 2, "adaptune: x (..., in), weight (out, in), "
              "A (r, in), B (out, r) expected; got x ", x.sizes(), ", weight ", W.sizes(), ", A ", A.sizes(), ", B ", B.sizes());
  TORCH_CHECK(x.size(-1) == W.size(1) && A.size(1) == W.size(1) && B.size(0) == W.size(0) && B.size(1) == A.size(0),
              "adaptune: shape mismatch: x ", x.sizes(), ", weight ", W.sizes(), ", A ", A.sizes(), ", B ", B.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == W.size(0)), "adaptune: bias must be (", W.size(0), ",)");
}

// y = x·Wᵀ (+ b) with s·h·Bᵀ added in place; h = xs·Aᵀ. Returns (y (N, out), h (N, r)).
inline std::tuple<Tensor, Tensor> low_rank_linear(const Tensor& x2, const Tensor& xs2, const Tensor& W,
                                                  const OptTensor& bias, const Tensor& A, const Tensor& B, double s) {
  Tensor h = at::mm(xs2, A.t());                                        // (N, r)
  Tensor y = bias ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());    // (N, out)
  y.addmm_(h, B.t(), 1.0, s);
  return {y, h};
}

// Gradients of y = x·Wᵀ + s·(xs·Aᵀ)·Bᵀ given dy (N, out): (dx, dxd, dA, dB).
inline std::tuple<Tensor, Tensor, Tensor, Tensor> low_rank_grads(const Tensor& dy2, const Tensor& xs, const Tensor& W,
    const Tensor& A, const Tensor& B, const Tensor& h, double s, bool dropped, bool need_dx) {
  const Tensor xs2 = xs.reshape({-1, xs.size(-1)});
  Tensor t = at::mm(dy2, B);                                            // (N, r)
  if (s != 1.0) t.mul_(s);
  Tensor dB = at::mm(dy2.t(), h);                                       // (out, r)
  if (s != 1.0) dB.mul_(s);
  Tensor dA = at::mm(t.t(), xs2);                                       // (r, in)
  Tensor dx = empty0(xs), dxd = empty0(xs);
  if (need_dx) {
    dx = at::mm(dy2, W);                                                // (N, in)
    if (dropped) dxd = at::mm(t, A).view(xs.sizes());
    else dx.addmm_(t, A);
    dx = dx.view(xs.sizes());
  }
  return {dx, dxd, dA, dB};
}

inline std::tuple<Tensor, Tensor> lora_forward(const Tensor& x, const Tensor& W, const OptTensor& bias,
                                               const Tensor& A, const Tensor& B, double s, const OptTensor& xd) {
  check_low_rank(x, W, bias, A, B);
  TORCH_CHECK(!xd || xd->sizes() == x.sizes(), "adaptune: xd must have x's shape");
  const Tensor x2 = x.reshape({-1, x.size(-1)});
  auto [y, h] = low_rank_linear(x2, xd ? xd->reshape({-1, x.size(-1)}) : x2, W, bias, A, B, s);
  return {at::_unsafe_view(y, with_last(x.sizes(), W.size(0))), h};  // untracked: an output, not a view
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> lora_backward(const Tensor& dy, const Tensor& xs, const Tensor& W,
    const Tensor& A, const Tensor& B, const Tensor& h, double s, bool dropped, bool need_dx) {
  return low_rank_grads(dy.reshape({-1, W.size(0)}), xs, W, A, B, h, s, dropped, need_dx);
}

// A (r, in) and B (out, r), or stacked per task: A (T, r, in) and B (T, out, r), n then (T, out). The
// stacked form reads W once for all tasks: W·[A_1; …; A_T]ᵀ is one GEMM.
inline int64_t norm_tasks(const Tensor& W, const Tensor& A, const Tensor& B) {
  const bool stacked = A.dim() == 3;
  TORCH_CHECK(W.dim() == 2 && (A.dim() == 2 || stacked) && B.dim() == A.dim() &&
              (!stacked || A.size(0) == B.size(0)) && A.size(-1) == W.size(1) && B.size(-2) == W.size(0) && B.size(-1) == A.size(-2),
              "adaptune: dora_norm shapes: weight ", W.sizes(), ", A (r, in) or (T, r, in) ", A.sizes(),
              ", B (out, r) or (T, out, r) ", B.sizes());
  return stacked ? A.size(0) : 1;
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> dora_norm_forward(const Tensor& W, const Tensor& A, const Tensor& B, double s,
                                                     const OptTensor& wsq) {
  const int64_t t = norm_tasks(W, A, B), out = W.size(0), in = W.size(1), r = A.size(-2);
  const auto ct = c10::promoteTypes(W.scalar_type(), at::kFloat);
  Tensor WA = K::mm_acc(W, A.to(W.scalar_type()).reshape({t * r, in}).t(), ct)   // (out, T·r)
                  .view({out, t, r}).transpose(0, 1).contiguous();                 // (T, out, r)
  const Tensor Af = A.to(ct).reshape({t, r, in}), Bf = B.to(ct).reshape({t, out, r});
  Tensor BAA = at::bmm(Bf, at::bmm(Af, Af.transpose(1, 2)));                       // (T, out, r)
  Tensor w2 = wsq ? wsq->to(ct) : W.to(ct).square().sum(1);                        // (out,)
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == out, "adaptune: weight_norm_sq must be (", out, ",)");
  Tensor n = K::dora_combine(w2.repeat({t}), WA.view({t * out, r}), BAA.view({t * out, r}),
                             Bf.reshape({t * out, r}), s);
  const auto shape = with_last(B.sizes(), r);                                      // WA's and BAA's: B's
  return {n.view(B.sizes().slice(0, B.dim() - 1)), WA.view(shape), BAA.view(shape)};
}

// n² = ‖W_i‖² + 2s·WA_i·B_i + s²·BAA_i·B_i: dB = dsq·(2s·WA + 2s²·BAA), dA = 2s·(dsq⊙B)ᵀ·W + 2s²·(Bᵀ·(dsq⊙B))·A.
template <class K>
std::tuple<Tensor, Tensor> dora_norm_backward(const Tensor& dn, const Tensor& n, const Tensor& W, const Tensor& A,
    const Tensor& B, const Tensor& WA, const Tensor& BAA, double s) {
  const int64_t t = norm_tasks(W, A, B), out = W.size(0), in = W.size(1), r = A.size(-2);
  const auto ct = n.scalar_type();
  Tensor dsq = at::where(n > 0, dn.to(ct) / (2 * n), at::zeros({}, n.options())).unsqueeze(-1);  // (…, out, 1)
  const Tensor Af = A.to(ct).reshape({t, r, in}), Bf = B.to(ct);
  Tensor dB = (WA * (2 * s) + BAA * (2 * s * s)) * dsq;                            // B's shape
  Tensor DB = (Bf * dsq).reshape({t, out, r});
  Tensor dA = K::mm_acc(DB.to(W.scalar_type()).transpose(1, 2).reshape({t * r, out}), W, ct)
                  .mul_(2 * s).view({t, r, in});                                   // (T, r, in)
  dA.baddbmm_(at::bmm(Bf.reshape({t, out, r}).transpose(1, 2), DB), Af, 1.0, 2 * s * s);
  return {dA.view(A.sizes()).to(A.scalar_type()), dB.to(B.scalar_type())};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> dora_forward(const Tensor& x, const Tensor& W, const OptTensor& bias, const Tensor& A,
    const Tensor& B, const Tensor& m, const Tensor& n, double s, const OptTensor& xd) {
  check_low_rank(x, W, bias, A, B);
  TORCH_CHECK(m.sizes() == n.sizes() && m.dim() == 1 && m.size(0) == W.size(0), "adaptune: magnitude and norm must be (",
              W.size(0), ",)");
  TORCH_CHECK(!xd || xd->sizes() == x.sizes(), "adaptune: xd must have x's shape");
  const Tensor x2 = x.reshape({-1, x.size(-1)});
  auto [z, h] = low_rank_linear(x2, xd ? xd->reshape({-1, x.size(-1)}) : x2, W, std::nullopt, A, B, s);
  Tensor y = K::dora_scale(z, m, n, bias);                              // (m / n) ⊙ z + b, one pass
  return {at::_unsafe_view(y, with_last(x.sizes(), W.size(0))), h, z};  // untracked: an output, not a view
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dora_backward(const Tensor& dy, const Tensor& xs,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& m, const Tensor& n, const Tensor& h,
    const Tensor& z, double s, bool dropped, bool need_dx, bool need_dnorm) {
  auto [dz, dm] = K::dora_scale_backward(dy.reshape({-1, W.size(0)}), z, m, n);  // dm in n's accumulation dtype
  auto [dx, dxd, dA, dB] = low_rank_grads(dz, xs, W, A, B, h, s, dropped, need_dx);
  Tensor dnorm = need_dnorm ? (-dm * m.to(dm.scalar_type()) / n).to(n.scalar_type()) : empty0(n);
  return {dx, dxd, dA, dB, dm.to(m.scalar_type()), dnorm};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> bottleneck_forward(const Tensor& x, const Tensor& residual, const Tensor& Wd,
    const OptTensor& bd, const Tensor& Wu, const OptTensor& bu, double s, c10::string_view act) {
  const int64_t code = act_code(act);
  TORCH_CHECK(Wd.dim() == 2 && Wu.dim() == 2 && x.dim() >= 1 && residual.dim() >= 1 && Wd.size(1) == x.size(-1) &&
              Wu.size(1) == Wd.size(0) && Wu.size(0) == residual.size(-1) && x.numel() / x.size(-1) == residual.numel() /
              residual.size(-1), "adaptune: bottleneck shapes: x ", x.sizes(), ", residual ", residual.sizes(),
              ", down ", Wd.sizes(), ", up ", Wu.sizes());
  auto [pre, h] = K::down(x.reshape({-1, x.size(-1)}), Wd, bd, code);   // (N, m): bias + act fused
  Tensor y = K::residual_bias(residual.reshape({-1, residual.size(-1)}), bu, s);  // residual + s·b_up
  y.addmm_(h, Wu.t(), 1.0, s);
  return {at::_unsafe_view(y, residual.sizes()), pre, h};  // untracked: an output, not a view
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_backward(const Tensor& dy, const Tensor& x,
    const Tensor& pre, const Tensor& h, const Tensor& Wd, const Tensor& Wu, double s, c10::string_view act, bool need_dx) {
  const int64_t code = act_code(act);
  const Tensor dy2 = dy.reshape({-1, Wu.size(0)}), x2 = x.reshape({-1, x.size(-1)});
  Tensor dWu = at::mm(dy2.t(), h);                                      // (d, m)
  if (s != 1.0) dWu.mul_(s);
  Tensor dbu = dy2.sum(0).mul_(s);
  Tensor da = K::act_backward(at::mm(dy2, Wu), pre, h, s, code);        // (N, m)
  Tensor dbd = da.sum(0);
  Tensor dWd = at::mm(da.t(), x2);                                      // (m, d_in)
  Tensor dx = need_dx ? at::mm(da, Wd).view(x.sizes()) : empty0(x);
  return {dx, dWd, dbd, dWu, dbu};
}

// Each family's ops, the same on every backend but for the device struct K: a new op of a family is one
// line here, and a backend registers a family with one call, register_<family><K>(m) (register_lora(m)).
inline void register_lora(torch::Library& m) {  // no device part
  m.impl("lora", &lora_forward);
  m.impl("lora_backward", &lora_backward);
}

template <class K>
void register_dora(torch::Library& m) {
  m.impl("dora_norm", &dora_norm_forward<K>);
  m.impl("dora_norm_backward", &dora_norm_backward<K>);
  m.impl("dora", &dora_forward<K>);
  m.impl("dora_backward", &dora_backward<K>);
}

template <class K>
void register_bottleneck(torch::Library& m) {
  m.impl("bottleneck", &bottleneck_forward<K>);
  m.impl("bottleneck_backward", &bottleneck_backward<K>);
}

}  // namespace adaptune
