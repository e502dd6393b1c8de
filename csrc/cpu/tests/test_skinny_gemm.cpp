// skinny_gemm (out = a @ b^T + bias for up to kSkinnyGemmMaxRows rows of a) against float64, for every
// instruction set and dtype, with b stored (N, K) and transposed (K, N): row counts that fill and miss
// the register blocking (every remainder of it), ragged N and K (the vector tails), rows long enough to
// leave the streamed path, padded row strides, several tasks, and with and without bias.
#include "test_util.h"

namespace fastgpt::test {
namespace {

void run_case(int64_t M, int64_t N, int64_t K, DType dtype, bool with_bias, bool transposed, cpu::Isa isa,
              std::mt19937& rng) {
  char name[128];
  std::snprintf(name, sizeof name, "%s %s M=%ld N=%ld K=%ld%s%s", cpu::isa_name(isa), dtype_name(dtype),
                static_cast<long>(M), static_cast<long>(N), static_cast<long>(K), with_bias ? " bias" : "",
                transposed ? " b stored (K, N)" : "");
  // Padded rows: strides are honoured. b[n, k] is at n * b_row + k * b_col.
  const int64_t lda = K + 3, ldo = N + 7;
  const int64_t b_row = transposed ? 1 : K + 5, b_col = transposed ? N + 5 : 1;
  Storage a(dtype, M * lda), b(dtype, transposed ? K * b_col : N * b_row), bias(dtype, N), out(dtype, M * ldo);
  a.fill_uniform(rng, -1, 1);
  b.fill_uniform(rng, -1, 1);
  bias.fill_uniform(rng, -1, 1);
  GemmParams p{};
  p.dtype = dtype;
  p.M = static_cast<int32_t>(M);
  p.N = static_cast<int32_t>(N);
  p.K = static_cast<int32_t>(K);
  p.a = Matrix{a.data(), lda, 1};
  p.b = Matrix{b.data(), b_row, b_col};
  p.bias = with_bias ? bias.data() : nullptr;
  p.out = Matrix{out.data(), ldo, 1};
  cpu::skinny_gemm(p);
  std::vector<double> expected, actual;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double sum = with_bias ? bias.value(n) : 0.0;
      for (int64_t k = 0; k < K; ++k) sum += a.value(m * lda + k) * b.value(n * b_row + k * b_col);
      expected.push_back(sum);
      actual.push_back(out.get(m * ldo + n));
    }
  }
  // Sums of K products of magnitude <= 1: the error grows like sqrt(K) ulps of the sum's terms.
  expect_close(name, actual, expected, tolerance(dtype), std::sqrt(static_cast<double>(K)));
  bool padding_untouched = true;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = N; n < ldo; ++n) padding_untouched &= std::isnan(out.get(m * ldo + n));
  }
  expect(padding_untouched, std::string(name) + ": wrote outside the output rows");
}

}  // namespace
}  // namespace fastgpt::test

int main() {
  using namespace fastgpt;
  using namespace fastgpt::test;
  std::mt19937 rng(11);
  for_each_isa([&](cpu::Isa isa) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      for (bool transposed : {false, true}) {
        for (int64_t M : {1, 2, 3, 5, 6, 7, 8, 16}) {
          run_case(M, 70, 131, dtype, true, transposed, isa, rng);
          run_case(M, 3, 16, dtype, false, transposed, isa, rng);
        }
        run_case(1, 1, 1, dtype, true, transposed, isa, rng);
        run_case(4, 300, 768, dtype, true, transposed, isa, rng);  // several tasks
        // Rows longer than kStreamMaxRowBytes (8 KiB in either dtype): up to 4 rows of a take dot_block.
        for (int64_t M : {1, 2, 3}) run_case(M, 37, 4099, dtype, true, transposed, isa, rng);
        // With b stored (K, N): more columns than one task holds (kMaxColumnsPerTask = 4096), a last
        // task of 37, and K not a multiple of the 4 weight rows streamed together.
        run_case(5, 4133, 23, dtype, true, transposed, isa, rng);
      }
    }
  });
  return report("test_skinny_gemm");
}
