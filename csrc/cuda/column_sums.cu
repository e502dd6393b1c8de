// Deterministic column sums: of float32 partial sums (the second pass of the LayerNorm weight/bias
// gradients and of the GEMM bias gradient), and of a 16-bit matrix (the FFN's bias gradient where
// cuBLASLt has no bias-gradient epilogue for a GEMM). out[c] = sum over r of in[r][c], in float32.
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

// blockIdx.y picks the matrix: 0 sums `partial` into `out`, 1 sums `second_partial` into `second_out`
// (one launch for the two LayerNorm parameter gradients).
template <typename TIn, typename T>
__global__ void __launch_bounds__(kColumns* kSlices)
    column_sums_kernel(const TIn* partial, int64_t rows, int cols, int64_t ld, T* out, const TIn* second_partial,
                       T* second_out) {
  __shared__ float slice_sums[kSlices][kColumns + 1];
  if (blockIdx.y == 1) {
    partial = second_partial;
    out = second_out;
  }
  const int col = blockIdx.x * kColumns + threadIdx.x;
  float sum = 0.0f;
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += kSlices) {
      if constexpr (std::is_same_v<TIn, float>) {
        sum += partial[r * ld + col];
      } else {
        sum += to_float(partial[r * ld + col]);
      }
    }
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
  return column_sums_pair(partial, out, nullptr, nullptr, rows, cols, dtype, stream);
}

cudaError_t column_sums_pair(const float* partial, void* out, const float* second_partial, void* second_out,
                             int64_t rows, int cols, DType dtype, cudaStream_t stream) {
  if ((dtype != DType::kBFloat16 && dtype != DType::kFloat16) || rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (cols == 0) return cudaSuccess;  // nothing to write (and out may then be null)
  const bool second = second_out != nullptr;
  if (out == nullptr || (rows > 0 && partial == nullptr) || (second && rows > 0 && second_partial == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const dim3 block(kColumns, kSlices);
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kColumns)), second ? 2 : 1);
  if (dtype == DType::kBFloat16) {
    column_sums_kernel<<<grid, block, 0, stream>>>(partial, rows, cols, int64_t(cols), static_cast<__nv_bfloat16*>(out),
                                                   second_partial, static_cast<__nv_bfloat16*>(second_out));
  } else {
    column_sums_kernel<<<grid, block, 0, stream>>>(partial, rows, cols, int64_t(cols), static_cast<__half*>(out),
                                                   second_partial, static_cast<__half*>(second_out));
  }
  return cudaGetLastError();
}

cudaError_t column_sums_16bit(const void* matrix, int64_t rows, int cols, int64_t ld, DType dtype, void* out,
                              cudaStream_t stream) {
  if ((dtype != DType::kBFloat16 && dtype != DType::kFloat16) || rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (cols == 0) return cudaSuccess;
  if (out == nullptr || (rows > 0 && (matrix == nullptr || ld < cols))) return cudaErrorInvalidValue;
  const dim3 block(kColumns, kSlices);
  const unsigned blocks = static_cast<unsigned>(ceil_div(cols, kColumns));
  if (dtype == DType::kBFloat16) {
    column_sums_kernel<<<blocks, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(matrix), rows, cols, ld,
                                                     static_cast<__nv_bfloat16*>(out),
                                                     static_cast<const __nv_bfloat16*>(nullptr),
                                                     static_cast<__nv_bfloat16*>(nullptr));
  } else {
    column_sums_kernel<<<blocks, block, 0, stream>>>(static_cast<const __half*>(matrix), rows, cols, ld,
                                                     static_cast<__half*>(out), static_cast<const __half*>(nullptr),
                                                     static_cast<__half*>(nullptr));
  }
  return cudaGetLastError();
}

}  // namespace fastgpt::cuda
