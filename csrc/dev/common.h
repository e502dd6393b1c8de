// Helpers shared by the csrc/dev harnesses (karpathy/llm.c dev/cuda style): CUDA error checks, random
// inputs rounded to the kernel's dtype, validate_result against a CPU reference, cudaEvent timing.
// The harnesses call the production launchers of csrc/cuda/launch.h and link the csrc/cuda objects.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "../params.h"

#define cuda_check(call)                                                                              \
  do {                                                                                                \
    const cudaError_t error_ = (call);                                                                \
    if (error_ != cudaSuccess) {                                                                      \
      fprintf(stderr, "CUDA error at %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(error_)); \
      exit(1);                                                                                        \
    }                                                                                                 \
  } while (0)

template <typename T>
constexpr fastgpt::DType dtype_of() {
  return std::is_same_v<T, __nv_bfloat16> ? fastgpt::DType::kBFloat16 : fastgpt::DType::kFloat16;
}

template <typename T>
const char* dtype_name() {
  return std::is_same_v<T, __nv_bfloat16> ? "bfloat16" : "float16";
}

template <typename T>
float to_host_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return x;
  }
}

template <typename T>
T from_host_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// A device buffer of n elements of T and the host copy of its values as float (exactly what the
// device holds, so the CPU reference sees the same rounded inputs).
template <typename T>
struct Buffer {
  T* device = nullptr;
  std::vector<float> host;

  explicit Buffer(size_t n) : host(n, 0.0f) {
    cuda_check(cudaMalloc(&device, (n > 0 ? n : 1) * sizeof(T)));
    cuda_check(cudaMemset(device, 0xff, (n > 0 ? n : 1) * sizeof(T)));  // NaN for 16-bit and float32 alike
  }
  ~Buffer() { cudaFree(device); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  size_t size() const { return host.size(); }

  // Fills with normal(0, scale) values rounded to T and uploads them.
  void randomize(std::mt19937& rng, float scale = 1.0f) {
    std::normal_distribution<float> normal(0.0f, scale);
    std::vector<T> staged(host.size());
    for (size_t i = 0; i < host.size(); ++i) {
      if constexpr (std::is_same_v<T, float>) {
        staged[i] = normal(rng);
      } else {
        staged[i] = from_host_float<T>(normal(rng));
      }
      host[i] = to_host_float(staged[i]);
    }
    cuda_check(cudaMemcpy(device, staged.data(), staged.size() * sizeof(T), cudaMemcpyHostToDevice));
  }

  // Refills the device buffer with NaN, so that an element the kernel does not write shows up.
  void poison() { cuda_check(cudaMemset(device, 0xff, (host.empty() ? 1 : host.size()) * sizeof(T))); }

  std::vector<float> download() const {
    std::vector<T> staged(host.size());
    cuda_check(cudaMemcpy(staged.data(), device, staged.size() * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<float> values(host.size());
    for (size_t i = 0; i < values.size(); ++i) values[i] = to_host_float(staged[i]);
    return values;
  }
};

static int g_failed_checks = 0;

// Compares device values with the CPU reference: |device - ref| <= atol + rtol * |ref| for every
// element, NaN never allowed. Prints the first mismatches and the largest error; returns whether all passed.
template <typename T>
bool validate_result(const T* device_ptr, const std::vector<float>& cpu_ref, const char* name, size_t n, float atol,
                     float rtol) {
  std::vector<T> staged(n);
  cuda_check(cudaMemcpy(staged.data(), device_ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
  int mismatches = 0;
  double max_error = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const float value = to_host_float(staged[i]);
    const float ref = cpu_ref[i];
    const double error = std::fabs(static_cast<double>(value) - ref);
    const bool bad = !std::isfinite(value) || error > atol + rtol * std::fabs(ref);
    if (std::isfinite(error) && error > max_error) max_error = error;
    if (bad) {
      if (mismatches < 5) printf("  %s mismatch at %zu: cuda %.6f, cpu %.6f\n", name, i, value, ref);
      ++mismatches;
    }
  }
  printf("  %-28s %s  (%zu values, max |error| %.3e, tolerance %.1e + %.1e |ref|)\n", name,
         mismatches == 0 ? "OK  " : "FAIL", n, max_error, atol, rtol);
  if (mismatches != 0) ++g_failed_checks;
  return mismatches == 0;
}

inline float max_abs(const std::vector<float>& values) {
  float m = 0.0f;
  for (float v : values) m = std::fmax(m, std::fabs(v));
  return m;
}

// Mean milliseconds of `repeats` calls of f after `warmup` calls, timed with CUDA events.
template <typename F>
float benchmark_ms(int warmup, int repeats, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t start, stop;
  cuda_check(cudaEventCreate(&start));
  cuda_check(cudaEventCreate(&stop));
  cuda_check(cudaEventRecord(start));
  for (int i = 0; i < repeats; ++i) f();
  cuda_check(cudaEventRecord(stop));
  cuda_check(cudaEventSynchronize(stop));
  float ms = 0.0f;
  cuda_check(cudaEventElapsedTime(&ms, start, stop));
  cuda_check(cudaEventDestroy(start));
  cuda_check(cudaEventDestroy(stop));
  return ms / repeats;
}

// Device-to-device copy bandwidth of 1 GiB, read + write, in GB/s: the memory-bound kernels' yardstick.
inline float copy_bandwidth_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *src, *dst;
  cuda_check(cudaMalloc(&src, bytes));
  cuda_check(cudaMalloc(&dst, bytes));
  const float ms = benchmark_ms(2, 10, [&] { cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  cuda_check(cudaFree(src));
  cuda_check(cudaFree(dst));
  return static_cast<float>(2.0 * bytes / (ms * 1e-3) / 1e9);
}

// "--validate" skips the benchmarks (for compute-sanitizer runs).
inline bool validate_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--validate") == 0) return true;
  }
  return false;
}

inline void print_device() {
  int device = 0;
  cudaDeviceProp props;
  cuda_check(cudaGetDevice(&device));
  cuda_check(cudaGetDeviceProperties(&props, device));
  printf("device: %s (sm_%d%d, %d SMs)\n", props.name, props.major, props.minor, props.multiProcessorCount);
}
