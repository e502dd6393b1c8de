// The FFN GEMM epilogues (forward: bias + activation, bias + residual; backward: activation derivative,
// recomputed activation, bias-gradient partials) and sum_partials against float64, for every
// instruction set, activation and dtype, on ragged shapes.
#include "test_util.h"

namespace fastgpt::test {
namespace {

double act_value(Activation a, double h) {
  switch (a) {
    case Activation::kGeluTanh: return 0.5 * h * (1 + std::tanh(std::sqrt(2 / M_PI) * (h + 0.044715 * h * h * h)));
    case Activation::kGelu: return 0.5 * h * std::erfc(-h / std::sqrt(2.0));
    case Activation::kRelu: return h > 0 ? h : 0;
    case Activation::kSilu: return h / (1 + std::exp(-h));
  }
  return NAN;
}

double act_derivative(Activation a, double h) {
  switch (a) {
    case Activation::kGeluTanh: {
      double t = std::tanh(std::sqrt(2 / M_PI) * (h + 0.044715 * h * h * h));
      return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * std::sqrt(2 / M_PI) * (1 + 3 * 0.044715 * h * h);
    }
    case Activation::kGelu: return 0.5 * std::erfc(-h / std::sqrt(2.0)) + h * std::exp(-0.5 * h * h) / std::sqrt(2 * M_PI);
    case Activation::kRelu: return h > 0 ? 1 : 0;
    case Activation::kSilu: {
      double s = 1 / (1 + std::exp(-h));
      return s * (1 + h * (1 - s));
    }
  }
  return NAN;
}

const char* act_name(Activation a) {
  const char* names[] = {"gelu_tanh", "gelu", "relu", "silu"};
  return names[static_cast<int>(a)];
}

void run_case(int64_t M, int64_t N, Activation act, DType dtype, bool with_bias, cpu::Isa isa, std::mt19937& rng) {
  char name[128];
  std::snprintf(name, sizeof name, "%s %s %s M=%ld N=%ld%s", cpu::isa_name(isa), dtype_name(dtype), act_name(act),
                static_cast<long>(M), static_cast<long>(N), with_bias ? " bias" : "");
  const double tol = tolerance(dtype);
  const int64_t ld = N + 5;  // padded rows: strides are honoured

  // Forward, first GEMM: h = gemm + bias (stored), a = act(h as stored).
  Storage h(dtype, M * ld), a(dtype, M * ld), bias(dtype, N);
  h.fill_uniform(rng, -4, 4);
  bias.fill_uniform(rng, -1, 1);
  std::vector<double> gemm(M * ld);
  for (int64_t i = 0; i < M * ld; ++i) gemm[i] = h.value(i);
  GemmParams p{};
  p.dtype = dtype;
  p.M = static_cast<int32_t>(M);
  p.N = static_cast<int32_t>(N);
  p.activation = act;
  p.bias = with_bias ? bias.data() : nullptr;
  p.out = Matrix{h.data(), ld, 1};
  p.activation_out = Matrix{a.data(), ld, 1};
  cpu::gemm_epilogue(p);
  std::vector<double> h_expected, h_actual, a_expected, a_actual;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      h_expected.push_back(gemm[m * ld + n] + (with_bias ? bias.value(n) : 0));
      h_actual.push_back(h.get(m * ld + n));
      a_expected.push_back(act_value(act, h.get(m * ld + n)));  // act of h as stored
      a_actual.push_back(a.get(m * ld + n));
    }
  }
  expect_close(std::string(name) + " h", h_actual, h_expected, tol);
  expect_close(std::string(name) + " act", a_actual, a_expected, tol);

  // Forward, second GEMM: y = gemm + bias + residual.
  Storage y(dtype, M * ld), residual(dtype, M * N);
  y.fill_uniform(rng, -2, 2);
  residual.fill_uniform(rng, -2, 2);
  std::vector<double> y_gemm(M * ld), y_expected, y_actual;
  for (int64_t i = 0; i < M * ld; ++i) y_gemm[i] = y.value(i);
  GemmParams q{};
  q.dtype = dtype;
  q.M = static_cast<int32_t>(M);
  q.N = static_cast<int32_t>(N);
  q.activation = act;
  q.bias = with_bias ? bias.data() : nullptr;
  q.out = Matrix{y.data(), ld, 1};
  q.residual = Matrix{residual.data(), N, 1};
  cpu::gemm_epilogue(q);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      y_expected.push_back(y_gemm[m * ld + n] + (with_bias ? bias.value(n) : 0) + residual.value(m * N + n));
      y_actual.push_back(y.get(m * ld + n));
    }
  }
  expect_close(std::string(name) + " y", y_actual, y_expected, tol);

  // Backward: dh = dA * act'(h), recomputed act(h), bias-gradient partials of 7 rows.
  const int64_t block = 7, blocks = (M + block - 1) / block;
  Storage dh(dtype, M * ld), recomputed(dtype, M * ld);
  dh.fill_uniform(rng, -2, 2);
  std::vector<double> da(M * ld);
  for (int64_t i = 0; i < M * ld; ++i) da[i] = dh.value(i);
  std::vector<float> partials(blocks * N, NAN), dbias(N, NAN);
  GemmParams b{};
  b.dtype = dtype;
  b.M = static_cast<int32_t>(M);
  b.N = static_cast<int32_t>(N);
  b.activation = act;
  b.out = Matrix{dh.data(), ld, 1};
  b.activation_out = Matrix{recomputed.data(), ld, 1};
  b.activation_grad_input = Matrix{h.data(), ld, 1};
  b.bias_grad_partial = partials.data();
  b.bias_grad_block_m = static_cast<int32_t>(block);
  cpu::gemm_epilogue(b);
  cpu::sum_partials(partials.data(), blocks, N, dbias.data());
  std::vector<double> dh_expected, dh_actual, re_actual, db_expected(N, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      dh_expected.push_back(da[m * ld + n] * act_derivative(act, h.get(m * ld + n)));
      dh_actual.push_back(dh.get(m * ld + n));
      re_actual.push_back(recomputed.get(m * ld + n));
      db_expected[n] += dh.get(m * ld + n);  // sums of dh as stored
    }
  }
  expect_close(std::string(name) + " dh", dh_actual, dh_expected, tol);
  expect(re_actual == a_actual, std::string(name) + ": recomputed act(h) differs from the forward's");
  expect_close(std::string(name) + " dbias", std::vector<double>(dbias.begin(), dbias.end()), db_expected, 2e-6, 1.0);
}

}  // namespace
}  // namespace fastgpt::test

int main() {
  using namespace fastgpt;
  using namespace fastgpt::test;
  std::mt19937 rng(7);
  for_each_isa([&](cpu::Isa isa) {
    for (Activation act : {Activation::kGeluTanh, Activation::kGelu, Activation::kRelu, Activation::kSilu}) {
      for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
        run_case(37, 77, act, dtype, true, isa, rng);
        run_case(1, 3, act, dtype, false, isa, rng);
        run_case(64, 128, act, dtype, true, isa, rng);
      }
    }
  });
  return report("test_ffn");
}
