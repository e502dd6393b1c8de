// The C++ CPU kernels of the 'cpu' backend: plain functions of the params.h structs.
//
// Each entry point below dispatches at run time to the best instruction set this CPU supports
// (see isa.h): the kernels are compiled once per instruction set from the same source, so the build
// needs no -march flag and the library runs on any x86-64 (or other) CPU.
//
// Conventions shared with api.cpp:
// - Kernels allocate nothing the caller sees: outputs and float32 scratch named in the params are
//   allocated by the caller. Kernels may allocate private per-thread scratch of O(tile) or O(seq_len)
//   floats (never O(seq_len^2)).
// - Every kernel is deterministic: its result does not depend on the number of threads.
#pragma once

#include <cstdint>

#include "params.h"

namespace fastgpt::cpu {

// bfloat16 as stored in memory: the upper half of a float32.
struct BFloat16 {
  uint16_t bits;
};

// Causal attention forward: writes out and lse.
void attention_forward(const AttentionParams& p);

// Causal attention backward, FlashAttention-2 style: reads q, k, v, out, dout, lse; writes delta, dq,
// dk, dv (the float32 accumulators live in the kernel's private scratch).
void attention_backward(const AttentionParams& p);

// The FFN GEMM epilogue, in one pass over a GEMM result the caller already wrote into p.out
// (p.out = a @ b^T; p.a and p.b are not read). Forward (activation_grad_input absent):
//   v = out + bias; with activation_out: out = v, activation_out = act(v); the stored value + residual.
// Backward (activation_grad_input = h present):
//   out = out * act'(h); activation_out, when given, = act(h) (the recomputed activation that the next
//   weight gradient needs); bias_grad_partial[m / bias_grad_block_m][n] = sum of the stored out values.
// act() is applied to the value as stored in p.dtype, so a backward that recomputes it from the saved h
// sees exactly what the forward produced.
void gemm_epilogue(const GemmParams& p);

// out = a @ b^T (+ p.bias) for few rows of a (p.M <= kSkinnyGemmMaxRows), a with unit column stride,
// b with unit column stride ((N, K) rows) or unit row stride (a transposed (K, N) weight): one pass over
// b, split over threads by rows of b, or, stored (K, N), by fixed chunks of K (and column blocks), whose
// partial sums are added in chunk order. Reads a, b, bias; writes out. Up to 16 rows it beat BLAS on
// every GPT-2 projection on the 2-core EPYC (benchmarks/cpu_linear.py), and at 32 the two were even; on
// the 2-core Xeon it trails at 768 x 768 with 2-4 rows (0.8-0.9x, calls of 20-40 us).
// With b stored (K, N) each further group of 4 rows re-reads the weight: streaming GPT-2 small's Conv1D
// weights from DRAM on the 2-core Xeon, 1.0x BLAS at 1 row, 1.5-1.7x at 2-4, even at 8, 0.75x at 16
// (2 threads; 1.0-1.6x, 1.1x and 0.9x on one), so that layout takes the kernel up to 4 rows.
constexpr int64_t kSkinnyGemmMaxRows = 16;
constexpr int64_t kSkinnyGemmMaxRowsTransposed = 4;
void skinny_gemm(const GemmParams& p);

// out[c] = sum over r of partials[r * cols + c], rows summed in order in float64 (deterministic).
void sum_partials(const float* partials, int64_t rows, int64_t cols, float* out);

// LayerNorm (+ fused residual add) forward: writes out, residual_out (when a residual is given), mean
// and rstd.
void layer_norm_forward(const LayerNormParams& p);

// LayerNorm backward: writes dx and dweight_partial / dbias_partial (num_partials rows each, every
// partial covering a fixed block of rows, so the result does not depend on the thread count).
void layer_norm_backward(const LayerNormParams& p);

// Linear cross-entropy over one chunk of rows [row_begin, row_begin + rows), in one pass over the
// chunk's logits, which the caller computed into `logits` (rows x vocab, row stride logits_stride, in
// p.dtype): writes loss[row_begin + r] and, when p.dx is requested (p.dx.data non-null), overwrites the
// logits with d loss / d logits (scaled by row_grad or grad_scale) and adds their column sums to
// p.dbias. The caller forms dx and dweight from the overwritten chunk with two GEMMs.
void cross_entropy_chunk(const CrossEntropyParams& p, int64_t row_begin, int64_t rows, void* logits,
                         int64_t logits_stride);

}  // namespace fastgpt::cpu
