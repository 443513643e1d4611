// CUDA side: the device struct for ops.h, activation math, and launch helpers.
// Kernels compute in float (double for double inputs) and run on the current stream.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"

namespace adaptune {

struct Cuda {
  ADAPTUNE_DEVICE_MEMBERS
};

// float for float/half/bfloat16, double for double
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// the current stream (at::cuda::getCurrentCUDAStream is this function)
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Threads per block of the elementwise kernels (grid-stride loops, launched with blocks_for): 8 warps, so
// several blocks fit on an SM at once (2048 threads on sm_80 and sm_90), and blocks_for's cap of 4096 blocks
// covers about a million elements per pass of the loop.
constexpr int kThreads = 256;

inline int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 4096 ? (b > 0 ? b : 1) : 4096);  // grid-stride loops cover the rest
}

template <typename T>
__device__ __forceinline__ T act_forward(T x, int64_t act) {
  switch (act) {
    case kRelu: return x > T(0) ? x : T(0);
    case kGelu: return T(0.5) * x * (T(1) + erf(x * T(0.70710678118654752)));
    case kGeluTanh: {
      const T inner = T(0.79788456080286536) * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + tanh(inner));
    }
    case kSilu: return x / (T(1) + exp(-x));
    case kTanh: return tanh(x);
    default: return x;
  }
}

// d act / d pre, given pre and h = act(pre)
template <typename T>
__device__ __forceinline__ T act_derivative(T x, T h, int64_t act) {
  switch (act) {
    case kRelu: return x > T(0) ? T(1) : T(0);
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + erf(x * T(0.70710678118654752)));
      const T pdf = exp(T(-0.5) * x * x) * T(0.39894228040143268);
      return cdf + x * pdf;
    }
    case kGeluTanh: {
      const T k0 = T(0.79788456080286536), k1 = T(0.044715);
      const T t = tanh(k0 * (x + k1 * x * x * x));
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k0 * (T(1) + T(3) * k1 * x * x);
    }
    case kSilu: {
      const T sig = T(1) / (T(1) + exp(-x));
      return sig * (T(1) + x * (T(1) - sig));
    }
    case kTanh: return T(1) - h * h;
    default: return T(1);
  }
}

}  // namespace adaptune
