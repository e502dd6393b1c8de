// Linear cross-entropy, the CUDA backend: the pass over one chunk of logits between cuBLAS's GEMMs
// (api_cuda.inc runs logits = x_chunk W^T + b, this pass, then dx_chunk = dlogits W and dW += dlogits^T
// x_chunk).
//
// One block per row, and the row is read from global memory once: cp.async copies it into shared
// memory (2 bytes a value: GPT-2's padded 50304 take 98 KiB, so two rows share an SM), where one pass
// forms each thread's online logsumexp and a second, after the block has combined them, forms
//   dlogits = (softmax - onehot(target)) * row_grad      (exact zeros on ignored rows)
// and writes them over the logits. A row too wide for the device's shared memory streams from global
// memory instead, read twice. (The bias gradient rides in api_cuda.inc's dW GEMM.)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "device.cuh"
#include "launch.h"
#include "mma.cuh"

namespace fastgpt::cuda {

namespace {

constexpr int kVectorWidth = 8;  // 16-bit values in one 16-byte vector
// Threads per block (one row): 7 vectors a thread at GPT-2's vocabulary, and two blocks fill an SM.
constexpr int kThreads = 1024;

// A running logsumexp: the largest value seen and the sum of exp(value - max) over the values seen.
struct MaxSum {
  float max;
  float sum;
};

__device__ inline MaxSum combine(MaxSum a, MaxSum b) {
  const float max = fmaxf(a.max, b.max);
  if (max == -INFINITY) return {max, 0.0f};  // nothing seen on either side: no -inf - -inf
  return {max, a.sum * exp2f((a.max - max) * kLog2e) + b.sum * exp2f((b.max - max) * kLog2e)};
}

// The block's combined MaxSum, the same in every thread. Warps combine by shuffles, then every thread
// combines the warps' results in warp order, so the result does not depend on timing.
__device__ inline MaxSum block_max_sum(MaxSum v, MaxSum* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v = combine(v, {__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  MaxSum total = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) total = combine(total, scratch[w]);
  return total;
}

template <typename T>
__device__ inline void unpack_vector(const uint4& raw, float (&v)[kVectorWidth]) {
  unpack_pair<T>(raw.x, v[0], v[1]);
  unpack_pair<T>(raw.y, v[2], v[3]);
  unpack_pair<T>(raw.z, v[4], v[5]);
  unpack_pair<T>(raw.w, v[6], v[7]);
}

template <typename T>
__device__ inline uint4 pack_vector(const float (&v)[kVectorWidth]) {
  return uint4{pack_pair<T>(v[0], v[1]), pack_pair<T>(v[2], v[3]), pack_pair<T>(v[4], v[5]), pack_pair<T>(v[6], v[7])};
}

// Adds vector `vec` of the row (its columns >= vocab excluded) to a running logsumexp.
template <typename T>
__device__ inline MaxSum add_vector(MaxSum running, const uint4& raw, int vec, int vocab) {
  float v[kVectorWidth];
  unpack_vector<T>(raw, v);
  const int col = vec * kVectorWidth;
  float max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kVectorWidth; ++j) max = col + j < vocab ? fmaxf(max, v[j]) : max;
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kVectorWidth; ++j) sum += col + j < vocab ? exp2f((v[j] - max) * kLog2e) : 0.0f;
  return combine(running, {max, sum});
}

// dlogits of vector `vec` (zeros beyond vocab and on ignored rows).
template <typename T>
__device__ inline uint4 grad_vector(const uint4& raw, int vec, int vocab, int64_t target, bool kept, float lse_log2,
                                    float scale) {
  float v[kVectorWidth];
  unpack_vector<T>(raw, v);
#pragma unroll
  for (int j = 0; j < kVectorWidth; ++j) {
    const int col = vec * kVectorWidth + j;
    const float softmax = col < vocab ? exp2f(v[j] * kLog2e - lse_log2) : 0.0f;
    const float onehot = col == target ? 1.0f : 0.0f;
    v[j] = kept ? (softmax - onehot) * scale : 0.0f;
  }
  return pack_vector<T>(v);
}

// kStaged: the row is copied into shared memory (vectors x 16 bytes of dynamic shared memory) and both
// passes read it there; otherwise both read global memory.
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, 2) cross_entropy_rows_kernel(const CrossEntropyRowsParams p) {
  extern __shared__ uint4 staged_row[];  // (vectors) when kStaged
  __shared__ MaxSum scratch[kThreads / 32];
  const int64_t r = blockIdx.x;
  T* row = static_cast<T*>(p.logits.data) + r * p.logits.row_stride;
  uint4* row_vectors = reinterpret_cast<uint4*>(row);
  const int64_t target = p.targets[r];
  const bool kept = target != p.ignore_index;
  const int vocab = p.vocab;
  const int vectors = ceil_div(vocab, kVectorWidth);

  if constexpr (kStaged) {
    for (int vec = threadIdx.x; vec < vectors; vec += kThreads) {
      cp_async_16(shared_address(&staged_row[vec]), &row_vectors[vec], true);
    }
    cp_async_commit();
  }
  // The target's logit, read before block_max_sum's barrier, after which the row is overwritten. A
  // target outside [0, vocab) (rejected by fastgpt's validation) gives a NaN loss, never a wild read.
  float target_logit = 0.0f;
  if (threadIdx.x == 0 && kept) target_logit = target >= 0 && target < vocab ? to_float(row[target]) : NAN;
  if constexpr (kStaged) {
    cp_async_wait<0>();
    __syncthreads();
  }
  const uint4* source = kStaged ? staged_row : row_vectors;

  MaxSum running{-INFINITY, 0.0f};
  for (int vec = threadIdx.x; vec < vectors; vec += kThreads) running = add_vector<T>(running, source[vec], vec, vocab);
  const MaxSum total = block_max_sum(running, scratch);
  const float lse = total.max + logf(total.sum);
  if (threadIdx.x == 0) p.loss[r] = kept ? lse - target_logit : 0.0f;
  if (!p.with_grad) return;

  const float scale = p.row_grad != nullptr ? p.row_grad[r] : 1.0f;
  const float lse_log2 = lse * kLog2e;
  for (int vec = threadIdx.x; vec < vectors; vec += kThreads) {
    row_vectors[vec] = grad_vector<T>(source[vec], vec, vocab, target, kept, lse_log2, scale);
  }
}

template <typename T>
cudaError_t launch_rows(const CrossEntropyRowsParams& p, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(p.rows);
  // In 64 bits: a vocabulary above 2^30 (up to 2^31 - 8 is taken) needs 2^31 bytes or more, past int.
  const int64_t staged_bytes = int64_t{ceil_div(p.vocab, kVectorWidth)} * 16;
  int device = 0, max_shared = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (error != cudaSuccess) return error;
  if (staged_bytes + static_cast<int64_t>(sizeof(MaxSum)) * (kThreads / 32) > max_shared) {
    cross_entropy_rows_kernel<T, false><<<blocks, kThreads, 0, stream>>>(p);
    return cudaSuccess;
  }
  // Here staged_bytes fits the device's shared memory, so in int.
  const int shared_bytes = static_cast<int>(staged_bytes);
  const auto kernel = cross_entropy_rows_kernel<T, true>;
  error = allow_shared_memory(kernel, shared_bytes);
  if (error != cudaSuccess) return error;
  kernel<<<blocks, kThreads, shared_bytes, stream>>>(p);
  return cudaSuccess;
}

}  // namespace

const char* cross_entropy_unsupported_reason(int64_t vocab, DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return "the CUDA cross-entropy takes float16 and bfloat16 (float32 runs on Triton)";
  }
  if (vocab > INT32_MAX - kVectorWidth) return "the CUDA cross-entropy takes a vocabulary below 2^31 - 8";
  return nullptr;
}

cudaError_t cross_entropy_rows(const CrossEntropyRowsParams& p, cudaStream_t stream) {
  if (cross_entropy_unsupported_reason(p.vocab, p.dtype) != nullptr || p.vocab <= 0 || p.rows < 0 ||
      p.rows > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  const int64_t padded_vocab = int64_t{ceil_div(p.vocab, kVectorWidth)} * kVectorWidth;
  if (p.logits.data == nullptr || !is_aligned(p.logits.data, 16) || p.logits.col_stride != 1 ||
      p.logits.row_stride % kVectorWidth != 0 || p.logits.row_stride < padded_vocab || p.targets == nullptr ||
      p.loss == nullptr) {
    return cudaErrorInvalidValue;
  }
  const cudaError_t error = p.dtype == DType::kBFloat16 ? launch_rows<__nv_bfloat16>(p, stream)
                                                         : launch_rows<__half>(p, stream);
  return error != cudaSuccess ? error : cudaGetLastError();
}

}  // namespace fastgpt::cuda
