// cuBLASLt GEMMs with fused epilogues for the FFN (see ffn_cublaslt.h). Host code, no torch.
//
// Layout mapping. torch's tensors are row-major; cuBLASLt's matrices are column-major. A row-major
// (R, C) matrix with row stride ld is, byte for byte, the column-major (C, R) matrix with leading
// dimension ld: its transpose. So the row-major product
//     out (M, N) = A (M, K) @ B (K, N)
// is computed as the column-major product of the transposes
//     D (N, M) = B^T (N, K) @ A^T (K, M),     D = out, read column-major with ld = ld_out,
// i.e. cuBLASLt's operand "A" is our B and its operand "B" is our A, with m = N, n = M, k = K:
//   our B stored (K, N) (not transposed)  -> column-major (N, K) = B^T: op N, layout (N, K)
//   our B stored (N, K) (transposed)      -> column-major (K, N) = B:   op T, layout (K, N)
//   our A stored (M, K) (not transposed)  -> column-major (K, M) = A^T: op N, layout (K, M)
//   our A stored (K, M) (transposed)      -> column-major (M, K) = A:   op T, layout (M, K)
//   out, residual (C) and aux (M, N)       -> column-major (N, M)
// The epilogues follow: a bias over our columns n is a bias over cuBLASLt's rows (CUBLASLT_EPILOGUE_BIAS,
// "bias length = rows of D"); DGELU_BGRAD's bias gradient is over those rows too, summed over our m;
// and the sum over k of our A (length M) is the sum over k of cuBLASLt's B: CUBLASLT_EPILOGUE_BGRADB.
#include "ffn_cublaslt.h"

#include <array>
#include <map>
#include <memory>
#include <mutex>

namespace fastgpt::cuda::lt {
namespace {

cudaDataType_t data_type(DType dtype) { return dtype == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F; }

cublasLtEpilogue_t lt_epilogue(Epilogue epilogue) {
  switch (epilogue) {
    case Epilogue::kBias:
      return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::kGeluAux:
      return CUBLASLT_EPILOGUE_GELU_AUX;
    case Epilogue::kGeluAuxBias:
      return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case Epilogue::kDGeluBGrad:
      return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case Epilogue::kBGradA:
      return CUBLASLT_EPILOGUE_BGRADB;
    case Epilogue::kNone:
    default:
      return CUBLASLT_EPILOGUE_DEFAULT;
  }
}

bool uses_bias(Epilogue e) {
  return e == Epilogue::kBias || e == Epilogue::kGeluAuxBias || e == Epilogue::kDGeluBGrad || e == Epilogue::kBGradA;
}

bool uses_aux(Epilogue e) {
  return e == Epilogue::kGeluAux || e == Epilogue::kGeluAuxBias || e == Epilogue::kDGeluBGrad;
}

// The largest power of two up to 256 bytes dividing the address (256: the alignment cuBLASLt's
// heuristic assumes by default, and the most any of its kernels asks for). 0 for a null pointer.
int64_t alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address == 0) return 0;
  int64_t bytes = 1;
  while (bytes < 256 && address % (bytes * 2) == 0) bytes *= 2;
  return bytes;
}

// Everything the heuristic's answer depends on. The pointers' values matter only through alignment.
using Key = std::array<int64_t, 23>;

struct Plan {
  cublasLtMatrixLayoutOpaque_t a, b, c, d;  // cuBLASLt's A (our B), B (our A), C (residual or out), D (out)
  cublasLtMatmulAlgo_t algo;
  bool found = false;
};

std::mutex cache_mutex;
std::map<Key, std::unique_ptr<Plan>> cache;  // node-based: a Plan never moves once inserted

cublasStatus_t init_layouts(const Gemm& g, Plan& plan) {
  const cudaDataType_t type = data_type(g.dtype);
  const cudaDataType_t out_type = g.float32_out ? CUDA_R_32F : type;
  // cuBLASLt's A: our B. Column-major (rows, cols) = the stored row-major (cols, rows).
  const uint64_t a_rows = g.b.transposed ? g.K : g.N, a_cols = g.b.transposed ? g.N : g.K;
  const uint64_t b_rows = g.a.transposed ? g.M : g.K, b_cols = g.a.transposed ? g.K : g.M;
  cublasStatus_t s = cublasLtMatrixLayoutInit(&plan.a, type, a_rows, a_cols, g.b.ld);
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutInit(&plan.b, type, b_rows, b_cols, g.a.ld);
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatrixLayoutInit(&plan.c, out_type, g.N, g.M, g.residual != nullptr ? g.ld_residual : g.ld_out);
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutInit(&plan.d, out_type, g.N, g.M, g.ld_out);
  return s;
}

bool valid(const Gemm& g) {
  const int64_t a_cols = g.a.transposed ? g.M : g.K, b_cols = g.b.transposed ? g.K : g.N;
  if (g.M <= 0 || g.N <= 0 || g.K <= 0) return false;  // cuBLASLt rejects empty layouts
  if (g.dtype != DType::kBFloat16 && g.dtype != DType::kFloat16) return false;
  if (g.a.data == nullptr || g.b.data == nullptr || g.out == nullptr) return false;
  if (g.a.ld < a_cols || g.b.ld < b_cols || g.ld_out < g.N) return false;
  if (g.residual != nullptr && g.ld_residual < g.N) return false;
  if (uses_bias(g.epilogue) != (g.bias != nullptr)) return false;
  if (g.float32_out && g.epilogue != Epilogue::kNone) return false;
  // cuBLASLt: the GELU aux matrix's leading dimension is a multiple of 8 and covers D's rows.
  if (uses_aux(g.epilogue) && (g.aux == nullptr || g.ld_aux < g.N || g.ld_aux % 8 != 0)) return false;
  return true;
}

}  // namespace

cublasStatus_t matmul(cublasLtHandle_t handle, const Gemm& g, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  if (!valid(g)) return CUBLAS_STATUS_INVALID_VALUE;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return CUBLAS_STATUS_INTERNAL_ERROR;

  // The operation: fp32 accumulation and fp32 alpha/beta, host pointer mode (the default).
  cublasLtMatmulDescOpaque_t desc;
  cublasStatus_t s = cublasLtMatmulDescInit(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  const cublasOperation_t trans_a = g.b.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A is our B
  const cublasOperation_t trans_b = g.a.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasLtEpilogue_t epilogue = lt_epilogue(g.epilogue);
  s = cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a));
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b));
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue));
  if (s == CUBLAS_STATUS_SUCCESS && uses_bias(g.epilogue))
    s = cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias));
  if (s == CUBLAS_STATUS_SUCCESS && uses_aux(g.epilogue)) {
    s = cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g.ld_aux, sizeof(g.ld_aux));
  }
  if (s != CUBLAS_STATUS_SUCCESS) return s;

  const void* c = g.residual != nullptr ? g.residual : g.out;
  // In cuBLASLt's naming: its A is our B, its B our A.
  const int64_t align_a = alignment(g.b.data), align_b = alignment(g.a.data);
  const int64_t align_c = alignment(c), align_d = alignment(g.out);
  const Key key{device,
                static_cast<int64_t>(g.dtype),
                g.float32_out,
                g.M,
                g.N,
                g.K,
                g.a.transposed,
                g.b.transposed,
                g.a.ld,
                g.b.ld,
                g.ld_out,
                g.residual != nullptr,
                g.residual != nullptr ? g.ld_residual : 0,
                static_cast<int64_t>(g.epilogue),
                uses_aux(g.epilogue) ? g.ld_aux : 0,
                align_a,
                align_b,
                align_c,
                align_d,
                uses_bias(g.epilogue) ? alignment(g.bias) : 0,
                uses_aux(g.epilogue) ? alignment(g.aux) : 0,
                static_cast<int64_t>(workspace_bytes),
                alignment(workspace)};

  Plan* plan = nullptr;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it == cache.end()) {
      auto fresh = std::make_unique<Plan>();
      s = init_layouts(g, *fresh);
      if (s != CUBLAS_STATUS_SUCCESS) return s;
      cublasLtMatmulPreferenceOpaque_t preference;
      s = cublasLtMatmulPreferenceInit(&preference);
      const uint64_t max_workspace = workspace_bytes;
      // The heuristic must only offer kernels that accept these pointers' alignment (its default
      // assumes 256-byte aligned A, B, C and D).
      const uint32_t min_align[4] = {static_cast<uint32_t>(align_a), static_cast<uint32_t>(align_b),
                                     static_cast<uint32_t>(align_c), static_cast<uint32_t>(align_d)};
      if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(&preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &max_workspace, sizeof(max_workspace));
      if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(&preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                 &min_align[0], sizeof(min_align[0]));
      if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(&preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                 &min_align[1], sizeof(min_align[1]));
      if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(&preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                 &min_align[2], sizeof(min_align[2]));
      if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(&preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                 &min_align[3], sizeof(min_align[3]));
      if (s != CUBLAS_STATUS_SUCCESS) return s;
      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      s = cublasLtMatmulAlgoGetHeuristic(handle, &desc, &fresh->a, &fresh->b, &fresh->c, &fresh->d, &preference, 1,
                                         &result, &returned);
      // NOT_SUPPORTED: no algorithm for this configuration; remembered, so the heuristic is asked once.
      if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED) return s;
      fresh->found = s == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
      if (fresh->found) fresh->algo = result.algo;
      it = cache.emplace(key, std::move(fresh)).first;
    }
    plan = it->second.get();
  }
  if (!plan->found) return CUBLAS_STATUS_NOT_SUPPORTED;

  const float alpha = 1.0f, beta = g.residual != nullptr ? 1.0f : 0.0f;
  return cublasLtMatmul(handle, &desc, &alpha, g.b.data, &plan->a, g.a.data, &plan->b, &beta, c, &plan->c, g.out,
                        &plan->d, &plan->algo, workspace, workspace_bytes, stream);
}

namespace {

// t read as t^T by a GEMM.
Operand transpose(Operand t) { return Operand{t.data, t.ld, !t.transposed}; }

// A contiguous (rows, cols) matrix read as itself.
Operand contiguous(const void* data, int64_t cols) { return Operand{data, cols, false}; }

Gemm make_gemm(DType dtype, int64_t M, int64_t N, int64_t K, Operand a, Operand b, void* out) {
  Gemm g{};
  g.dtype = dtype;
  g.M = M;
  g.N = N;
  g.K = K;
  g.a = a;
  g.b = b;
  g.out = out;
  g.ld_out = N;  // every output is contiguous
  g.epilogue = Epilogue::kNone;
  return g;
}

cublasStatus_t run(const Resources& r, const Gemm& g) {
  return matmul(r.handle, g, r.workspace, r.workspace_bytes, r.stream);
}

Status blas_status(const char* step, cublasStatus_t s) {
  Status status;
  if (s != CUBLAS_STATUS_SUCCESS) {
    status.step = step;
    status.blas = s;
  }
  return status;
}

Status cuda_status(const char* step, cudaError_t e) {
  Status status;
  if (e != cudaSuccess) {
    status.step = step;
    status.cuda = e;
  }
  return status;
}

Matrix rows_of(void* data, int64_t cols) { return Matrix{data, cols, 1}; }

// A weight-gradient GEMM dW (M, N) = dY^T (M, tokens) @ X (tokens, N) whose bias gradient, the sum over
// tokens of dY (`source`, (tokens, M) contiguous), rides in its BGRADB epilogue; where cuBLASLt has no
// algorithm for that epilogue, the GEMM runs plain and column_sums_16bit sums the tokens.
Status weight_grad_with_bias_grad(const Resources& r, Gemm g, void* bias_grad, const void* source,
                                  const char* step) {
  g.epilogue = Epilogue::kBGradA;
  g.bias = bias_grad;
  cublasStatus_t s = run(r, g);
  if (s != CUBLAS_STATUS_NOT_SUPPORTED) return blas_status(step, s);
  g.epilogue = Epilogue::kNone;
  g.bias = nullptr;
  s = run(r, g);
  if (s != CUBLAS_STATUS_SUCCESS) return blas_status(step, s);
  return cuda_status("column_sums_16bit (bias gradient)",
                     column_sums_16bit(source, g.K, static_cast<int>(g.M), g.M, g.dtype, bias_grad, r.stream));
}

// GEMM2: y (M, C_out) = act (M, hidden) @ Wproj^T (hidden, C_out) [+ b_proj] [+ residual as C, beta = 1].
Status forward_projection(const FfnForwardParams& p, const Resources& r) {
  Gemm proj = make_gemm(p.dtype, p.tokens, p.out_features, p.hidden, contiguous(p.activated, p.hidden),
                        transpose(p.proj_weight), p.y);
  proj.epilogue = p.proj_bias != nullptr ? Epilogue::kBias : Epilogue::kNone;
  proj.bias = const_cast<void*>(p.proj_bias);  // read only (see ffn_forward)
  proj.residual = p.residual;
  proj.ld_residual = p.ld_residual;
  return blas_status("proj GEMM with the bias + residual epilogue", run(r, proj));
}

}  // namespace

// Shapes (row-major, M = tokens):
//   GEMM1  act (M, hidden) = x (M, C) @ Wfc^T (C, hidden) [+ b_fc], gelu_tanh epilogue with aux h (M, hidden);
//          or h (M, hidden) = the same product [+ b_fc], then act(h) in one pass;
//   GEMM2  y (M, C_out) = act (M, hidden) @ Wproj^T (hidden, C_out) [+ b_proj] [+ residual (M, C_out)].
Status ffn_forward(const FfnForwardParams& p, const Resources& r) {
  Gemm fc = make_gemm(p.dtype, p.tokens, p.hidden, p.channels, p.x, transpose(p.fc_weight), p.activated);
  const bool fc_bias = p.fc_bias != nullptr;
  fc.bias = const_cast<void*>(p.fc_bias);  // read only: Gemm::bias is written by the gradient epilogues alone
  // cuBLASLt's GELU is the tanh form; its aux matrix (h) needs a leading dimension divisible by 8.
  if (p.activation == Activation::kGeluTanh && p.hidden % 8 == 0) {
    fc.epilogue = fc_bias ? Epilogue::kGeluAuxBias : Epilogue::kGeluAux;
    fc.aux = p.h;
    fc.ld_aux = p.hidden;
    const cublasStatus_t s = run(r, fc);
    if (s != CUBLAS_STATUS_NOT_SUPPORTED) {
      if (s != CUBLAS_STATUS_SUCCESS) return blas_status("fc GEMM with the bias + gelu_tanh epilogue", s);
      return forward_projection(p, r);
    }
  }
  fc.epilogue = fc_bias ? Epilogue::kBias : Epilogue::kNone;
  fc.out = p.h;
  fc.aux = nullptr;
  fc.ld_aux = 0;
  const cublasStatus_t s = run(r, fc);
  if (s != CUBLAS_STATUS_SUCCESS) return blas_status("fc GEMM with the bias epilogue", s);
  const Status pass = cuda_status("activation_forward", activation_forward(p.dtype, p.activation, p.tokens, p.hidden,
                                                                           rows_of(p.h, p.hidden),
                                                                           rows_of(p.activated, p.hidden), r.stream));
  if (!pass.ok()) return pass;
  return forward_projection(p, r);
}

// Shapes (row-major, M = tokens):
//   dH (M, hidden)         = dY (M, C_out) @ Wproj (C_out, hidden), times act'(h): DGELU_BGRAD for gelu_tanh
//                            (also dfc_bias (hidden)), else a plain GEMM and one pass that also writes act(h);
//   dWproj (C_out, hidden) = dY^T (C_out, M) @ act(h) (M, hidden), BGRADB: dproj_bias (C_out) = sum of dY rows;
//   dWfc (hidden, C)       = dH^T (hidden, M) @ x (M, C), BGRADB (unless DGELU_BGRAD gave it): dfc_bias;
//   dx (M, C)              = dH (M, hidden) @ Wfc (hidden, C).
Status ffn_backward(const FfnBackwardParams& p, const Resources& r) {
  Gemm dh = make_gemm(p.dtype, p.tokens, p.hidden, p.out_features, contiguous(p.dy, p.out_features), p.proj_weight,
                      p.dh);
  bool fused = p.activation == Activation::kGeluTanh && p.hidden % 8 == 0;  // the aux rule, as in the forward
  if (fused) {
    dh.epilogue = Epilogue::kDGeluBGrad;
    dh.bias = p.dfc_bias;
    dh.aux = const_cast<void*>(p.h);  // read only: DGELU reads its aux
    dh.ld_aux = p.hidden;
    const cublasStatus_t s = run(r, dh);
    fused = s != CUBLAS_STATUS_NOT_SUPPORTED;
    if (fused) {
      if (s != CUBLAS_STATUS_SUCCESS) return blas_status("dH GEMM with the dgelu + bias-gradient epilogue", s);
      const Status pass =
          cuda_status("activation_forward (act(h) for dWproj)",
                      activation_forward(p.dtype, p.activation, p.tokens, p.hidden,
                                         rows_of(const_cast<void*>(p.h), p.hidden), rows_of(p.activated, p.hidden),
                                         r.stream));
      if (!pass.ok()) return pass;
    }
  }
  if (!fused) {
    dh.epilogue = Epilogue::kNone;
    dh.bias = nullptr;
    dh.aux = nullptr;
    dh.ld_aux = 0;
    const cublasStatus_t s = run(r, dh);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_status("dY Wproj GEMM", s);
    const Status pass = cuda_status(
        "activation_backward", activation_backward(p.dtype, p.activation, p.tokens, p.hidden, rows_of(p.dh, p.hidden),
                                                   rows_of(const_cast<void*>(p.h), p.hidden),
                                                   rows_of(p.activated, p.hidden), r.stream));
    if (!pass.ok()) return pass;
  }

  Status status = weight_grad_with_bias_grad(
      r,
      make_gemm(p.dtype, p.out_features, p.hidden, p.tokens, transpose(contiguous(p.dy, p.out_features)),
                contiguous(p.activated, p.hidden), p.dproj_weight),
      p.dproj_bias, p.dy, "dWproj GEMM with the bias-gradient epilogue");
  if (!status.ok()) return status;

  const Gemm dfc = make_gemm(p.dtype, p.hidden, p.channels, p.tokens, transpose(contiguous(p.dh, p.hidden)), p.x,
                             p.dfc_weight);
  status = fused ? blas_status("dWfc GEMM", run(r, dfc))
                 : weight_grad_with_bias_grad(r, dfc, p.dfc_bias, p.dh, "dWfc GEMM with the bias-gradient epilogue");
  if (!status.ok()) return status;

  return blas_status("dx GEMM", run(r, make_gemm(p.dtype, p.tokens, p.channels, p.hidden,
                                                 contiguous(p.dh, p.hidden), p.fc_weight, p.dx)));
}

size_t cached_plans() {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.size();
}

}  // namespace fastgpt::cuda::lt
