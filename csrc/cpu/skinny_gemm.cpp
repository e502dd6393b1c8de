// out = a @ b^T (+ bias) for a few rows of a: the GEMMs of a decode step (one token per sequence),
// where every weight is read once to produce a handful of outputs, so the time is the time to stream
// the weights.
//
// Each thread streams a contiguous range of weight rows and the rows of a stay in L1. Up to
// kStreamMaxRows rows of a, each weight row is read front to back as one sequential stream (its dot
// product with every row of a, one row of a at a time, the weight row re-read from L1); with more rows,
// kWeightRows weight rows are multiplied together so each weight vector loaded serves a register block of
// rows of a. Measured on 2 cores, one row through all GPT-2 small weights (495 MB, from DRAM): the
// sequential stream reads 33 GB/s on 4 KiB pages and 45-50 GB/s on transparent huge pages, against 27
// and 30 GB/s for four interleaved weight rows and 14 GB/s for BLAS (torch's F.linear).
// Each output is one thread's dot product in a fixed order, so the result does not depend on the
// thread count.
#ifndef FASTGPT_ISA_PASS

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

#define FASTGPT_ISA_SOURCE "cpu/skinny_gemm.cpp"
#include "cpu/foreach_isa.h"

namespace fastgpt::cpu {

void skinny_gemm(const GemmParams& p) { FASTGPT_ISA_DISPATCH(skinny_gemm, p) }

}  // namespace fastgpt::cpu

#else  // FASTGPT_ISA_PASS: compiled once per instruction set

namespace fastgpt::cpu::FASTGPT_ISA {

#include "cpu/simd.h"

// Rows of a up to which each weight row is streamed alone (row_stream). Measured over the GPT-2 small
// weights from DRAM on huge pages (GB/s, streamed vs four weight rows together): 1 row 45 vs 30, 2 rows
// 42 vs 26, 4 rows 34 vs 28, 8 rows 15 vs 21: from 8 rows on, the loads of a, one per multiply when
// a weight row is streamed alone, bound the time, and the register blocks of dot_block win.
constexpr int64_t kStreamMaxRows = 4;

// Vectors of one weight row in flight per step of row_stream: 4 independent accumulator chains cover
// the multiply-add latency (2 measured the same, 8 no better).
constexpr int kStreamVecs = 4;

// Weight rows multiplied together by dot_block: 4 independent loads in flight per step, enough to keep
// the prefetchers streaming four sequential rows.
constexpr int kWeightRows = 4;

// How far ahead (in weight rows) dot_block prefetches: the next block's rows (8 and 16 measured no
// better).
constexpr int64_t kPrefetchRows = kWeightRows;

// Rows of a per pass over a weight row block: kRowsPerPass x kWeightRows accumulators, plus the 4
// weight vectors and one a vector, fit the register file (4 x 4 + 5 = 21 of AVX-512's 32; 2 x 4 + 5 =
// 13 of the 16 of AVX2, SSE and NEON). Further rows re-read the weight block from L1.
constexpr int kRowsPerPass = FASTGPT_SIMD_REGISTERS >= 32 ? 4 : 2;

// Weight rows per task: 64 rows of a GPT-2 weight (K = 768: 192 KiB in float32) amortise the task's
// scheduling, and a 768 x 768 projection still splits into 12 tasks for the threads.
constexpr int64_t kWeightRowsPerTask = 64;

// With the weight stored (K, N): vectors of output columns per register tile (kRowsPerPass x 4
// accumulators, as for kWeightRows), and columns per task: 128 (512 B of each weight row in float32)
// splits a 768-wide output into 6 tasks for the threads.
constexpr int kColumnVecs = 4;
constexpr int64_t kColumnsPerTask = 128;

template <typename T>
const T* row_of(const Matrix& m, int64_t row) {
  return static_cast<const T*>(m.data) + row * m.row_stride;
}

// out[m, n] for every row m of a: weight row n read front to back once (for the first row of a; the
// others re-read it from L1), kStreamVecs vectors per step into independent accumulators.
template <typename T>
void row_stream(const GemmParams& p, int64_t n) {
  const T* weight = row_of<T>(p.b, n);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t step = kStreamVecs * kWidth;
  const int64_t steps_end = p.K - p.K % step;
  const int64_t vecs_end = p.K - p.K % kWidth;
  for (int64_t m = 0; m < p.M; ++m) {
    const T* a = row_of<T>(p.a, m);
    Vec acc[kStreamVecs];
    for (int v = 0; v < kStreamVecs; ++v) acc[v] = splat(0.0f);
    for (int64_t k = 0; k < steps_end; k += step) {
      for (int v = 0; v < kStreamVecs; ++v) acc[v] += load(weight + k + v * kWidth) * load(a + k + v * kWidth);
    }
    for (int64_t k = steps_end; k < vecs_end; k += kWidth) acc[0] += load(weight + k) * load(a + k);
    if (vecs_end < p.K) {
      acc[0] += load_partial(weight + vecs_end, p.K - vecs_end) * load_partial(a + vecs_end, p.K - vecs_end);
    }
    for (int v = 1; v < kStreamVecs; ++v) acc[0] += acc[v];
    T* out = static_cast<T*>(p.out.data) + m * p.out.row_stride;
    out[n] = from_float<T>(reduce_sum(acc[0]) + (bias ? to_float(bias[n]) : 0.0f));
  }
}

// out[m, n .. n + weight_rows) for m in [m_begin, m_begin + kRows): dot products over K of rows of a
// with weight rows n .. n + weight_rows (weight_rows <= kWeightRows).
template <typename T, int kRows>
void dot_block(const GemmParams& p, int64_t m_begin, int64_t n, int weight_rows) {
  Vec acc[kRows][kWeightRows];
  for (int i = 0; i < kRows; ++i) {
    for (int r = 0; r < kWeightRows; ++r) acc[i][r] = splat(0.0f);
  }
  const T* weight[kWeightRows];
  for (int r = 0; r < kWeightRows; ++r) weight[r] = row_of<T>(p.b, n + (r < weight_rows ? r : 0));
  // The rows kPrefetchRows ahead, requested while these stream: the hardware prefetcher alone leaves
  // a sixth of the read bandwidth unused on four interleaved streams (24 -> 26-30 GB/s, measured).
  const T* next_weight[kWeightRows];
  for (int r = 0; r < kWeightRows; ++r) {
    const int64_t ahead = n + kPrefetchRows + r;
    next_weight[r] = row_of<T>(p.b, ahead < p.N ? ahead : n + r);
  }
  const T* a[kRows];
  for (int i = 0; i < kRows; ++i) a[i] = row_of<T>(p.a, m_begin + i);
  const int64_t full_end = p.K - p.K % kWidth;
  for (int64_t k = 0; k < full_end; k += kWidth) {
    Vec w[kWeightRows];
    for (int r = 0; r < kWeightRows; ++r) {
      __builtin_prefetch(next_weight[r] + k);
      w[r] = load(weight[r] + k);
    }
    for (int i = 0; i < kRows; ++i) {
      Vec x = load(a[i] + k);
      for (int r = 0; r < kWeightRows; ++r) acc[i][r] += x * w[r];
    }
  }
  if (full_end < p.K) {
    const int64_t count = p.K - full_end;
    Vec w[kWeightRows];
    for (int r = 0; r < kWeightRows; ++r) w[r] = load_partial(weight[r] + full_end, count);
    for (int i = 0; i < kRows; ++i) {
      Vec x = load_partial(a[i] + full_end, count);
      for (int r = 0; r < kWeightRows; ++r) acc[i][r] += x * w[r];
    }
  }
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = 0; i < kRows; ++i) {
    T* out = static_cast<T*>(p.out.data) + (m_begin + i) * p.out.row_stride;
    for (int r = 0; r < weight_rows; ++r) {
      out[n + r] = from_float<T>(reduce_sum(acc[i][r]) + (bias ? to_float(bias[n + r]) : 0.0f));
    }
  }
}

template <typename T>
void rows_block(const GemmParams& p, int64_t n_begin, int64_t n_end) {
  if (p.M <= kStreamMaxRows) {
    for (int64_t n = n_begin; n < n_end; ++n) row_stream<T>(p, n);
    return;
  }
  for (int64_t n = n_begin; n < n_end; n += kWeightRows) {
    const int weight_rows = static_cast<int>(n_end - n < kWeightRows ? n_end - n : kWeightRows);
    int64_t m = 0;
    for (; m + kRowsPerPass <= p.M; m += kRowsPerPass) dot_block<T, kRowsPerPass>(p, m, n, weight_rows);
    for (; m < p.M; ++m) dot_block<T, 1>(p, m, n, weight_rows);
  }
}

// Weights stored (K, N), b[n, k] at k * col_stride + n (the transposed view of an (in, out) weight such
// as transformers' Conv1D): out[m, c .. c + columns) for m in [m_begin, m_begin + kRows), with
// columns <= kColumnVecs * kWidth, streams that column segment of every weight row and adds a[m, k] x
// segment into accumulators held in registers.
template <typename T, int kRows>
void column_tile(const GemmParams& p, int64_t m_begin, int64_t c, int64_t columns) {
  Vec acc[kRows][kColumnVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kColumnVecs; ++v) acc[i][v] = splat(0.0f);
  }
  const T* a[kRows];
  for (int i = 0; i < kRows; ++i) a[i] = row_of<T>(p.a, m_begin + i);
  const T* weight = static_cast<const T*>(p.b.data) + c;
  const bool full = columns == kColumnVecs * kWidth;
  for (int64_t k = 0; k < p.K; ++k) {
    const T* segment = weight + k * p.b.col_stride;
    const int64_t ahead = k + kPrefetchRows < p.K ? k + kPrefetchRows : k;
    for (int64_t offset = 0; offset < columns; offset += 64 / static_cast<int64_t>(sizeof(T))) {
      __builtin_prefetch(weight + ahead * p.b.col_stride + offset);
    }
    Vec w[kColumnVecs];
    for (int v = 0; v < kColumnVecs; ++v) {
      const int64_t left = columns - v * kWidth;
      w[v] = full || left >= kWidth ? load(segment + v * kWidth)
                                    : (left > 0 ? load_partial(segment + v * kWidth, left) : splat(0.0f));
    }
    for (int i = 0; i < kRows; ++i) {
      const Vec x = splat(to_float(a[i][k]));
      for (int v = 0; v < kColumnVecs; ++v) acc[i][v] += x * w[v];
    }
  }
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = 0; i < kRows; ++i) {
    T* out = static_cast<T*>(p.out.data) + (m_begin + i) * p.out.row_stride + c;
    for (int v = 0; v < kColumnVecs; ++v) {
      const int64_t left = columns - v * kWidth;
      if (left <= 0) break;
      Vec value = acc[i][v];
      if (bias) value += left >= kWidth ? load(bias + c + v * kWidth) : load_partial(bias + c + v * kWidth, left);
      if (left >= kWidth) {
        store(out + v * kWidth, value);
      } else {
        store_partial(out + v * kWidth, value, left);
      }
    }
  }
}

template <typename T>
void columns_block(const GemmParams& p, int64_t n_begin, int64_t n_end) {
  for (int64_t c = n_begin; c < n_end; c += kColumnVecs * kWidth) {
    const int64_t columns = n_end - c < kColumnVecs * kWidth ? n_end - c : kColumnVecs * kWidth;
    int64_t m = 0;
    for (; m + kRowsPerPass <= p.M; m += kRowsPerPass) column_tile<T, kRowsPerPass>(p, m, c, columns);
    for (; m < p.M; ++m) column_tile<T, 1>(p, m, c, columns);
  }
}

template <typename T>
void skinny_gemm_typed(const GemmParams& p) {
  const bool rows_contiguous = p.b.col_stride == 1;
  const int64_t per_task = rows_contiguous ? kWeightRowsPerTask : kColumnsPerTask;
  const int64_t tasks = ceil_div(p.N, per_task);
  parallel_for(tasks, threads_for(static_cast<int64_t>(p.N) * p.K), [&](int64_t task) {
    const int64_t begin = task * per_task;
    const int64_t end = begin + per_task < p.N ? begin + per_task : p.N;
    if (rows_contiguous) {
      rows_block<T>(p, begin, end);
    } else {
      columns_block<T>(p, begin, end);
    }
  });
}

void skinny_gemm(const GemmParams& p) {
  if (p.dtype == DType::kBFloat16) {
    skinny_gemm_typed<BFloat16>(p);
  } else {
    skinny_gemm_typed<float>(p);
  }
}

}  // namespace fastgpt::cpu::FASTGPT_ISA

#endif  // FASTGPT_ISA_PASS
