/*
LayerNorm with fused residual (csrc/cuda/layernorm.cu) and the column sums of its weight/bias partials
(csrc/cuda/column_sums.cu): checks out, x + residual, mean, rstd, dx, dweight and dbias against a
double-precision CPU reference on the vectorised (cols % 8 == 0) and scalar paths, rows of one warp,
several warps and 512 threads (cols up to 16384), with and without residual, weight and bias, and
zero rows, in bfloat16 and float16. Then times forward and backward in bfloat16 as GB/s and as a
fraction of the device-to-device copy bandwidth measured in the same run.

Compile and run (from csrc/dev; `make` builds every harness, ARCH="-arch=sm_90a" for one GPU):
  make layernorm && ./layernorm                        (add --validate to skip the timing)
*/
#include <cstdio>

#include "../cuda/launch.h"
#include "common.h"

struct Case {
  int rows, cols;
  bool residual, weight, bias, dresidual;
};

static const Case kCases[] = {
    {257, 768, true, true, true, true},     // GPT-2 width, vectorised, 8 rows a block
    {33, 1000, false, true, true, false},   // vectorised, a row over 32 lanes with a partial chunk count
    {65, 999, true, true, false, true},     // scalar path
    {17, 100, false, false, false, false},  // scalar, no affine parameters
    {300, 2048, true, true, true, false},   // 64 threads a row: cross-warp reductions, 4 rows a block
    {40, 4104, false, true, true, true},    // 256 threads a row
    {8, 16384, true, true, true, true},     // 512 threads a row, the largest supported
    {5, 4095, true, true, true, false},     // scalar path at its widest
    {0, 768, true, true, true, true},       // no rows: zero weight/bias gradients
};

template <typename T>
void check_layer_norm(const Case& c, std::mt19937& rng) {
  printf("%s rows %d cols %d%s%s%s%s\n", dtype_name<T>(), c.rows, c.cols, c.residual ? " +residual" : "",
         c.weight ? " +weight" : "", c.bias ? " +bias" : "", c.dresidual ? " +dresidual" : "");
  const size_t n = size_t(c.rows) * c.cols;
  const float eps = 1e-5f;
  Buffer<T> x(n), residual(n), residual_out(n), out(n), dout(n), dresidual(n), dx(n);
  Buffer<T> weight(c.cols), bias(c.cols), dweight(c.cols), dbias(c.cols);
  Buffer<float> mean(c.rows), rstd(c.rows);
  for (Buffer<T>* b : {&x, &residual, &dout, &dresidual, &weight, &bias}) b->randomize(rng);
  const int num_partials = fastgpt::cuda::layer_norm_backward_num_partials(c.rows);
  Buffer<float> dweight_partial(size_t(num_partials) * c.cols), dbias_partial(size_t(num_partials) * c.cols);

  fastgpt::LayerNormParams p{};
  p.dtype = dtype_of<T>();
  p.rows = c.rows;
  p.cols = c.cols;
  p.eps = eps;
  p.x = {x.device, c.cols, 1};
  if (c.residual) {
    p.residual = {residual.device, c.cols, 1};
    p.residual_out = {residual_out.device, c.cols, 1};
  }
  p.weight = c.weight ? weight.device : nullptr;
  p.bias = c.bias ? bias.device : nullptr;
  p.out = {out.device, c.cols, 1};
  p.mean = mean.device;
  p.rstd = rstd.device;
  cuda_check(fastgpt::cuda::layer_norm_forward(p, nullptr));

  fastgpt::LayerNormParams back = p;
  back.x = c.residual ? p.residual_out : p.x;  // the normalised input
  back.dout = {dout.device, c.cols, 1};
  if (c.dresidual) back.dresidual_out = {dresidual.device, c.cols, 1};
  back.dx = {dx.device, c.cols, 1};
  back.dweight_partial = dweight_partial.device;
  back.dbias_partial = dbias_partial.device;
  back.num_partials = num_partials;
  cuda_check(fastgpt::cuda::layer_norm_backward(back, nullptr));
  cuda_check(fastgpt::cuda::column_sums_pair(dweight_partial.device, dweight.device, dbias_partial.device,
                                              dbias.device, num_partials, c.cols, p.dtype, nullptr));
  cuda_check(cudaDeviceSynchronize());

  std::vector<float> sum_ref(n), out_ref(n), dx_ref(n), mean_ref(c.rows), rstd_ref(c.rows);
  std::vector<double> dweight_sum(c.cols, 0.0), dbias_sum(c.cols, 0.0);
  std::vector<double> xhat(c.cols);
  for (int r = 0; r < c.rows; ++r) {
    const size_t row = size_t(r) * c.cols;
    double mu = 0.0;
    for (int j = 0; j < c.cols; ++j) {
      // x + residual is rounded to the dtype (it is stored as residual_out) before normalising.
      sum_ref[row + j] = c.residual ? to_host_float(from_host_float<T>(x.host[row + j] + residual.host[row + j]))
                                    : x.host[row + j];
      mu += sum_ref[row + j];
    }
    mu /= c.cols;
    double var = 0.0;
    for (int j = 0; j < c.cols; ++j) var += (sum_ref[row + j] - mu) * (sum_ref[row + j] - mu);
    const double rs = 1.0 / std::sqrt(var / c.cols + eps);
    mean_ref[r] = static_cast<float>(mu);
    rstd_ref[r] = static_cast<float>(rs);
    double mean_wdy = 0.0, mean_wdy_xhat = 0.0;
    for (int j = 0; j < c.cols; ++j) {
      const double w = c.weight ? weight.host[j] : 1.0, b = c.bias ? bias.host[j] : 0.0;
      xhat[j] = (sum_ref[row + j] - mu) * rs;
      out_ref[row + j] = static_cast<float>(xhat[j] * w + b);
      const double dy = dout.host[row + j];
      mean_wdy += w * dy / c.cols;
      mean_wdy_xhat += w * dy * xhat[j] / c.cols;
      dweight_sum[j] += dy * xhat[j];
      dbias_sum[j] += dy;
    }
    for (int j = 0; j < c.cols; ++j) {
      const double w = c.weight ? weight.host[j] : 1.0;
      const double extra = c.dresidual ? dresidual.host[row + j] : 0.0;
      dx_ref[row + j] = static_cast<float>(rs * (w * dout.host[row + j] - mean_wdy - xhat[j] * mean_wdy_xhat) + extra);
    }
  }
  const std::vector<float> dweight_ref(dweight_sum.begin(), dweight_sum.end());
  const std::vector<float> dbias_ref(dbias_sum.begin(), dbias_sum.end());
  const float tolerance = std::is_same_v<T, __nv_bfloat16> ? 2e-2f : 4e-3f;
  validate_result(out.device, out_ref, "out", n, tolerance, tolerance);
  if (c.residual) validate_result(residual_out.device, sum_ref, "residual_out", n, 0.0f, 0.0f);
  validate_result(mean.device, mean_ref, "mean", mean_ref.size(), 1e-4f, 1e-4f);
  validate_result(rstd.device, rstd_ref, "rstd", rstd_ref.size(), 1e-4f, 1e-4f);
  validate_result(dx.device, dx_ref, "dx", n, tolerance * std::fmax(1.0f, max_abs(dx_ref)), tolerance);
  validate_result(dweight.device, dweight_ref, "dweight", dweight_ref.size(),
                  tolerance * std::fmax(1.0f, max_abs(dweight_ref)), tolerance);
  validate_result(dbias.device, dbias_ref, "dbias", dbias_ref.size(), tolerance * std::fmax(1.0f, max_abs(dbias_ref)),
                  tolerance);
}

// Bytes moved per call / time, next to a device-to-device copy measured here.
void benchmark(int rows, int cols, float copy_gbps, std::mt19937& rng) {
  const size_t n = size_t(rows) * cols;
  Buffer<__nv_bfloat16> x(n), residual(n), residual_out(n), out(n), dout(n), dx(n), weight(cols), bias(cols);
  for (Buffer<__nv_bfloat16>* b : {&x, &residual, &dout, &weight, &bias}) b->randomize(rng);
  Buffer<float> mean(rows), rstd(rows);
  const int num_partials = fastgpt::cuda::layer_norm_backward_num_partials(rows);
  Buffer<float> dweight_partial(size_t(num_partials) * cols), dbias_partial(size_t(num_partials) * cols);
  Buffer<__nv_bfloat16> dweight(cols), dbias(cols);
  fastgpt::LayerNormParams p{};
  p.dtype = fastgpt::DType::kBFloat16;
  p.rows = rows;
  p.cols = cols;
  p.eps = 1e-5f;
  p.x = {x.device, cols, 1};
  p.residual = {residual.device, cols, 1};
  p.residual_out = {residual_out.device, cols, 1};
  p.weight = weight.device;
  p.bias = bias.device;
  p.out = {out.device, cols, 1};
  p.mean = mean.device;
  p.rstd = rstd.device;
  const float forward_ms = benchmark_ms(3, 20, [&] { cuda_check(fastgpt::cuda::layer_norm_forward(p, nullptr)); });
  fastgpt::LayerNormParams back = p;
  back.residual = {};
  back.residual_out = {};
  back.x = p.residual_out;
  back.dout = {dout.device, cols, 1};
  back.dx = {dx.device, cols, 1};
  back.dweight_partial = dweight_partial.device;
  back.dbias_partial = dbias_partial.device;
  back.num_partials = num_partials;
  const float backward_ms = benchmark_ms(3, 20, [&] {
    cuda_check(fastgpt::cuda::layer_norm_backward(back, nullptr));
    cuda_check(fastgpt::cuda::column_sums_pair(dweight_partial.device, dweight.device, dbias_partial.device,
                                                dbias.device, num_partials, cols, back.dtype, nullptr));
  });
  const double forward_bytes = 4.0 * n * 2;   // read x, residual; write x + residual, out
  const double backward_bytes = 3.0 * n * 2;  // read input, dout; write dx (the partial sums are extra)
  const double forward_gbps = forward_bytes / (forward_ms * 1e-3) / 1e9;
  const double backward_gbps = backward_bytes / (backward_ms * 1e-3) / 1e9;
  printf("layer_norm bf16 rows %5d cols %5d: forward %7.3f ms %6.0f GB/s (%3.0f%% of copy)  backward %7.3f ms %6.0f GB/s (%3.0f%%)\n",
         rows, cols, forward_ms, forward_gbps, 100.0 * forward_gbps / copy_gbps, backward_ms, backward_gbps,
         100.0 * backward_gbps / copy_gbps);
}

int main(int argc, char** argv) {
  print_device();
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_layer_norm<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_layer_norm<__half>(c, rng);
  if (!validate_only(argc, argv)) {
    const float copy_gbps = copy_bandwidth_gbps();
    printf("device-to-device copy: %.0f GB/s\n", copy_gbps);
    benchmark(16384, 768, copy_gbps, rng);
    benchmark(16384, 1600, copy_gbps, rng);
    benchmark(8192, 4096, copy_gbps, rng);
    benchmark(2048, 16384, copy_gbps, rng);
  }
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
