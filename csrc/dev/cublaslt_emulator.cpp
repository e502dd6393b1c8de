/*
The FFN's cuBLASLt host code (csrc/cuda/ffn_cublaslt.cpp) run on the CPU against an emulated cuBLASLt:
this file defines the cuBLASLt entry points that ffn_cublaslt.cpp calls, with the semantics that
cublasLt.h documents, on host memory, and checks what ffn_forward, ffn_backward and the float32
accumulation (the linear cross-entropy's weight gradient) compute against a double-precision
reference. What it proves: the row-major -> column-major mapping (operand swap, transposes, leading
dimensions), the epilogue wiring (bias, GELU aux and its leading dimension, DGELU_BGRAD, BGRADB, the
residual as C with beta = 1, C and D in place), the attribute sizes, the fallback routes where the
heuristic declines an epilogue, and that a cached plan is only reused with pointers aligned as well as
the ones the heuristic was asked with. What it cannot: cuBLASLt's kernels themselves, and which
configurations the real heuristic takes (csrc/dev/ffn_cublaslt.cu and tests/test_cuda_backend.py, on a
GPU).

The emulated library follows cublasLt.h (CUDA 13):
  D (m x n) = epilogue(alpha * op(A) op(B) + beta * C), column-major, element (r, c) at r + c * ld;
  BIAS: + bias[r] (length: rows of D) before the activation; GELU_AUX(_BIAS): aux = the GELU input,
  leading dimension EPILOGUE_AUX_LD (a multiple of 8, >= rows of D); DGELU_BGRAD: D = P * gelu'(aux),
  bias[r] = sum over c of D; BGRADB: bias[c] = sum over k of op(B) (length: columns of D). The GELU is
  the tanh form. The device launchers ffn_cublaslt.cpp also calls (activation passes, 16-bit column
  sums) run here as host loops; their kernels are checked by the GPU harnesses.

Run: tests/test_cuda_compile.py::test_cublaslt_mapping_on_an_emulated_cublaslt builds it with the
host compiler (no GPU, no libcublasLt, no CUDA runtime) and runs it twice: as is, and with
`--decline-fused` (the heuristic declines GELU_AUX*, DGELU_BGRAD and BGRADB, so every fallback runs).
*/
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../cuda/ffn_cublaslt.h"
#include "activations_ref.h"

namespace lt = fastgpt::cuda::lt;
using fastgpt::DType;
using fastgpt::Matrix;

namespace {

int g_failed_checks = 0;
bool g_decline_fused = false;  // --decline-fused: the heuristic offers nothing for the fused epilogues

// ---- 16-bit storage -----------------------------------------------------------------------------

double load(cudaDataType_t type, const void* data, int64_t index) {
  switch (type) {
    case CUDA_R_16BF:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[index]);
    case CUDA_R_16F:
      return __half2float(static_cast<const __half*>(data)[index]);
    default:
      return static_cast<const float*>(data)[index];
  }
}

void store(cudaDataType_t type, void* data, int64_t index, double value) {
  switch (type) {
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(data)[index] = __float2bfloat16(static_cast<float>(value));
      return;
    case CUDA_R_16F:
      static_cast<__half*>(data)[index] = __float2half(static_cast<float>(value));
      return;
    default:
      static_cast<float*>(data)[index] = static_cast<float>(value);
  }
}

cudaDataType_t lt_type(DType dtype) { return dtype == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F; }

int64_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  int64_t bytes = 1;
  while (bytes < 256 && address % (bytes * 2) == 0) bytes *= 2;
  return bytes;
}

// ---- The emulated descriptors (cuBLASLt's opaque storage, filled our way) -------------------------

struct Layout {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
};
static_assert(sizeof(Layout) <= sizeof(cublasLtMatrixLayoutOpaque_t));

struct Desc {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  int32_t trans_a, trans_b;
  uint32_t epilogue;
  const void* bias;
  const void* aux;
  int64_t aux_ld;
};
static_assert(sizeof(Desc) <= sizeof(cublasLtMatmulDescOpaque_t));

struct Preference {
  uint64_t max_workspace;
  uint32_t min_alignment[4];  // A, B, C, D
};
static_assert(sizeof(Preference) <= sizeof(cublasLtMatmulPreferenceOpaque_t));

// What the "kernel" picked by the heuristic requires: the alignments it was chosen for.
struct Algo {
  uint32_t min_alignment[4];
  int64_t bias_alignment, aux_alignment;
  uint64_t workspace;
};
static_assert(sizeof(Algo) <= sizeof(cublasLtMatmulAlgo_t));

template <typename T, typename Opaque>
T* as(Opaque* opaque) {
  return reinterpret_cast<T*>(opaque);
}

bool uses_aux(uint32_t e) {
  return e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || e == CUBLASLT_EPILOGUE_DGELU_BGRAD;
}

bool uses_bias(uint32_t e) {
  return e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || e == CUBLASLT_EPILOGUE_DGELU_BGRAD ||
         e == CUBLASLT_EPILOGUE_BGRADA || e == CUBLASLT_EPILOGUE_BGRADB;
}

bool fused(uint32_t e) { return uses_aux(e) || e == CUBLASLT_EPILOGUE_BGRADA || e == CUBLASLT_EPILOGUE_BGRADB; }

// op(X) (rows x cols) element (r, c) of a stored column-major X.
double op_element(const Layout& layout, const void* data, int32_t trans, uint64_t r, uint64_t c) {
  return trans == CUBLAS_OP_N ? load(layout.type, data, static_cast<int64_t>(r) + static_cast<int64_t>(c) * layout.ld)
                              : load(layout.type, data, static_cast<int64_t>(c) + static_cast<int64_t>(r) * layout.ld);
}

// The documented shape rules; INVALID_VALUE where ffn_cublaslt.cpp would have broken one.
cublasStatus_t check_problem(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl) {
  const uint64_t m = dl.rows, n = dl.cols;
  const bool a_n = d.trans_a == CUBLAS_OP_N, b_n = d.trans_b == CUBLAS_OP_N;
  const uint64_t a_rows = a_n ? a.rows : a.cols, a_cols = a_n ? a.cols : a.rows;
  const uint64_t b_rows = b_n ? b.rows : b.cols, b_cols = b_n ? b.cols : b.rows;
  if (d.compute != CUBLAS_COMPUTE_32F || d.scale != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
  if (a_rows != m || b_cols != n || a_cols != b_rows) return CUBLAS_STATUS_INVALID_VALUE;
  if (c.rows != m || c.cols != n || c.type != dl.type) return CUBLAS_STATUS_INVALID_VALUE;
  for (const Layout* l : {&a, &b, &c, &dl}) {
    if (l->ld < static_cast<int64_t>(l->rows)) return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (a.type != b.type || (a.type != CUDA_R_16BF && a.type != CUDA_R_16F)) return CUBLAS_STATUS_INVALID_VALUE;
  if (dl.type != a.type && !(dl.type == CUDA_R_32F && d.epilogue == CUBLASLT_EPILOGUE_DEFAULT)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (uses_bias(d.epilogue) && d.bias == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (uses_aux(d.epilogue) && (d.aux == nullptr || d.aux_ld % 8 != 0 || d.aux_ld < static_cast<int64_t>(m))) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  return CUBLAS_STATUS_SUCCESS;
}

double gelu_tanh_derivative(double x) { return activation_derivative(Activation::kGeluTanh, x); }

}  // namespace

// ---- The emulated cuBLASLt and CUDA runtime entry points ----------------------------------------

extern "C" {

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t layout, size_t size,
                                                              cudaDataType type, uint64_t rows, uint64_t cols,
                                                              int64_t ld) {
  if (size != sizeof(cublasLtMatrixLayoutOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
  *as<Layout>(layout) = Layout{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t desc, size_t size,
                                                            cublasComputeType_t compute, cudaDataType_t scale) {
  if (size != sizeof(cublasLtMatmulDescOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
  *as<Desc>(desc) = Desc{compute, scale, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT, nullptr, nullptr, 0};
  return CUBLAS_STATUS_SUCCESS;
}

// Each attribute with the size and type cublasLt.h gives it.
cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                           cublasLtMatmulDescAttributes_t attr, const void* buf,
                                                           size_t size) {
  Desc& d = *as<Desc>(desc);
  auto take = [&](void* field, size_t expected) {
    if (buf == nullptr || size != expected) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(field, buf, size);
    return CUBLAS_STATUS_SUCCESS;
  };
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
      return take(&d.trans_a, sizeof(int32_t));
    case CUBLASLT_MATMUL_DESC_TRANSB:
      return take(&d.trans_b, sizeof(int32_t));
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      return take(&d.epilogue, sizeof(uint32_t));
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      return take(&d.bias, sizeof(void*));
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
      return take(&d.aux, sizeof(void*));
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
      return take(&d.aux_ld, sizeof(int64_t));
    default:
      return CUBLAS_STATUS_INVALID_VALUE;  // ffn_cublaslt.cpp sets no other attribute
  }
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t pref, size_t size) {
  if (size != sizeof(cublasLtMatmulPreferenceOpaque_t)) return CUBLAS_STATUS_ALLOC_FAILED;
  *as<Preference>(pref) = Preference{0, {256, 256, 256, 256}};  // the documented defaults
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                 cublasLtMatmulPreferenceAttributes_t attr,
                                                                 const void* buf, size_t size) {
  Preference& p = *as<Preference>(pref);
  if (buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == sizeof(uint64_t)) {
    std::memcpy(&p.max_workspace, buf, size);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES &&
      size == sizeof(uint32_t)) {
    std::memcpy(&p.min_alignment[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size);
    return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc,
                                                           cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                           cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                           cublasLtMatmulPreference_t pref, int requested,
                                                           cublasLtMatmulHeuristicResult_t results[],
                                                           int* returned) {
  const Desc& dd = *as<Desc>(desc);
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  const cublasStatus_t s = check_problem(dd, *as<Layout>(a), *as<Layout>(b), *as<Layout>(c), *as<Layout>(d));
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  *returned = 0;
  if (g_decline_fused && fused(dd.epilogue)) return CUBLAS_STATUS_NOT_SUPPORTED;
  const Preference& p = *as<Preference>(pref);
  Algo algo{};
  std::memcpy(algo.min_alignment, p.min_alignment, sizeof(algo.min_alignment));
  algo.bias_alignment = uses_bias(dd.epilogue) ? alignment_of(dd.bias) : 1;
  algo.aux_alignment = uses_aux(dd.epilogue) ? alignment_of(dd.aux) : 1;
  algo.workspace = p.max_workspace;
  results[0] = cublasLtMatmulHeuristicResult_t{};
  std::memcpy(&results[0].algo, &algo, sizeof(algo));
  results[0].state = CUBLAS_STATUS_SUCCESS;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha_ptr,
                                           const void* A, cublasLtMatrixLayout_t a_desc, const void* B,
                                           cublasLtMatrixLayout_t b_desc, const void* beta_ptr, const void* C,
                                           cublasLtMatrixLayout_t c_desc, void* D, cublasLtMatrixLayout_t d_desc,
                                           const cublasLtMatmulAlgo_t* algo_in, void* workspace, size_t workspace_bytes,
                                           cudaStream_t) {
  const Desc& d = *as<Desc>(desc);
  const Layout &a = *as<Layout>(a_desc), &b = *as<Layout>(b_desc), &c = *as<Layout>(c_desc), &dl = *as<Layout>(d_desc);
  const cublasStatus_t s = check_problem(d, a, b, c, dl);
  if (s != CUBLAS_STATUS_SUCCESS || algo_in == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  Algo algo;
  std::memcpy(&algo, algo_in, sizeof(algo));
  // The chosen kernel relies on the alignments it was chosen for (a reused plan must not be handed
  // worse-aligned pointers), and on the workspace it was promised.
  const void* pointers[4] = {A, B, C, D};
  for (int i = 0; i < 4; ++i) {
    if (alignment_of(pointers[i]) < algo.min_alignment[i]) return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (uses_bias(d.epilogue) && alignment_of(d.bias) < algo.bias_alignment) return CUBLAS_STATUS_INVALID_VALUE;
  if (uses_aux(d.epilogue) && alignment_of(d.aux) < algo.aux_alignment) return CUBLAS_STATUS_INVALID_VALUE;
  if (workspace_bytes < algo.workspace || (algo.workspace > 0 && workspace == nullptr)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  // In place (C == D) needs C's layout to be D's.
  if (C == D && (c.ld != dl.ld || c.type != dl.type)) return CUBLAS_STATUS_INVALID_VALUE;

  const float alpha = *static_cast<const float*>(alpha_ptr), beta = *static_cast<const float*>(beta_ptr);
  const uint64_t m = dl.rows, n = dl.cols, k = d.trans_a == CUBLAS_OP_N ? a.cols : a.rows;
  const cudaDataType_t type = dl.type;
  std::vector<double> result(m * n), bias_grad(m, 0.0);
  for (uint64_t j = 0; j < n; ++j) {
    for (uint64_t i = 0; i < m; ++i) {
      double acc = 0.0;
      for (uint64_t p = 0; p < k; ++p) acc += op_element(a, A, d.trans_a, i, p) * op_element(b, B, d.trans_b, p, j);
      double value = alpha * acc;
      if (beta != 0.0f) value += beta * load(c.type, C, static_cast<int64_t>(i + j * c.ld));
      const int64_t aux_index = static_cast<int64_t>(i + j * d.aux_ld);
      switch (d.epilogue) {
        case CUBLASLT_EPILOGUE_BIAS:
          value += load(type, d.bias, static_cast<int64_t>(i));
          break;
        case CUBLASLT_EPILOGUE_GELU_AUX_BIAS:
          value += load(type, d.bias, static_cast<int64_t>(i));
          [[fallthrough]];
        case CUBLASLT_EPILOGUE_GELU_AUX:
          store(type, const_cast<void*>(d.aux), aux_index, value);
          value = activation(Activation::kGeluTanh, value);
          break;
        case CUBLASLT_EPILOGUE_DGELU_BGRAD:
          value *= gelu_tanh_derivative(load(type, d.aux, aux_index));
          bias_grad[i] += value;
          break;
        default:
          break;
      }
      result[i + j * m] = value;
    }
  }
  for (uint64_t j = 0; j < n; ++j) {
    for (uint64_t i = 0; i < m; ++i) store(type, D, static_cast<int64_t>(i + j * dl.ld), result[i + j * m]);
  }
  void* bias_out = const_cast<void*>(d.bias);
  if (d.epilogue == CUBLASLT_EPILOGUE_DGELU_BGRAD) {
    for (uint64_t i = 0; i < m; ++i) store(type, bias_out, static_cast<int64_t>(i), bias_grad[i]);
  } else if (d.epilogue == CUBLASLT_EPILOGUE_BGRADA) {  // rows of D, over k of op(A)
    for (uint64_t i = 0; i < m; ++i) {
      double sum = 0.0;
      for (uint64_t p = 0; p < k; ++p) sum += op_element(a, A, d.trans_a, i, p);
      store(type, bias_out, static_cast<int64_t>(i), sum);
    }
  } else if (d.epilogue == CUBLASLT_EPILOGUE_BGRADB) {  // columns of D, over k of op(B)
    for (uint64_t j = 0; j < n; ++j) {
      double sum = 0.0;
      for (uint64_t p = 0; p < k; ++p) sum += op_element(b, B, d.trans_b, p, j);
      store(type, bias_out, static_cast<int64_t>(j), sum);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"

// ---- The device launchers ffn_cublaslt.cpp calls, as host loops --------------------------------

namespace fastgpt::cuda {

cudaError_t activation_forward(DType dtype, Activation act, int64_t rows, int64_t cols, const Matrix& h,
                               const Matrix& out, cudaStream_t) {
  const cudaDataType_t type = lt_type(dtype);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      store(type, out.data, r * out.row_stride + c, activation(act, load(type, h.data, r * h.row_stride + c)));
    }
  }
  return cudaSuccess;
}

cudaError_t activation_backward(DType dtype, Activation act, int64_t rows, int64_t cols, const Matrix& grad,
                                const Matrix& h, const Matrix& act_out, cudaStream_t) {
  const cudaDataType_t type = lt_type(dtype);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const double x = load(type, h.data, r * h.row_stride + c);
      const int64_t g = r * grad.row_stride + c;
      store(type, grad.data, g, load(type, grad.data, g) * activation_derivative(act, x));
      if (act_out.data != nullptr) store(type, act_out.data, r * act_out.row_stride + c, activation(act, x));
    }
  }
  return cudaSuccess;
}

cudaError_t column_sums_16bit(const void* matrix, int64_t rows, int cols, int64_t ld, DType dtype, void* out,
                              cudaStream_t) {
  const cudaDataType_t type = lt_type(dtype);
  for (int c = 0; c < cols; ++c) {
    double sum = 0.0;
    for (int64_t r = 0; r < rows; ++r) sum += load(type, matrix, r * ld + c);
    store(type, out, c, sum);
  }
  return cudaSuccess;
}

}  // namespace fastgpt::cuda

// ---- The checks ---------------------------------------------------------------------------------

namespace {

// A row-major (rows, cols) matrix in 16-bit storage, 256-byte aligned plus `offset_bytes` (to give a
// pointer a weaker alignment), with row stride ld >= cols; `host` holds its values as doubles.
struct Tensor {
  cudaDataType_t type;
  int64_t rows, cols, ld;
  std::vector<unsigned char> storage;
  void* data;

  Tensor(cudaDataType_t type_, int64_t rows_, int64_t cols_, int64_t ld_ = 0, int offset_bytes = 0)
      : type(type_), rows(rows_), cols(cols_), ld(ld_ > 0 ? ld_ : cols_) {
    const size_t element = type == CUDA_R_32F ? 4 : 2;
    storage.assign(static_cast<size_t>(rows * ld) * element + 512 + static_cast<size_t>(offset_bytes), 0);
    const auto base = reinterpret_cast<uintptr_t>(storage.data());
    data = reinterpret_cast<void*>((base + 255) / 256 * 256 + static_cast<uintptr_t>(offset_bytes));
    for (int64_t i = 0; i < rows * ld; ++i) store(type, data, i, NAN);  // what is never written shows up
  }
  double at(int64_t r, int64_t c) const { return load(type, data, r * ld + c); }
  void randomize(std::mt19937& rng, double scale) {
    std::normal_distribution<double> normal(0.0, scale);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) store(type, data, r * ld + c, normal(rng));
    }
  }
};

// value(r, c) as the GEMMs read an operand given as `t` (transposed: the tensor holds its transpose).
struct View {
  const Tensor* t;
  bool transposed;
  double operator()(int64_t r, int64_t c) const { return transposed ? t->at(c, r) : t->at(r, c); }
  lt::Operand operand() const { return lt::Operand{t->data, t->ld, transposed}; }
};

void check(const char* name, const Tensor& actual, const std::vector<double>& expected, int64_t cols,
           double tolerance) {
  double max_ref = 1.0, max_error = 0.0;
  for (double v : expected) max_ref = std::fmax(max_ref, std::fabs(v));
  bool finite = true;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double v = actual.at(static_cast<int64_t>(i) / cols, static_cast<int64_t>(i) % cols);
    finite = finite && std::isfinite(v);
    max_error = std::fmax(max_error, std::fabs(v - expected[i]));
  }
  const bool ok = finite && max_error <= tolerance * max_ref;
  if (!ok) ++g_failed_checks;
  printf("  %-14s %s (max |error| %.3e, tolerance %.1e x %.2f)\n", name, ok ? "ok" : "FAILED", max_error, tolerance,
         max_ref);
}

void check_status(const lt::Status& status) {
  if (status.ok()) return;
  ++g_failed_checks;
  printf("  %s failed: cublas %d, cuda %d\n", status.step, static_cast<int>(status.blas),
         static_cast<int>(status.cuda));
}

struct Case {
  int tokens, channels, hidden, out_features;
  Activation activation;
  bool bias, residual;
  bool transposed_weights;  // W given as W^T tensors' transposed views
  bool strided;             // x and the residual with padded rows, x at a 2-byte aligned address
  bool transposed_x;        // x given as a transposed view of a (C, tokens) tensor
};

const Case kCases[] = {
    {19, 24, 32, 24, Activation::kGeluTanh, true, true, false, false, false},   // GELU_AUX_BIAS / DGELU_BGRAD
    {19, 24, 32, 24, Activation::kGeluTanh, false, false, true, false, false},  // GELU_AUX, W^T views
    {13, 16, 20, 16, Activation::kGeluTanh, true, true, false, true, false},    // hidden % 8 != 0, strided
    {11, 16, 24, 12, Activation::kGelu, true, false, true, false, true},        // x^T view, C_out != C
    {9, 8, 16, 8, Activation::kRelu, false, true, false, true, false},
    {1, 8, 16, 8, Activation::kSilu, true, true, false, false, false},          // one token
};

void check_ffn(const Case& c, DType dtype, std::mt19937& rng) {
  const cudaDataType_t type = lt_type(dtype);
  printf("%s tokens %d C %d hidden %d C_out %d %s%s%s%s%s%s\n", type == CUDA_R_16BF ? "bf16" : "fp16", c.tokens,
         c.channels, c.hidden, c.out_features, activation_name(c.activation), c.bias ? " +bias" : "",
         c.residual ? " +residual" : "", c.transposed_weights ? " W^T-views" : "", c.strided ? " strided" : "",
         c.transposed_x ? " x^T-view" : "");
  const int M = c.tokens, C = c.channels, H = c.hidden, O = c.out_features;
  const int pad = c.strided ? 3 : 0;
  Tensor x = c.transposed_x ? Tensor(type, C, M) : Tensor(type, M, C, C + pad, c.strided ? 2 : 0);
  Tensor fc_w = c.transposed_weights ? Tensor(type, C, H) : Tensor(type, H, C);
  Tensor proj_w = c.transposed_weights ? Tensor(type, H, O) : Tensor(type, O, H);
  Tensor fc_b(type, 1, H), proj_b(type, 1, O), residual(type, M, O, O + pad), dy(type, M, O);
  x.randomize(rng, 1.0);
  fc_w.randomize(rng, 1.0 / std::sqrt(double(C)));
  proj_w.randomize(rng, 1.0 / std::sqrt(double(H)));
  fc_b.randomize(rng, 0.5);
  proj_b.randomize(rng, 0.5);
  residual.randomize(rng, 1.0);
  dy.randomize(rng, 1.0);
  const View xv{&x, c.transposed_x}, fc{&fc_w, c.transposed_weights}, proj{&proj_w, c.transposed_weights};
  Tensor h(type, M, H), activated(type, M, H), y(type, M, O);
  Tensor dh(type, M, H), dx(type, M, C), dfc_w(type, H, C), dfc_b(type, 1, H), dproj_w(type, O, H), dproj_b(type, 1, O);
  std::vector<unsigned char> workspace_storage((size_t(1) << 16) + 256);
  void* workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace_storage.data()) + 255) / 256 * 256);
  const lt::Resources resources{reinterpret_cast<cublasLtHandle_t>(&workspace_storage), workspace, size_t(1) << 16,
                                nullptr};

  lt::FfnForwardParams fp{};
  fp.dtype = dtype;
  fp.activation = c.activation;
  fp.tokens = M, fp.channels = C, fp.hidden = H, fp.out_features = O;
  fp.x = xv.operand(), fp.fc_weight = fc.operand(), fp.proj_weight = proj.operand();
  fp.fc_bias = c.bias ? fc_b.data : nullptr;
  fp.proj_bias = c.bias ? proj_b.data : nullptr;
  fp.residual = c.residual ? residual.data : nullptr;
  fp.ld_residual = residual.ld;
  fp.h = h.data, fp.activated = activated.data, fp.y = y.data;
  if (c.strided) {
    // First the same call with x 256-byte aligned: its plans must not serve the 2-byte aligned x.
    Tensor x_aligned(type, M, C, C + pad);
    x_aligned.randomize(rng, 1.0);
    fp.x = lt::Operand{x_aligned.data, x_aligned.ld, false};
    check_status(lt::ffn_forward(fp, resources));
    fp.x = xv.operand();
  }
  check_status(lt::ffn_forward(fp, resources));
  const size_t plans = lt::cached_plans();
  check_status(lt::ffn_forward(fp, resources));  // the same call again: every plan found in the cache
  if (lt::cached_plans() != plans) {
    ++g_failed_checks;
    printf("  a repeated call added %zu plans\n", lt::cached_plans() - plans);
  }

  lt::FfnBackwardParams bp{};
  bp.dtype = dtype;
  bp.activation = c.activation;
  bp.tokens = M, bp.channels = C, bp.hidden = H, bp.out_features = O;
  bp.dy = dy.data;
  bp.x = fp.x, bp.h = h.data, bp.fc_weight = fp.fc_weight, bp.proj_weight = fp.proj_weight;
  bp.activated = activated.data, bp.dh = dh.data, bp.dx = dx.data;
  bp.dfc_weight = dfc_w.data, bp.dfc_bias = dfc_b.data, bp.dproj_weight = dproj_w.data, bp.dproj_bias = dproj_b.data;
  check_status(lt::ffn_backward(bp, resources));

  // fc_weight is (H, C) as the op sees it, proj_weight (O, H).
  std::vector<double> h_ref(size_t(M) * H), a_ref(h_ref.size()), dh_ref(h_ref.size()), y_ref(size_t(M) * O);
  std::vector<double> dx_ref(size_t(M) * C, 0.0), dfc_w_ref(size_t(H) * C, 0.0), dfc_b_ref(H, 0.0);
  std::vector<double> dproj_w_ref(size_t(O) * H, 0.0), dproj_b_ref(O, 0.0);
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < H; ++j) {
      double v = c.bias ? fc_b.at(0, j) : 0.0;
      for (int k = 0; k < C; ++k) v += xv(m, k) * fc(j, k);
      h_ref[size_t(m) * H + j] = v;
      a_ref[size_t(m) * H + j] = activation(c.activation, v);
    }
    for (int o = 0; o < O; ++o) {
      double v = (c.bias ? proj_b.at(0, o) : 0.0) + (c.residual ? residual.at(m, o) : 0.0);
      for (int j = 0; j < H; ++j) v += a_ref[size_t(m) * H + j] * proj(o, j);
      y_ref[size_t(m) * O + o] = v;
    }
    for (int j = 0; j < H; ++j) {
      double v = 0.0;
      for (int o = 0; o < O; ++o) v += dy.at(m, o) * proj(o, j);
      dh_ref[size_t(m) * H + j] = v * activation_derivative(c.activation, h_ref[size_t(m) * H + j]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < H; ++j) {
      const double g = dh_ref[size_t(m) * H + j];
      dfc_b_ref[j] += g;
      for (int k = 0; k < C; ++k) {
        dx_ref[size_t(m) * C + k] += g * fc(j, k);
        dfc_w_ref[size_t(j) * C + k] += g * xv(m, k);
      }
    }
    for (int o = 0; o < O; ++o) {
      dproj_b_ref[o] += dy.at(m, o);
      for (int j = 0; j < H; ++j) dproj_w_ref[size_t(o) * H + j] += dy.at(m, o) * a_ref[size_t(m) * H + j];
    }
  }
  // 16-bit storage of h, act(h) and dH between the steps, as on the GPU.
  const double tolerance = type == CUDA_R_16BF ? 2e-2 : 4e-3;
  check("h", h, h_ref, H, tolerance);
  check("y", y, y_ref, O, tolerance);
  check("dx", dx, dx_ref, C, tolerance);
  check("dfc_weight", dfc_w, dfc_w_ref, C, tolerance);
  check("dfc_bias", dfc_b, dfc_b_ref, H, tolerance);
  check("dproj_weight", dproj_w, dproj_w_ref, H, tolerance);
  check("dproj_bias", dproj_b, dproj_b_ref, O, tolerance);
}

// The linear cross-entropy's use (api_cuda.inc): dW (V, N) float32 += dlogits^T (V, rows) @ x (rows, N)
// over two chunks, the logits rows padded to 64 values, the second chunk adding to dW in place (C = D,
// beta = 1), and the second chunk's x at a weaker alignment than the first's.
void check_float32_accumulation(DType dtype, std::mt19937& rng) {
  const cudaDataType_t type = lt_type(dtype);
  const int vocab = 37, padded = 64, columns = 24, rows[2] = {16, 5};
  printf("%s float32 accumulation: V %d (row stride %d) N %d, chunks of %d and %d rows\n",
         type == CUDA_R_16BF ? "bf16" : "fp16", vocab, padded, columns, rows[0], rows[1]);
  Tensor dw(CUDA_R_32F, vocab, columns);
  std::vector<double> expected(size_t(vocab) * columns, 0.0);
  std::vector<unsigned char> workspace_storage((size_t(1) << 16) + 256);
  void* workspace = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace_storage.data()) + 255) / 256 * 256);
  for (int chunk = 0; chunk < 2; ++chunk) {
    Tensor logits(type, rows[chunk], padded), x(type, rows[chunk], columns, 0, chunk == 0 ? 0 : 2);
    logits.randomize(rng, 1.0);
    x.randomize(rng, 1.0);
    lt::Gemm g{};
    g.dtype = dtype;
    g.M = vocab, g.N = columns, g.K = rows[chunk];
    g.a = lt::Operand{logits.data, padded, true};
    g.b = lt::Operand{x.data, columns, false};
    g.out = dw.data, g.ld_out = columns;
    g.residual = chunk == 0 ? nullptr : dw.data;
    g.ld_residual = columns;
    g.epilogue = lt::Epilogue::kNone;
    g.float32_out = true;
    const cublasStatus_t status = lt::matmul(reinterpret_cast<cublasLtHandle_t>(&workspace_storage), g, workspace,
                                             size_t(1) << 16, nullptr);
    check_status(lt::Status{status == CUBLAS_STATUS_SUCCESS ? nullptr : "float32 accumulation GEMM", status});
    for (int v = 0; v < vocab; ++v) {
      for (int n = 0; n < columns; ++n) {
        for (int r = 0; r < rows[chunk]; ++r) expected[size_t(v) * columns + n] += logits.at(r, v) * x.at(r, n);
      }
    }
  }
  check("dW (float32)", dw, expected, columns, 1e-5);
}

}  // namespace

int main(int argc, char** argv) {
  g_decline_fused = argc > 1 && std::string(argv[1]) == "--decline-fused";
  printf("emulated cuBLASLt%s\n", g_decline_fused ? ", declining GELU_AUX*, DGELU_BGRAD and BGRADB" : "");
  std::mt19937 rng(0);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    for (const Case& c : kCases) check_ffn(c, dtype, rng);
    check_float32_accumulation(dtype, rng);
  }
  printf("cuBLASLt plans cached: %zu\n", lt::cached_plans());
  printf(g_failed_checks == 0 ? "all emulated cuBLASLt checks passed\n" : "%d check(s) FAILED\n", g_failed_checks);
  return g_failed_checks == 0 ? 0 : 1;
}
