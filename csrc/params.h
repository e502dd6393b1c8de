// Plain structs of pointers, sizes and strides: the only thing the kernels in csrc/cpu and csrc/cuda
// see of a tensor. csrc/api.cpp fills them from torch tensors after checking them; no kernel includes a
// torch header.
//
// Conventions:
// - Strides are in elements, not bytes.
// - The innermost dimension of every tensor (head_dim, channels, vocab) has stride 1. api.cpp copies a
//   tensor whose innermost stride is not 1; every other stride is free, so views of a fused qkv
//   projection are read in place.
// - Statistics (lse, delta, mean, rstd) and partial sums are float32 and contiguous.
#pragma once

#include <cstdint>

namespace fastgpt {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Activation : int32_t { kGeluTanh = 0, kGelu = 1, kRelu = 2, kSilu = 3 };

// A strided 4-D tensor (batch, heads, rows, head_dim), head_dim contiguous.
struct HeadTensor {
  void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;
};

// A strided 2-D matrix (rows, cols). col_stride is 1 except for the transposed operand views that
// the GEMMs read (for example W^T of an nn.Linear weight), where row_stride is 1 instead.
struct Matrix {
  void* data;
  int64_t row_stride;
  int64_t col_stride;
};

// Causal attention, bottom-right aligned: query i sees keys j <= i + kv_len - q_len.
// q/out/dq/dout: (batch, heads, q_len, head_dim); k/v/dk/dv: (batch, kv_heads, kv_len, head_dim).
struct AttentionParams {
  DType dtype;
  int32_t batch;
  int32_t heads;
  int32_t kv_heads;  // heads % kv_heads == 0; query head h reads kv head h / (heads / kv_heads)
  int32_t q_len;
  int32_t kv_len;
  int32_t head_dim;
  float softmax_scale;

  HeadTensor q;
  HeadTensor k;
  HeadTensor v;
  HeadTensor out;
  float* lse;  // (batch, heads, q_len), natural log, contiguous
  // CPU decode only, else null: the valid keys of each sequence's cache, (batch) values in [0, kv_len].
  // Sequence b's query i then sees keys j <= i + kv_lens[b] - q_len (kv_len is the longest's length).
  const int64_t* kv_lens;

  // Backward only (null in the forward).
  HeadTensor dout;
  HeadTensor dq;
  HeadTensor dk;      // summed over the query heads of each kv head (GQA)
  HeadTensor dv;
  float* delta;       // (batch, heads, q_len): rowsum(dout * out), contiguous

  // Launch configuration chosen by the host (CUDA: threads per block and dynamic shared memory).
  int32_t num_threads;
  int32_t shared_bytes;
};

// out = epilogue(a @ b^T), a: (M, K), b: (N, K), out: (M, N).
// The epilogue, in order: + bias (N) when given; when `activation_out` is given, writes the
// pre-activation value to `out` and act(value) to `activation_out`; + residual (M, N) when given.
// When `activation_grad_input` is given (the backward), the result is instead multiplied by
// act'(activation_grad_input[m, n]) before it is stored: dH = (dY @ Wproj) * act'(h); `activation_out`,
// when given there, receives act(activation_grad_input), the recomputed activation that the gradient of
// W_proj needs (only x and h are saved by the forward).
struct GemmParams {
  DType dtype;
  int32_t M;
  int32_t N;
  int32_t K;
  Activation activation;

  Matrix a;
  Matrix b;
  const void* bias;               // (N) or null
  Matrix residual;                // (M, N); data null when absent
  Matrix out;                     // (M, N)
  Matrix activation_out;          // (M, N); data null when no activation is applied
  Matrix activation_grad_input;   // (M, N) pre-activation h; data null outside the backward
  float* bias_grad_partial;       // (ceil(M / block_m), N) float32 column sums of the epilogue's output, or null
  int32_t bias_grad_block_m;      // rows per partial sum when bias_grad_partial is set

  int32_t num_threads;
  int32_t shared_bytes;
};

// LayerNorm over the last dimension, with a fused residual add.
struct LayerNormParams {
  DType dtype;
  int64_t rows;
  int32_t cols;
  float eps;

  Matrix x;               // (rows, cols)
  Matrix residual;        // (rows, cols); data null when absent
  Matrix residual_out;    // x + residual, (rows, cols); data null when absent
  const void* weight;     // (cols) or null
  const void* bias;       // (cols) or null
  Matrix out;             // (rows, cols)
  float* mean;            // (rows)
  float* rstd;            // (rows)

  // Backward only (null in the forward). The input is residual_out when a residual was given.
  Matrix dout;            // (rows, cols)
  Matrix dresidual_out;   // (rows, cols) gradient flowing into x + residual from later use; data null when absent
  Matrix dx;              // (rows, cols)
  float* dweight_partial; // (num_partials, cols) per-program sums, reduced in a second pass
  float* dbias_partial;   // (num_partials, cols)
  int32_t num_partials;

  int32_t num_threads;
};

// Chunked linear cross-entropy: loss[n] = logsumexp(x[n] @ W^T + b) - (x[n] @ W^T + b)[target[n]],
// computed over chunks of tokens so that at most chunk_size x vocab logits exist at once.
struct CrossEntropyParams {
  DType dtype;
  int64_t tokens;
  int32_t channels;
  int32_t vocab;
  int64_t ignore_index;
  int32_t chunk_size;

  Matrix x;                 // (tokens, channels)
  Matrix weight;            // (vocab, channels)
  const void* bias;         // (vocab) or null
  const int64_t* targets;   // (tokens)
  float* loss;              // (tokens), 0 for ignored rows

  // Gradients, formed in the same pass (null when not needed). They are of sum(row_grad[n] * loss[n]);
  // row_grad null means 1 for every row. 'mean' and 'sum' pass null and scale afterwards by the
  // upstream gradient (and 1 / kept rows) on the device, so the host never synchronises.
  const float* row_grad;    // (tokens) or null
  Matrix dx;                // (tokens, channels)
  float* dbias;             // (vocab) float32 accumulator, or null
};

// One chunk of logits for the CUDA backend's row kernel (csrc/cuda/cross_entropy.cu); the GEMMs on
// either side of it are cuBLAS's (csrc/cuda/api_cuda.inc). The logits already include the bias.
struct CrossEntropyRowsParams {
  DType dtype;              // of the logits: float16 or bfloat16
  int64_t rows;
  int32_t vocab;
  Matrix logits;            // (rows, vocab), col_stride 1; replaced by dloss/dlogits when with_grad
  const int64_t* targets;   // (rows)
  int64_t ignore_index;
  float* loss;              // (rows): logsumexp - logit[target], 0 on ignored rows
  const float* row_grad;    // (rows) upstream gradient of each row's loss, or null for 1
  bool with_grad;
};

}  // namespace fastgpt
