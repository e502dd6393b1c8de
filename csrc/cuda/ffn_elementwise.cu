// The FFN's activation passes next to its cuBLASLt GEMMs (api_cuda.inc), for what cuBLASLt's epilogues
// cannot do: exact gelu, relu and silu (cuBLASLt's GELU epilogue is the tanh form, and its ReLU one keeps a
// bitmask rather than the pre-activation h that ffn_forward returns), and, for every activation,
// recomputing act(h) from the saved h in the backward.
//   forward:  out = act(h)                                          (one read, one write per element)
//   backward: grad *= act'(h) in place, and act_out = act(h)        (two reads, one or two writes)
// Memory-bound: each thread moves 16 bytes per tensor when every row is 16-byte aligned, one element
// otherwise.
#include <cuda_runtime.h>

#include "activations.cuh"
#include "launch.h"
#include "mma.cuh"

namespace fastgpt::cuda {

namespace {

constexpr int kThreads = 256;           // 8 warps: enough loads in flight per SM for a streaming pass
constexpr int kVector = 8;              // 16 bytes of bfloat16/float16
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this: ~65k blocks already fill any GPU

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(Activation activation, int64_t rows, int64_t packs_per_row, const T* h, int64_t ld_h,
                              T* out, int64_t ld_out) {
  const int64_t total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t row = i / packs_per_row, col = (i - row * packs_per_row) * kVec;
    const Pack<T, kVec> in = *reinterpret_cast<const Pack<T, kVec>*>(h + row * ld_h + col);
    Pack<T, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) result.v[j] = from_float<T>(activation_forward(activation, to_float(in.v[j])));
    *reinterpret_cast<Pack<T, kVec>*>(out + row * ld_out + col) = result;
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(Activation activation, int64_t rows, int64_t packs_per_row, T* grad, int64_t ld_grad,
                               const T* h, int64_t ld_h, T* act_out, int64_t ld_act) {
  const int64_t total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t row = i / packs_per_row, col = (i - row * packs_per_row) * kVec;
    Pack<T, kVec>* grad_pack = reinterpret_cast<Pack<T, kVec>*>(grad + row * ld_grad + col);
    const Pack<T, kVec> hv = *reinterpret_cast<const Pack<T, kVec>*>(h + row * ld_h + col);
    Pack<T, kVec> g = *grad_pack, value;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float a = 0.0f, d = 0.0f;
      activation_and_derivative(activation, to_float(hv.v[j]), a, d);
      g.v[j] = from_float<T>(to_float(g.v[j]) * d);
      value.v[j] = from_float<T>(a);
    }
    *grad_pack = g;
    if (act_out != nullptr) *reinterpret_cast<Pack<T, kVec>*>(act_out + row * ld_act + col) = value;
  }
}

bool rows_aligned_16(const Matrix& m) {
  return reinterpret_cast<uintptr_t>(m.data) % 16 == 0 && m.row_stride % kVector == 0;
}

unsigned blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T, int kVec>
void launch_forward(Activation activation, int64_t rows, int64_t cols, const Matrix& h, const Matrix& out,
                    cudaStream_t stream) {
  const int64_t packs = cols / kVec;
  activation_forward_kernel<T, kVec><<<blocks_for(rows * packs), kThreads, 0, stream>>>(
      activation, rows, packs, static_cast<const T*>(h.data), h.row_stride, static_cast<T*>(out.data),
      out.row_stride);
}

template <typename T, int kVec>
void launch_backward(Activation activation, int64_t rows, int64_t cols, const Matrix& grad, const Matrix& h,
                     const Matrix& act_out, cudaStream_t stream) {
  const int64_t packs = cols / kVec;
  activation_backward_kernel<T, kVec><<<blocks_for(rows * packs), kThreads, 0, stream>>>(
      activation, rows, packs, static_cast<T*>(grad.data), grad.row_stride, static_cast<const T*>(h.data),
      h.row_stride, static_cast<T*>(act_out.data), act_out.row_stride);
}

bool valid_matrix(const Matrix& m, int64_t cols) { return m.data != nullptr && m.col_stride == 1 && m.row_stride >= cols; }

}  // namespace

cudaError_t activation_forward(DType dtype, Activation activation, int64_t rows, int64_t cols, const Matrix& h,
                               const Matrix& out, cudaStream_t stream) {
  if ((dtype != DType::kBFloat16 && dtype != DType::kFloat16) || rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!valid_matrix(h, cols) || !valid_matrix(out, cols)) return cudaErrorInvalidValue;
  const bool vector = cols % kVector == 0 && rows_aligned_16(h) && rows_aligned_16(out);
  if (dtype == DType::kBFloat16) {
    vector ? launch_forward<__nv_bfloat16, kVector>(activation, rows, cols, h, out, stream)
           : launch_forward<__nv_bfloat16, 1>(activation, rows, cols, h, out, stream);
  } else {
    vector ? launch_forward<__half, kVector>(activation, rows, cols, h, out, stream)
           : launch_forward<__half, 1>(activation, rows, cols, h, out, stream);
  }
  return cudaGetLastError();
}

cudaError_t activation_backward(DType dtype, Activation activation, int64_t rows, int64_t cols, const Matrix& grad,
                                const Matrix& h, const Matrix& act_out, cudaStream_t stream) {
  if ((dtype != DType::kBFloat16 && dtype != DType::kFloat16) || rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool with_act = act_out.data != nullptr;
  if (!valid_matrix(grad, cols) || !valid_matrix(h, cols) || (with_act && !valid_matrix(act_out, cols)))
    return cudaErrorInvalidValue;
  const bool vector =
      cols % kVector == 0 && rows_aligned_16(grad) && rows_aligned_16(h) && (!with_act || rows_aligned_16(act_out));
  if (dtype == DType::kBFloat16) {
    vector ? launch_backward<__nv_bfloat16, kVector>(activation, rows, cols, grad, h, act_out, stream)
           : launch_backward<__nv_bfloat16, 1>(activation, rows, cols, grad, h, act_out, stream);
  } else {
    vector ? launch_backward<__half, kVector>(activation, rows, cols, grad, h, act_out, stream)
           : launch_backward<__half, 1>(activation, rows, cols, grad, h, act_out, stream);
  }
  return cudaGetLastError();
}

}  // namespace fastgpt::cuda
