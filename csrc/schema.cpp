// Every op's schema, defined once. Implementations: cpu/*.cpp (CPU), cuda/*.cu (CUDA), one file per op family.
//
// Shapes: x (..., in), weight (out, in), bias (out,), A (r, in), B (out, r), magnitude (out,).
// Dropout stays in Python: `xd` is drop(x) (None without dropout), so kernel and reference see
// the same dropped input. Extra outputs (h = xd·Aᵀ, z, pre-activations) are saved for backward.
#include <torch/library.h>

TORCH_LIBRARY(adaptune, m) {
  // y = x·Wᵀ + b + s·(xd·Aᵀ)·Bᵀ  ->  (y (..., out), h (N, r))
  m.def("lora(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, Tensor? xd) "
        "-> (Tensor, Tensor)");
  // xs: the input of the low-rank path (xd if dropped else x)  ->  (dx, dxd, dA, dB)
  m.def("lora_backward(Tensor dy, Tensor xs, Tensor weight, Tensor A, Tensor B, Tensor h, float scale, "
        "bool dropped, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
  // n_i = ‖W_i + s·B_i·A‖ by the factored formula  ->  (n, W·Aᵀ, B·A·Aᵀ), float32 at least
  m.def("dora_norm(Tensor weight, Tensor A, Tensor B, float scale, Tensor? weight_norm_sq) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("dora_norm_backward(Tensor dn, Tensor n, Tensor weight, Tensor A, Tensor B, Tensor WA, Tensor BAA, "
        "float scale) -> (Tensor, Tensor)");
  // y = (m / n) ⊙ z + b, z = x·Wᵀ + s·(xd·Aᵀ)·Bᵀ  ->  (y, h (N, r), z (N, out))
  m.def("dora(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor magnitude, Tensor norm, "
        "float scale, Tensor? xd) -> (Tensor, Tensor, Tensor)");
  // -> (dx, dxd, dA, dB, dmagnitude, dnorm)
  m.def("dora_backward(Tensor dy, Tensor xs, Tensor weight, Tensor A, Tensor B, Tensor magnitude, "
        "Tensor norm, Tensor h, Tensor z, float scale, bool dropped, bool need_dx, bool need_dnorm) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y = residual + s·up(act(down(x)))  ->  (y, pre-activation (N, m), h = act(pre) (N, m))
  m.def("bottleneck(Tensor x, Tensor residual, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
        "Tensor? up_bias, float scale, str act) -> (Tensor, Tensor, Tensor)");
  // -> (dx, d down_weight, d down_bias, d up_weight, d up_bias); d residual = dy
  m.def("bottleneck_backward(Tensor dy, Tensor x, Tensor pre, Tensor h, Tensor down_weight, "
        "Tensor up_weight, float scale, str act, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Routed (a task per sample): x (N, ..., in), index (N,) in [-1, T), tables stacked on T: A (T, r, in),
  // B (T, out, r), magnitude and norm (T, out), down (T, m, d_in), up (T, d, m), scale (T,).
  m.def("lora_routed(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor scale, Tensor index, "
        "Tensor? xd) -> (Tensor, Tensor)");
  m.def("lora_routed_backward(Tensor dy, Tensor xs, Tensor weight, Tensor A, Tensor B, Tensor scale, "
        "Tensor index, Tensor h, bool dropped, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dora_routed(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor magnitude, Tensor norm, "
        "Tensor scale, Tensor index, Tensor? xd) -> (Tensor, Tensor, Tensor)");
  m.def("dora_routed_backward(Tensor dy, Tensor xs, Tensor weight, Tensor A, Tensor B, Tensor magnitude, "
        "Tensor norm, Tensor scale, Tensor index, Tensor h, Tensor z, bool dropped, bool need_dx, bool need_dnorm) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bottleneck_routed(Tensor x, Tensor residual, Tensor down_weight, Tensor down_bias, Tensor up_weight, "
        "Tensor up_bias, Tensor scale, Tensor index, str act) -> (Tensor, Tensor, Tensor)");
  m.def("bottleneck_routed_backward(Tensor dy, Tensor x, Tensor pre, Tensor h, Tensor down_weight, "
        "Tensor up_weight, Tensor scale, Tensor index, str act, bool need_dx) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
