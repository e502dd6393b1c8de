/*
Causal attention on Hopper (csrc/cuda/attention_fwd_sm90.cu and attention_bwd_sm90.cu: TMA, wgmma, warp
specialisation).
Forward: checks out and lse against a double-precision CPU reference over ragged lengths, GQA and MQA,
q_len < kv_len, packed-qkv strides, a length of 1 and more tiles than SMs (every persistent CTA takes
several), in bfloat16 and float16 at head_dim 64 and 128.
Backward: over the same cases but the largest, runs the sm90 backward on the sm90 forward's out and lse
and checks dq, dk and dv against the CPU reference (the workspace starts as NaN, so whatever the prepare
pass fails to write shows).
Then times bfloat16 for seq 2k to 16k, forward and backward, beside the sm_80 kernels (attention_fwd.cu,
attention_bwd.cu) on the same inputs, as TFLOP/s (the backward counted as 2.5 forwards). Needs a compute
capability 9.0 GPU.

Compile and run (from csrc/dev; needs the CUTLASS headers: pip install nvidia-cutlass):
  make attention_sm90 && ./attention_sm90             (add --validate to skip the timing)
  compute-sanitizer --tool memcheck ./attention_sm90 --validate
*/
#include <cstdio>

#include "attention_common.h"

struct Case {
  AttentionShape shape;
  bool packed;
};

// Lengths off the 128-row/128-key tiles, one tile, a length of 1, GQA and MQA, q_len < kv_len (the
// bottom-right diagonal), packed qkv views, and 4 x 16 x 8 = 512 tiles (more than any GPU's SMs).
static const Case kCases[] = {
    {{2, 4, 2, 97, 97, 64}, false},      {{1, 3, 1, 17, 300, 128}, false},  {{2, 2, 2, 257, 257, 128}, false},
    {{1, 4, 4, 130, 200, 64}, false},    {{1, 2, 1, 1, 1, 64}, false},      {{1, 1, 1, 1, 64, 128}, false},
    {{2, 4, 4, 150, 150, 64}, true},     {{1, 2, 2, 200, 200, 128}, true},  {{1, 2, 2, 128, 128, 128}, false},
    {{4, 16, 4, 1000, 1000, 64}, false}, {{1, 4, 2, 300, 1100, 128}, false},
};

template <typename T>
void check_forward(const Case& c, std::mt19937& rng) {
  print_case<T>("", c.shape, c.packed);
  AttentionProblem<T> problem(c.shape, c.packed, rng);
  const char* reason = fastgpt::cuda::attention_forward_sm90_unsupported_reason(problem.params);
  if (reason != nullptr) {
    printf("  declined: %s\n", reason);
    ++g_failed_checks;
    return;
  }
  cuda_check(fastgpt::cuda::attention_forward_sm90(problem.params, nullptr));
  cuda_check(cudaDeviceSynchronize());
  validate_forward(problem);
}

// The sm90 backward's workspace (dQ accumulator, lse, delta), NaN until the prepare pass writes it.
struct Sm90Workspace {
  Buffer<float> buffer;
  explicit Sm90Workspace(const fastgpt::AttentionParams& p)
      : buffer(fastgpt::cuda::attention_backward_sm90_workspace_bytes(p) / sizeof(float)) {}
};

template <typename T>
void check_backward(const Case& c, std::mt19937& rng) {
  const AttentionShape& s = c.shape;
  // The double-precision CPU backward costs about three forwards: the 512-tile case (several seconds of
  // CPU reference per dtype) stays forward-only, so the harness fits gpu_check.sh's time limit.
  if (static_cast<double>(s.batch) * s.heads * s.q_len * s.kv_len > 1e7) return;
  print_case<T>("backward ", s, c.packed);
  AttentionProblem<T> problem(s, c.packed, rng);
  const char* reason = fastgpt::cuda::attention_backward_sm90_unsupported_reason(problem.params);
  if (reason != nullptr) {
    printf("  declined: %s\n", reason);
    ++g_failed_checks;
    return;
  }
  Sm90Workspace workspace(problem.params);
  cuda_check(fastgpt::cuda::attention_forward_sm90(problem.params, nullptr));
  cuda_check(fastgpt::cuda::attention_backward_sm90(problem.params, workspace.buffer.device, nullptr));
  cuda_check(cudaDeviceSynchronize());
  validate_backward(problem);
}

void benchmark_forward(int seq_len, int head_dim, std::mt19937& rng) {
  // 16k tokens a call, model width 2048, so every configuration fills the GPU.
  const AttentionShape s{16384 / seq_len, 2048 / head_dim, 2048 / head_dim, seq_len, seq_len, head_dim};
  AttentionProblem<__nv_bfloat16> problem(s, false, rng);
  const float sm90_ms =
      benchmark_ms(3, 20, [&] { cuda_check(fastgpt::cuda::attention_forward_sm90(problem.params, nullptr)); });
  const float sm80_ms =
      benchmark_ms(3, 20, [&] { cuda_check(fastgpt::cuda::attention_forward(problem.params, nullptr)); });
  const double flops = causal_forward_flops(s);
  printf("forward bf16 batch %2d heads %2d seq %5d head_dim %3d: sm90 %8.3f ms %6.1f TFLOP/s | sm80 %8.3f ms %6.1f "
         "TFLOP/s\n",
         s.batch, s.heads, seq_len, head_dim, sm90_ms, flops / (sm90_ms * 1e-3) / 1e12, sm80_ms,
         flops / (sm80_ms * 1e-3) / 1e12);
}

void benchmark_backward(int seq_len, int head_dim, std::mt19937& rng) {
  const AttentionShape s{16384 / seq_len, 2048 / head_dim, 2048 / head_dim, seq_len, seq_len, head_dim};
  AttentionProblem<__nv_bfloat16> problem(s, false, rng);
  Sm90Workspace workspace(problem.params);
  cuda_check(fastgpt::cuda::attention_forward(problem.params, nullptr));
  const float sm90_ms = benchmark_ms(3, 10, [&] {
    cuda_check(fastgpt::cuda::attention_backward_sm90(problem.params, workspace.buffer.device, nullptr));
  });
  const float sm80_ms =
      benchmark_ms(3, 10, [&] { cuda_check(fastgpt::cuda::attention_backward(problem.params, nullptr)); });
  const double flops = 2.5 * causal_forward_flops(s);
  printf("backward bf16 batch %2d heads %2d seq %5d head_dim %3d: sm90 %8.3f ms %6.1f TFLOP/s | sm80 %8.3f ms %6.1f "
         "TFLOP/s\n",
         s.batch, s.heads, seq_len, head_dim, sm90_ms, flops / (sm90_ms * 1e-3) / 1e12, sm80_ms,
         flops / (sm80_ms * 1e-3) / 1e12);
}

int main(int argc, char** argv) {
  print_device();
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_forward<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_forward<__half>(c, rng);
  for (const Case& c : kCases) check_backward<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_backward<__half>(c, rng);
  if (!validate_only(argc, argv)) {
    for (int head_dim : {64, 128}) {
      for (int seq_len : {2048, 4096, 8192, 16384}) benchmark_forward(seq_len, head_dim, rng);
    }
    for (int head_dim : {64, 128}) {
      for (int seq_len : {2048, 4096, 8192, 16384}) benchmark_backward(seq_len, head_dim, rng);
    }
  }
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
