// Run-time choice of the instruction set the CPU kernels use.
//
// Every kernel source (attention.cpp, ...) is compiled once per instruction set through
// foreach_isa.h, into the namespaces fastgpt::cpu::avx512, fastgpt::cpu::avx2 (x86-64 only) and
// fastgpt::cpu::baseline, so the build needs no -march flag. The public entry points of kernels.h
// dispatch with FASTGPT_ISA_DISPATCH to the best set the CPU and OS support, or to a lower one chosen
// with FASTGPT_CPU_ISA=baseline|avx2|avx512 or set_active_isa() (the C++ tests run every set).
#pragma once

#include <cstdlib>
#include <cstring>

namespace fastgpt::cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The best instruction set this CPU and OS support (__builtin_cpu_supports checks that the OS saves
// the vector registers too).
inline Isa supported_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

constexpr Isa kAllIsas[] = {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512};

// The set FASTGPT_CPU_ISA names, or nullptr when it is unset or names none.
inline const Isa* isa_in_environment() {
  const char* requested = std::getenv("FASTGPT_CPU_ISA");
  if (requested == nullptr) return nullptr;
  for (const Isa& named : kAllIsas) {
    if (std::strcmp(requested, isa_name(named)) == 0) return &named;
  }
  return nullptr;
}

// FASTGPT_CPU_ISA's value when it names no instruction set (a typo), else nullptr. The kernels never
// throw on it (they may first ask for the set inside an OpenMP region): the extension's import
// refuses such a value instead, before any kernel runs (api.cpp's PyInit__C).
inline const char* unknown_isa_setting() {
  const char* requested = std::getenv("FASTGPT_CPU_ISA");
  return requested != nullptr && isa_in_environment() == nullptr ? requested : nullptr;
}

// The set FASTGPT_CPU_ISA names if this CPU supports it, else the best supported one.
inline Isa isa_from_environment() {
  const Isa isa = supported_isa();
  const Isa* requested = isa_in_environment();
  return requested != nullptr && static_cast<int>(*requested) <= static_cast<int>(isa) ? *requested : isa;
}

inline Isa& active_isa_storage() {
  static Isa isa = isa_from_environment();
  return isa;
}

inline Isa active_isa() { return active_isa_storage(); }

// Selects `isa` if this CPU supports it; returns whether it did.
inline bool set_active_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(supported_isa())) return false;
  active_isa_storage() = isa;
  return true;
}

}  // namespace fastgpt::cpu

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGPT_HAS_X86_ISAS 1
#define FASTGPT_ISA_DISPATCH(function, ...)                                         \
  switch (::fastgpt::cpu::active_isa()) {                                          \
    case ::fastgpt::cpu::Isa::kAvx512: return avx512::function(__VA_ARGS__);         \
    case ::fastgpt::cpu::Isa::kAvx2: return avx2::function(__VA_ARGS__);             \
    default: return baseline::function(__VA_ARGS__);                                \
  }
#else
#define FASTGPT_HAS_X86_ISAS 0
#define FASTGPT_ISA_DISPATCH(function, ...) return baseline::function(__VA_ARGS__);
#endif
