// The FFN on cuBLASLt GEMMs with fused epilogues (ffn_cublaslt.cpp): host code only, no torch and no
// device code. Its GEMM, `matmul`, also serves the linear cross-entropy's float32 weight-gradient
// accumulation (api_cuda.inc). csrc/cuda/api_cuda.inc calls ffn_forward/ffn_backward with torch's cuBLASLt handle, a
// workspace from torch's caching allocator and the current stream; csrc/dev/ffn_cublaslt.cu calls the
// same functions with its own.
//
// Everything here is in torch's row-major terms: out (M, N) = A (M, K) @ B (K, N), each operand given by
// the row-major matrix stored in memory and whether the GEMM reads it transposed. The mapping onto
// cuBLASLt's column-major convention is ffn_cublaslt.cpp's business (see the comment there).
//
// Per activation (M tokens; h is the pre-activation, which ffn_forward returns and ffn_backward reads):
//   gelu_tanh, hidden % 8 == 0:  forward GEMM1 with GELU_AUX(_BIAS) writes act(h) and h (its aux);
//                                backward dY Wproj with DGELU_BGRAD writes dH and dfc_bias, then one pass
//                                recomputes act(h) from h for dWproj;
//   gelu, relu, silu (and gelu_tanh with hidden % 8 != 0, cuBLASLt's aux rule): forward GEMM1 with BIAS
//                                writes h and one pass writes act(h); backward dY Wproj plain, one pass
//                                turns it into dH and writes act(h), dfc_bias rides in the dWfc GEMM;
//   every activation:            GEMM2 with BIAS and the residual as C (beta = 1); dproj_bias rides in
//                                the dWproj GEMM (BGRADB).
// relu keeps off cuBLASLt's RELU_AUX epilogues: their aux is a bitmask, not the h this op returns.
// Where cuBLASLt has no algorithm for a fused epilogue (NOT_SUPPORTED from its heuristic, before any
// launch), the unfused route above runs instead, and a bias gradient comes from column_sums_16bit.
//
// Plans: the first call of each (device, dtype, M, N, K, operand layouts, leading dimensions, pointer
// alignments, epilogue, workspace size) asks cuBLASLt's heuristic for an algorithm and caches the
// answer (including "none"), so later calls only look it up. The cache is guarded by a mutex, so
// several host threads may call at once. No call synchronises the host.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../params.h"
#include "launch.h"

namespace fastgpt::cuda::lt {

// A row-major matrix in memory: element (r, c) at data[r * ld + c]. `transposed`: the GEMM reads the
// transpose of the stored matrix (e.g. an nn.Linear weight (N, K) as the operand B (K, N)).
struct Operand {
  const void* data;
  int64_t ld;  // row stride in elements, >= the stored matrix's column count
  bool transposed;
};

// What happens to the product P = A @ B before it is stored (the row-major meaning; the cuBLASLt
// epilogue each maps to is in ffn_cublaslt.cpp).
enum class Epilogue : int32_t {
  kNone = 0,       // out = P (+ residual)
  kBias = 1,       // out = P + bias[n] (+ residual)
  kGeluAux = 2,    // aux = P (+ bias[n] with kGeluAuxBias); out = gelu_tanh(aux)
  kGeluAuxBias = 3,
  kDGeluBGrad = 4,  // out = P * gelu_tanh'(aux); bias[n] = sum over m of out (written)
  kBGradA = 5,      // out = P; bias[m] = sum over k of A[m, k] (written): the bias gradient that rides
                    // along a weight-gradient GEMM dW = dY^T @ X, whose A is dY^T
};

struct Gemm {
  DType dtype;  // of A, B, out, residual, bias and aux (bfloat16 or float16); fp32 accumulation
  int64_t M, N, K;
  Operand a;  // (M, K)
  Operand b;  // (K, N)
  void* out;  // (M, N), row stride ld_out
  int64_t ld_out;
  const void* residual;  // (M, N) added with beta = 1 (cuBLASLt's C), or nullptr
  int64_t ld_residual;
  Epilogue epilogue;
  void* bias;  // read for kBias/kGeluAuxBias ((N) contiguous), written for kDGeluBGrad (N) and kBGradA (M)
  void* aux;   // (M, N) pre-activation, row stride ld_aux (a multiple of 8): written by kGeluAux*, read by
               // kDGeluBGrad
  int64_t ld_aux;
  // out and residual are float32 instead of `dtype` (epilogue kNone only): the linear cross-entropy's
  // weight gradient accumulates chunk by chunk into a float32 buffer, as residual = out with beta = 1.
  bool float32_out = false;
};

// cuBLAS's recommended workspace: 32 MiB on Hopper (sm_90), 4 MiB on earlier GPUs (cuBLAS docs,
// "cublasSetWorkspace"; torch uses the same sizes for its own cuBLASLt calls).
inline size_t recommended_workspace_bytes(int compute_capability_major) {
  return compute_capability_major >= 9 ? size_t(32) << 20 : size_t(4) << 20;
}

// Runs one GEMM on `stream`. Returns CUBLAS_STATUS_NOT_SUPPORTED, launching nothing, when cuBLASLt has no
// algorithm for it (the caller may then take another route), CUBLAS_STATUS_INVALID_VALUE when the
// arguments break the contract above, and otherwise what cublasLtMatmul returns.
cublasStatus_t matmul(cublasLtHandle_t handle, const Gemm& gemm, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream);

// The device resources of one call: a cuBLASLt handle, a workspace (any size; more lets cuBLASLt pick
// split-K algorithms) and the stream every GEMM and pass is enqueued on.
struct Resources {
  cublasLtHandle_t handle;
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
};

// What went wrong, if anything: the step's name and cuBLASLt's or CUDA's status.
struct Status {
  const char* step = nullptr;  // nullptr: success
  cublasStatus_t blas = CUBLAS_STATUS_SUCCESS;
  cudaError_t cuda = cudaSuccess;
  bool ok() const { return step == nullptr; }
};

// The 2-D tensors below are Operands describing the tensor itself (transposed = true when it is a
// transposed view of its stored matrix, such as W.t()); the GEMMs read them as they need. Every
// dimension is >= 1 (callers route empty calls elsewhere). Written matrices are contiguous.
struct FfnForwardParams {
  DType dtype;
  Activation activation;
  int64_t tokens, channels, hidden, out_features;
  Operand x;                // (tokens, C)
  Operand fc_weight;        // (hidden, C)
  Operand proj_weight;      // (C_out, hidden)
  const void* fc_bias;      // (hidden) contiguous, or nullptr
  const void* proj_bias;    // (C_out) contiguous, or nullptr
  const void* residual;     // (tokens, C_out) with row stride ld_residual, or nullptr
  int64_t ld_residual;
  void* h;                  // (tokens, hidden), written
  void* activated;          // (tokens, hidden), scratch: act(h)
  void* y;                  // (tokens, C_out), written
};

struct FfnBackwardParams {
  DType dtype;
  Activation activation;
  int64_t tokens, channels, hidden, out_features;
  const void* dy;           // (tokens, C_out) contiguous
  Operand x;                // (tokens, C)
  const void* h;            // (tokens, hidden) contiguous
  Operand fc_weight;        // (hidden, C)
  Operand proj_weight;      // (C_out, hidden)
  void* activated;          // (tokens, hidden), scratch: act(h)
  void* dh;                 // (tokens, hidden), written (dL/dh)
  void* dx;                 // (tokens, C), written
  void* dfc_weight;         // (hidden, C), written
  void* dfc_bias;           // (hidden), written
  void* dproj_weight;       // (C_out, hidden), written
  void* dproj_bias;         // (C_out), written
};

// y = act(x Wfc^T + b_fc) Wproj^T + b_proj + residual, and h = x Wfc^T + b_fc.
Status ffn_forward(const FfnForwardParams& params, const Resources& resources);

// dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias from dy, x and h.
Status ffn_backward(const FfnBackwardParams& params, const Resources& resources);

// Number of plans cached so far (the dev harness reports it; a growing count in steady state would mean
// the cache key misses).
size_t cached_plans();

}  // namespace fastgpt::cuda::lt
