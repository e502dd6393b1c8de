// LayerNorm over the last dimension with a fused residual add, forward and backward, on the CPU.
//
// Forward, per row: v = x + residual (stored as residual_out, rounded to the tensor's dtype, and
// normalised as stored), mean and rstd in float32 from two passes over the row (the first sums v as it
// is stored, the second corrects that pass's mean by the mean deviation from it), then
// out = (v - mean) * rstd * weight + bias, while the next row is prefetched.
// Backward, per row: with xhat = (v - mean) * rstd (re-centred to mean 0, which the float32 mean's
// rounding shifts it from) and g = dout * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out),
// and per fixed block of rows the partial sums of dout * xhat (dweight) and dout (dbias), which
// sum_partials reduces in order: deterministic for any thread count.
#ifndef FASTGPT_ISA_PASS

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

#define FASTGPT_ISA_SOURCE "cpu/layernorm.cpp"
#include "cpu/foreach_isa.h"

namespace fastgpt::cpu {

void layer_norm_forward(const LayerNormParams& p) { FASTGPT_ISA_DISPATCH(layer_norm_forward, p) }

void layer_norm_backward(const LayerNormParams& p) { FASTGPT_ISA_DISPATCH(layer_norm_backward, p) }

}  // namespace fastgpt::cpu

#else  // FASTGPT_ISA_PASS: compiled once per instruction set

namespace fastgpt::cpu::FASTGPT_ISA {

#include "cpu/simd.h"

// Rows per forward task: a few KiB of work per task at GPT-2 widths.
constexpr int64_t kRowsPerTask = 8;

// Lanes beyond `cols` of a tail vector are 0, so they add nothing to sums.
inline Vec valid_lanes(Vec v, int64_t c, int64_t cols) {
  return c + kWidth <= cols ? v : vselect(iota(static_cast<int32_t>(c)) < static_cast<int32_t>(cols), v, splat(0.0f));
}

// Independent accumulators per reduction: with one, each add waits for the previous one's result (4
// cycles), which bounds an L1-resident row's sum by that latency instead of by the loads.
constexpr int kChains = 4;

inline float sum_of_chains(const Vec (&chains)[kChains]) {
  return reduce_sum((chains[0] + chains[1]) + (chains[2] + chains[3]));
}

// The sum of a row's `cols` values.
template <typename T>
inline float row_sum(const T* row, int64_t cols) {
  Vec chains[kChains] = {};
  int64_t c = 0;
  for (; c + kChains * kWidth <= cols; c += kChains * kWidth) {
    for (int k = 0; k < kChains; ++k) chains[k] += load(row + c + k * kWidth);
  }
  for (; c < cols; c += kWidth) chains[0] += load_columns(row, c, cols);
  return sum_of_chains(chains);
}

// Writes sum = x + residual (rounded to T) over a row and returns the sum of the rounded values.
template <typename T>
inline float add_rows(const T* x, const T* residual, T* sum, int64_t cols) {
  Vec chains[kChains] = {};
  int64_t c = 0;
  for (; c + kChains * kWidth <= cols; c += kChains * kWidth) {
    for (int k = 0; k < kChains; ++k) {
      const int64_t column = c + k * kWidth;
      store(sum + column, load(x + column) + load(residual + column));
      chains[k] += load(sum + column);
    }
  }
  for (; c < cols; c += kWidth) {
    store_columns(sum, c, cols, load_columns(x, c, cols) + load_columns(residual, c, cols));
    chains[0] += load_columns(sum, c, cols);
  }
  return sum_of_chains(chains);
}

struct Moments {
  float deviation_sum;  // sum of (x - center)
  float square_sum;     // sum of (x - center)^2
};

// The first two moments of a row's values about `center`.
template <typename T>
inline Moments centered_moments(const T* row, int64_t cols, float center) {
  Vec deviations[kChains] = {}, squares[kChains] = {};
  int64_t c = 0;
  for (; c + kChains * kWidth <= cols; c += kChains * kWidth) {
    for (int k = 0; k < kChains; ++k) {
      const Vec centered = load(row + c + k * kWidth) - center;
      deviations[k] += centered;
      squares[k] += centered * centered;
    }
  }
  for (; c < cols; c += kWidth) {
    const Vec centered = valid_lanes(load_columns(row, c, cols) - center, c, cols);
    deviations[0] += centered;
    squares[0] += centered * centered;
  }
  return {sum_of_chains(deviations), sum_of_chains(squares)};
}

// out = (input - mean) * rstd * weight + bias over one row (weight, bias may be null). Meanwhile it
// requests the next row's x and residual, which the first pass over that row would otherwise wait for
// one cache line at a time: with the kChains sums, the forward went from 1.50 to 0.97 ms at 4096 x 768
// and from 3.59 to 1.99 ms at 4096 x 1600 (float32, one thread of the 2-core Xeon, 2026-12-07).
// Arguments by value: the kernel's lambda captures by reference, and the stores here would make the
// compiler reload every captured value in each iteration.
template <typename T>
inline void normalize_row(const T* input, T* out, const T* weight, const T* bias, int64_t cols, float mean,
                          float rstd, const T* next_x, const T* next_residual) {
  for (int64_t c = 0; c < cols; c += kWidth) {
    __builtin_prefetch(next_x + c);
    __builtin_prefetch(next_residual + c);
    Vec y = (load_columns(input, c, cols) - mean) * rstd;
    if (weight) y *= load_columns(weight, c, cols);
    if (bias) y += load_columns(bias, c, cols);
    store_columns(out, c, cols, y);
  }
}

template <typename T>
T* row_of(const Matrix& m, int64_t row) {
  return static_cast<T*>(m.data) + row * m.row_stride;
}

template <typename T>
void forward(const LayerNormParams& p) {
  const int64_t cols = p.cols;
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const bool has_residual = p.residual.data != nullptr;
  const int64_t tasks = ceil_div(p.rows, kRowsPerTask);
  parallel_for(tasks, threads_for(p.rows * cols), [&](int64_t task) {
    const int64_t end = (task + 1) * kRowsPerTask < p.rows ? (task + 1) * kRowsPerTask : p.rows;
    for (int64_t r = task * kRowsPerTask; r < end; ++r) {
      const T* input = row_of<T>(p.x, r);
      float rough_sum;
      if (has_residual) {
        T* sum = row_of<T>(p.residual_out, r);
        rough_sum = add_rows(input, row_of<T>(p.residual, r), sum, cols);
        input = sum;
      } else {
        rough_sum = row_sum(input, cols);
      }
      const float rough_mean = rough_sum / static_cast<float>(cols);
      // Corrected two-pass: the first pass's sum of values far from 0 (a row near 1e4 with unit
      // spread) is rounded at their magnitude, which each lane's serial sum compounds; the deviations
      // from that rough mean are exact and small, so their mean corrects it to float32's resolution.
      const Moments moments = centered_moments(input, cols, rough_mean);
      const float shift = moments.deviation_sum / static_cast<float>(cols);
      const float mean = rough_mean + shift;
      // Var = E[(x - rough_mean)^2] - shift^2 >= 0; the clamp absorbs rounding (NaN stays NaN).
      const float variance = std::max(moments.square_sum / static_cast<float>(cols) - shift * shift, 0.0f);
      const float rstd = 1.0f / std::sqrt(variance + p.eps);
      const int64_t next = r + 1 < p.rows ? r + 1 : r;
      const T* next_x = row_of<T>(p.x, next);
      normalize_row(input, row_of<T>(p.out, r), weight, bias, cols, mean, rstd, next_x,
                    has_residual ? row_of<T>(p.residual, next) : next_x);
      p.mean[r] = mean;
      p.rstd[r] = rstd;
    }
  });
}

template <typename T>
void backward(const LayerNormParams& p) {
  const int64_t cols = p.cols;
  const T* weight = static_cast<const T*>(p.weight);
  const bool has_dresidual = p.dresidual_out.data != nullptr;
  const int64_t rows_per_partial = p.num_partials > 0 ? ceil_div(p.rows, p.num_partials) : 0;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  parallel_for(p.num_partials, threads_for(p.rows * cols), [&](int64_t part) {
    float* dweight = p.dweight_partial + part * cols;
    float* dbias = p.dbias_partial + part * cols;
    for (int64_t c = 0; c < cols; ++c) dweight[c] = dbias[c] = 0.0f;
    const int64_t begin = part * rows_per_partial;
    const int64_t end = begin + rows_per_partial < p.rows ? begin + rows_per_partial : p.rows;
    for (int64_t r = begin; r < end; ++r) {
      const T* input = row_of<T>(p.x, r);
      const T* dout = row_of<T>(p.dout, r);
      const float mean = p.mean[r];
      const float rstd = p.rstd[r];
      Vec sum_g = splat(0.0f), sum_g_xhat = splat(0.0f), sum_xhat = splat(0.0f);
      for (int64_t c = 0; c < cols; c += kWidth) {
        Vec xhat = valid_lanes((load_columns(input, c, cols) - mean) * rstd, c, cols);
        Vec dy = load_columns(dout, c, cols);
        Vec g = weight ? dy * load_columns(weight, c, cols) : dy;
        sum_g += g;
        sum_g_xhat += g * xhat;
        sum_xhat += xhat;
      }
      // The saved mean is float32, off by up to half an ulp of the row's level (5e-4 at 1e4): a common
      // shift of xhat, which the formula's mean(xhat) = 0 would carry into dx and dweight. xhat is
      // re-centred, and mean(g * xhat) with it.
      const float mean_g = reduce_sum(sum_g) * inv_cols;
      const float mean_xhat = reduce_sum(sum_xhat) * inv_cols;
      const float mean_g_xhat = reduce_sum(sum_g_xhat) * inv_cols - mean_xhat * mean_g;
      T* dx = row_of<T>(p.dx, r);
      const T* dresidual = has_dresidual ? row_of<T>(p.dresidual_out, r) : nullptr;
      for (int64_t c = 0; c < cols; c += kWidth) {
        Vec xhat = (load_columns(input, c, cols) - mean) * rstd - mean_xhat;
        Vec dy = load_columns(dout, c, cols);
        Vec g = weight ? dy * load_columns(weight, c, cols) : dy;
        Vec grad = rstd * (g - mean_g - xhat * mean_g_xhat);
        if (dresidual) grad += load_columns(dresidual, c, cols);
        store_columns(dx, c, cols, grad);
        store_columns(dweight, c, cols, load_columns(dweight, c, cols) + dy * xhat);
        store_columns(dbias, c, cols, load_columns(dbias, c, cols) + dy);
      }
    }
  });
}

void layer_norm_forward(const LayerNormParams& p) {
  if (p.dtype == DType::kBFloat16) {
    forward<BFloat16>(p);
  } else {
    forward<float>(p);
  }
}

void layer_norm_backward(const LayerNormParams& p) {
  if (p.dtype == DType::kBFloat16) {
    backward<BFloat16>(p);
  } else {
    backward<float>(p);
  }
}

}  // namespace fastgpt::cpu::FASTGPT_ISA

#endif  // FASTGPT_ISA_PASS
