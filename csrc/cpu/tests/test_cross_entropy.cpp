// The linear cross-entropy chunk kernel (loss, dlogits in place, dbias column sums) against float64,
// for every instruction set and dtype: ragged vocabularies, ignored rows, a bias, per-row gradients
// ('none') and huge logits that would overflow a naive exp.
#include "test_util.h"

namespace fastgpt::test {
namespace {

void run_case(int64_t tokens, int64_t vocab, bool with_bias, bool row_grads, DType dtype, cpu::Isa isa,
              std::mt19937& rng) {
  char name[128];
  std::snprintf(name, sizeof name, "%s %s tokens=%ld vocab=%ld%s%s", cpu::isa_name(isa), dtype_name(dtype),
                static_cast<long>(tokens), static_cast<long>(vocab), with_bias ? " bias" : "",
                row_grads ? " row_grad" : "");
  const int64_t ld = vocab + 2;
  const int64_t ignore = -100;
  Storage logits(dtype, tokens * ld), bias(dtype, vocab);
  logits.fill_uniform(rng, -6, 6);
  bias.fill_uniform(rng, -1, 1);
  logits.set(0, 1e4);  // row 0: a huge logit
  std::vector<int64_t> targets(tokens);
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  for (int64_t n = 0; n < tokens; ++n) targets[n] = n % 4 == 2 ? ignore : pick(rng);
  std::vector<float> row_grad(tokens), loss(tokens, NAN), dbias(vocab, 0.25f);
  for (int64_t n = 0; n < tokens; ++n) row_grad[n] = 0.5f + 0.1f * static_cast<float>(n);
  std::vector<double> original(tokens * ld);
  for (int64_t i = 0; i < tokens * ld; ++i) original[i] = logits.value(i);

  CrossEntropyParams p{};
  p.dtype = dtype;
  p.tokens = tokens;
  p.vocab = static_cast<int32_t>(vocab);
  p.ignore_index = ignore;
  p.bias = with_bias ? bias.data() : nullptr;
  p.targets = targets.data();
  p.loss = loss.data();
  p.row_grad = row_grads ? row_grad.data() : nullptr;
  float dx_marker = 0;
  p.dx = Matrix{&dx_marker, 0, 1};  // gradients requested
  p.dbias = with_bias ? dbias.data() : nullptr;
  // Two chunks, as api.cpp walks the tokens.
  const int64_t first = tokens / 2;
  cpu::cross_entropy_chunk(p, 0, first, logits.data(), ld);
  cpu::cross_entropy_chunk(p, first, tokens - first,
                           static_cast<char*>(logits.data()) + first * ld * (dtype == DType::kBFloat16 ? 2 : 4), ld);

  std::vector<double> loss_expected(tokens), grad_expected, grad_actual, dbias_expected(vocab, 0.25);
  for (int64_t n = 0; n < tokens; ++n) {
    std::vector<double> z(vocab);
    double max = -INFINITY, sum = 0;
    for (int64_t v = 0; v < vocab; ++v) max = std::fmax(max, z[v] = original[n * ld + v] + (with_bias ? bias.value(v) : 0));
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(z[v] - max);
    const double lse = max + std::log(sum);
    const bool kept = targets[n] != ignore;
    loss_expected[n] = kept ? lse - z[targets[n]] : 0.0;
    const double scale = row_grads ? row_grad[n] : 1.0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double g = kept ? (std::exp(z[v] - lse) - (v == targets[n])) * scale : 0.0;
      grad_expected.push_back(g);
      grad_actual.push_back(logits.get(n * ld + v));
      dbias_expected[v] += logits.get(n * ld + v);  // sums of dlogits as stored
    }
  }
  // The loss is float32 from logits of either dtype; |loss| ~ 10, and the huge row is exact to ~1e-3.
  expect_close(std::string(name) + " loss", std::vector<double>(loss.begin(), loss.end()), loss_expected, 2e-6, 1e4);
  expect_close(std::string(name) + " dlogits", grad_actual, grad_expected, tolerance(dtype), 1.0);
  if (with_bias) {
    expect_close(std::string(name) + " dbias", std::vector<double>(dbias.begin(), dbias.end()), dbias_expected, 1e-5, 1.0);
  }
}

}  // namespace
}  // namespace fastgpt::test

int main() {
  using namespace fastgpt;
  using namespace fastgpt::test;
  std::mt19937 rng(5);
  for_each_isa([&](cpu::Isa isa) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      for (bool with_bias : {false, true}) {
        run_case(9, 333, with_bias, false, dtype, isa, rng);
        run_case(6, 1, with_bias, true, dtype, isa, rng);
        run_case(5, 1029, with_bias, true, dtype, isa, rng);
      }
    }
  });
  return report("test_cross_entropy");
}
