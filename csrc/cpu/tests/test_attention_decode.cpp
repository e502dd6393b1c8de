// The decode path of the attention forward (q_len <= 16) against a float64 reference, for every
// instruction set, float32 and bfloat16: q_len 1, 3 and 16 (the bottom-right mask inside the last
// keys), MHA, GQA 4:1 and MQA, queries as views of a fused qkv projection, keys and values as
// views cache[:, :, :kv_len] of a longer preallocated cache, chunk and split boundaries; and the output's
// bitwise independence of the thread count.
#include <omp.h>

#include "test_util.h"

namespace fastgpt::test {
namespace {

struct Case {
  int batch, heads, kv_heads, q_len, kv_len, head_dim;
};

// Queries: rows of a (batch, q_len, heads + 2 * kv_heads, head_dim) fused projection.
// Keys/values: (batch, kv_heads, kv_len + kCacheSlack, head_dim) caches, of which the first kv_len
// rows of each head are used. Outputs: contiguous (batch, heads, q_len, head_dim).
constexpr int kCacheSlack = 7;

struct Layout {
  int64_t batch_stride, head_stride, row_stride, size;
  int64_t at(int64_t b, int64_t h, int64_t i, int64_t d) const {
    return b * batch_stride + h * head_stride + i * row_stride + d;
  }
  HeadTensor tensor(Storage& s) const { return HeadTensor{s.data(), batch_stride, head_stride, row_stride}; }
};

Layout projection_layout(const Case& c) {
  const int64_t row = static_cast<int64_t>(c.heads + 2 * c.kv_heads) * c.head_dim;
  return Layout{c.q_len * row, c.head_dim, row, c.batch * c.q_len * row};
}

Layout cache_layout(const Case& c) {
  const int64_t head = static_cast<int64_t>(c.kv_len + kCacheSlack) * c.head_dim;
  return Layout{c.kv_heads * head, head, c.head_dim, c.batch * c.kv_heads * head};
}

Layout output_layout(const Case& c) {
  const int64_t head = static_cast<int64_t>(c.q_len) * c.head_dim;
  return Layout{c.heads * head, head, c.head_dim, c.batch * c.heads * head};
}

void reference(const Case& c, const Layout& ql, const Layout& kl, const Storage& q, const Storage& k, const Storage& v,
               double scale, std::vector<double>* out, std::vector<double>* lse) {
  const int64_t D = c.head_dim, group = c.heads / c.kv_heads, offset = c.kv_len - c.q_len;
  out->assign(static_cast<size_t>(c.batch) * c.heads * c.q_len * D, 0.0);
  lse->assign(static_cast<size_t>(c.batch) * c.heads * c.q_len, 0.0);
  std::vector<double> p(c.kv_len);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t i = 0; i < c.q_len; ++i) {
        const int64_t visible = i + offset + 1, row = (b * c.heads + h) * c.q_len + i;
        double max = -INFINITY, sum = 0;
        for (int64_t j = 0; j < visible; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += q.value(ql.at(b, h, i, d)) * k.value(kl.at(b, h / group, j, d));
          max = std::fmax(max, p[j] = s * scale);
        }
        for (int64_t j = 0; j < visible; ++j) sum += (p[j] = std::exp(p[j] - max));
        (*lse)[row] = max + std::log(sum);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < visible; ++j) o += p[j] * v.value(kl.at(b, h / group, j, d));
          (*out)[row * D + d] = o / sum;
        }
      }
    }
  }
}

void run_case(const Case& c, DType dtype, cpu::Isa isa, std::mt19937& rng) {
  char name[160];
  std::snprintf(name, sizeof name, "%s %s B=%d H=%d Hkv=%d Tq=%d Tk=%d D=%d", cpu::isa_name(isa), dtype_name(dtype),
                c.batch, c.heads, c.kv_heads, c.q_len, c.kv_len, c.head_dim);
  const Layout ql = projection_layout(c), kl = cache_layout(c), ol = output_layout(c);
  Storage q(dtype, ql.size), k(dtype, kl.size), v(dtype, kl.size), out(dtype, ol.size);
  for (Storage* s : {&q, &k, &v}) s->fill_uniform(rng, -1.5, 1.5);
  std::vector<float> lse(static_cast<size_t>(c.batch) * c.heads * c.q_len, NAN);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));

  AttentionParams p{};
  p.dtype = dtype;
  p.batch = c.batch;
  p.heads = c.heads;
  p.kv_heads = c.kv_heads;
  p.q_len = c.q_len;
  p.kv_len = c.kv_len;
  p.head_dim = c.head_dim;
  p.softmax_scale = static_cast<float>(scale);
  p.q = ql.tensor(q);
  p.k = kl.tensor(k);
  p.v = kl.tensor(v);
  p.out = ol.tensor(out);
  p.lse = lse.data();
  cpu::attention_forward(p);

  std::vector<double> expected_out, expected_lse, actual_out(ol.size);
  reference(c, ql, kl, q, k, v, scale, &expected_out, &expected_lse);
  for (int64_t i = 0; i < ol.size; ++i) actual_out[i] = out.get(i);
  expect_close(std::string(name) + " out", actual_out, expected_out, tolerance(dtype));
  expect_close(std::string(name) + " lse", std::vector<double>(lse.begin(), lse.end()), expected_lse, 2e-5);

  // The same bits on one thread.
  const std::vector<float> lse_many = lse;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  cpu::attention_forward(p);
  omp_set_num_threads(threads);
  bool same = lse == lse_many;
  for (int64_t i = 0; i < ol.size; ++i) same = same && out.get(i) == actual_out[i];
  expect(same, std::string(name) + ": output differs between thread counts");
}

}  // namespace
}  // namespace fastgpt::test

int main() {
  using namespace fastgpt;
  using namespace fastgpt::test;
  const Case cases[] = {
      {1, 1, 1, 1, 1, 16},     {2, 4, 4, 1, 17, 64},    {1, 8, 2, 1, 300, 64},   {2, 4, 1, 3, 300, 80},
      {1, 4, 1, 1, 1000, 64},  {1, 2, 2, 3, 1000, 128}, {3, 4, 4, 3, 17, 24},    {1, 1, 1, 16, 100, 32},
      // One (batch, kv head): the keys are split in 5 splits of 320, the last holding key 1280 only,
      // which queries 0 and 1 do not see (their state for that split stays empty).
      {1, 1, 1, 3, 1281, 64},  {1, 4, 1, 3, 3, 256},   {1, 16, 1, 16, 90, 64},
  };
  std::mt19937 rng(4321);
  for_each_isa([&](cpu::Isa isa) {
    for (const Case& c : cases) {
      for (DType dtype : {DType::kFloat32, DType::kBFloat16}) run_case(c, dtype, isa, rng);
    }
  });
  return report("test_attention_decode");
}
