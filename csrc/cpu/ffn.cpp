// The FFN's GEMM epilogues on the CPU: bias + activation after the first GEMM, bias + residual after
// the second, and the activation's derivative (with the bias gradient's partial column sums and the
// recomputed activation) after the backward GEMM dA = dY @ W_proj. Each is one pass over the GEMM
// output, which the caller (api.cpp) computes with BLAS. Rows are split into fixed blocks, one per
// bias-gradient partial, so the sums do not depend on the thread count.
#ifndef FASTGPT_ISA_PASS

#include <cmath>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

#define FASTGPT_ISA_SOURCE "cpu/ffn.cpp"
#include "cpu/foreach_isa.h"

namespace fastgpt::cpu {

void gemm_epilogue(const GemmParams& p) { FASTGPT_ISA_DISPATCH(gemm_epilogue, p) }

void sum_partials(const float* partials, int64_t rows, int64_t cols, float* out) {
  FASTGPT_ISA_DISPATCH(sum_partials, partials, rows, cols, out)
}

}  // namespace fastgpt::cpu

#else  // FASTGPT_ISA_PASS: compiled once per instruction set

namespace fastgpt::cpu::FASTGPT_ISA {

#include "cpu/simd.h"

// Rows per task when no bias-gradient partials fix the blocking: enough work per task (>= 16 rows of
// a GPT-2 hidden layer) to amortise scheduling.
constexpr int64_t kRowsPerTask = 16;

// Columns summed per task in sum_partials: 256 floats of every partial row, 1 KiB contiguous reads.
constexpr int64_t kColumnsPerTask = 256;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

inline Vec vabs(Vec x) { return (Vec)((VecBits)x & 0x7FFFFFFFu); }

// |magnitude| with the sign of `sign`.
inline Vec copy_sign(Vec magnitude, Vec sign) {
  return (Vec)(((VecBits)magnitude & 0x7FFFFFFFu) | ((VecBits)sign & 0x80000000u));
}

// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow; absolute error ~1 ulp.
inline Vec tanh(Vec x) {
  Vec e = exp2(vabs(x) * (-2.0f * kLog2e));
  return copy_sign((1.0f - e) / (1.0f + e), x);
}

// erfc(z) for z >= 0 as t exp(-z^2 + P(t)) with t = 1 / (1 + z / 2), P of degree 9 fitted by least
// squares on z in [0, 10] (relative error < 5e-8 in float64, ~1e-6 when evaluated in float32). Returns
// the factor exp(P(t)) t, so callers can share exp(-z^2).
inline Vec erfc_factor(Vec z) {
  static constexpr float kCoefficients[10] = {-1.265447997e+00f, 9.986327833e-01f,  3.866404121e-01f,
                                              3.460280010e-02f,  1.267586073e-03f,  -8.028043160e-02f,
                                              -6.962518996e-01f, 1.156733758e+00f,  -6.808271780e-01f,
                                              1.449302138e-01f};
  Vec t = 1.0f / (1.0f + 0.5f * z);
  Vec poly = splat(kCoefficients[9]);
  for (int i = 8; i >= 0; --i) poly = poly * t + kCoefficients[i];
  return t * exp(poly);
}

// act(h) and, when derivative is non-null, act'(h).
template <Activation kActivation>
inline Vec activation(Vec h, Vec* derivative) {
  if constexpr (kActivation == Activation::kGeluTanh) {
    Vec t = tanh(kSqrt2OverPi * (h + kGeluCubic * h * h * h));
    if (derivative) {
      *derivative = 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * h * h);
    }
    return 0.5f * h * (1.0f + t);
  } else if constexpr (kActivation == Activation::kGelu) {
    // Phi(h) = erfc(-h / sqrt 2) / 2 from the tail erfc(|h| / sqrt 2) / 2, accurate for both signs.
    Vec z = vabs(h) * kInvSqrt2;
    Vec gauss = exp(-(z * z));  // exp(-h^2 / 2)
    Vec tail = 0.5f * gauss * erfc_factor(z);
    Vec cdf = h < 0.0f ? tail : 1.0f - tail;
    if (derivative) *derivative = cdf + h * gauss * kInvSqrt2Pi;
    return h * cdf;
  } else if constexpr (kActivation == Activation::kRelu) {
    if (derivative) *derivative = h > 0.0f ? splat(1.0f) : splat(0.0f);
    return h < 0.0f ? splat(0.0f) : h;  // NaN stays NaN
  } else {
    Vec sigmoid = 1.0f / (1.0f + exp(-h));
    if (derivative) *derivative = sigmoid * (1.0f + h * (1.0f - sigmoid));
    return h * sigmoid;
  }
}

template <typename T>
T* element(const Matrix& m, int64_t row) {
  return static_cast<T*>(m.data) + row * m.row_stride;
}

// Forward: out = out + bias; with activation_out: activation_out = act(out as stored); + residual on
// the last stored value.
template <typename T, Activation kActivation>
void forward_rows(const GemmParams& p, int64_t row_begin, int64_t row_end) {
  const T* bias = static_cast<const T*>(p.bias);
  const bool has_activation = p.activation_out.data != nullptr;
  const bool has_residual = p.residual.data != nullptr;
  for (int64_t m = row_begin; m < row_end; ++m) {
    T* out = element<T>(p.out, m);
    T* act = has_activation ? element<T>(p.activation_out, m) : nullptr;
    const T* residual = has_residual ? element<T>(p.residual, m) : nullptr;
    for (int64_t n = 0; n < p.N; n += kWidth) {
      Vec value = load_columns(out, n, p.N);
      if (bias) value += load_columns(bias, n, p.N);
      if (has_activation) {
        // Round h to T first: the backward recomputes act from the stored h.
        T stored[kWidth];
        store(stored, value);
        store_columns(out, n, p.N, value);
        value = activation<kActivation>(load(stored), nullptr);
      }
      if (has_residual) value += load_columns(residual, n, p.N);
      store_columns(has_activation ? act : out, n, p.N, value);
    }
  }
}

// Backward: out = out * act'(h); activation_out = act(h) when given; partial[n] += out as stored.
template <typename T, Activation kActivation>
void backward_rows(const GemmParams& p, int64_t row_begin, int64_t row_end, float* partial) {
  const bool recompute = p.activation_out.data != nullptr;
  if (partial) {
    for (int64_t n = 0; n < p.N; ++n) partial[n] = 0.0f;
  }
  for (int64_t m = row_begin; m < row_end; ++m) {
    T* out = element<T>(p.out, m);
    const T* h_row = element<T>(p.activation_grad_input, m);
    T* act = recompute ? element<T>(p.activation_out, m) : nullptr;
    for (int64_t n = 0; n < p.N; n += kWidth) {
      Vec derivative;
      Vec value = activation<kActivation>(load_columns(h_row, n, p.N), &derivative);
      Vec grad = load_columns(out, n, p.N) * derivative;
      T stored[kWidth];
      store(stored, grad);
      store_columns(out, n, p.N, grad);
      if (recompute) store_columns(act, n, p.N, value);
      if (partial) store_columns(partial, n, p.N, load_columns(partial, n, p.N) + load(stored));
    }
  }
}

template <typename T, Activation kActivation>
void epilogue(const GemmParams& p) {
  const bool backward = p.activation_grad_input.data != nullptr;
  const int64_t block = p.bias_grad_partial ? p.bias_grad_block_m : kRowsPerTask;
  const int64_t blocks = ceil_div(p.M, block);
  parallel_for(blocks, threads_for(static_cast<int64_t>(p.M) * p.N), [&](int64_t b) {
    const int64_t begin = b * block;
    const int64_t end = begin + block < p.M ? begin + block : p.M;
    if (backward) {
      backward_rows<T, kActivation>(p, begin, end, p.bias_grad_partial ? p.bias_grad_partial + b * p.N : nullptr);
    } else {
      forward_rows<T, kActivation>(p, begin, end);
    }
  });
}

template <typename T>
void epilogue_typed(const GemmParams& p) {
  switch (p.activation) {
    case Activation::kGeluTanh: return epilogue<T, Activation::kGeluTanh>(p);
    case Activation::kGelu: return epilogue<T, Activation::kGelu>(p);
    case Activation::kRelu: return epilogue<T, Activation::kRelu>(p);
    case Activation::kSilu: return epilogue<T, Activation::kSilu>(p);
  }
}

void gemm_epilogue(const GemmParams& p) {
  if (p.dtype == DType::kBFloat16) {
    epilogue_typed<BFloat16>(p);
  } else {
    epilogue_typed<float>(p);
  }
}

void sum_partials(const float* partials, int64_t rows, int64_t cols, float* out) {
  const int64_t tasks = ceil_div(cols, kColumnsPerTask);
  parallel_for(tasks, threads_for(rows * cols), [&](int64_t task) {
    const int64_t begin = task * kColumnsPerTask;
    const int64_t end = begin + kColumnsPerTask < cols ? begin + kColumnsPerTask : cols;
    for (int64_t c = begin; c < end; c += kWidth) {
      VecDouble sum = {};
      for (int64_t r = 0; r < rows; ++r) {
        sum += __builtin_convertvector(load_columns(partials + r * cols, c, end), VecDouble);
      }
      store_columns(out, c, end, __builtin_convertvector(sum, Vec));
    }
  });
}

}  // namespace fastgpt::cpu::FASTGPT_ISA

#endif  // FASTGPT_ISA_PASS
