/*
The FFN on cuBLASLt epilogues (csrc/cuda/ffn_cublaslt.cpp, with the activation passes of
csrc/cuda/ffn_elementwise.cu and the column sums of csrc/cuda/column_sums.cu): checks the forward
(y, h) and the backward (dx, dWfc, dbfc, dWproj, dbproj) against a double-precision CPU reference for
every activation (gelu_tanh on cuBLASLt's GELU epilogues when hidden % 8 == 0, on the bias GEMM and
elementwise passes otherwise; gelu, relu, silu always on the latter), with and without biases and a
residual, at ragged sizes, in bfloat16 and float16, and says per case whether cuBLASLt offered the
fused epilogues tried (GELU_AUX(_BIAS), DGELU_BGRAD, BGRADB) or the fallback routes ran. Then times the
forward and the backward of a GPT-2 small and a GPT-2 XL FFN (8192 tokens, bfloat16, biases and
residual) per activation, in TFLOP/s (forward 2 GEMMs = 4 * tokens * C * hidden FLOPs, backward 4 GEMMs =
twice that). The mma.sync GEMMs of the same FFN are timed GEMM by GEMM by ./gemm.

Compile and run (from csrc/dev; needs cuBLASLt: CUBLASLT_INCLUDE/CUBLASLT_LIB default to what
fastgpt/_cublaslt_paths.py finds, e.g. the nvidia-cublas wheel):
  make ffn_cublaslt && ./ffn_cublaslt                  (add --validate to skip the timing)
*/
#include <cublasLt.h>

#include <cstdio>

#include "../cuda/ffn_cublaslt.h"
#include "../cuda/launch.h"
#include "activations_ref.h"
#include "common.h"

namespace lt = fastgpt::cuda::lt;

#define cublas_check(call)                                                                                  \
  do {                                                                                                      \
    const cublasStatus_t status_ = (call);                                                                  \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                                                 \
      fprintf(stderr, "cuBLASLt error at %s:%d: %s: %s\n", __FILE__, __LINE__, #call,                      \
              cublasLtGetStatusString(status_));                                                            \
      exit(1);                                                                                              \
    }                                                                                                       \
  } while (0)

static void lt_check(const lt::Status& status) {
  if (status.ok()) return;
  fprintf(stderr, "ffn_cublaslt: %s failed: %s\n", status.step,
          status.blas != CUBLAS_STATUS_SUCCESS ? cublasLtGetStatusString(status.blas) : cudaGetErrorString(status.cuda));
  exit(1);
}

// The handle, workspace and stream every call shares, as api_cuda.inc passes torch's.
struct Context {
  lt::Resources resources{};
  Context() {
    int device = 0, major = 0;
    cuda_check(cudaGetDevice(&device));
    cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cublas_check(cublasLtCreate(&resources.handle));
    resources.workspace_bytes = lt::recommended_workspace_bytes(major);
    cuda_check(cudaMalloc(&resources.workspace, resources.workspace_bytes));
    resources.stream = nullptr;
  }
  ~Context() {
    cudaFree(resources.workspace);
    cublasLtDestroy(resources.handle);
  }
};

// All tensors of one FFN call, on the device (NaN-poisoned outputs) and their host copies.
template <typename T>
struct Ffn {
  int tokens, channels, hidden, out_features;
  Buffer<T> x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dy;  // inputs
  Buffer<T> h, activated, y;                                            // forward
  Buffer<T> dh, dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias;     // backward

  Ffn(int tokens_, int channels_, int hidden_, int out_features_, std::mt19937& rng)
      : tokens(tokens_), channels(channels_), hidden(hidden_), out_features(out_features_),
        x(size_t(tokens_) * channels_), fc_weight(size_t(hidden_) * channels_), fc_bias(hidden_),
        proj_weight(size_t(out_features_) * hidden_), proj_bias(out_features_),
        residual(size_t(tokens_) * out_features_), dy(size_t(tokens_) * out_features_),
        h(size_t(tokens_) * hidden_), activated(size_t(tokens_) * hidden_), y(size_t(tokens_) * out_features_),
        dh(size_t(tokens_) * hidden_), dx(size_t(tokens_) * channels_), dfc_weight(size_t(hidden_) * channels_),
        dfc_bias(hidden_), dproj_weight(size_t(out_features_) * hidden_), dproj_bias(out_features_) {
    // Weights scaled by 1/sqrt(fan_in), like nn.Linear's initialisation, so every value stays O(1).
    x.randomize(rng);
    fc_weight.randomize(rng, 1.0f / std::sqrt(float(channels_)));
    fc_bias.randomize(rng, 0.5f);
    proj_weight.randomize(rng, 1.0f / std::sqrt(float(hidden_)));
    proj_bias.randomize(rng, 0.5f);
    residual.randomize(rng);
    dy.randomize(rng);
  }

  lt::FfnForwardParams forward_params(Activation activation, bool bias, bool with_residual) {
    lt::FfnForwardParams p{};
    p.dtype = dtype_of<T>();
    p.activation = activation;
    p.tokens = tokens, p.channels = channels, p.hidden = hidden, p.out_features = out_features;
    p.x = {x.device, channels, false};
    p.fc_weight = {fc_weight.device, channels, false};
    p.proj_weight = {proj_weight.device, hidden, false};
    p.fc_bias = bias ? fc_bias.device : nullptr;
    p.proj_bias = bias ? proj_bias.device : nullptr;
    p.residual = with_residual ? residual.device : nullptr;
    p.ld_residual = out_features;
    p.h = h.device, p.activated = activated.device, p.y = y.device;
    return p;
  }

  lt::FfnBackwardParams backward_params(Activation activation) {
    lt::FfnBackwardParams p{};
    p.dtype = dtype_of<T>();
    p.activation = activation;
    p.tokens = tokens, p.channels = channels, p.hidden = hidden, p.out_features = out_features;
    p.dy = dy.device;
    p.x = {x.device, channels, false};
    p.h = h.device;
    p.fc_weight = {fc_weight.device, channels, false};
    p.proj_weight = {proj_weight.device, hidden, false};
    p.activated = activated.device, p.dh = dh.device, p.dx = dx.device;
    p.dfc_weight = dfc_weight.device, p.dfc_bias = dfc_bias.device;
    p.dproj_weight = dproj_weight.device, p.dproj_bias = dproj_bias.device;
    return p;
  }
};

struct Case {
  int tokens, channels, hidden, out_features;
  Activation activation;
  bool bias, residual;
};

static const Case kCases[] = {
    {257, 136, 200, 136, Activation::kGeluTanh, true, true},    // GELU_AUX_BIAS / DGELU_BGRAD
    {257, 136, 200, 136, Activation::kGeluTanh, false, false},  // GELU_AUX / DGELU_BGRAD, no bias
    {97, 64, 100, 64, Activation::kGeluTanh, true, true},       // hidden % 8 != 0: bias GEMM + passes
    {130, 72, 96, 72, Activation::kGelu, true, true},
    {130, 72, 96, 72, Activation::kRelu, false, true},
    {129, 96, 72, 80, Activation::kSilu, true, false},           // C_out != C
    {17, 40, 24, 40, Activation::kSilu, false, false},
    {1, 8, 16, 8, Activation::kGeluTanh, true, true},            // one token
    {33, 30, 50, 30, Activation::kGelu, true, true},             // nothing a multiple of 8: element-wise passes
};

// Whether cuBLASLt offers the fused epilogues ffn_cublaslt.cpp tries at this case's shapes: where one
// says "no", ffn_cublaslt.cpp took its fallback route (silently) and the checks below cover that route.
// Each probe runs its GEMM once more into scratch outputs.
template <typename T>
void report_fused_epilogues(const Context& context, const Ffn<T>& f, const Case& c) {
  const int M = c.tokens, C = c.channels, H = c.hidden, O = c.out_features;
  Buffer<T> out(size_t(M) * H), aux(size_t(M) * H), bias(H), weight_grad(size_t(O) * H), bias_grad(O);
  auto offered = [&](const lt::Gemm& g) {
    const lt::Resources& r = context.resources;
    const cublasStatus_t s = lt::matmul(r.handle, g, r.workspace, r.workspace_bytes, r.stream);
    if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED) cublas_check(s);
    return s == CUBLAS_STATUS_SUCCESS ? "yes" : "no";
  };
  auto gemm = [&](int64_t m, int64_t n, int64_t k, lt::Operand a, lt::Operand b, void* result, lt::Epilogue e,
                  void* bias_ptr, void* aux_ptr) {
    lt::Gemm g{};
    g.dtype = dtype_of<T>();
    g.M = m, g.N = n, g.K = k;
    g.a = a, g.b = b;
    g.out = result, g.ld_out = n;
    g.epilogue = e, g.bias = bias_ptr;
    g.aux = aux_ptr, g.ld_aux = aux_ptr != nullptr ? H : 0;
    return g;
  };
  const lt::Gemm dproj = gemm(O, H, M, {f.dy.device, O, true}, {f.activated.device, H, false}, weight_grad.device,
                              lt::Epilogue::kBGradA, bias_grad.device, nullptr);
  if (c.activation != Activation::kGeluTanh || H % 8 != 0) {
    printf("  cuBLASLt offers BGRADB (dWproj): %s\n", offered(dproj));
    return;
  }
  const lt::Gemm fc = gemm(M, H, C, {f.x.device, C, false}, {f.fc_weight.device, C, true}, out.device,
                           c.bias ? lt::Epilogue::kGeluAuxBias : lt::Epilogue::kGeluAux,
                           c.bias ? f.fc_bias.device : nullptr, aux.device);
  const lt::Gemm dh = gemm(M, H, O, {f.dy.device, O, false}, {f.proj_weight.device, H, false}, out.device,
                           lt::Epilogue::kDGeluBGrad, bias.device, f.h.device);
  printf("  cuBLASLt offers %s (fc): %s, DGELU_BGRAD (dH): %s, BGRADB (dWproj): %s\n",
         c.bias ? "GELU_AUX_BIAS" : "GELU_AUX", offered(fc), offered(dh), offered(dproj));
}

template <typename T>
void check_ffn(const Context& context, const Case& c, std::mt19937& rng) {
  printf("%s tokens %d C %d hidden %d C_out %d %s%s%s\n", dtype_name<T>(), c.tokens, c.channels, c.hidden,
         c.out_features, activation_name(c.activation), c.bias ? " +bias" : "", c.residual ? " +residual" : "");
  Ffn<T> f(c.tokens, c.channels, c.hidden, c.out_features, rng);
  lt_check(lt::ffn_forward(f.forward_params(c.activation, c.bias, c.residual), context.resources));
  lt_check(lt::ffn_backward(f.backward_params(c.activation), context.resources));
  cuda_check(cudaDeviceSynchronize());

  const int M = c.tokens, C = c.channels, H = c.hidden, O = c.out_features;
  std::vector<double> h(size_t(M) * H), a(h.size()), dh(h.size());
  std::vector<float> h_ref(h.size()), y_ref(size_t(M) * O), dx_ref(size_t(M) * C), dfc_weight_ref(size_t(H) * C),
      dfc_bias_ref(H), dproj_weight_ref(size_t(O) * H), dproj_bias_ref(O);
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < H; ++j) {
      double v = c.bias ? f.fc_bias.host[j] : 0.0;
      for (int k = 0; k < C; ++k) v += double(f.x.host[size_t(m) * C + k]) * f.fc_weight.host[size_t(j) * C + k];
      h[size_t(m) * H + j] = v;
      h_ref[size_t(m) * H + j] = float(v);
      a[size_t(m) * H + j] = activation(c.activation, v);
    }
    for (int o = 0; o < O; ++o) {
      double v = c.bias ? f.proj_bias.host[o] : 0.0;
      if (c.residual) v += f.residual.host[size_t(m) * O + o];
      for (int j = 0; j < H; ++j) v += a[size_t(m) * H + j] * f.proj_weight.host[size_t(o) * H + j];
      y_ref[size_t(m) * O + o] = float(v);
    }
    for (int j = 0; j < H; ++j) {
      double v = 0.0;
      for (int o = 0; o < O; ++o) v += double(f.dy.host[size_t(m) * O + o]) * f.proj_weight.host[size_t(o) * H + j];
      dh[size_t(m) * H + j] = v * activation_derivative(c.activation, h[size_t(m) * H + j]);
    }
    for (int k = 0; k < C; ++k) {
      double v = 0.0;
      for (int j = 0; j < H; ++j) v += dh[size_t(m) * H + j] * f.fc_weight.host[size_t(j) * C + k];
      dx_ref[size_t(m) * C + k] = float(v);
    }
  }
  for (int j = 0; j < H; ++j) {
    double bias_sum = 0.0;
    for (int m = 0; m < M; ++m) bias_sum += dh[size_t(m) * H + j];
    dfc_bias_ref[j] = float(bias_sum);
    for (int k = 0; k < C; ++k) {
      double v = 0.0;
      for (int m = 0; m < M; ++m) v += dh[size_t(m) * H + j] * f.x.host[size_t(m) * C + k];
      dfc_weight_ref[size_t(j) * C + k] = float(v);
    }
  }
  for (int o = 0; o < O; ++o) {
    double bias_sum = 0.0;
    for (int m = 0; m < M; ++m) bias_sum += f.dy.host[size_t(m) * O + o];
    dproj_bias_ref[o] = float(bias_sum);
    for (int j = 0; j < H; ++j) {
      double v = 0.0;
      for (int m = 0; m < M; ++m) v += double(f.dy.host[size_t(m) * O + o]) * a[size_t(m) * H + j];
      dproj_weight_ref[size_t(o) * H + j] = float(v);
    }
  }

  // Relative to each output's largest value (16-bit storage of the GEMM results; the sums over tokens
  // grow with M).
  const float tolerance = std::is_same_v<T, __nv_bfloat16> ? 1.6e-2f : 4e-3f;
  auto check = [&](const Buffer<T>& device, const std::vector<float>& ref, const char* name) {
    validate_result(device.device, ref, name, ref.size(), tolerance * std::fmax(1.0f, max_abs(ref)), tolerance);
  };
  check(f.h, h_ref, "h");
  check(f.y, y_ref, "y");
  check(f.dx, dx_ref, "dx");
  check(f.dfc_weight, dfc_weight_ref, "dfc_weight");
  check(f.dfc_bias, dfc_bias_ref, "dfc_bias");
  check(f.dproj_weight, dproj_weight_ref, "dproj_weight");
  check(f.dproj_bias, dproj_bias_ref, "dproj_bias");
  report_fused_epilogues(context, f, c);
}

void benchmark(const Context& context, const char* model, int tokens, int channels, std::mt19937& rng) {
  const int hidden = 4 * channels;  // GPT-2's FFN width
  Ffn<__nv_bfloat16> f(tokens, channels, hidden, channels, rng);
  const double forward_flops = 4.0 * tokens * channels * hidden;
  for (Activation activation : {Activation::kGeluTanh, Activation::kGelu, Activation::kRelu, Activation::kSilu}) {
    const lt::FfnForwardParams fp = f.forward_params(activation, true, true);
    const lt::FfnBackwardParams bp = f.backward_params(activation);
    const float forward_ms = benchmark_ms(3, 20, [&] { lt_check(lt::ffn_forward(fp, context.resources)); });
    const float backward_ms = benchmark_ms(3, 20, [&] { lt_check(lt::ffn_backward(bp, context.resources)); });
    printf("%-12s %-9s tokens %5d C %5d hidden %5d: forward %7.3f ms %6.1f TFLOP/s, backward %7.3f ms %6.1f TFLOP/s\n",
           model, activation_name(activation), tokens, channels, hidden, forward_ms,
           forward_flops / (forward_ms * 1e-3) / 1e12, backward_ms, 2.0 * forward_flops / (backward_ms * 1e-3) / 1e12);
  }
}

int main(int argc, char** argv) {
  print_device();
  const Context context;
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_ffn<__nv_bfloat16>(context, c, rng);
  for (const Case& c : kCases) check_ffn<__half>(context, c, rng);
  if (!validate_only(argc, argv)) {
    benchmark(context, "gpt2", 8192, 768, rng);
    benchmark(context, "gpt2-xl", 8192, 1600, rng);
  }
  printf("cuBLASLt plans cached: %zu\n", lt::cached_plans());
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
