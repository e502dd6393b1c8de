// out = a @ b^T (+ bias) for a few rows of a: the GEMMs of a decode step (one token per sequence),
// where every weight is read once to produce a handful of outputs, so the time is the time to stream
// the weights.
//
// Each thread streams a contiguous range of weight rows and the rows of a stay in L1. Up to
// kStreamMaxRows rows of a and weight rows of up to kStreamMaxRowBytes, each weight row is read front to
// back as one sequential stream (each vector of it multiplied by every row of a, the next rows
// prefetched); with more rows, or longer ones,
// kWeightRows weight rows are multiplied together so each weight vector loaded serves a register block of
// rows of a. Measured on 2 cores of an AMD EPYC, one row through all GPT-2 small weights (495 MB, from
// DRAM): the sequential stream reads 33 GB/s on 4 KiB pages and 45-50 GB/s on transparent huge pages,
// against 27 and 30 GB/s for four interleaved weight rows and 14 GB/s for BLAS (torch's F.linear); on
// the 2-core Xeon, where BLAS reads 26 GB/s, the three are even.
// With the weight stored (K, N) (transformers' Conv1D), each task streams one contiguous block of
// the weight, kChunkWeightRows rows by a range of columns, into float32 partial sums, and the chunks'
// partial sums are added in chunk order. Each output is summed in an order fixed by the shape, so the
// result does not depend on the thread count.
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

// Weight row length (K x element size) up to which those rows of a are streamed; longer rows go to
// dot_block whatever the row count. Measured on the 2-core Xeon, GPT-2's 768 x 3072 MLP projection (rows
// of 12 KiB) from DRAM against BLAS, streamed vs dot_block: 1 row 0.84-0.87x vs 0.96-0.97x, 2 rows 0.74x
// vs 0.97-0.99x, 3 rows 0.54-0.59x vs 0.84-0.98x, 4 rows 0.96x vs 1.65x (4 rows of a of 12 KiB no longer
// stay in L1 next to the weight stream). The 3 KiB rows of K = 768 stream at 0.98-1.03x.
constexpr int64_t kStreamMaxRowBytes = 8192;

// Vectors of one weight row in flight per step of row_stream: 4 independent accumulator chains cover
// the multiply-add latency (2 measured the same, 8 no better).
constexpr int kStreamVecs = 4;

// Weight rows multiplied together by dot_block: 4 independent loads in flight per step, enough to keep
// the prefetchers streaming four sequential rows.
constexpr int kWeightRows = 4;

// How far ahead (in weight rows) dot_block prefetches: the next block's rows (8 and 16 measured no
// better).
constexpr int64_t kPrefetchRows = kWeightRows;

// How far ahead (in weight rows) row_stream prefetches. Without it one core kept too few reads in
// flight once a step did more than one row's multiplies: GPT-2's LM head (50257 x 768) from DRAM on
// the 2-core Xeon read 26 / 21 / 21 GB/s at 1 / 2 / 4 rows of a, 29 / 31-34 / 30-31 with it (BLAS 30,
// 30, 15). One row ahead and two measured the same within the noise.
constexpr int64_t kStreamPrefetchRows = 2;

// Rows of a per pass over a weight row block: kRowsPerPass x kWeightRows accumulators, plus the 4
// weight vectors and one a vector, fit the register file (4 x 4 + 5 = 21 of AVX-512's 32; 2 x 4 + 5 =
// 13 of the 16 of AVX2, SSE and NEON). Further rows re-read the weight block from L1.
constexpr int kRowsPerPass = FASTGPT_SIMD_REGISTERS >= 32 ? 4 : 2;

// Weight rows per task: 64 rows of a GPT-2 weight (K = 768: 192 KiB in float32) amortise the task's
// scheduling, and a 768 x 768 projection still splits into 12 tasks for the threads.
constexpr int64_t kWeightRowsPerTask = 64;

// With the weight stored (K, N), a task streams kChunkWeightRows weight rows over a range of columns,
// kStreamedWeightRows rows at a time, into accumulators for its columns held in L1/L2: four sequential
// streams, and a quarter of the accumulator loads and stores of one row at a time. The chunk is fixed,
// not derived from the thread count, because it sets the order of each output's sum. 64 rows: GPT-2's
// K = 768 splits into 12 chunks, an even share for 2, 3, 4 or 6 threads. Measured on the 2-core Xeon
// (one row of a through the 48 Conv1D weights of GPT-2 small from DRAM, against BLAS): chunks of 64
// and 128 rows read 27-29 GB/s (1.00-1.04x), 32 rows 25.5 (more partial sums to add), 256 rows 24.9
// (3 chunks of K = 768 on 2 threads); splitting the columns alone over the threads, each thread reading
// half of every weight row, read 25-26 GB/s (0.94x).
constexpr int kStreamedWeightRows = 4;
constexpr int64_t kChunkWeightRows = 64;
// Columns per task at most: 16 KiB of float32 accumulators per row of a. Fewer when the chunks alone
// would leave threads idle.
constexpr int64_t kMaxColumnsPerTask = 4096;
// Rows of a per pass over a task's block: their 4 x kMaxColumnsPerTask float32 accumulators (64 KiB) stay
// in L2, and kSkinnyGemmMaxRowsTransposed rows (the most the router sends this layout) read it once.
constexpr int64_t kColumnPassRows = 4;
// Columns per task of the pass that adds the chunks' partial sums (2 KiB of each partial row).
constexpr int64_t kSumColumnsPerTask = 512;

// The sum of a vector's lanes by halving: log2(kLanes) adds of its upper half onto its lower half.
// Every output of row_stream and dot_block ends with one; dot_block's kRows x kWeightRows lane-by-lane
// sums (reduce_sum) took about half of its time at K = 256 (perf annotate, 16 rows of a), and halving
// made it 1.27x faster there, 1.1x at K = 768 (16 x 256 -> 8192: 1.08 -> 0.85 ms, one thread).
template <int kLanes>
struct Lanes {
  typedef float type __attribute__((vector_size(4 * kLanes)));
};

template <int kLanes>
inline float halving_sum(typename Lanes<kLanes>::type v) {
  if constexpr (kLanes == 2) {
    return v[0] + v[1];
  } else {
    typename Lanes<kLanes / 2>::type low, high;
    __builtin_memcpy(&low, &v, sizeof low);
    __builtin_memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
    return halving_sum<kLanes / 2>(low + high);
  }
}

template <typename T>
const T* row_of(const Matrix& m, int64_t row) {
  return static_cast<const T*>(m.data) + row * m.row_stride;
}

// out[m, n] for the kRows rows of a: weight row n read front to back once, each vector of it multiplied
// by all kRows rows of a before the next is loaded, kStreamVecs vectors per step into independent
// accumulators. One pass over the weight row for all rows of a: with a pass per row of a, re-reading
// the weight row from L1, 4 rows ran 1.3-1.45x BLAS on GPT-2's 2304 x 768 and 3072 x 768 (in cache,
// benchmarks/cpu_linear.py), 1.85-1.9x with one pass.
template <typename T, int kRows>
void row_stream(const GemmParams& p, int64_t n) {
  const T* weight = row_of<T>(p.b, n);
  const T* next_weight = row_of<T>(p.b, n + kStreamPrefetchRows < p.N ? n + kStreamPrefetchRows : n);
  const T* a[kRows];
  for (int i = 0; i < kRows; ++i) a[i] = row_of<T>(p.a, i);
  const int64_t step = kStreamVecs * kWidth;
  const int64_t steps_end = p.K - p.K % step;
  const int64_t vecs_end = p.K - p.K % kWidth;
  Vec acc[kRows][kStreamVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kStreamVecs; ++v) acc[i][v] = splat(0.0f);
  }
  for (int64_t k = 0; k < steps_end; k += step) {
    for (int v = 0; v < kStreamVecs; ++v) {
      __builtin_prefetch(next_weight + k + v * kWidth);
      const Vec w = load(weight + k + v * kWidth);
      for (int i = 0; i < kRows; ++i) acc[i][v] += w * load(a[i] + k + v * kWidth);
    }
  }
  for (int64_t k = steps_end; k < vecs_end; k += kWidth) {
    const Vec w = load(weight + k);
    for (int i = 0; i < kRows; ++i) acc[i][0] += w * load(a[i] + k);
  }
  if (vecs_end < p.K) {
    const Vec w = load_partial(weight + vecs_end, p.K - vecs_end);
    for (int i = 0; i < kRows; ++i) acc[i][0] += w * load_partial(a[i] + vecs_end, p.K - vecs_end);
  }
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = 0; i < kRows; ++i) {
    for (int v = 1; v < kStreamVecs; ++v) acc[i][0] += acc[i][v];
    T* out = static_cast<T*>(p.out.data) + i * p.out.row_stride;
    out[n] = from_float<T>(halving_sum<kWidth>(acc[i][0]) + (bias ? to_float(bias[n]) : 0.0f));
  }
}

template <typename T, int kRows>
void stream_rows(const GemmParams& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) row_stream<T, kRows>(p, n);
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
      out[n + r] = from_float<T>(halving_sum<kWidth>(acc[i][r]) + (bias ? to_float(bias[n + r]) : 0.0f));
    }
  }
}

// out[:, n .. n + weight_rows) for fewer rows of a than one pass takes (p.M < kRowsPerPass), in one
// pass over the weight block.
template <typename T>
void dot_block_few_rows(const GemmParams& p, int64_t n, int weight_rows) {
  if constexpr (kRowsPerPass > 3) {
    if (p.M == 3) return dot_block<T, 3>(p, 0, n, weight_rows);
  }
  if constexpr (kRowsPerPass > 2) {
    if (p.M == 2) return dot_block<T, 2>(p, 0, n, weight_rows);
  }
  dot_block<T, 1>(p, 0, n, weight_rows);
}

// Up to kStreamMaxRows rows of a and rows of at most kStreamMaxRowBytes, row_stream; otherwise
// dot_block, in passes of kRowsPerPass rows of a, each row left after them in a pass of its own. One
// pass for the 2-3 rows left measured slower at K = 3072 (7 rows: 1.22-1.24x BLAS, against 1.44-1.46x).
template <typename T>
void rows_block(const GemmParams& p, int64_t n_begin, int64_t n_end) {
  static_assert(kStreamMaxRows == 4, "one stream_rows instance per row count up to kStreamMaxRows");
  if (p.K * static_cast<int64_t>(sizeof(T)) <= kStreamMaxRowBytes) {
    switch (p.M) {
      case 1: return stream_rows<T, 1>(p, n_begin, n_end);
      case 2: return stream_rows<T, 2>(p, n_begin, n_end);
      case 3: return stream_rows<T, 3>(p, n_begin, n_end);
      case 4: return stream_rows<T, 4>(p, n_begin, n_end);
    }
  }
  for (int64_t n = n_begin; n < n_end; n += kWeightRows) {
    const int weight_rows = static_cast<int>(n_end - n < kWeightRows ? n_end - n : kWeightRows);
    if (p.M < kRowsPerPass) {
      dot_block_few_rows<T>(p, n, weight_rows);
      continue;
    }
    int64_t m = 0;
    for (; m + kRowsPerPass <= p.M; m += kRowsPerPass) dot_block<T, kRowsPerPass>(p, m, n, weight_rows);
    for (; m < p.M; ++m) dot_block<T, 1>(p, m, n, weight_rows);
  }
}

// Weights stored (K, N), b[n, k] at k * col_stride + n (the transposed view of an (in, out) weight such
// as transformers' Conv1D): the partial sums over weight rows k_begin .. k_end of out[m, n_begin ..
// n_end) for rows m_begin .. m_begin + rows of a (rows <= kColumnPassRows), written to acc (row m at
// acc + m * acc_stride, column n at n - n_begin). Weight rows k .. k + kStreamedWeightRows are read over
// the columns, and each vector of them is multiplied by a[m, k ..] and added to row m's accumulators,
// so every weight element is loaded once and each partial sum runs over k in order.
template <typename T>
void column_pass(const GemmParams& p, int64_t m_begin, int64_t rows, int64_t n_begin, int64_t n_end,
                 int64_t k_begin, int64_t k_end, float* acc, int64_t acc_stride) {
  const int64_t columns = n_end - n_begin;
  const int64_t vectors_end = columns - columns % kWidth;  // full vectors of weight columns
  const int64_t padded = vectors_end < columns ? vectors_end + kWidth : vectors_end;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < padded; c += kWidth) store(acc + m * acc_stride + c, splat(0.0f));
  }
  const T* weight = static_cast<const T*>(p.b.data) + n_begin;
  const auto load_weight = [&](const T* row, int64_t c) {
    return c < vectors_end ? load(row + c) : load_partial(row + c, columns - c);
  };
  int64_t k = k_begin;
  for (; k + kStreamedWeightRows <= k_end; k += kStreamedWeightRows) {
    const T* streams[kStreamedWeightRows];  // weight rows k .. k + kStreamedWeightRows
    for (int j = 0; j < kStreamedWeightRows; ++j) streams[j] = weight + (k + j) * p.b.col_stride;
    const int64_t ahead = k + 2 * kStreamedWeightRows <= p.K ? kStreamedWeightRows * p.b.col_stride : 0;
    Vec x[kColumnPassRows][kStreamedWeightRows];
    for (int64_t m = 0; m < rows; ++m) {
      const T* a = row_of<T>(p.a, m_begin + m) + k;
      for (int j = 0; j < kStreamedWeightRows; ++j) x[m][j] = splat(to_float(a[j]));
    }
    for (int64_t c = 0; c < padded; c += kWidth) {
      Vec w[kStreamedWeightRows];
      for (int j = 0; j < kStreamedWeightRows; ++j) {
        __builtin_prefetch(streams[j] + ahead + c);
        w[j] = load_weight(streams[j], c);
      }
      for (int64_t m = 0; m < rows; ++m) {
        Vec sum = load(acc + m * acc_stride + c);
        for (int j = 0; j < kStreamedWeightRows; ++j) sum += x[m][j] * w[j];
        store(acc + m * acc_stride + c, sum);
      }
    }
  }
  for (; k < k_end; ++k) {
    const T* row = weight + k * p.b.col_stride;
    for (int64_t c = 0; c < padded; c += kWidth) {
      const Vec w = load_weight(row, c);
      for (int64_t m = 0; m < rows; ++m) {
        float* sums = acc + m * acc_stride + c;
        store(sums, load(sums) + to_float(row_of<T>(p.a, m_begin + m)[k]) * w);
      }
    }
  }
}

// out[m, n_begin .. n_end) = bias + the chunks' partial sums added in chunk order, where chunk c's sum
// for row m is at partial + (c * M + m) * stride.
template <typename T>
void sum_chunks(const GemmParams& p, const float* partial, int64_t stride, int64_t chunks, int64_t n_begin,
                int64_t n_end) {
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t m = 0; m < p.M; ++m) {
    T* out = static_cast<T*>(p.out.data) + m * p.out.row_stride;
    for (int64_t n = n_begin; n < n_end; n += kWidth) {
      Vec value = load(partial + m * stride + n);
      for (int64_t c = 1; c < chunks; ++c) value += load(partial + (c * p.M + m) * stride + n);
      if (bias) value += load_columns(bias, n, n_end);
      store_columns(out, n, n_end, value);
    }
  }
}

// With the weight stored (K, N): tasks of kChunkWeightRows weight rows by a range of columns, each one
// block of the weight, write their partial sums; sum_chunks adds them.
template <typename T>
void skinny_gemm_transposed(const GemmParams& p) {
  const int threads = threads_for(static_cast<int64_t>(p.N) * p.K);
  const int64_t chunks = ceil_div(p.K, kChunkWeightRows);
  const int64_t wanted_ranges = ceil_div(threads, chunks);  // > 1 only when K has fewer chunks than threads
  const int64_t min_ranges = ceil_div(p.N, kMaxColumnsPerTask);
  const int64_t range_columns =
      round_up(ceil_div(p.N, wanted_ranges > min_ranges ? wanted_ranges : min_ranges), kWidth);
  const int64_t ranges = ceil_div(p.N, range_columns);
  const int64_t stride = round_up(p.N, kWidth);
  ThreadScratch<float> partial(1, chunks * p.M * stride);  // (chunks, M, N rounded up to kWidth)
  float* sums = partial.for_thread(0);
  parallel_for(chunks * ranges, threads, [&](int64_t task) {
    const int64_t chunk = task / ranges;
    const int64_t n_begin = task % ranges * range_columns;
    const int64_t n_end = n_begin + range_columns < p.N ? n_begin + range_columns : p.N;
    const int64_t k_begin = chunk * kChunkWeightRows;
    const int64_t k_end = k_begin + kChunkWeightRows < p.K ? k_begin + kChunkWeightRows : p.K;
    for (int64_t m = 0; m < p.M; m += kColumnPassRows) {
      const int64_t rows = p.M - m < kColumnPassRows ? p.M - m : kColumnPassRows;
      column_pass<T>(p, m, rows, n_begin, n_end, k_begin, k_end, sums + (chunk * p.M + m) * stride + n_begin,
                     stride);
    }
  });
  parallel_for(ceil_div(p.N, kSumColumnsPerTask), threads_for(chunks * p.M * p.N), [&](int64_t task) {
    const int64_t n_begin = task * kSumColumnsPerTask;
    sum_chunks<T>(p, sums, stride, chunks, n_begin,
                  n_begin + kSumColumnsPerTask < p.N ? n_begin + kSumColumnsPerTask : p.N);
  });
}

template <typename T>
void skinny_gemm_typed(const GemmParams& p) {
  if (p.b.col_stride != 1) {
    skinny_gemm_transposed<T>(p);
    return;
  }
  const int threads = threads_for(static_cast<int64_t>(p.N) * p.K);
  parallel_for(ceil_div(p.N, kWeightRowsPerTask), threads, [&](int64_t task) {
    const int64_t begin = task * kWeightRowsPerTask;
    rows_block<T>(p, begin, begin + kWeightRowsPerTask < p.N ? begin + kWeightRowsPerTask : p.N);
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
