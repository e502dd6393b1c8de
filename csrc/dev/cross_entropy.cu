/*
The linear cross-entropy's row pass on the cuda backend (csrc/cuda/cross_entropy.cu): checks the per-row
loss and dlogits = (softmax - onehot(target)) * row_grad, written over the logits, against a
double-precision CPU reference: rows staged in shared memory and rows too wide for it (streamed),
vocabularies not a multiple of 8 (GPT-2's 50257), ignored targets, per-row upstream gradients, in
bfloat16 and float16. Then times the pass on a
chunk of GPT-2's padded logits (4096 x 50304, what api_cuda.inc runs for 8192 tokens) as GB/s, next to
the device-to-device copy bandwidth measured in the same run.

Compile and run (from csrc/dev; `make` builds every harness, ARCH="-arch=sm_90a" for one GPU):
  make cross_entropy && ./cross_entropy              (add --validate to skip the timing)
*/
#include <cmath>
#include <cstdio>

#include "../cuda/launch.h"
#include "common.h"

constexpr int64_t kIgnore = -100;
constexpr int kRowAlignment = 64;  // api_cuda.inc's padding of the logits rows

struct Case {
  int rows, vocab;
  bool row_grad;
};

static const Case kCases[] = {
    {37, 1001, false},   // a vocabulary not a multiple of 8
    {64, 50257, true},   // GPT-2's vocabulary, per-row upstream gradients
    {5, 8, true},        // one vector a row
    {9, 120000, false},  // 240 KB rows: wider than shared memory, streamed
    {1, 50304, false},   // one row
};

int64_t padded(int vocab) { return (vocab + kRowAlignment - 1) / kRowAlignment * kRowAlignment; }

template <typename T>
void check_rows(const Case& c, std::mt19937& rng) {
  printf("%s rows %d vocab %d%s\n", dtype_name<T>(), c.rows, c.vocab, c.row_grad ? " +row_grad" : "");
  const int64_t ld = padded(c.vocab);
  Buffer<T> logits(size_t(c.rows) * ld);
  logits.randomize(rng, 3.0f);
  Buffer<float> loss(c.rows), row_grad(c.rows);
  row_grad.randomize(rng);
  std::vector<int64_t> targets(c.rows);
  std::uniform_int_distribution<int> pick(0, c.vocab - 1);
  for (int r = 0; r < c.rows; ++r) targets[r] = r % 4 == 3 ? kIgnore : pick(rng);
  int64_t* targets_device = nullptr;
  cuda_check(cudaMalloc(&targets_device, targets.size() * sizeof(int64_t)));
  cuda_check(cudaMemcpy(targets_device, targets.data(), targets.size() * sizeof(int64_t), cudaMemcpyHostToDevice));

  fastgpt::CrossEntropyRowsParams p{};
  p.dtype = dtype_of<T>();
  p.rows = c.rows;
  p.vocab = c.vocab;
  p.logits = {logits.device, ld, 1};
  p.targets = targets_device;
  p.ignore_index = kIgnore;
  p.loss = loss.device;
  p.row_grad = c.row_grad ? row_grad.device : nullptr;
  p.with_grad = true;
  cuda_check(fastgpt::cuda::cross_entropy_rows(p, nullptr));
  cuda_check(cudaDeviceSynchronize());

  // The reference, whole padded rows: dlogits, zeros up to the next multiple of 8 (the kernel's last
  // vector), and the untouched logits beyond.
  std::vector<float> loss_ref(c.rows), grad_ref(logits.host);
  const int vector_end = (c.vocab + 7) / 8 * 8;
  for (int r = 0; r < c.rows; ++r) {
    const float* row = &logits.host[size_t(r) * ld];
    double max = -INFINITY, sum = 0.0;
    for (int v = 0; v < c.vocab; ++v) max = std::fmax(max, row[v]);
    for (int v = 0; v < c.vocab; ++v) sum += std::exp(row[v] - max);
    const double lse = max + std::log(sum);
    const bool kept = targets[r] != kIgnore;
    loss_ref[r] = kept ? static_cast<float>(lse - row[targets[r]]) : 0.0f;
    const double scale = c.row_grad ? row_grad.host[r] : 1.0;
    for (int v = 0; v < c.vocab; ++v) {
      const double grad = kept ? (std::exp(row[v] - lse) - (v == targets[r] ? 1.0 : 0.0)) * scale : 0.0;
      grad_ref[size_t(r) * ld + v] = static_cast<float>(grad);
    }
    for (int v = c.vocab; v < vector_end; ++v) grad_ref[size_t(r) * ld + v] = 0.0f;
  }
  const float tolerance = std::is_same_v<T, __nv_bfloat16> ? 1e-2f : 2e-3f;
  validate_result(loss.device, loss_ref, "loss", loss_ref.size(), 1e-4f, 1e-4f);
  validate_result(logits.device, grad_ref, "dlogits", grad_ref.size(), 1e-6f, tolerance);
  cuda_check(cudaFree(targets_device));
}

// Bytes moved per call (each logits row read once and written once) / time, next to a copy.
void benchmark(int rows, int vocab, float copy_gbps, std::mt19937& rng) {
  const int64_t ld = padded(vocab);
  Buffer<__nv_bfloat16> logits(size_t(rows) * ld);
  logits.randomize(rng, 3.0f);
  Buffer<float> loss(rows);
  std::vector<int64_t> targets(rows);
  for (int r = 0; r < rows; ++r) targets[r] = (r * 7919) % vocab;
  int64_t* targets_device = nullptr;
  cuda_check(cudaMalloc(&targets_device, targets.size() * sizeof(int64_t)));
  cuda_check(cudaMemcpy(targets_device, targets.data(), targets.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  fastgpt::CrossEntropyRowsParams p{};
  p.dtype = fastgpt::DType::kBFloat16;
  p.rows = rows;
  p.vocab = vocab;
  p.logits = {logits.device, ld, 1};
  p.targets = targets_device;
  p.ignore_index = kIgnore;
  p.loss = loss.device;
  p.with_grad = true;
  // The pass overwrites its input with dlogits, which are valid logits again: repeating it is fine.
  const float ms = benchmark_ms(3, 20, [&] { cuda_check(fastgpt::cuda::cross_entropy_rows(p, nullptr)); });
  const double bytes = 2.0 * rows * vocab * 2;  // read and write every logit
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  printf("cross_entropy_rows bf16 rows %5d vocab %6d: %7.3f ms %6.0f GB/s (%3.0f%% of copy)\n", rows, vocab, ms, gbps,
         100.0 * gbps / copy_gbps);
  cuda_check(cudaFree(targets_device));
}

int main(int argc, char** argv) {
  print_device();
  std::mt19937 rng(0);
  for (const Case& c : kCases) check_rows<__nv_bfloat16>(c, rng);
  for (const Case& c : kCases) check_rows<__half>(c, rng);
  if (!validate_only(argc, argv)) {
    const float copy_gbps = copy_bandwidth_gbps();
    printf("device-to-device copy: %.0f GB/s\n", copy_gbps);
    benchmark(4096, 50304, copy_gbps, rng);
    benchmark(4096, 50257, copy_gbps, rng);
    benchmark(512, 128256, copy_gbps, rng);
  }
  printf(g_failed_checks == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
