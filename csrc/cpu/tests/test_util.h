// Shared helpers of the C++ kernel tests: random inputs, bfloat16 storage, float64 comparison, and a
// loop over every instruction set this CPU supports. Each test binary returns non-zero on failure.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace fastgpt::test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_value(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

// A tensor stored as float32 or bfloat16 in a buffer whose layout the test chooses; values() holds
// the stored values as float64 (after rounding to bfloat16), indexed by the same offsets.
class Storage {
 public:
  Storage(DType dtype, int64_t size) : dtype_(dtype), values_(size, std::nan("")) {
    if (dtype == DType::kBFloat16) {
      bf16_.assign(size, bf16_bits(std::nanf("")));
    } else {
      f32_.assign(size, std::nanf(""));
    }
  }

  void* data() { return dtype_ == DType::kBFloat16 ? static_cast<void*>(bf16_.data()) : f32_.data(); }
  int64_t size() const { return static_cast<int64_t>(values_.size()); }

  void set(int64_t i, double x) {
    if (dtype_ == DType::kBFloat16) {
      bf16_[i] = bf16_bits(static_cast<float>(x));
      values_[i] = bf16_value(bf16_[i]);
    } else {
      f32_[i] = static_cast<float>(x);
      values_[i] = f32_[i];
    }
  }
  double get(int64_t i) const { return dtype_ == DType::kBFloat16 ? bf16_value(bf16_[i]) : f32_[i]; }
  double value(int64_t i) const { return values_[i]; }

  void fill_uniform(std::mt19937& rng, double low, double high) {
    std::uniform_real_distribution<double> dist(low, high);
    for (int64_t i = 0; i < size(); ++i) set(i, dist(rng));
  }

 private:
  DType dtype_;
  std::vector<double> values_;
  std::vector<float> f32_;
  std::vector<uint16_t> bf16_;
};

// Relative tolerance of a result stored in dtype and accumulated in float32.
inline double tolerance(DType dtype) { return dtype == DType::kBFloat16 ? 1.6e-2 : 2e-5; }

// Checks |actual - expected| <= tol * max(max |expected|, floor) elementwise; reports the first
// mismatch. floor is the magnitude of the terms that cancel in a result that may be ~0.
inline void expect_close(const std::string& name, const std::vector<double>& actual, const std::vector<double>& expected,
                         double tol, double floor = 1e-3) {
  double scale = floor;
  for (double e : expected) scale = std::fmax(scale, std::fabs(e));
  for (size_t i = 0; i < expected.size(); ++i) {
    double error = std::fabs(actual[i] - expected[i]);
    if (!(error <= tol * scale)) {
      std::printf("FAIL %s: element %zu is %.8g, expected %.8g (tolerance %.3g)\n", name.c_str(), i, actual[i],
                  expected[i], tol * scale);
      ++failures();
      return;
    }
  }
}

inline void expect(bool condition, const std::string& what) {
  if (!condition) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures();
  }
}

inline const char* dtype_name(DType dtype) { return dtype == DType::kBFloat16 ? "bf16" : "fp32"; }

// Runs body() once per instruction set this CPU supports, with that set active.
template <typename Body>
void for_each_isa(Body body) {
  for (cpu::Isa isa : {cpu::Isa::kBaseline, cpu::Isa::kAvx2, cpu::Isa::kAvx512}) {
    if (!cpu::set_active_isa(isa)) continue;
    body(isa);
  }
  cpu::set_active_isa(cpu::supported_isa());
}

inline int report(const char* test) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", test);
    return 0;
  }
  std::printf("%s: %d failure(s)\n", test, failures());
  return 1;
}

}  // namespace fastgpt::test
