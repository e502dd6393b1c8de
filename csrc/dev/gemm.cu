/*
Tensor-core GEMM with fused epilogues (csrc/cuda/gemm.cu) and the column sums of its bias-gradient
partials (csrc/cuda/column_sums.cu): checks out = epilogue(a @ b^T) against a double-precision CPU
reference for every operand layout (K-contiguous or transposed), ragged M/N/K, unaligned operands
(element-wise path), K = 0, and each epilogue (bias + activation writing h and act(h); bias +
residual; the backward's act'(h) product with act(h) recomputed and bias-gradient partials), in
bfloat16 and float16. Then times the six GEMMs of a GPT-2 small FFN step (8192 tokens) in bfloat16.

Compile and run (from csrc/dev; `make` builds every harness, ARCH="-arch=sm_90a" for one GPU):
  make gemm && ./gemm                                  (add --validate to skip the timing)
*/
#include <cstdio>

#include "../cuda/launch.h"
#include "activations_ref.h"
#include "common.h"

// A logical (rows, k) operand, stored K-contiguous or transposed (rows contiguous), optionally
// starting `misalign` elements into its allocation (16-byte misaligned: the element-wise path).
template <typename T>
struct Operand {
  int rows, k;
  bool transposed;
  int misalign;
  Buffer<T> buffer;
  fastgpt::Matrix matrix{};

  Operand(int rows_, int k_, bool transposed_, int misalign_, std::mt19937& rng)
      : rows(rows_), k(k_), transposed(transposed_), misalign(misalign_), buffer(size_t(rows_) * k_ + misalign_) {
    buffer.randomize(rng, 0.3f);
    T* data = buffer.device + misalign;
    matrix = transposed ? fastgpt::Matrix{data, 1, rows} : fastgpt::Matrix{data, k, 1};
  }
  double at(int r, int kk) const {
    return buffer.host[misalign + (transposed ? size_t(kk) * rows + r : size_t(r) * k + kk)];
  }
};

enum class Epilogue { kPlain, kActivation, kResidual, kBackward };

struct Case {
  int M, N, K;
  bool a_transposed, b_transposed;
  int a_misalign;
  Epilogue epilogue;
  Activation activation;
  bool bias;
};

static const Case kCases[] = {
    {257, 200, 136, false, false, 0, Epilogue::kActivation, Activation::kGeluTanh, true},  // FFN fc
    {130, 72, 64, false, false, 0, Epilogue::kActivation, Activation::kGelu, true},
    {130, 72, 64, false, false, 0, Epilogue::kActivation, Activation::kRelu, false},
    {130, 72, 64, false, false, 0, Epilogue::kActivation, Activation::kSilu, true},
    {257, 136, 200, false, false, 0, Epilogue::kResidual, Activation::kGeluTanh, true},    // FFN proj
    {257, 200, 136, false, true, 0, Epilogue::kBackward, Activation::kGeluTanh, false},    // dH = dY Wproj * act'
    {129, 96, 72, false, true, 0, Epilogue::kBackward, Activation::kSilu, false},
    {136, 200, 257, true, true, 0, Epilogue::kPlain, Activation::kGeluTanh, false},        // dW = dY^T act(h)
    {96, 136, 80, true, false, 0, Epilogue::kPlain, Activation::kGeluTanh, false},
    {100, 60, 100, false, false, 0, Epilogue::kPlain, Activation::kGeluTanh, true},        // K % 8 != 0
    {96, 64, 48, true, false, 1, Epilogue::kPlain, Activation::kGeluTanh, false},          // misaligned a
    {1, 8, 8, false, false, 0, Epilogue::kActivation, Activation::kGeluTanh, true},
    {5, 7, 0, false, false, 0, Epilogue::kResidual, Activation::kGeluTanh, true},          // K = 0
};

template <typename T>
void check_gemm(const Case& c, std::mt19937& rng) {
  printf("%s M %d N %d K %d a%s b%s%s epilogue %d %s%s\n", dtype_name<T>(), c.M, c.N, c.K, c.a_transposed ? "^T" : "",
         c.b_transposed ? "^T" : "", c.a_misalign ? " (misaligned a)" : "", static_cast<int>(c.epilogue),
         activation_name(c.activation), c.bias ? " +bias" : "");
  Operand<T> a(c.M, c.K, c.a_transposed, c.a_misalign, rng);
  Operand<T> b(c.N, c.K, c.b_transposed, 0, rng);
  Buffer<T> bias(c.N), out(size_t(c.M) * c.N), second(size_t(c.M) * c.N), input(size_t(c.M) * c.N);
  bias.randomize(rng);
  input.randomize(rng);  // the residual, or h in the backward
  const int partial_rows = (c.M + fastgpt::cuda::kGemmBlockM - 1) / fastgpt::cuda::kGemmBlockM;
  Buffer<float> partial(size_t(partial_rows) * c.N);
  Buffer<T> bias_grad(c.N);

  fastgpt::GemmParams p{};
  p.dtype = dtype_of<T>();
  p.M = c.M, p.N = c.N, p.K = c.K;
  p.activation = c.activation;
  p.a = a.matrix;
  p.b = b.matrix;
  p.bias = c.bias ? bias.device : nullptr;
  p.out = {out.device, c.N, 1};
  if (c.epilogue == Epilogue::kActivation || c.epilogue == Epilogue::kBackward) p.activation_out = {second.device, c.N, 1};
  if (c.epilogue == Epilogue::kResidual) p.residual = {input.device, c.N, 1};
  if (c.epilogue == Epilogue::kBackward) {
    p.activation_grad_input = {input.device, c.N, 1};
    p.bias_grad_partial = partial.device;
    p.bias_grad_block_m = fastgpt::cuda::kGemmBlockM;
  }
  cuda_check(fastgpt::cuda::gemm(p, nullptr));
  if (c.epilogue == Epilogue::kBackward) {
    cuda_check(fastgpt::cuda::column_sums(partial.device, partial_rows, c.N, p.dtype, bias_grad.device, nullptr));
  }
  cuda_check(cudaDeviceSynchronize());

  std::vector<float> out_ref(size_t(c.M) * c.N), second_ref(out_ref.size()), bias_grad_ref(c.N);
  std::vector<double> column_sums(c.N, 0.0);
  for (int m = 0; m < c.M; ++m) {
    for (int n = 0; n < c.N; ++n) {
      double v = c.bias ? bias.host[n] : 0.0;
      for (int k = 0; k < c.K; ++k) v += a.at(m, k) * b.at(n, k);
      const size_t i = size_t(m) * c.N + n;
      if (c.epilogue == Epilogue::kActivation) second_ref[i] = static_cast<float>(activation(c.activation, v));
      if (c.epilogue == Epilogue::kResidual) v += input.host[i];
      if (c.epilogue == Epilogue::kBackward) {
        second_ref[i] = static_cast<float>(activation(c.activation, input.host[i]));
        v *= activation_derivative(c.activation, input.host[i]);
      }
      out_ref[i] = static_cast<float>(v);
      column_sums[n] += v;
    }
  }
  const float tolerance = std::is_same_v<T, __nv_bfloat16> ? 1e-2f : 2e-3f;
  validate_result(out.device, out_ref, "out", out_ref.size(), tolerance * std::fmax(1.0f, max_abs(out_ref)), tolerance);
  if (c.epilogue == Epilogue::kActivation || c.epilogue == Epilogue::kBackward) {
    validate_result(second.device, second_ref, "activation_out", second_ref.size(), tolerance, tolerance);
  }
  if (c.epilogue == Epilogue::kBackward) {
    for (int n = 0; n < c.N; ++n) bias_grad_ref[n] = static_cast<float>(column_sums[n]);
    validate_result(bias_grad.device, bias_grad_ref, "bias grad (column sums)", bias_grad_ref.size(),
                    tolerance * max_abs(bias_grad_ref), tolerance);
  }
}

// One GEMM of the FFN step, timed: (M, N, K), operand layouts and epilogue.
void benchmark(const char* name, int M, int N, int K, bool a_transposed, bool b_transposed, Epilogue epilogue,
               std::mt19937& rng) {
  Operand<__nv_bfloat16> a(M, K, a_transposed, 0, rng), b(N, K, b_transposed, 0, rng);
  Buffer<__nv_bfloat16> bias(N), out(size_t(M) * N), second(size_t(M) * N), input(size_t(M) * N);
  bias.randomize(rng);
  input.randomize(rng);
  Buffer<float> partial(size_t((M + fastgpt::cuda::kGemmBlockM - 1) / fastgpt::cuda::kGemmBlockM) * N);
  fastgpt::GemmParams p{};
  p.dtype = fastgpt::DType::kBFloat16;
  p.M = M, p.N = N, p.K = K;
  p.activation = Activation::kGeluTanh;
  p.a = a.matrix;
  p.b = b.matrix;
  p.out = {out.device, N, 1};
  if (epilogue == Epilogue::kActivation) {
    p.bias = bias.device;
    p.activation_out = {second.device, N, 1};
  } else if (epilogue == Epilogue::kResidual) {
    p.bias = bias.device;
    p.residual = {input.device, N, 1};
  } else if (epilogue == Epilogue::kBackward) {
    p.activation_grad_input = {input.device, N, 1};
    p.activation_out = {second.device, N, 1};
    p.bias_grad_partial = partial.device;
    p.bias_grad_block_m = fastgpt::cuda::kGemmBlockM;
  }
  const float ms = benchmark_ms(3, 20, [&] { cuda_check(fastgpt::cuda::gemm(p, nullptr)); });
  printf("%-44s M %5d N %5d K %5d: %7.3f ms  %6.1f TFLOP/s\n", name, M, N, K, ms, 2.0 * M * N * K / (ms * 1e-3) / 1e12);
}

int main(int argc, char** argv) {
  print_device();
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_gemm<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_gemm<__half>(c, rng);
  if (!validate_only(argc, argv)) {
    const int tokens = 8192, channels = 768, hidden = 3072;  // GPT-2 small
    benchmark("fc: h, act(h) = x Wfc^T + b", tokens, hidden, channels, false, false, Epilogue::kActivation, rng);
    benchmark("proj: y = act(h) Wproj^T + b + residual", tokens, channels, hidden, false, false, Epilogue::kResidual, rng);
    benchmark("dH = (dY Wproj) * act'(h), act(h), db", tokens, hidden, channels, false, true, Epilogue::kBackward, rng);
    benchmark("dWproj = dY^T act(h)", channels, hidden, tokens, true, true, Epilogue::kPlain, rng);
    benchmark("dWfc = dH^T x", hidden, channels, tokens, true, true, Epilogue::kPlain, rng);
    benchmark("dx = dH Wfc", tokens, channels, hidden, false, true, Epilogue::kPlain, rng);
  }
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
