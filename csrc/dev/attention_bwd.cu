/*
Causal attention backward (csrc/cuda/attention_bwd.cu): runs the forward kernel, then the backward,
checks dq, dk and dv against a double-precision CPU reference (ragged lengths, GQA, q_len < kv_len,
padded head dims, packed-qkv strides; bfloat16 and float16) and that a second backward gives the same
bits (no atomics), then times the bfloat16 backward at head_dim 64 and 128 for seq 2k to 8k.

Compile and run (from csrc/dev; `make` builds every harness, ARCH="-arch=sm_90a" for one GPU):
  make attention_bwd && ./attention_bwd               (add --validate to skip the timing)
  compute-sanitizer --tool racecheck ./attention_bwd --validate
*/
#include <cstdio>
#include <cstring>

#include "attention_common.h"

struct Case {
  AttentionShape shape;
  bool packed;
};

static const Case kCases[] = {
    {{2, 4, 2, 97, 97, 64}, false},   {{1, 3, 1, 17, 300, 128}, false}, {{2, 2, 2, 257, 257, 32}, false},
    {{1, 4, 4, 130, 200, 96}, false}, {{1, 2, 1, 1, 1, 16}, false},     {{1, 2, 2, 65, 129, 80}, false},
    {{2, 4, 4, 150, 150, 64}, true},  {{1, 2, 2, 200, 200, 128}, true}, {{1, 4, 1, 70, 70, 128}, false},
};

template <typename T>
void check_backward(const Case& c, std::mt19937& rng) {
  print_case<T>("", c.shape, c.packed);
  AttentionProblem<T> problem(c.shape, c.packed, rng);
  cuda_check(fastgpt::cuda::attention_forward(problem.params, nullptr));
  cuda_check(fastgpt::cuda::attention_backward(problem.params, nullptr));
  cuda_check(cudaDeviceSynchronize());
  validate_backward(problem);

  const std::vector<float> first_dq = problem.dq.download(), first_dk = problem.dk.download(),
                           first_dv = problem.dv.download();
  problem.dq.poison();
  problem.dk.poison();
  problem.dv.poison();
  cuda_check(fastgpt::cuda::attention_backward(problem.params, nullptr));
  cuda_check(cudaDeviceSynchronize());
  const bool same = problem.dq.download() == first_dq && problem.dk.download() == first_dk &&
                    problem.dv.download() == first_dv;
  printf("  %-28s %s\n", "deterministic (rerun)", same ? "OK" : "FAIL");
  if (!same) ++g_failed_checks;
}

void benchmark_backward(int seq_len, int head_dim, std::mt19937& rng) {
  const AttentionShape s{16384 / seq_len, 2048 / head_dim, 2048 / head_dim, seq_len, seq_len, head_dim};
  AttentionProblem<__nv_bfloat16> problem(s, false, rng);
  cuda_check(fastgpt::cuda::attention_forward(problem.params, nullptr));
  const float ms = benchmark_ms(3, 10, [&] { cuda_check(fastgpt::cuda::attention_backward(problem.params, nullptr)); });
  const double tflops = 2.5 * causal_forward_flops(s) / (ms * 1e-3) / 1e12;
  printf("backward bf16 batch %2d heads %2d seq %5d head_dim %3d: %8.3f ms  %6.1f TFLOP/s\n", s.batch, s.heads,
         seq_len, head_dim, ms, tflops);
}

int main(int argc, char** argv) {
  print_device();
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_backward<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_backward<__half>(c, rng);
  if (!validate_only(argc, argv)) {
    for (int head_dim : {64, 128}) {
      for (int seq_len : {2048, 4096, 8192}) benchmark_backward(seq_len, head_dim, rng);
    }
  }
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
