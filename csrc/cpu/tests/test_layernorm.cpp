// LayerNorm (+ fused residual) forward and backward against float64, for every instruction set and
// dtype, with and without residual, weight and bias, on ragged widths.
#include "test_util.h"

namespace fastgpt::test {
namespace {

std::vector<double> read(const Storage& s, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<double> v;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) v.push_back(s.get(r * ld + c));
  }
  return v;
}

void run_case(int64_t rows, int64_t cols, bool residual, bool affine, DType dtype, cpu::Isa isa, std::mt19937& rng) {
  char name[128];
  std::snprintf(name, sizeof name, "%s %s rows=%ld cols=%ld%s%s", cpu::isa_name(isa), dtype_name(dtype),
                static_cast<long>(rows), static_cast<long>(cols), residual ? " residual" : "", affine ? " affine" : "");
  const double tol = tolerance(dtype);
  const int64_t ld = cols + 3;
  Storage x(dtype, rows * ld), res(dtype, rows * ld), sum(dtype, rows * ld), out(dtype, rows * ld);
  Storage weight(dtype, cols), bias(dtype, cols), dout(dtype, rows * ld), dres(dtype, rows * ld), dx(dtype, rows * ld);
  x.fill_uniform(rng, -2, 3);
  res.fill_uniform(rng, -1, 1);
  weight.fill_uniform(rng, 0.5, 1.5);
  bias.fill_uniform(rng, -1, 1);
  dout.fill_uniform(rng, -1, 1);
  dres.fill_uniform(rng, -1, 1);
  std::vector<float> mean(rows, NAN), rstd(rows, NAN);
  const float eps = 1e-5f;

  LayerNormParams p{};
  p.dtype = dtype;
  p.rows = rows;
  p.cols = static_cast<int32_t>(cols);
  p.eps = eps;
  p.x = Matrix{x.data(), ld, 1};
  if (residual) {
    p.residual = Matrix{res.data(), ld, 1};
    p.residual_out = Matrix{sum.data(), ld, 1};
  }
  p.weight = affine ? weight.data() : nullptr;
  p.bias = affine ? bias.data() : nullptr;
  p.out = Matrix{out.data(), ld, 1};
  p.mean = mean.data();
  p.rstd = rstd.data();
  cpu::layer_norm_forward(p);

  const Storage& input = residual ? sum : x;
  std::vector<double> out_expected, sum_expected, dx_expected, dw_expected(cols, 0), db_expected(cols, 0);
  for (int64_t r = 0; r < rows; ++r) {
    double mu = 0, var = 0;
    for (int64_t c = 0; c < cols; ++c) {
      if (residual) sum_expected.push_back(x.value(r * ld + c) + res.value(r * ld + c));
      mu += input.get(r * ld + c);
    }
    mu /= cols;
    for (int64_t c = 0; c < cols; ++c) var += (input.get(r * ld + c) - mu) * (input.get(r * ld + c) - mu);
    const double rs = 1 / std::sqrt(var / cols + eps);
    double mean_g = 0, mean_gx = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double xhat = (input.get(r * ld + c) - mu) * rs;
      out_expected.push_back(affine ? xhat * weight.value(c) + bias.value(c) : xhat);
      const double g = dout.value(r * ld + c) * (affine ? weight.value(c) : 1.0);
      mean_g += g / cols;
      mean_gx += g * xhat / cols;
      dw_expected[c] += dout.value(r * ld + c) * xhat;
      db_expected[c] += dout.value(r * ld + c);
    }
    for (int64_t c = 0; c < cols; ++c) {
      const double xhat = (input.get(r * ld + c) - mu) * rs;
      const double g = dout.value(r * ld + c) * (affine ? weight.value(c) : 1.0);
      dx_expected.push_back(rs * (g - mean_g - xhat * mean_gx) + (residual ? dres.value(r * ld + c) : 0.0));
    }
  }
  expect_close(std::string(name) + " out", read(out, rows, cols, ld), out_expected, tol);
  if (residual) expect_close(std::string(name) + " residual_out", read(sum, rows, cols, ld), sum_expected, tol);

  const int32_t partials = static_cast<int32_t>(rows < 5 ? rows : 5);
  std::vector<float> dw_partial(partials * cols, NAN), db_partial(partials * cols, NAN), dw(cols), db(cols);
  p.x = Matrix{const_cast<Storage&>(input).data(), ld, 1};
  p.dout = Matrix{dout.data(), ld, 1};
  if (residual) p.dresidual_out = Matrix{dres.data(), ld, 1};
  p.dx = Matrix{dx.data(), ld, 1};
  p.dweight_partial = dw_partial.data();
  p.dbias_partial = db_partial.data();
  p.num_partials = partials;
  cpu::layer_norm_backward(p);
  cpu::sum_partials(dw_partial.data(), partials, cols, dw.data());
  cpu::sum_partials(db_partial.data(), partials, cols, db.data());
  expect_close(std::string(name) + " dx", read(dx, rows, cols, ld), dx_expected, 2 * tol, 1.0);
  expect_close(std::string(name) + " dweight", std::vector<double>(dw.begin(), dw.end()), dw_expected, 1e-4, 1.0);
  expect_close(std::string(name) + " dbias", std::vector<double>(db.begin(), db.end()), db_expected, 1e-5, 1.0);
}

}  // namespace
}  // namespace fastgpt::test

int main() {
  using namespace fastgpt;
  using namespace fastgpt::test;
  std::mt19937 rng(11);
  for_each_isa([&](cpu::Isa isa) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      for (bool residual : {false, true}) {
        for (bool affine : {false, true}) {
          run_case(13, 67, residual, affine, dtype, isa, rng);
          run_case(1, 1, residual, affine, dtype, isa, rng);
          run_case(9, 768, residual, affine, dtype, isa, rng);
        }
      }
    }
  });
  return report("test_layernorm");
}
