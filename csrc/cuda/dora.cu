// DoRA on CUDA: the factored row norm and the (m / n) scaling epilogue as fused kernels.
#include <torch/library.h>

#include "fused.cuh"

namespace adaptune {
namespace {

// The tile of dora_scale_backward_kernel: a block of kTileCols x kTileRows threads covers kTileCols columns and
// reads kTileRows rows at a time.
// kTileCols: one warp (threadIdx.x) spans 32 consecutive columns of a row, so each read of dy and z and each
// write of dz is one coalesced transaction.
constexpr int kTileCols = 32;
// kTileRows: the warps per block (threadIdx.y), each on its own row; 8 x 32 = 256 threads per block.
constexpr int kTileRows = 8;
// kRowsPerBlock: about how many rows each block sums (gridDim.y = ceil(rows / kRowsPerBlock), at most
// kMaxRowBlocks): 32 rows per thread, enough to amortise a block's shared-memory reduction and its row of
// partial sums.
constexpr int64_t kRowsPerBlock = 256;
// kMaxRowBlocks: the most blocks along the rows (gridDim.y); larger inputs loop over the rows. Bounds the partial
// sums (kMaxRowBlocks x cols in the accumulation dtype) that are added afterwards in a fixed order.
constexpr int64_t kMaxRowBlocks = 1024;

// n_i = sqrt(max(wsq_i + Σ_k (2s·WA_ik + s²·BAA_ik)·B_ik, 0)); one thread per row (r is small).
template <typename T>
__global__ void dora_combine_kernel(const T* wsq, const T* WA, const T* BAA, const T* B, T* n, int64_t rows,
                                    int64_t r, T s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows; i += (int64_t)gridDim.x * blockDim.x) {
    T acc = wsq[i];
    for (int64_t k = 0; k < r; ++k) acc += (T(2) * s * WA[i * r + k] + s * s * BAA[i * r + k]) * B[i * r + k];
    n[i] = sqrt(acc > T(0) ? acc : T(0));
  }
}

// y = z·(m_j / n_j) + b_j over a contiguous (rows, cols) z
template <typename T, typename A>
__global__ void dora_scale_kernel(const T* z, const A* m, const A* n, const T* bias, T* y, int64_t total,
                                  int64_t cols) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % cols;
    A v = static_cast<A>(z[i]) * (m[j] / n[j]);
    if (bias != nullptr) v += static_cast<A>(bias[j]);
    y[i] = static_cast<T>(v);
  }
}

// dz = dy·(m_j / n_j); part[b, j] = Σ_{i in row chunk b} dy_ij·z_ij (x over columns, y over row chunks).
// Each block writes its own partial sums, reduced afterwards in a fixed order: dm is deterministic.
template <typename T, typename A>
__global__ void dora_scale_backward_kernel(const T* dy, const T* z, const A* m, const A* n, T* dz, A* part_out,
                                           int64_t rows, int64_t cols) {
  // +1 column: padding against shared-memory bank conflicts (the accesses below run along rows: none either way)
  __shared__ A part[kTileRows][kTileCols + 1];
  const int64_t j = blockIdx.x * kTileCols + threadIdx.x;
  A acc = 0;
  if (j < cols) {
    const A g = m[j] / n[j];
    for (int64_t i = blockIdx.y * kTileRows + threadIdx.y; i < rows; i += (int64_t)gridDim.y * kTileRows) {
      const A d = static_cast<A>(dy[i * cols + j]);
      dz[i * cols + j] = static_cast<T>(d * g);
      acc += d * static_cast<A>(z[i * cols + j]);
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    for (int k = 1; k < kTileRows; ++k) acc += part[k][threadIdx.x];
    part_out[blockIdx.y * cols + j] = acc;
  }
}

}  // namespace

Tensor Cuda::mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  // half / bfloat16 operands, float32 product straight from cuBLAS (no rounding to the input dtype)
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

Tensor Cuda::dora_combine(const Tensor& wsq, const Tensor& WA, const Tensor& BAA, const Tensor& B, double s) {
  const c10::cuda::OptionalCUDAGuard guard(WA.device());
  const auto w = wsq.contiguous(), a = WA.contiguous(), b = BAA.contiguous(), bb = B.contiguous();
  Tensor n = at::empty({a.size(0)}, a.options());
  if (a.size(0) == 0) return n;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "adaptune_dora_combine", [&] {
    dora_combine_kernel<scalar_t><<<blocks_for(a.size(0), kThreads), kThreads, 0, stream()>>>(
        w.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), bb.data_ptr<scalar_t>(),
        n.data_ptr<scalar_t>(), a.size(0), a.size(1), static_cast<scalar_t>(s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return n;
}

Tensor Cuda::dora_scale(const Tensor& z, const Tensor& m, const Tensor& n, const OptTensor& bias) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  const auto acc = acc_dtype(z.scalar_type());
  const Tensor zc = z.contiguous(), mc = m.to(acc).contiguous(), nc = n.to(acc).contiguous();
  const Tensor bc = bias ? bias->to(z.scalar_type()).contiguous() : Tensor();
  Tensor y = at::empty_like(zc);
  if (zc.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "adaptune_dora_scale", [&] {
    using A = typename Acc<scalar_t>::type;
    dora_scale_kernel<scalar_t, A><<<blocks_for(zc.numel(), kThreads), kThreads, 0, stream()>>>(
        zc.data_ptr<scalar_t>(), mc.data_ptr<A>(), nc.data_ptr<A>(), bias ? bc.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), zc.numel(), zc.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<Tensor, Tensor> Cuda::dora_scale_backward(const Tensor& dy, const Tensor& z, const Tensor& m,
                                                     const Tensor& n) {
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  const auto acc = acc_dtype(dy.scalar_type());
  const Tensor dyc = dy.contiguous(), zc = z.contiguous(), mc = m.to(acc).contiguous(), nc = n.to(acc).contiguous();
  Tensor dz = at::empty_like(dyc);
  const int64_t rows = dyc.size(0), cols = dyc.size(1);
  const int64_t gy = std::max<int64_t>(std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxRowBlocks),
                                       1);
  Tensor part = at::zeros({gy, cols}, dyc.options().dtype(acc));  // (row chunks, out)
  if (dyc.numel() > 0) {
    const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(gy)),
        block(kTileCols, kTileRows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dyc.scalar_type(), "adaptune_dora_scale_bwd", [&] {
      using A = typename Acc<scalar_t>::type;
      dora_scale_backward_kernel<scalar_t, A><<<grid, block, 0, stream()>>>(
          dyc.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(), mc.data_ptr<A>(), nc.data_ptr<A>(),
          dz.data_ptr<scalar_t>(), part.data_ptr<A>(), rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dz, part.sum(0).div_(nc).to(n.scalar_type())};
}

TORCH_LIBRARY_IMPL(adaptune, CUDA, m) { register_dora<Cuda>(m); }

}  // namespace adaptune
