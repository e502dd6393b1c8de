// Shared by the csrc/dev attention harnesses: the CPU reference of causal attention (bottom-right
// mask, GQA) and its gradients in double, and a problem builder (random inputs, device buffers,
// AttentionParams) with contiguous or packed-qkv strided inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../cuda/launch.h"
#include "common.h"

// A strided (batch, heads, rows, head_dim) tensor on the host, head_dim contiguous.
struct HostHeads {
  const float* data;
  int64_t batch_stride, head_stride, row_stride;
  double at(int b, int h, int i, int d) const { return data[b * batch_stride + h * head_stride + i * row_stride + d]; }
};

struct AttentionShape {
  int batch, heads, kv_heads, q_len, kv_len, head_dim;
};

// Outputs are contiguous: out/dq (batch, heads, q_len, head_dim), lse (batch, heads, q_len),
// dk/dv (batch, kv_heads, kv_len, head_dim). dout.data == nullptr skips the backward.
inline void attention_reference(const AttentionShape& s, double scale, HostHeads q, HostHeads k, HostHeads v,
                                HostHeads dout, std::vector<float>& out, std::vector<float>& lse,
                                std::vector<float>& dq, std::vector<float>& dk, std::vector<float>& dv) {
  const int group = s.heads / s.kv_heads;
  const int diagonal = s.kv_len - s.q_len;
  const int D = s.head_dim;
  out.assign(static_cast<size_t>(s.batch) * s.heads * s.q_len * D, 0.0f);
  lse.assign(static_cast<size_t>(s.batch) * s.heads * s.q_len, 0.0f);
  std::vector<double> dq_sum(out.size(), 0.0);
  std::vector<double> dk_sum(static_cast<size_t>(s.batch) * s.kv_heads * s.kv_len * D, 0.0);
  std::vector<double> dv_sum(dk_sum.size(), 0.0);
  std::vector<double> p(s.kv_len), dp(s.kv_len), o(D);
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const int kvh = h / group;
      for (int i = 0; i < s.q_len; ++i) {
        const int visible = std::min(s.kv_len, i + diagonal + 1);
        double m = -INFINITY;
        for (int j = 0; j < visible; ++j) {
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += q.at(b, h, i, d) * k.at(b, kvh, j, d);
          p[j] = dot * scale;
          m = std::max(m, p[j]);
        }
        double l = 0.0;
        for (int j = 0; j < visible; ++j) {
          p[j] = std::exp(p[j] - m);
          l += p[j];
        }
        const size_t row = (static_cast<size_t>(b) * s.heads + h) * s.q_len + i;
        lse[row] = static_cast<float>(m + std::log(l));
        for (int d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int j = 0; j < visible; ++j) acc += p[j] * v.at(b, kvh, j, d);
          o[d] = acc / l;
          out[row * D + d] = static_cast<float>(o[d]);
        }
        if (dout.data == nullptr) continue;
        double delta = 0.0;
        for (int d = 0; d < D; ++d) delta += dout.at(b, h, i, d) * o[d];
        for (int j = 0; j < visible; ++j) {
          double acc = 0.0;
          for (int d = 0; d < D; ++d) acc += dout.at(b, h, i, d) * v.at(b, kvh, j, d);
          dp[j] = acc;
        }
        for (int j = 0; j < visible; ++j) {
          const double probability = p[j] / l;
          const double ds = probability * (dp[j] - delta);
          const size_t kv_row = (static_cast<size_t>(b) * s.kv_heads + kvh) * s.kv_len + j;
          for (int d = 0; d < D; ++d) {
            dq_sum[row * D + d] += scale * ds * k.at(b, kvh, j, d);
            dk_sum[kv_row * D + d] += scale * ds * q.at(b, h, i, d);
            dv_sum[kv_row * D + d] += probability * dout.at(b, h, i, d);
          }
        }
      }
    }
  }
  dq.assign(dq_sum.begin(), dq_sum.end());
  dk.assign(dk_sum.begin(), dk_sum.end());
  dv.assign(dv_sum.begin(), dv_sum.end());
}

// Inputs, outputs and params of one attention problem. packed: q, k and v are views of one
// (batch, len, 3, heads, head_dim) tensor, as from a fused qkv projection (needs heads == kv_heads and
// q_len == kv_len); otherwise three contiguous tensors. Outputs are contiguous and start as NaN.
template <typename T>
struct AttentionProblem {
  AttentionShape shape;
  double scale;
  Buffer<T> storage, out, dout, dq, dk, dv;
  Buffer<float> lse, delta;
  fastgpt::AttentionParams params{};
  HostHeads q_host{}, k_host{}, v_host{}, dout_host{};

  static size_t q_elements(const AttentionShape& s) { return size_t(s.batch) * s.heads * s.q_len * s.head_dim; }
  static size_t kv_elements(const AttentionShape& s) { return size_t(s.batch) * s.kv_heads * s.kv_len * s.head_dim; }

  AttentionProblem(const AttentionShape& s, bool packed, std::mt19937& rng)
      : shape(s),
        scale(1.0 / std::sqrt(static_cast<double>(s.head_dim))),
        storage(packed ? 3 * q_elements(s) : q_elements(s) + 2 * kv_elements(s)),
        out(q_elements(s)),
        dout(q_elements(s)),
        dq(q_elements(s)),
        dk(kv_elements(s)),
        dv(kv_elements(s)),
        lse(size_t(s.batch) * s.heads * s.q_len),
        delta(size_t(s.batch) * s.heads * s.q_len) {
    storage.randomize(rng);
    dout.randomize(rng);
    const int64_t D = s.head_dim;
    fastgpt::HeadTensor q, k, v;
    if (packed) {
      const int64_t row = 3 * int64_t(s.heads) * D;
      q = {storage.device, s.q_len * row, D, row};
      k = {storage.device + s.heads * D, s.q_len * row, D, row};
      v = {storage.device + 2 * s.heads * D, s.q_len * row, D, row};
    } else {
      q = {storage.device, int64_t(s.heads) * s.q_len * D, s.q_len * D, D};
      k = {storage.device + q_elements(s), int64_t(s.kv_heads) * s.kv_len * D, s.kv_len * D, D};
      v = {storage.device + q_elements(s) + kv_elements(s), int64_t(s.kv_heads) * s.kv_len * D, s.kv_len * D, D};
    }
    auto host_view = [&](const fastgpt::HeadTensor& t, const Buffer<T>& buffer) {
      const ptrdiff_t offset = static_cast<const T*>(t.data) - buffer.device;
      return HostHeads{buffer.host.data() + offset, t.batch_stride, t.head_stride, t.row_stride};
    };
    q_host = host_view(q, storage);
    k_host = host_view(k, storage);
    v_host = host_view(v, storage);
    const fastgpt::HeadTensor q_shaped{nullptr, int64_t(s.heads) * s.q_len * D, s.q_len * D, D};
    const fastgpt::HeadTensor kv_shaped{nullptr, int64_t(s.kv_heads) * s.kv_len * D, s.kv_len * D, D};
    auto with = [](fastgpt::HeadTensor t, void* data) {
      t.data = data;
      return t;
    };
    dout_host = host_view(with(q_shaped, dout.device), dout);

    params.dtype = dtype_of<T>();
    params.batch = s.batch;
    params.heads = s.heads;
    params.kv_heads = s.kv_heads;
    params.q_len = s.q_len;
    params.kv_len = s.kv_len;
    params.head_dim = s.head_dim;
    params.softmax_scale = static_cast<float>(scale);
    params.q = q;
    params.k = k;
    params.v = v;
    params.out = with(q_shaped, out.device);
    params.lse = lse.device;
    params.dout = with(q_shaped, dout.device);
    params.dq = with(q_shaped, dq.device);
    params.dk = with(kv_shaped, dk.device);
    params.dv = with(kv_shaped, dv.device);
    params.delta = delta.device;
  }
};

// The case line each harness prints before checking it: "<dtype> [label ]batch .. head_dim ..".
template <typename T>
void print_case(const char* label, const AttentionShape& s, bool packed) {
  printf("%s %sbatch %d heads %d/%d q_len %d kv_len %d head_dim %d%s\n", dtype_name<T>(), label, s.batch, s.heads,
         s.kv_heads, s.q_len, s.kv_len, s.head_dim, packed ? " (packed qkv)" : "");
}

// out and lse, as a forward kernel left them in `problem`, against the double-precision reference.
template <typename T>
void validate_forward(const AttentionProblem<T>& problem) {
  std::vector<float> out, lse, unused_dq, unused_dk, unused_dv;
  attention_reference(problem.shape, problem.scale, problem.q_host, problem.k_host, problem.v_host,
                      HostHeads{nullptr, 0, 0, 0}, out, lse, unused_dq, unused_dk, unused_dv);
  // bfloat16 keeps 8 bits of mantissa (P is rounded to it before P V), float16 11.
  const float tolerance = std::is_same_v<T, __nv_bfloat16> ? 2e-2f : 4e-3f;
  validate_result(problem.out.device, out, "out", out.size(), tolerance, tolerance);
  validate_result(problem.lse.device, lse, "lse", lse.size(), 2e-3f, 1e-4f);
}

// dq, dk and dv, as a backward kernel left them in `problem`, against the double-precision reference.
template <typename T>
void validate_backward(const AttentionProblem<T>& problem) {
  std::vector<float> out, lse, dq, dk, dv;
  attention_reference(problem.shape, problem.scale, problem.q_host, problem.k_host, problem.v_host,
                      problem.dout_host, out, lse, dq, dk, dv);
  // Gradients sum many bf16-rounded P and dS terms: tolerance relative to each gradient's scale. Where
  // the exact dq and dk are 0 (one key per query: the softmax is constant), dS = P (dP - delta) still
  // leaves the float32 rounding of that difference: 6e-8 and 1.2e-7 in float16 on the H200
  // (2026-11-29), so the absolute tolerance never drops below kCancellationFloor.
  constexpr float kCancellationFloor = 1e-6f;
  const float tolerance = std::is_same_v<T, __nv_bfloat16> ? 4e-2f : 1e-2f;
  validate_result(problem.dq.device, dq, "dq", dq.size(), tolerance * max_abs(dq) + kCancellationFloor, tolerance);
  validate_result(problem.dk.device, dk, "dk", dk.size(), tolerance * max_abs(dk) + kCancellationFloor, tolerance);
  validate_result(problem.dv.device, dv, "dv", dv.size(), tolerance * max_abs(dv), tolerance);
}

// FLOPs of causal attention, the usual convention: forward 4 * B * H * N * N * D / 2 (QK^T and PV
// over half the score matrix); the backward counts 2.5 times that.
inline double causal_forward_flops(const AttentionShape& s) {
  return 4.0 * s.batch * s.heads * double(s.q_len) * s.kv_len * s.head_dim / 2.0;
}
