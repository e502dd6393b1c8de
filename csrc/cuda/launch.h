// Host launchers of the CUDA kernels in csrc/cuda: what csrc/api.cpp (through csrc/cuda/api_cuda.inc)
// and the csrc/dev harnesses call. Plain C++ over params.h: no torch and no device code, so the host
// compiler can include it. Every launcher returns cudaSuccess, the launch error, or
// cudaErrorInvalidValue when the params break a precondition stated here (nothing is launched then).
//
// Kernels: bfloat16 and float16 only. float32 calls are declined (the *_unsupported_reason functions
// say so) and run on the Triton backend.
//
// api_cuda.inc registers these launchers as the CUDA implementations of the fastgpt ops whose schemas
// csrc/api.cpp defines (attention_forward/backward, ffn_forward/backward, layer_norm_forward/backward,
// linear_cross_entropy_forward/backward),
// and adds fastgpt::cuda_unsupported_reason(str op, int size, ScalarType dtype) -> str ("" when
// supported; `size` is head_dim for causal_attention, the hidden size for fused_ffn and layer_norm, and
// the vocabulary for linear_cross_entropy).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../params.h"

namespace fastgpt::cuda {

// ---- Causal attention (attention_fwd.cu, attention_bwd.cu) -----------------------------------------
// head_dim: a multiple of 8 up to 128 (kernels for 32, 64, 96 and 128; other sizes run zero-padded in
// the next one up). Every HeadTensor (q, k, v, out, and dout, dq, dk, dv in the backward) must have a
// 16-byte aligned data pointer and batch/head/row strides that are multiples of 8 elements; head_dim
// is contiguous. lse and delta are contiguous float32 (batch, heads, q_len). Needs sm_80+.

// nullptr when the kernels handle this head_dim and dtype, else why not.
const char* attention_unsupported_reason(int head_dim, DType dtype);

// Writes out and lse.
cudaError_t attention_forward(const AttentionParams& params, cudaStream_t stream);

// The Hopper forward (attention_fwd_sm90.cu, built only where the CUTLASS/CuTe headers were found:
// FASTGPT_WITH_SM90_ATTENTION is then defined): TMA, wgmma and warp specialisation, compute capability
// 9.x only. It writes out and lse exactly as attention_forward does (the backward reads that lse).
// It takes bfloat16 and float16 at head_dim 64 and 128 with every HeadTensor TMA-describable (16-byte
// aligned data, batch/head/row strides multiples of 8 elements, head_dim contiguous, no broadcast
// dimension: more than one element at stride 0); nullptr when it can take `params`, else why not.
// attention_forward_sm90 returns cudaErrorInvalidValue for params it cannot take and
// cudaErrorNoKernelImageForDevice off compute capability 9.x.
const char* attention_forward_sm90_unsupported_reason(const AttentionParams& params);

cudaError_t attention_forward_sm90(const AttentionParams& params, cudaStream_t stream);

// Writes delta (scratch the caller allocates), dq, dk and dv from dout, q, k, v, out and lse.
// Deterministic: no atomics.
cudaError_t attention_backward(const AttentionParams& params, cudaStream_t stream);

// The Hopper backward (attention_bwd_sm90.cu, built with attention_fwd_sm90.cu under
// FASTGPT_WITH_SM90_ATTENTION): TMA, wgmma and a producer warp, compute capability 9.x only. It writes
// dq, dk and dv from dout, q, k, v, out and lse (params.delta is not used) and needs a 16-byte aligned
// workspace of attention_backward_sm90_workspace_bytes(params) bytes (the float32 dQ accumulator, lse
// and delta; no initial contents). NOT deterministic: dQ is accumulated with float32 atomics, so its
// last bits vary between runs; callers that need repeatable bits use attention_backward. It takes
// bfloat16 and float16 at head_dim 64 and 128 with q_len >= 1 and every HeadTensor TMA-describable
// (16-byte aligned data, batch/head/row strides multiples of 8 elements); nullptr when it can take
// `params`, else why not. attention_backward_sm90 returns cudaErrorInvalidValue for params it cannot
// take and cudaErrorNoKernelImageForDevice off compute capability 9.x.
const char* attention_backward_sm90_unsupported_reason(const AttentionParams& params);

size_t attention_backward_sm90_workspace_bytes(const AttentionParams& params);

cudaError_t attention_backward_sm90(const AttentionParams& params, void* workspace, cudaStream_t stream);

// ---- GEMM with fused epilogues (gemm.cu) -----------------------------------------------------------
// out = epilogue(a @ b^T) as params.h describes, for any M, N, K >= 0 and any strides: operands with a
// contiguous K (col_stride 1) or a contiguous M/N (row_stride 1, a transposed view such as W^T) take the
// 16-byte cp.async path when their pointer and other stride are 16-byte aligned, any other operand a
// slower element-wise path. Outputs need col_stride 1. Precise meaning of the epilogue:
//   v = acc (+ bias[n])
//   forward  (activation_grad_input absent): when activation_out is set, out = v and
//            activation_out = act(v); otherwise out = v (+ residual).
//   backward (activation_grad_input = h set): v *= act'(h); when activation_out is set it also receives
//            act(h), recomputed here so that the next GEMM (dW = dY^T @ act(h)) needs no separate pass;
//            out = v.
//   residual only without activation_out/activation_grad_input.
//   bias_grad_partial[i][n] = sum of the float32 v stored to out over rows [i * kGemmBlockM,
//            (i + 1) * kGemmBlockM); bias_grad_block_m must equal kGemmBlockM.
constexpr int kGemmBlockM = 128;

const char* gemm_unsupported_reason(DType dtype);

cudaError_t gemm(const GemmParams& params, cudaStream_t stream);

// ---- FFN activation passes beside the cuBLASLt GEMMs (ffn_elementwise.cu) --------------------------
// (rows, cols) matrices with col_stride 1 and row_stride >= cols, bfloat16 or float16, act in float32
// with activations.cuh's formulas. 16-byte vectors when cols % 8 == 0 and every matrix's pointer is
// 16-byte aligned with a row_stride that is a multiple of 8; element by element otherwise.

// out = act(h). out may be h itself (in place).
cudaError_t activation_forward(DType dtype, Activation activation, int64_t rows, int64_t cols, const Matrix& h,
                               const Matrix& out, cudaStream_t stream);

// grad *= act'(h), in place (grad: dL/d act(h) in, dL/dh out); act_out = act(h) unless act_out.data is null.
cudaError_t activation_backward(DType dtype, Activation activation, int64_t rows, int64_t cols, const Matrix& grad,
                                const Matrix& h, const Matrix& act_out, cudaStream_t stream);

// ---- LayerNorm with fused residual (layernorm.cu) --------------------------------------------------
// cols up to 16384 when cols % 8 == 0 and every row starts 16-byte aligned (the vectorised path), up to
// 4096 otherwise (the scalar path; layer_norm_unsupported_reason declines wider rows of odd widths, and
// api_cuda.inc copies misaligned tensors). x/out/residual/... have col_stride 1. Backward: `x` is the normalised input (residual_out
// when a residual was given), dweight_partial/dbias_partial are (num_partials, cols) float32 with
// num_partials = layer_norm_backward_num_partials(rows) (either may be null when not needed), and
// column_sums_pair reduces them in one launch.
const char* layer_norm_unsupported_reason(int cols, DType dtype);

cudaError_t layer_norm_forward(const LayerNormParams& params, cudaStream_t stream);

int layer_norm_backward_num_partials(int64_t rows);

cudaError_t layer_norm_backward(const LayerNormParams& params, cudaStream_t stream);

// ---- Linear cross-entropy, the pass between the GEMMs (cross_entropy.cu) --------------------------
// Per row of logits (bias included): loss = logsumexp - logit[target] (0 on ignored rows) and, with
// with_grad, dlogits = (softmax - onehot(target)) * row_grad in place (zeros on ignored rows). The
// logits must be 16-byte aligned with a row stride that is a multiple of 8 and at least vocab rounded
// up to 8: the columns from vocab to that rounding are read and overwritten (api_cuda.inc allocates
// its logits buffer so). A row that fits the device's shared memory (vocab up to ~113K in 16 bits on
// H100) is read from global memory once, a wider one twice. Deterministic.

// nullptr when the kernel takes this dtype and vocabulary, else why not.
const char* cross_entropy_unsupported_reason(int64_t vocab, DType dtype);

cudaError_t cross_entropy_rows(const CrossEntropyRowsParams& params, cudaStream_t stream);

// ---- Deterministic column sums (column_sums.cu) ----------------------------------------------------
// out[c] = sum over r of partial[r * cols + c] in float32, in a fixed order, stored as `dtype`. The second
// pass of the LayerNorm weight/bias gradients and of the GEMM bias gradient. rows may be 0 (zeros).
cudaError_t column_sums(const float* partial, int64_t rows, int cols, DType dtype, void* out, cudaStream_t stream);

// Two such sums in one launch: partial into out and second_partial into second_out (the LayerNorm
// weight and bias gradients). A null second_out makes it column_sums.
cudaError_t column_sums_pair(const float* partial, void* out, const float* second_partial, void* second_out,
                             int64_t rows, int cols, DType dtype, cudaStream_t stream);

// The same over a (rows, cols) `dtype` matrix with row stride ld >= cols: the FFN's bias gradient where
// cuBLASLt offers no bias-gradient epilogue for the GEMM at hand (ffn_cublaslt.cpp).
cudaError_t column_sums_16bit(const void* matrix, int64_t rows, int cols, int64_t ld, DType dtype, void* out,
                              cudaStream_t stream);

}  // namespace fastgpt::cuda
