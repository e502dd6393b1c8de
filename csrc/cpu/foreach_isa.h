// Compiles the kernel source named by FASTGPT_ISA_SOURCE once per instruction set (see isa.h).
//
// Usage, in a kernel source file:
//   #ifndef FASTGPT_ISA_PASS
//   ...includes...
//   #define FASTGPT_ISA_SOURCE "cpu/attention.cpp"
//   #include "cpu/foreach_isa.h"
//   ...dispatching entry points...
//   #else
//   ...kernels: included once per instruction set, inside namespace fastgpt::cpu::<isa>...
//   #endif
//
// Each pass defines FASTGPT_ISA (the namespace name) and FASTGPT_SIMD_WIDTH (floats per vector
// register) and compiles the code for that instruction set with `#pragma GCC target` (or clang's
// equivalent). Headers the kernels need must be included before this file: the pragmas must not reach
// standard library code, whose inline functions are shared by every pass.
#ifndef FASTGPT_ISA_SOURCE
#error "define FASTGPT_ISA_SOURCE before including foreach_isa.h"
#endif

#define FASTGPT_ISA_PASS 1

#if FASTGPT_HAS_X86_ISAS
// AVX-512 (x86-64-v4): 16 floats per register, 32 registers.
#define FASTGPT_ISA avx512
#define FASTGPT_SIMD_WIDTH 16
#define FASTGPT_SIMD_REGISTERS 32
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#endif
#include FASTGPT_ISA_SOURCE
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef FASTGPT_ISA
#undef FASTGPT_SIMD_WIDTH
#undef FASTGPT_SIMD_REGISTERS

// AVX2 + FMA (x86-64-v3): 8 floats per register, 16 registers.
#define FASTGPT_ISA avx2
#define FASTGPT_SIMD_WIDTH 8
#define FASTGPT_SIMD_REGISTERS 16
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include FASTGPT_ISA_SOURCE
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef FASTGPT_ISA
#undef FASTGPT_SIMD_WIDTH
#undef FASTGPT_SIMD_REGISTERS
#endif  // FASTGPT_HAS_X86_ISAS

// The compiler's default target (SSE2 on x86-64, NEON on arm64): 4 floats per register, 16 registers.
#define FASTGPT_ISA baseline
#define FASTGPT_SIMD_WIDTH 4
#define FASTGPT_SIMD_REGISTERS 16
#include FASTGPT_ISA_SOURCE
#undef FASTGPT_ISA
#undef FASTGPT_SIMD_WIDTH
#undef FASTGPT_SIMD_REGISTERS

#undef FASTGPT_ISA_PASS
#undef FASTGPT_ISA_SOURCE
