// Linear cross-entropy on the CPU: the fused softmax / loss / gradient pass over one chunk of logits.
//
// api.cpp walks the tokens in chunks: logits = x_chunk @ W^T (BLAS) into a (chunk, vocab) buffer, this
// kernel, then dx_chunk = dlogits @ W and dW += dlogits^T @ x_chunk (BLAS). The kernel reads each row
// of logits (+ bias) twice: once for its maximum, once for sum(exp(logit - max)), giving
//   loss = max + log(sum) - logit[target],
// and, when gradients are requested, overwrites the row in place with
//   dlogits = (softmax - onehot(target)) * row_grad
// (row_grad = 1 for 'mean' and 'sum', which the caller scales afterwards). Ignored rows get loss 0 and
// zero gradients. dbias accumulates the chunk's dlogits column sums, rows added in order in float64.
#ifndef FASTGPT_ISA_PASS

#include <cmath>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

#define FASTGPT_ISA_SOURCE "cpu/cross_entropy.cpp"
#include "cpu/foreach_isa.h"

namespace fastgpt::cpu {

void cross_entropy_chunk(const CrossEntropyParams& p, int64_t row_begin, int64_t rows, void* logits,
                         int64_t logits_stride) {
  FASTGPT_ISA_DISPATCH(cross_entropy_chunk, p, row_begin, rows, logits, logits_stride)
}

}  // namespace fastgpt::cpu

#else  // FASTGPT_ISA_PASS: compiled once per instruction set

namespace fastgpt::cpu::FASTGPT_ISA {

#include "cpu/simd.h"

// Vocabulary entries per dbias task: 1024 floats of every row of the chunk, 4 KiB contiguous reads.
constexpr int64_t kColumnsPerTask = 1024;

template <typename T>
inline Vec load_logits(const T* row, const T* bias, int64_t c, int64_t vocab) {
  Vec v = load_columns(row, c, vocab);
  if (bias) v += load_columns(bias, c, vocab);
  return v;
}

template <typename T>
void chunk(const CrossEntropyParams& p, int64_t row_begin, int64_t rows, T* logits, int64_t stride) {
  const int64_t vocab = p.vocab;
  const T* bias = static_cast<const T*>(p.bias);
  const bool with_grad = p.dx.data != nullptr;
  parallel_for(rows, threads_for(rows * vocab), [&](int64_t r) {
    const int64_t n = row_begin + r;
    const int64_t target = p.targets[n];
    T* row = logits + r * stride;
    if (target == p.ignore_index) {
      p.loss[n] = 0.0f;
      if (with_grad) {
        for (int64_t c = 0; c < vocab; ++c) row[c] = from_float<T>(0.0f);
      }
      return;
    }
    Vec max_vec = splat(-__builtin_inff());
    for (int64_t c = 0; c < vocab; c += kWidth) {
      Vec v = load_logits(row, bias, c, vocab);
      if (c + kWidth > vocab) v = vselect(iota(static_cast<int32_t>(c)) < static_cast<int32_t>(vocab), v, max_vec);
      max_vec = vmax(max_vec, v);
    }
    const float max = reduce_max(max_vec);
    Vec sum_vec = splat(0.0f);
    for (int64_t c = 0; c < vocab; c += kWidth) {
      Vec e = exp(load_logits(row, bias, c, vocab) - max);
      if (c + kWidth > vocab) e = vselect(iota(static_cast<int32_t>(c)) < static_cast<int32_t>(vocab), e, splat(0.0f));
      sum_vec += e;
    }
    const float lse = max + std::log(reduce_sum(sum_vec));
    // Targets out of [0, vocab) are rejected by the Python validation; here they only give a NaN loss.
    const bool in_range = target >= 0 && target < vocab;
    const float target_logit =
        in_range ? to_float(row[target]) + (bias ? to_float(bias[target]) : 0.0f) : __builtin_nanf("");
    p.loss[n] = lse - target_logit;
    if (!with_grad) return;
    const float scale = p.row_grad ? p.row_grad[n] : 1.0f;
    for (int64_t c = 0; c < vocab; c += kWidth) {
      store_columns(row, c, vocab, exp(load_logits(row, bias, c, vocab) - lse) * scale);
    }
    if (in_range) row[target] = from_float<T>((std::exp(target_logit - lse) - 1.0f) * scale);
  });

  if (!with_grad || p.dbias == nullptr) return;
  const int64_t tasks = ceil_div(vocab, kColumnsPerTask);
  parallel_for(tasks, threads_for(rows * vocab), [&](int64_t task) {
    const int64_t begin = task * kColumnsPerTask;
    const int64_t end = begin + kColumnsPerTask < vocab ? begin + kColumnsPerTask : vocab;
    for (int64_t c = begin; c < end; c += kWidth) {
      VecDouble sum = __builtin_convertvector(load_columns(p.dbias, c, end), VecDouble);
      for (int64_t r = 0; r < rows; ++r) {
        sum += __builtin_convertvector(load_columns(logits + r * stride, c, end), VecDouble);
      }
      store_columns(p.dbias, c, end, __builtin_convertvector(sum, Vec));
    }
  });
}

void cross_entropy_chunk(const CrossEntropyParams& p, int64_t row_begin, int64_t rows, void* logits,
                         int64_t logits_stride) {
  if (p.dtype == DType::kBFloat16) {
    chunk(p, row_begin, rows, static_cast<BFloat16*>(logits), logits_stride);
  } else {
    chunk(p, row_begin, rows, static_cast<float*>(logits), logits_stride);
  }
}

}  // namespace fastgpt::cpu::FASTGPT_ISA

#endif  // FASTGPT_ISA_PASS
