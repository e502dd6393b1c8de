/*
Causal attention forward (csrc/cuda/attention_fwd.cu): checks out and lse against a double-precision
CPU reference over ragged lengths, GQA, q_len < kv_len, padded head dims and packed-qkv strides, in
bfloat16 and float16, then times bfloat16 at head_dim 64 and 128 for seq 2k to 8k.

Compile and run (from csrc/dev; `make` builds every harness, ARCH="-arch=sm_90a" for one GPU):
  make attention_fwd && ./attention_fwd               (add --validate to skip the timing)
  compute-sanitizer --tool memcheck ./attention_fwd --validate
*/
#include <cstdio>

#include "attention_common.h"

struct Case {
  AttentionShape shape;
  bool packed;
};

// Every head-dim kernel (32, 64, 96, 128; 16 and 80 run zero-padded), lengths off the block sizes,
// a length of 1, GQA and MQA, q_len < kv_len, and strided views of a packed qkv tensor.
static const Case kCases[] = {
    {{2, 4, 2, 97, 97, 64}, false},   {{1, 3, 1, 17, 300, 128}, false}, {{2, 2, 2, 257, 257, 32}, false},
    {{1, 4, 4, 130, 200, 96}, false}, {{1, 2, 1, 1, 1, 16}, false},     {{1, 2, 2, 65, 129, 80}, false},
    {{2, 4, 4, 150, 150, 64}, true},  {{1, 2, 2, 200, 200, 128}, true}, {{1, 1, 1, 1, 64, 128}, false},
};

template <typename T>
void check_forward(const Case& c, std::mt19937& rng) {
  print_case<T>("", c.shape, c.packed);
  AttentionProblem<T> problem(c.shape, c.packed, rng);
  cuda_check(fastgpt::cuda::attention_forward(problem.params, nullptr));
  cuda_check(cudaDeviceSynchronize());
  validate_forward(problem);
}

void benchmark_forward(int seq_len, int head_dim, std::mt19937& rng) {
  // 16k tokens a call, model width 2048, so every configuration fills the GPU.
  const AttentionShape s{16384 / seq_len, 2048 / head_dim, 2048 / head_dim, seq_len, seq_len, head_dim};
  AttentionProblem<__nv_bfloat16> problem(s, false, rng);
  const float ms = benchmark_ms(3, 20, [&] { cuda_check(fastgpt::cuda::attention_forward(problem.params, nullptr)); });
  const double tflops = causal_forward_flops(s) / (ms * 1e-3) / 1e12;
  printf("forward bf16 batch %2d heads %2d seq %5d head_dim %3d: %8.3f ms  %6.1f TFLOP/s\n", s.batch, s.heads, seq_len,
         head_dim, ms, tflops);
}

int main(int argc, char** argv) {
  print_device();
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_forward<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_forward<__half>(c, rng);
  if (!validate_only(argc, argv)) {
    for (int head_dim : {64, 128}) {
      for (int seq_len : {2048, 4096, 8192}) benchmark_forward(seq_len, head_dim, rng);
    }
  }
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
