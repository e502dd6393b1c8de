// Deterministic column sums of float32 partial sums: the second pass of the LayerNorm weight/bias
// gradients and of the GEMM bias gradient. out[c] = sum over r of partial[r][c].
//
// A block takes 32 columns; its 16 row slices each add every 16th partial row in increasing order,
// then slice sums are added in slice order. The order never depends on timing, so the result is the
// same bit for bit on every run.
#include <cuda_runtime.h>

#include "launch.h"
#include "mma.cuh"

namespace fastgpt::cuda {

namespace {

constexpr int kColumns = 32;  // one warp reads 128 contiguous bytes of a partial row
constexpr int kSlices = 16;   // rows in flight per column

template <typename T>
__global__ void __launch_bounds__(kColumns* kSlices)
    column_sums_kernel(const float* partial, int64_t rows, int cols, T* out) {
  __shared__ float slice_sums[kSlices][kColumns + 1];
  const int col = blockIdx.x * kColumns + threadIdx.x;
  float sum = 0.0f;
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += kSlices) sum += partial[r * cols + col];
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlices; ++s) total += slice_sums[s][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

}  // namespace

cudaError_t column_sums(const float* partial, int64_t rows, int cols, DType dtype, void* out, cudaStream_t stream) {
  if ((dtype != DType::kBFloat16 && dtype != DType::kFloat16) || rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (cols == 0) return cudaSuccess;  // nothing to write (and out may then be null)
  if (out == nullptr || (rows > 0 && partial == nullptr)) return cudaErrorInvalidValue;
  const dim3 block(kColumns, kSlices);
  const unsigned blocks = static_cast<unsigned>(ceil_div(cols, kColumns));
  if (dtype == DType::kBFloat16) {
    column_sums_kernel<<<blocks, block, 0, stream>>>(partial, rows, cols, static_cast<__nv_bfloat16*>(out));
  } else {
    column_sums_kernel<<<blocks, block, 0, stream>>>(partial, rows, cols, static_cast<__half*>(out));
  }
  return cudaGetLastError();
}

}  // namespace fastgpt::cuda
