// The torch-facing side of fastgpt._C: the operators of the `fastgpt` namespace, one schema per op
// (forward and backward of each fused op) with its CPU and Meta implementations.
//
// Every op takes tensors of any number of leading dimensions (flattened to rows here), checks them with
// TORCH_CHECK, fills the params.h structs (pointers, sizes, strides; a tensor whose innermost stride is
// not 1 is copied, every other stride is passed through) and calls the kernels. The CPU implementations
// run the C++ kernels of csrc/cpu, with BLAS (through ATen) for the FFN's and the cross-entropy's large
// GEMMs; the Meta implementations give output shapes (SymInt-aware, for torch.compile with dynamic
// shapes). The same schemas get their CUDA implementations from csrc/cuda/api_cuda.inc (included below
// when built with FASTGPT_WITH_CUDA: setup.py, when csrc/cuda/*.cu exist and CUDA is available) and
// their autograd, once for both devices, from csrc/autograd.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "params.h"
#include "targets.h"

namespace fastgpt {
namespace {

// ---------------------------------------------------------------------------------------------
// Tensor helpers

// FASTGPT_POISON_OUTPUTS=1 (the test suite sets it): outputs start as NaN, so an element a kernel
// forgets to write shows up (the same switch as fastgpt/ops/memory.py).
// The switch is read once, at the first output: it is set before fastgpt is imported. As in
// dispatch.env_switch, "1" is on, "0", empty or unset off, and any other value a ValueError naming it
// (raised by every output allocation until the variable is fixed).
bool poison_outputs_enabled() {
  const char* value = std::getenv("FASTGPT_POISON_OUTPUTS");
  const std::string setting = value == nullptr ? "" : value;
  TORCH_CHECK_VALUE(setting.empty() || setting == "0" || setting == "1",
                    "the environment variable FASTGPT_POISON_OUTPUTS must be '1' (on) or '0' (off), got '", setting,
                    "'");
  return setting == "1";
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = poison_outputs_enabled();
  return poison ? at::full(sizes, NAN, options) : at::empty(sizes, options);
}

// The kernels require a unit innermost stride; any other stride is passed through.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

DType kernel_dtype(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32; }

HeadTensor head_tensor(const at::Tensor& t) { return HeadTensor{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// t (..., cols) as (rows, cols): a view where the strides allow, else a copy. Every op takes any number
// of leading dimensions and flattens them here, so the Python side passes tensors through unchanged.
at::Tensor as_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)});
}

// t's sizes with the last one replaced by `last`: the shape of a row-wise op's output.
std::vector<int64_t> with_last_size(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

// A 2-D tensor with unit column stride (see unit_inner_stride).
Matrix matrix(const at::Tensor& t) { return Matrix{t.data_ptr(), t.stride(0), 1}; }

const void* optional_data(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

int32_t checked_int32(const char* op, const char* what, int64_t value) {
  TORCH_CHECK_VALUE(value <= std::numeric_limits<int32_t>::max(), op, ": ", what, " must fit in int32, got ", value);
  return static_cast<int32_t>(value);
}

// The softmax scales every operator takes, on every device: fastgpt.dispatch.SOFTMAX_SCALE_MIN and
// SOFTMAX_SCALE_MAX (which say why this range; tests/test_bad_input.py checks the bounds agree). The
// kernels compute in float32, and a scale outside it underflows or overflows there (one that rounds to 0
// gave NaN), so the operators refuse it, as the public API does, rather than return NaN.
constexpr double kMinSoftmaxScale = 0x1p-64;
constexpr double kMaxSoftmaxScale = 0x1p64;

void check_softmax_scale(const char* op, double softmax_scale) {
  TORCH_CHECK_VALUE(softmax_scale >= kMinSoftmaxScale && softmax_scale <= kMaxSoftmaxScale, op,
                    ": softmax_scale must be a finite positive float in [2**-64, 2**64], got ", softmax_scale);
}

// LayerNorm's eps, as fastgpt.dispatch.check_eps takes it: a negative or non-finite eps makes every rstd NaN.
void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite float >= 0, got ", eps);
}

void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpu backend, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op,
              ": the cpu backend supports float32 and bfloat16 tensors; ", name, " has dtype ", t.scalar_type());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* reference_name,
                const at::Tensor& reference) {
  check_cpu_float(op, name, t);
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), op, ": ", name, " must have the dtype of ", reference_name, " (",
              reference.scalar_type(), "), got ", t.scalar_type());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_sizes(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_vector(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t size,
                  const at::Tensor& reference) {
  if (!t) return;
  check_like(op, name, *t, "x", reference);
  check_sizes(op, name, *t, {size});
}

Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, op, ": activation must be one of gelu_tanh, gelu, relu, silu, got '", std::string(name), "'");
}

// Column sums in float32 of a (rows, cols) float32 matrix with rows stored contiguously.
at::Tensor column_sums(const at::Tensor& partials, at::ScalarType dtype) {
  at::Tensor out = at::empty({partials.size(1)}, partials.options().dtype(at::kFloat));
  cpu::sum_partials(partials.data_ptr<float>(), partials.size(0), partials.size(1), out.data_ptr<float>());
  return out.to(dtype);
}

// out (M, N) = a (M, K) @ b (N, K)^T (+ bias (N), contiguous): the skinny kernel for the few rows of a
// decode step (csrc/cpu/skinny_gemm.cpp) when a and out have unit column stride and b is stored (N, K)
// or (K, N) (unit column or row stride; up to fewer rows), BLAS otherwise.
void linear_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  const bool rows_contiguous = b.stride(1) == 1;
  const bool supported_layout = a.stride(1) == 1 && out.stride(1) == 1 && (rows_contiguous || b.stride(0) == 1);
  const int64_t max_rows = rows_contiguous ? cpu::kSkinnyGemmMaxRows : cpu::kSkinnyGemmMaxRowsTransposed;
  if (!supported_layout || a.size(0) > max_rows || a.size(0) == 0 || a.size(1) == 0) {
    if (bias) {
      at::addmm_out(out, *bias, a, b.t());
    } else {
      at::mm_out(out, a, b.t());
    }
    return;
  }
  GemmParams p{};
  p.dtype = kernel_dtype(out);
  p.M = static_cast<int32_t>(a.size(0));
  p.N = checked_int32("fastgpt::linear", "out_features", b.size(0));
  p.K = checked_int32("fastgpt::linear", "in_features", a.size(1));
  p.a = matrix(a);
  p.b = Matrix{b.data_ptr(), b.stride(0), b.stride(1)};
  p.bias = optional_data(bias);
  p.out = matrix(out);
  cpu::skinny_gemm(p);
}

// ---------------------------------------------------------------------------------------------
// Linear: a decode step's projections (qkv, attention output, logits of the last position)

// The weight is read in place whatever its strides (linear_into falls back to BLAS for layouts the
// skinny kernel does not read): copying it would cost more than the product.
// x (..., K) -> (..., N).
at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in) {
  const char* op = "fastgpt::linear";
  check_cpu_float(op, "x", x_in);
  check_like(op, "weight", weight, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(weight.size(1) == x_in.size(-1), op, ": weight must have shape (out_features, ", x_in.size(-1),
              "), got ", weight.sizes());
  check_vector(op, "bias", bias_in, weight.size(0), x_in);
  const at::Tensor x = unit_inner_stride(as_rows(x_in));  // (M, K)
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->contiguous();
  at::Tensor out = new_output({x.size(0), weight.size(0)}, x.options());  // (M, N)
  linear_into(out, x, weight, bias);
  return out.view(with_last_size(x_in, weight.size(0)));
}

// ---------------------------------------------------------------------------------------------
// Causal attention

void check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_float(op, "q", q);
  check_like(op, "k", k, "q", q);
  check_like(op, "v", v, "q", q);
  check_dim(op, "q", q, 4);
  check_dim(op, "k", k, 4);
  check_sizes(op, "v", v, k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op,
              ": k must have shape (batch, kv_heads, kv_len, head_dim) with q's batch and head_dim, got q ", q.sizes(),
              " and k ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q's heads (", q.size(1),
              ") must be a multiple of k's kv_heads (", k.size(1), ")");
  TORCH_CHECK(q.size(2) <= k.size(2), op, ": q_len (", q.size(2), ") must be <= kv_len (", k.size(2),
              ") for the bottom-right causal mask");
  TORCH_CHECK_VALUE(q.size(3) > 0, op, ": head_dim (q.shape[3]) must be at least 1, got 0");
}

AttentionParams attention_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double softmax_scale) {
  AttentionParams p{};
  p.dtype = kernel_dtype(q);
  p.batch = checked_int32(op, "batch", q.size(0));
  p.heads = checked_int32(op, "heads", q.size(1));
  p.kv_heads = checked_int32(op, "kv_heads", k.size(1));
  p.q_len = checked_int32(op, "q_len", q.size(2));
  p.kv_len = checked_int32(op, "kv_len", k.size(2));
  p.head_dim = checked_int32(op, "head_dim", q.size(3));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.q = head_tensor(q);
  p.k = head_tensor(k);
  p.v = head_tensor(v);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, double softmax_scale) {
  const char* op = "fastgpt::attention_forward";
  check_attention(op, q_in, k_in, v_in);
  check_softmax_scale(op, softmax_scale);
  const at::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in), v = unit_inner_stride(v_in);
  at::Tensor out = new_output(q.sizes(), q.options());                                      // (B, H, Tq, D)
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, H, Tq)
  AttentionParams p = attention_params(op, q, k, v, softmax_scale);
  p.out = head_tensor(out);
  p.lse = lse.data_ptr<float>();
  cpu::attention_forward(p);
  return {out, lse};
}

// The valid keys of each of `batch` sequences, from kv_len (a CPU int32/int64 tensor of 1 element, every
// sequence's length, or `batch`, FlashAttention's cache_seqlens), each clamped to [0, capacity]. Read
// element by element: at a decode step's size, ATen ops on it would cost more than the attention.
std::vector<int64_t> sequence_lengths(const char* op, const at::Tensor& kv_len, int64_t batch, int64_t capacity) {
  const bool int64 = kv_len.scalar_type() == at::kLong;
  TORCH_CHECK_TYPE((int64 || kv_len.scalar_type() == at::kInt) && kv_len.device().is_cpu(), op,
                   ": kv_len must be a CPU int32 or int64 tensor, got ", kv_len.scalar_type(), " on ", kv_len.device());
  TORCH_CHECK_VALUE(kv_len.numel() == 1 || kv_len.numel() == batch, op, ": kv_len must have 1 or batch (", batch,
                    ") elements, got ", kv_len.numel());
  const at::Tensor flat = kv_len.reshape({-1});
  std::vector<int64_t> lengths(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t at = flat.numel() == 1 ? 0 : b;
    const int64_t value = int64 ? flat.const_data_ptr<int64_t>()[at * flat.stride(0)]
                                : flat.const_data_ptr<int32_t>()[at * flat.stride(0)];
    lengths[b] = std::clamp<int64_t>(value, 0, capacity);
  }
  return lengths;
}

// q (B, H, 1, D) against the first lengths[b] keys of sequence b's cache k, v (B, Hkv, capacity, D), any
// strides -> (B, H, 1, D); 0 for a sequence of length 0. The decode kernel, reading only up to the
// longest length (so its key splits are sized for the keys read, not the cache).
at::Tensor attention_with_lengths(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                  const at::Tensor& v_in, const std::vector<int64_t>& lengths, double softmax_scale) {
  const int64_t longest = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
  if (longest == 0) return at::zeros(q_in.sizes(), q_in.options());
  const at::Tensor q = unit_inner_stride(q_in);
  const at::Tensor k = unit_inner_stride(k_in.narrow(2, 0, longest));
  const at::Tensor v = unit_inner_stride(v_in.narrow(2, 0, longest));
  at::Tensor out = new_output(q.sizes(), q.options());                                       // (B, H, 1, D)
  at::Tensor lse = at::empty({q.size(0), q.size(1), 1}, q.options().dtype(at::kFloat));  // (B, H, 1)
  AttentionParams p = attention_params(op, q, k, v, softmax_scale);
  p.out = head_tensor(out);
  p.lse = lse.data_ptr<float>();
  p.kv_lens = lengths.data();
  cpu::attention_forward(p);
  return out;
}

// q (B, H, 1, D); k, v (B, Hkv, capacity, D) caches; kv_len: see sequence_lengths. Returns (B, H, 1, D),
// each sequence's query attending to its cache's first kv_len keys (fastgpt.decode_attention_with_length).
at::Tensor decode_attention_with_length_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& kv_len, double softmax_scale) {
  const char* op = "fastgpt::decode_attention_with_length";
  check_attention(op, q, k, v);
  check_softmax_scale(op, softmax_scale);
  TORCH_CHECK_VALUE(q.size(2) == 1, op, ": q must have shape (batch, heads, 1, head_dim), got ", q.sizes());
  return attention_with_lengths(op, q, k, v, sequence_lengths(op, kv_len, q.size(0), k.size(2)), softmax_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                                      const at::Tensor& k_in, const at::Tensor& v_in,
                                                                      const at::Tensor& out_in, const at::Tensor& lse_in,
                                                                      double softmax_scale) {
  const char* op = "fastgpt::attention_backward";
  check_attention(op, q_in, k_in, v_in);
  check_softmax_scale(op, softmax_scale);
  check_like(op, "dout", dout_in, "q", q_in);
  check_like(op, "out", out_in, "q", q_in);
  check_sizes(op, "dout", dout_in, q_in.sizes());
  check_sizes(op, "out", out_in, q_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  check_sizes(op, "lse", lse_in, {q_in.size(0), q_in.size(1), q_in.size(2)});
  const at::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in), v = unit_inner_stride(v_in);
  const at::Tensor dout = unit_inner_stride(dout_in), out = unit_inner_stride(out_in), lse = lse_in.contiguous();
  at::Tensor dq = new_output(q.sizes(), q.options());  // (B, H, Tq, D)
  at::Tensor dk = new_output(k.sizes(), k.options());  // (B, Hkv, Tk, D)
  at::Tensor dv = new_output(v.sizes(), v.options());  // (B, Hkv, Tk, D)
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AttentionParams p = attention_params(op, q, k, v, softmax_scale);
  p.out = head_tensor(out);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = head_tensor(dout);
  p.dq = head_tensor(dq);
  p.dk = head_tensor(dk);
  p.dv = head_tensor(dv);
  p.delta = delta.data_ptr<float>();
  cpu::attention_backward(p);
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// FFN: GEMMs with BLAS, bias/activation epilogues in one pass each (csrc/cpu/ffn.cpp)

// Rows per bias-gradient partial sum in the backward epilogue.
constexpr int64_t kBiasGradBlockRows = 64;

void check_ffn(const char* op, const at::Tensor& x, const at::Tensor& fc_weight, const at::Tensor& proj_weight) {
  check_cpu_float(op, "x", x);
  check_like(op, "fc_weight", fc_weight, "x", x);
  check_like(op, "proj_weight", proj_weight, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_dim(op, "fc_weight", fc_weight, 2);
  check_dim(op, "proj_weight", proj_weight, 2);
  TORCH_CHECK(fc_weight.size(1) == x.size(-1), op, ": fc_weight must have shape (hidden, ", x.size(-1), "), got ",
              fc_weight.sizes());
  TORCH_CHECK(proj_weight.size(1) == fc_weight.size(0), op, ": proj_weight must have shape (out_features, ",
              fc_weight.size(0), "), got ", proj_weight.sizes());
}

GemmParams epilogue_params(const at::Tensor& out, Activation activation) {
  GemmParams p{};
  p.dtype = kernel_dtype(out);
  p.M = checked_int32("fastgpt::ffn", "tokens", out.size(0));
  p.N = checked_int32("fastgpt::ffn", "features", out.size(1));
  p.activation = activation;
  p.out = matrix(out);
  return p;
}

// x (..., C) -> (out (..., C_out), h (..., Hid)); residual (..., C_out).
std::tuple<at::Tensor, at::Tensor> ffn_forward_cpu(const at::Tensor& x_in, const at::Tensor& fc_weight,
                                                   const std::optional<at::Tensor>& fc_bias_in,
                                                   const at::Tensor& proj_weight,
                                                   const std::optional<at::Tensor>& proj_bias_in,
                                                   c10::string_view activation_name,
                                                   const std::optional<at::Tensor>& residual_in) {
  const char* op = "fastgpt::ffn_forward";
  check_ffn(op, x_in, fc_weight, proj_weight);
  const Activation activation = parse_activation(op, activation_name);
  const int64_t hidden = fc_weight.size(0), out_features = proj_weight.size(0);
  check_vector(op, "fc_bias", fc_bias_in, hidden, x_in);
  check_vector(op, "proj_bias", proj_bias_in, out_features, x_in);
  const std::vector<int64_t> out_sizes = with_last_size(x_in, out_features);
  std::optional<at::Tensor> fc_bias, proj_bias, residual;
  if (fc_bias_in) fc_bias = fc_bias_in->contiguous();
  if (proj_bias_in) proj_bias = proj_bias_in->contiguous();
  if (residual_in) {
    check_like(op, "residual", *residual_in, "x", x_in);
    check_sizes(op, "residual", *residual_in, out_sizes);
    residual = unit_inner_stride(as_rows(*residual_in));  // (M, C_out)
  }
  const at::Tensor x = as_rows(x_in);  // (M, C)
  const int64_t tokens = x.size(0);

  at::Tensor h = new_output({tokens, hidden}, x.options());  // (M, Hid): x @ fc_weight^T, then + fc_bias
  linear_into(h, x, fc_weight, std::nullopt);
  at::Tensor act = new_output({tokens, hidden}, x.options());  // (M, Hid): act(h)
  GemmParams fc = epilogue_params(h, activation);
  fc.bias = optional_data(fc_bias);
  fc.activation_out = matrix(act);
  cpu::gemm_epilogue(fc);

  at::Tensor out = new_output({tokens, out_features}, x.options());  // (M, C_out)
  linear_into(out, act, proj_weight, std::nullopt);
  if (proj_bias || residual) {
    GemmParams proj = epilogue_params(out, activation);
    proj.bias = optional_data(proj_bias);
    if (residual) proj.residual = matrix(*residual);
    cpu::gemm_epilogue(proj);
  }
  return {out.view(out_sizes), h.view(with_last_size(x_in, hidden))};
}

// dout (..., C_out), x (..., C), h (..., Hid) -> dx (..., C), dfc_weight, dfc_bias, dproj_weight, dproj_bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& fc_weight,
    const at::Tensor& proj_weight, c10::string_view activation_name) {
  const char* op = "fastgpt::ffn_backward";
  check_ffn(op, x_in, fc_weight, proj_weight);
  const Activation activation = parse_activation(op, activation_name);
  const int64_t hidden = fc_weight.size(0), out_features = proj_weight.size(0);
  check_like(op, "dout", dout_in, "x", x_in);
  check_like(op, "h", h_in, "x", x_in);
  check_sizes(op, "dout", dout_in, with_last_size(x_in, out_features));
  check_sizes(op, "h", h_in, with_last_size(x_in, hidden));
  const at::Tensor x = as_rows(x_in);                                             // (M, C)
  const at::Tensor dout = as_rows(dout_in).contiguous(), h = unit_inner_stride(as_rows(h_in));  // (M, C_out), (M, Hid)
  const int64_t tokens = x.size(0);

  // dproj_bias: column sums of dout, read as float32 partial rows when float32, else via one upcast.
  at::Tensor dproj_bias = column_sums(dout.to(at::kFloat), x.scalar_type());
  at::Tensor dh = new_output({tokens, hidden}, x.options());  // (M, Hid): dout @ proj_weight, then * act'(h)
  at::mm_out(dh, dout, proj_weight);
  at::Tensor act = new_output({tokens, hidden}, x.options());  // (M, Hid): act(h), recomputed
  const int64_t blocks = (tokens + kBiasGradBlockRows - 1) / kBiasGradBlockRows;
  at::Tensor partials = at::empty({blocks, hidden}, x.options().dtype(at::kFloat));
  GemmParams epilogue = epilogue_params(dh, activation);
  epilogue.activation_grad_input = matrix(h);
  epilogue.activation_out = matrix(act);
  epilogue.bias_grad_partial = partials.data_ptr<float>();
  epilogue.bias_grad_block_m = static_cast<int32_t>(kBiasGradBlockRows);
  cpu::gemm_epilogue(epilogue);

  at::Tensor dfc_bias = column_sums(partials, x.scalar_type());
  at::Tensor dproj_weight = at::mm(dout.t(), act);  // (C_out, Hid)
  at::Tensor dfc_weight = at::mm(dh.t(), x);        // (Hid, C)
  at::Tensor dx = at::mm(dh, fc_weight);            // (M, C)
  return {dx.view(x_in.sizes()), dfc_weight, dfc_bias, dproj_weight, dproj_bias};
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (+ fused residual)

// Rows per dweight/dbias partial: at least 16, and at most 256 partials.
int64_t layer_norm_partials(int64_t rows) {
  const int64_t rows_per_partial = std::max<int64_t>(16, (rows + 255) / 256);
  return (rows + rows_per_partial - 1) / rows_per_partial;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, double eps) {
  const char* op = "fastgpt::layer_norm_forward";
  check_cpu_float(op, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_eps(op, eps);
  const at::Tensor x = unit_inner_stride(as_rows(x_in));  // (R, C)
  const int64_t rows = x.size(0), cols = x.size(1);
  check_vector(op, "weight", weight_in, cols, x_in);
  check_vector(op, "bias", bias_in, cols, x_in);
  std::optional<at::Tensor> weight, bias, residual;
  if (weight_in) weight = weight_in->contiguous();
  if (bias_in) bias = bias_in->contiguous();
  if (residual_in) {
    check_like(op, "residual", *residual_in, "x", x_in);
    check_sizes(op, "residual", *residual_in, x_in.sizes());
    residual = unit_inner_stride(as_rows(*residual_in));  // (R, C)
  }
  at::Tensor out = new_output({rows, cols}, x.options());
  at::Tensor residual_out = residual ? new_output({rows, cols}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = new_output({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = new_output({rows}, x.options().dtype(at::kFloat));
  LayerNormParams p{};
  p.dtype = kernel_dtype(x);
  p.rows = rows;
  p.cols = checked_int32(op, "the normalised dimension", cols);
  p.eps = static_cast<float>(eps);
  p.x = matrix(x);
  if (residual) {
    p.residual = matrix(*residual);
    p.residual_out = matrix(residual_out);
  }
  p.weight = optional_data(weight);
  p.bias = optional_data(bias);
  p.out = matrix(out);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  cpu::layer_norm_forward(p);
  return {out.view(x_in.sizes()), residual ? residual_out.view(x_in.sizes()) : residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dresidual_out_in, const at::Tensor& input_in,
    const std::optional<at::Tensor>& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const char* op = "fastgpt::layer_norm_backward";
  check_cpu_float(op, "input", input_in);
  TORCH_CHECK(input_in.dim() >= 1, op, ": input must have at least one dimension, got a scalar");
  const at::Tensor input = unit_inner_stride(as_rows(input_in));  // (R, C)
  const int64_t rows = input.size(0), cols = input.size(1);
  check_like(op, "dout", dout_in, "input", input_in);
  check_sizes(op, "dout", dout_in, input_in.sizes());
  check_vector(op, "weight", weight_in, cols, input_in);
  TORCH_CHECK(mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat, op,
              ": mean and rstd must be float32");
  check_sizes(op, "mean", mean_in, {rows});
  check_sizes(op, "rstd", rstd_in, {rows});
  const at::Tensor dout = unit_inner_stride(as_rows(dout_in));  // (R, C)
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  std::optional<at::Tensor> weight, dresidual_out;
  if (weight_in) weight = weight_in->contiguous();
  if (dresidual_out_in) {
    check_like(op, "dresidual_out", *dresidual_out_in, "input", input_in);
    check_sizes(op, "dresidual_out", *dresidual_out_in, input_in.sizes());
    dresidual_out = unit_inner_stride(as_rows(*dresidual_out_in));  // (R, C)
  }
  at::Tensor dx = new_output({rows, cols}, input.options());
  const int64_t partials = layer_norm_partials(rows);
  at::Tensor dweight_partial = at::empty({partials, cols}, input.options().dtype(at::kFloat));
  at::Tensor dbias_partial = at::empty({partials, cols}, input.options().dtype(at::kFloat));
  LayerNormParams p{};
  p.dtype = kernel_dtype(input);
  p.rows = rows;
  p.cols = checked_int32(op, "the normalised dimension", cols);
  p.x = matrix(input);
  p.weight = optional_data(weight);
  p.mean = const_cast<float*>(mean.data_ptr<float>());
  p.rstd = const_cast<float*>(rstd.data_ptr<float>());
  p.dout = matrix(dout);
  if (dresidual_out) p.dresidual_out = matrix(*dresidual_out);
  p.dx = matrix(dx);
  p.dweight_partial = dweight_partial.data_ptr<float>();
  p.dbias_partial = dbias_partial.data_ptr<float>();
  p.num_partials = static_cast<int32_t>(partials);
  cpu::layer_norm_backward(p);
  return {dx.view(input_in.sizes()), column_sums(dweight_partial, input.scalar_type()),
          column_sums(dbias_partial, input.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Linear cross-entropy, chunked: logits = x_chunk @ W^T (BLAS), the fused loss/gradient pass
// (csrc/cpu/cross_entropy.cpp), then dx_chunk = dlogits @ W and dW += dlogits^T @ x_chunk (BLAS).

// Tokens per chunk: the largest power of two whose float32 logits fit in 64 MiB (256 rows for GPT-2's
// 50257-token vocabulary), at least 64. Each chunk's dW += dlogits^T @ x_chunk reads and writes all of
// dW, so on a CPU fewer, larger chunks are much faster, while memory stays bounded by the budget.
constexpr int64_t kLogitsChunkBytes = int64_t{64} << 20;

int64_t cross_entropy_chunk_rows(int64_t tokens, int64_t vocab) {
  int64_t rows = 64;
  while (2 * rows * vocab * static_cast<int64_t>(sizeof(float)) <= kLogitsChunkBytes) rows *= 2;
  return std::min(rows, tokens);
}

struct CrossEntropyResult {
  at::Tensor loss;  // (tokens) float32
  at::Tensor dx, dweight, dbias;
};

CrossEntropyResult cross_entropy_pass(const char* op, const at::Tensor& x_in, const at::Tensor& weight,
                                      const at::Tensor& targets_in, const std::optional<at::Tensor>& bias_in,
                                      int64_t ignore_index, bool with_grad, const at::Tensor* row_grad) {
  check_cpu_float(op, "x", x_in);
  check_like(op, "weight", weight, "x", x_in);
  check_dim(op, "x", x_in, 2);
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(weight.size(1) == x_in.size(1), op, ": weight must have shape (vocab, ", x_in.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(targets_in.scalar_type() == at::kLong && targets_in.device().is_cpu(), op,
              ": targets must be a CPU int64 tensor, got ", targets_in.scalar_type(), " on ", targets_in.device());
  const int64_t tokens = x_in.size(0), channels = x_in.size(1), vocab = weight.size(0);
  // No class, no loss (and cross_entropy_chunk_rows would double its row count forever).
  TORCH_CHECK_VALUE(vocab > 0, op, ": weight must have at least one row (vocab >= 1), got shape ", weight.sizes());
  check_sizes(op, "targets", targets_in, {tokens});
  check_vector(op, "bias", bias_in, vocab, x_in);
  const at::Tensor x = unit_inner_stride(x_in), targets = targets_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->contiguous();

  const int64_t chunk = cross_entropy_chunk_rows(tokens, vocab);
  // One chunk (every small batch) takes dweight from one GEMM, with no accumulator and no views: at a
  // decode-sized batch each ATen call costs more than the kernel. No rows: zero gradients.
  const bool one_chunk = tokens > 0 && chunk == tokens;
  CrossEntropyResult result;
  result.loss = new_output({tokens}, x.options().dtype(at::kFloat));
  at::Tensor dweight_acc, dbias_acc, dweight_chunk;
  if (with_grad) {
    result.dx = new_output({tokens, channels}, x.options());
    if (!one_chunk) dweight_acc = at::zeros({vocab, channels}, x.options().dtype(at::kFloat));
    if (bias) dbias_acc = at::zeros({vocab}, x.options().dtype(at::kFloat));
    if (!one_chunk && x.scalar_type() != at::kFloat) dweight_chunk = at::empty({vocab, channels}, x.options());
  }
  CrossEntropyParams p{};
  p.dtype = kernel_dtype(x);
  p.tokens = tokens;
  p.channels = checked_int32(op, "channels", channels);
  p.vocab = checked_int32(op, "vocab", vocab);
  p.ignore_index = ignore_index;
  p.x = matrix(x);
  p.weight = matrix(weight);
  p.bias = optional_data(bias);
  p.targets = targets.data_ptr<int64_t>();
  p.loss = result.loss.data_ptr<float>();
  p.row_grad = row_grad ? row_grad->data_ptr<float>() : nullptr;
  if (with_grad) {
    p.dx = matrix(result.dx);
    p.dbias = bias ? dbias_acc.data_ptr<float>() : nullptr;
  }
  p.chunk_size = static_cast<int32_t>(chunk);
  at::Tensor logits = at::empty({chunk, vocab}, x.options());  // (chunk, V): logits, then dlogits
  for (int64_t begin = 0; begin < tokens; begin += chunk) {
    const int64_t rows = std::min(chunk, tokens - begin);
    const at::Tensor x_chunk = one_chunk ? x : x.narrow(0, begin, rows);
    at::Tensor chunk_logits = one_chunk ? logits : logits.narrow(0, 0, rows);
    at::mm_out(chunk_logits, x_chunk, weight.t());
    cpu::cross_entropy_chunk(p, begin, rows, chunk_logits.data_ptr(), vocab);
    if (!with_grad) continue;
    at::Tensor dx_chunk = one_chunk ? result.dx : result.dx.narrow(0, begin, rows);
    at::mm_out(dx_chunk, chunk_logits, weight);
    if (one_chunk) {
      result.dweight = at::mm(chunk_logits.t(), x_chunk);  // (V, C) in x's dtype, rounded once
    } else if (dweight_chunk.defined()) {
      at::mm_out(dweight_chunk, chunk_logits.t(), x_chunk);
      dweight_acc.add_(dweight_chunk);
    } else {
      dweight_acc.addmm_(chunk_logits.t(), x_chunk);
    }
  }
  if (with_grad) {
    if (!one_chunk) result.dweight = dweight_acc.to(x.scalar_type());
    result.dbias = bias ? dbias_acc.to(x.scalar_type()) : at::empty({0}, x.options());
  }
  return result;
}

// The per-row losses (N) reduced: themselves for 'none', else a 0-d float32 tensor, the sum (in
// float64) or the mean over the kept rows (0 / 0 = NaN when every row is ignored, as in torch). A plain
// loop: at a decode-sized batch, ATen's sum and division cost more than the kernel.
at::Tensor reduce_loss(const at::Tensor& loss, int64_t kept, c10::string_view reduction) {
  if (reduction == "none") return loss;
  const float* values = loss.data_ptr<float>();
  double total = 0.0;
  for (int64_t n = 0; n < loss.numel(); ++n) total += values[n];
  at::Tensor reduced = at::empty({}, loss.options());
  *reduced.data_ptr<float>() = static_cast<float>(reduction == "sum" ? total : total / static_cast<double>(kept));
  return reduced;
}

void check_reduction(const char* op, c10::string_view reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              ": reduction must be one of mean, sum, none, got '", std::string(reduction), "'");
}

// x (..., C) and targets (...) as (N, C) and (N): x's leading dimensions must be targets' shape.
std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const char* op, const at::Tensor& x, const at::Tensor& targets) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  check_sizes(op, "targets", targets, x.sizes().slice(0, x.dim() - 1));
  return {as_rows(x), targets.reshape({-1})};
}

// x (..., C), targets (...) -> loss (() for mean/sum, targets' shape for none) and, with compute_grad,
// the gradients of the summed loss: dx (..., C), dweight (V, C), dbias (V, or 0 without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& targets_in,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  const char* op = "fastgpt::linear_cross_entropy_forward";
  check_reduction(op, reduction);
  TORCH_CHECK(!compute_grad || reduction != "none", op,
              ": compute_grad needs reduction 'mean' or 'sum' (with 'none' the backward runs its own pass)");
  const auto [x, targets] = cross_entropy_rows(op, x_in, targets_in);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.device().is_cpu(), op,
              ": targets must be a CPU int64 tensor, got ", targets.scalar_type(), " on ", targets.device());
  const int64_t kept = reduction == "mean" ? kept_rows(targets, ignore_index) : 0;
  CrossEntropyResult r = cross_entropy_pass(op, x, weight, targets, bias, ignore_index, compute_grad, nullptr);
  at::Tensor loss = reduce_loss(r.loss, kept, reduction);
  if (reduction == "none") loss = loss.view(targets_in.sizes());
  if (!compute_grad) {
    at::Tensor empty = at::empty({0}, x.options());
    return {loss, empty, empty.clone(), empty.clone()};
  }
  return {loss, r.dx.view(x_in.sizes()), r.dweight, r.dbias};
}

// row_grad (...): the upstream gradient of each row's loss, float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& targets_in,
    const std::optional<at::Tensor>& bias, const at::Tensor& row_grad_in, int64_t ignore_index) {
  const char* op = "fastgpt::linear_cross_entropy_backward";
  TORCH_CHECK(row_grad_in.scalar_type() == at::kFloat, op, ": row_grad must be float32, got ", row_grad_in.scalar_type());
  check_sizes(op, "row_grad", row_grad_in, targets_in.sizes());
  const auto [x, targets] = cross_entropy_rows(op, x_in, targets_in);
  const at::Tensor row_grad = row_grad_in.reshape({-1}).contiguous();  // (N,)
  CrossEntropyResult r = cross_entropy_pass(op, x, weight, targets, bias, ignore_index, true, &row_grad);
  return {r.dx.view(x_in.sizes()), r.dweight, r.dbias};
}

// ---------------------------------------------------------------------------------------------
// GPT decode step: the transformer blocks over a few new positions, in one call

// Parameters per block, in this order: ln_1 weight, bias; attn.c_attn weight, bias; attn.c_proj
// weight, bias; ln_2 weight, bias; mlp.c_fc weight, bias; mlp.c_proj weight, bias (biases may be None).
constexpr size_t kBlockParams = 12;

// dst[b, h, positions[b]] = src[b, h, 0] for every sequence b and kv head h: src (B, Hkv, 1, D) and dst
// (B, Hkv, max_len, D) of one dtype, both with unit last stride. One memcpy per row: as ATen copies of
// selected rows, a decode step's B * Hkv rows per layer would cost more host time than its kernels.
void write_rows_at(const at::Tensor& dst, const at::Tensor& src, const std::vector<int64_t>& positions) {
  const int64_t element = dst.element_size(), row_bytes = dst.size(3) * element;
  char* dst_base = static_cast<char*>(dst.data_ptr());
  const char* src_base = static_cast<const char*>(src.const_data_ptr());
  for (int64_t b = 0; b < dst.size(0); ++b) {
    for (int64_t h = 0; h < dst.size(1); ++h) {
      std::memcpy(dst_base + (b * dst.stride(0) + h * dst.stride(1) + positions[b] * dst.stride(2)) * element,
                  src_base + (b * src.stride(0) + h * src.stride(1)) * element, row_bytes);
    }
  }
}

// x (B, T, C): the embedded new tokens at positions start .. start+T-1 -> the residual stream after
// every block (B, T, C), writing their keys and values into each layer's cache (B, Hkv, max_len, D) at
// those positions. With `positions` (B) int64 instead (T = 1, `start` unused), sequence b's token is at
// positions[b]: prompts of different lengths decoding together, each attending to its own first
// positions[b] + 1 keys. The same kernels, in the same order, as fastgpt.nn.Block with the cpu backend,
// so the result is identical; a decode step costs one call instead of some 15 Python op calls per block.
at::Tensor decode_blocks_cpu(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params,
                             at::TensorList keys, at::TensorList values, int64_t start, int64_t heads, double eps,
                             double softmax_scale, c10::string_view activation,
                             const std::optional<at::Tensor>& positions) {
  const char* op = "fastgpt::decode_blocks";
  check_cpu_float(op, "x", x);
  check_dim(op, "x", x, 3);
  TORCH_CHECK(!keys.empty() && values.size() == keys.size() && params.size() == kBlockParams * keys.size(), op,
              ": expected one key cache and one value cache per block and ", kBlockParams,
              " parameters per block, got ", keys.size(), " key caches, ", values.size(), " value caches and ",
              params.size(), " parameters");
  const int64_t batch = x.size(0), seq = x.size(1), channels = x.size(2);
  TORCH_CHECK(heads > 0 && channels % heads == 0, op, ": heads must divide n_embd (", channels, "), got ", heads);
  // The scalars too, before any cache is written (the ops below would refuse them only after layer 0's).
  check_eps(op, eps);
  check_softmax_scale(op, softmax_scale);
  parse_activation(op, activation);
  const int64_t head_dim = channels / heads;
  // Each sequence's position, and its keys once the token's are written: start and start + T for all,
  // unless `positions` gives them per sequence.
  std::vector<int64_t> sequence_positions(batch, start);
  if (positions) {
    TORCH_CHECK_VALUE(seq == 1, op, ": positions needs one new token per sequence, got x of shape ", x.sizes());
    TORCH_CHECK_TYPE(positions->scalar_type() == at::kLong && positions->device().is_cpu(), op,
                     ": positions must be a CPU int64 tensor, got ", positions->scalar_type(), " on ",
                     positions->device());
    check_sizes(op, "positions", *positions, {batch});
    const int64_t* given = positions->const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) sequence_positions[b] = given[b * positions->stride(0)];
  }
  const int64_t first = *std::min_element(sequence_positions.begin(), sequence_positions.end());
  const int64_t last = *std::max_element(sequence_positions.begin(), sequence_positions.end());
  TORCH_CHECK_VALUE(first >= 0, op, ": start and positions must be >= 0, got ", first);
  std::vector<int64_t> lengths(batch);
  for (int64_t b = 0; b < batch; ++b) lengths[b] = sequence_positions[b] + seq;
  auto param = [&](size_t layer, size_t index) { return params.get(kBlockParams * layer + index); };
  auto weight = [&](size_t layer, size_t index) { return *param(layer, index); };
  // Every cache and parameter, before any cache is written. Parameter shapes: (rows, cols) for the four
  // weights, (rows, 0) for a bias or LayerNorm vector; the hidden width is read from mlp.c_proj's weight.
  for (size_t layer = 0; layer < keys.size(); ++layer) {
    check_like(op, "keys", keys[layer], "x", x);
    check_like(op, "values", values[layer], "x", x);
    check_dim(op, "keys", keys[layer], 4);
    check_sizes(op, "values", values[layer], keys[layer].sizes());
    const int64_t kv_heads = keys[layer].size(1);
    TORCH_CHECK(keys[layer].size(0) == batch && keys[layer].size(3) == head_dim && kv_heads > 0 &&
                    heads % kv_heads == 0 && last + seq <= keys[layer].size(2),
                op, ": each cache must have shape (", batch, ", kv_heads dividing ", heads, ", >= ", last + seq,
                ", ", head_dim, "), got ", keys[layer].sizes());
    TORCH_CHECK(!positions || (keys[layer].stride(3) == 1 && values[layer].stride(3) == 1), op,
                ": with positions, each cache's last dimension must have stride 1");
    const int64_t qkv_features = (heads + 2 * kv_heads) * head_dim;
    const std::optional<at::Tensor> proj_weight = param(layer, 10);
    const int64_t hidden = proj_weight && proj_weight->dim() == 2 ? proj_weight->size(1) : -1;
    const std::array<std::array<int64_t, 2>, kBlockParams> shapes{{{channels, 0}, {channels, 0},
                                                                   {qkv_features, channels}, {qkv_features, 0},
                                                                   {channels, channels}, {channels, 0},
                                                                   {channels, 0}, {channels, 0},
                                                                   {hidden, channels}, {hidden, 0},
                                                                   {channels, hidden}, {channels, 0}}};
    for (size_t index = 0; index < kBlockParams; ++index) {
      const std::optional<at::Tensor> tensor = param(layer, index);
      const bool is_weight = shapes[index][1] != 0;
      TORCH_CHECK(tensor.has_value() || !is_weight, op, ": parameter ", index, " of block ", layer,
                  " (a weight) must be a tensor, got None");
      if (!tensor) continue;
      check_like(op, "each parameter", *tensor, "x", x);
      const at::IntArrayRef expected(shapes[index].data(), is_weight ? 2 : 1);
      TORCH_CHECK(tensor->sizes() == expected, op, ": parameter ", index, " of block ", layer, " must have shape ",
                  expected, ", got ", tensor->sizes());
    }
  }

  at::Tensor stream = x.reshape({batch * seq, channels});  // (B*T, C): the residual stream
  for (size_t layer = 0; layer < keys.size(); ++layer) {
    const int64_t kv_heads = keys[layer].size(1);
    at::Tensor h = std::get<0>(layer_norm_forward_cpu(stream, param(layer, 0), param(layer, 1), std::nullopt, eps));
    at::Tensor qkv = linear_cpu(h, weight(layer, 2), param(layer, 3));  // (B*T, (H + 2 Hkv) D)
    at::Tensor qkv_heads = qkv.view({batch, seq, heads + 2 * kv_heads, head_dim}).transpose(1, 2);
    at::Tensor q = qkv_heads.narrow(1, 0, heads);  // (B, H, T, D)
    const at::Tensor new_keys = qkv_heads.narrow(1, heads, kv_heads);             // (B, Hkv, T, D)
    const at::Tensor new_values = qkv_heads.narrow(1, heads + kv_heads, kv_heads);  // (B, Hkv, T, D)
    at::Tensor y;  // (B, H, T, D)
    if (positions) {
      write_rows_at(keys[layer], new_keys, sequence_positions);
      write_rows_at(values[layer], new_values, sequence_positions);
      y = attention_with_lengths(op, q, keys[layer], values[layer], lengths, softmax_scale);
    } else {
      keys[layer].narrow(2, start, seq).copy_(new_keys);
      values[layer].narrow(2, start, seq).copy_(new_values);
      y = std::get<0>(attention_forward_cpu(q, keys[layer].narrow(2, 0, start + seq),
                                            values[layer].narrow(2, 0, start + seq), softmax_scale));
    }
    at::Tensor attn_out = linear_cpu(y.transpose(1, 2).reshape({batch * seq, channels}), weight(layer, 4),
                                     param(layer, 5));  // (B*T, C)
    auto [h2, residual, mean, rstd] = layer_norm_forward_cpu(attn_out, param(layer, 6), param(layer, 7), stream, eps);
    stream = std::get<0>(ffn_forward_cpu(h2, weight(layer, 8), param(layer, 9), weight(layer, 10), param(layer, 11),
                                         activation, residual));
  }
  return stream.view({batch, seq, channels});
}

// ---------------------------------------------------------------------------------------------
// Meta implementations: output shapes and dtypes only (contiguous, as the CPU ones return).

at::Tensor empty_like_sizes(const at::Tensor& t, c10::SymIntArrayRef sizes, at::ScalarType dtype) {
  return at::empty_symint(sizes, t.options().dtype(dtype));
}

// t's sizes with the last one replaced by `last`.
std::vector<c10::SymInt> sym_with_last_size(const at::Tensor& t, const c10::SymInt& last) {
  std::vector<c10::SymInt> sizes(t.sym_sizes().begin(), t.sym_sizes().end());
  sizes.back() = last;
  return sizes;
}

// The number of rows of t (..., cols): the product of its leading sizes.
c10::SymInt sym_rows(const at::Tensor& t) {
  c10::SymInt rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows = rows * t.sym_size(d);
  return rows;
}

at::Tensor decode_attention_with_length_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& kv_len, double softmax_scale) {
  (void)k, (void)v, (void)kv_len, (void)softmax_scale;
  return empty_like_sizes(q, q.sym_sizes(), q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          double softmax_scale) {
  (void)k, (void)v, (void)softmax_scale;
  return {empty_like_sizes(q, q.sym_sizes(), q.scalar_type()),
          empty_like_sizes(q, {q.sym_size(0), q.sym_size(1), q.sym_size(2)}, at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(const at::Tensor& dout, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, const at::Tensor& lse,
                                                                       double softmax_scale) {
  (void)dout, (void)out, (void)lse, (void)softmax_scale;
  return {empty_like_sizes(q, q.sym_sizes(), q.scalar_type()), empty_like_sizes(k, k.sym_sizes(), q.scalar_type()),
          empty_like_sizes(v, v.sym_sizes(), q.scalar_type())};
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  (void)bias;
  return empty_like_sizes(x, sym_with_last_size(x, weight.sym_size(0)), x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> ffn_forward_meta(const at::Tensor& x, const at::Tensor& fc_weight,
                                                    const std::optional<at::Tensor>& fc_bias,
                                                    const at::Tensor& proj_weight,
                                                    const std::optional<at::Tensor>& proj_bias,
                                                    c10::string_view activation,
                                                    const std::optional<at::Tensor>& residual) {
  (void)fc_bias, (void)proj_bias, (void)activation, (void)residual;
  return {empty_like_sizes(x, sym_with_last_size(x, proj_weight.sym_size(0)), x.scalar_type()),
          empty_like_sizes(x, sym_with_last_size(x, fc_weight.sym_size(0)), x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_backward_meta(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& h, const at::Tensor& fc_weight,
    const at::Tensor& proj_weight, c10::string_view activation) {
  (void)dout, (void)h, (void)activation;
  const at::ScalarType dtype = x.scalar_type();
  return {empty_like_sizes(x, x.sym_sizes(), dtype), empty_like_sizes(x, fc_weight.sym_sizes(), dtype),
          empty_like_sizes(x, {fc_weight.sym_size(0)}, dtype), empty_like_sizes(x, proj_weight.sym_sizes(), dtype),
          empty_like_sizes(x, {proj_weight.sym_size(0)}, dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_meta(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  (void)weight, (void)bias, (void)eps;
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor residual_out =
      residual ? empty_like_sizes(x, x.sym_sizes(), dtype) : empty_like_sizes(x, {c10::SymInt(0)}, dtype);
  return {empty_like_sizes(x, x.sym_sizes(), dtype), residual_out, empty_like_sizes(x, {sym_rows(x)}, at::kFloat),
          empty_like_sizes(x, {sym_rows(x)}, at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_meta(
    const at::Tensor& dout, const std::optional<at::Tensor>& dresidual_out, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  (void)dout, (void)dresidual_out, (void)weight, (void)mean, (void)rstd;
  const at::ScalarType dtype = input.scalar_type();
  const c10::SymInt cols = input.sym_size(-1);
  return {empty_like_sizes(input, input.sym_sizes(), dtype), empty_like_sizes(input, {cols}, dtype),
          empty_like_sizes(input, {cols}, dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_meta(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets, const std::optional<at::Tensor>& bias,
    int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  (void)ignore_index;
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor loss = reduction == "none" ? empty_like_sizes(x, targets.sym_sizes(), at::kFloat)
                                        : empty_like_sizes(x, c10::SymIntArrayRef{}, at::kFloat);
  const c10::SymInt none(0);
  if (!compute_grad) {
    return {loss, empty_like_sizes(x, {none}, dtype), empty_like_sizes(x, {none}, dtype),
            empty_like_sizes(x, {none}, dtype)};
  }
  return {loss, empty_like_sizes(x, x.sym_sizes(), dtype), empty_like_sizes(x, weight.sym_sizes(), dtype),
          empty_like_sizes(x, {bias ? weight.sym_size(0) : none}, dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_meta(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_grad, int64_t ignore_index) {
  (void)targets, (void)row_grad, (void)ignore_index;
  const at::ScalarType dtype = x.scalar_type();
  return {empty_like_sizes(x, x.sym_sizes(), dtype), empty_like_sizes(x, weight.sym_sizes(), dtype),
          empty_like_sizes(x, {bias ? weight.sym_size(0) : c10::SymInt(0)}, dtype)};
}

}  // namespace
}  // namespace fastgpt

// ---------------------------------------------------------------------------------------------
// Operator registration

TORCH_LIBRARY(fastgpt, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def("decode_attention_with_length(Tensor q, Tensor k, Tensor v, Tensor kv_len, float softmax_scale) -> Tensor");
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "ffn_forward(Tensor x, Tensor fc_weight, Tensor? fc_bias, Tensor proj_weight, Tensor? proj_bias, "
      "str activation, Tensor? residual) -> (Tensor out, Tensor h)");
  m.def(
      "ffn_backward(Tensor dout, Tensor x, Tensor h, Tensor fc_weight, Tensor proj_weight, str activation) "
      "-> (Tensor dx, Tensor dfc_weight, Tensor dfc_bias, Tensor dproj_weight, Tensor dproj_bias)");
  m.def(
      "layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
      "-> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor dout, Tensor? dresidual_out, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "linear_cross_entropy_forward(Tensor x, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
      "str reduction, bool compute_grad) -> (Tensor loss, Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "linear_cross_entropy_backward(Tensor x, Tensor weight, Tensor targets, Tensor? bias, Tensor row_grad, "
      "int ignore_index) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "decode_blocks(Tensor x, Tensor?[] params, Tensor(a!)[] keys, Tensor(b!)[] values, int start, int heads, "
      "float eps, float softmax_scale, str activation, Tensor? positions=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("linear", &fastgpt::linear_cpu);
  m.impl("attention_forward", &fastgpt::attention_forward_cpu);
  m.impl("decode_attention_with_length", &fastgpt::decode_attention_with_length_cpu);
  m.impl("attention_backward", &fastgpt::attention_backward_cpu);
  m.impl("ffn_forward", &fastgpt::ffn_forward_cpu);
  m.impl("ffn_backward", &fastgpt::ffn_backward_cpu);
  m.impl("layer_norm_forward", &fastgpt::layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &fastgpt::layer_norm_backward_cpu);
  m.impl("linear_cross_entropy_forward", &fastgpt::linear_cross_entropy_forward_cpu);
  m.impl("linear_cross_entropy_backward", &fastgpt::linear_cross_entropy_backward_cpu);
  m.impl("decode_blocks", &fastgpt::decode_blocks_cpu);
}

TORCH_LIBRARY_IMPL(fastgpt, Meta, m) {
  m.impl("linear", &fastgpt::linear_meta);
  m.impl("attention_forward", &fastgpt::attention_forward_meta);
  m.impl("decode_attention_with_length", &fastgpt::decode_attention_with_length_meta);
  m.impl("attention_backward", &fastgpt::attention_backward_meta);
  m.impl("ffn_forward", &fastgpt::ffn_forward_meta);
  m.impl("ffn_backward", &fastgpt::ffn_backward_meta);
  m.impl("layer_norm_forward", &fastgpt::layer_norm_forward_meta);
  m.impl("layer_norm_backward", &fastgpt::layer_norm_backward_meta);
  m.impl("linear_cross_entropy_forward", &fastgpt::linear_cross_entropy_forward_meta);
  m.impl("linear_cross_entropy_backward", &fastgpt::linear_cross_entropy_backward_meta);
}

#ifdef FASTGPT_WITH_CUDA
#include "cuda/api_cuda.inc"
#endif

// ---------------------------------------------------------------------------------------------
// The Python module: importing it registers the operators above; it also reports how it was built.

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastgpt::cpu::isa_name(fastgpt::cpu::active_isa()));
}

PyMethodDef module_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels run with: avx512, avx2 or baseline."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_C", "fastgpt's compiled kernels (torch.ops.fastgpt).", -1,
                                 module_methods};

}  // namespace

// Whether this build holds the Hopper attention kernels (csrc/cuda/*_sm90.cu): setup.py compiles them,
// and defines FASTGPT_WITH_SM90_ATTENTION, only for a CUDA build with the CUTLASS headers and a compute
// capability 9.0 entry in TORCH_CUDA_ARCH_LIST.
#ifdef FASTGPT_WITH_SM90_ATTENTION
constexpr long kSm90AttentionKernels = 1;
#else
constexpr long kSm90AttentionKernels = 0;
#endif

extern "C" PyMODINIT_FUNC PyInit__C() {
  if (const char* setting = fastgpt::cpu::unknown_isa_setting()) {
    PyErr_Format(PyExc_ValueError,
                 "the environment variable FASTGPT_CPU_ISA must be 'baseline', 'avx2' or 'avx512' (or unset), "
                 "got '%s'",
                 setting);
    return nullptr;
  }
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) return nullptr;
  // The most rows fastgpt::linear runs on the skinny kernel: callers route few-row calls by it.
  // SM90_ATTENTION_KERNELS: what `fastgpt info` reports as the Hopper kernels built in.
  if (PyModule_AddIntConstant(module, "LINEAR_KERNEL_MAX_ROWS", fastgpt::cpu::kSkinnyGemmMaxRows) < 0 ||
      PyModule_AddIntConstant(module, "SM90_ATTENTION_KERNELS", kSm90AttentionKernels) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
