// Causal attention forward and backward against a float64 reference, for every instruction set,
// float32 and bfloat16, ragged lengths, head dims, GQA, q_len < kv_len and strided layouts; and the
// backward's bitwise determinism across thread counts (which also switches its schedule).
#include <omp.h>

#include "test_util.h"

namespace fastgpt::test {
namespace {

struct Case {
  int batch, heads, kv_heads, q_len, kv_len, head_dim;
  bool strided;  // (batch, len, heads, head_dim) rows with padding, as views of a fused projection
};

// A (batch, heads, len, head_dim) tensor inside a Storage: contiguous, or rows of all heads
// interleaved with 3 padding elements per row.
struct Layout {
  int64_t batch_stride, head_stride, row_stride, size;
  Layout(const Case& c, int heads, int len, bool strided) {
    if (strided) {
      head_stride = c.head_dim;
      row_stride = static_cast<int64_t>(heads) * c.head_dim + 3;
      batch_stride = len * row_stride;
    } else {
      row_stride = c.head_dim;
      head_stride = static_cast<int64_t>(len) * c.head_dim;
      batch_stride = heads * head_stride;
    }
    size = c.batch * batch_stride;
  }
  int64_t at(int64_t b, int64_t h, int64_t i, int64_t d) const {
    return b * batch_stride + h * head_stride + i * row_stride + d;
  }
  HeadTensor tensor(Storage& s) const { return HeadTensor{s.data(), batch_stride, head_stride, row_stride}; }
};

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

Reference reference(const Case& c, const Layout& ql, const Layout& kl, const Storage& q, const Storage& k,
                    const Storage& v, const Storage& dout, double scale) {
  const int64_t D = c.head_dim, group = c.heads / c.kv_heads, offset = c.kv_len - c.q_len;
  Reference r;
  r.out.assign(static_cast<size_t>(c.batch) * c.heads * c.q_len * D, 0.0);
  r.lse.assign(static_cast<size_t>(c.batch) * c.heads * c.q_len, 0.0);
  r.dq.assign(r.out.size(), 0.0);
  r.dk.assign(static_cast<size_t>(c.batch) * c.kv_heads * c.kv_len * D, 0.0);
  r.dv.assign(r.dk.size(), 0.0);
  std::vector<double> p(c.kv_len), dp(c.kv_len);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t kh = h / group;
      for (int64_t i = 0; i < c.q_len; ++i) {
        const int64_t visible = i + offset + 1;
        double max = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += q.value(ql.at(b, h, i, d)) * k.value(kl.at(b, kh, j, d));
          p[j] = s * scale;
          max = std::fmax(max, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < visible; ++j) sum += (p[j] = std::exp(p[j] - max));
        const int64_t row = (b * c.heads + h) * c.q_len + i;
        r.lse[row] = max + std::log(sum);
        for (int64_t j = 0; j < visible; ++j) p[j] /= sum;
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < visible; ++j) o += p[j] * v.value(kl.at(b, kh, j, d));
          r.out[row * D + d] = o;
        }
        double delta = 0;
        for (int64_t j = 0; j < visible; ++j) {
          dp[j] = 0;
          for (int64_t d = 0; d < D; ++d) dp[j] += dout.value(ql.at(b, h, i, d)) * v.value(kl.at(b, kh, j, d));
          delta += p[j] * dp[j];
        }
        for (int64_t j = 0; j < visible; ++j) {
          const double ds = p[j] * (dp[j] - delta);
          const int64_t key_row = (b * c.kv_heads + kh) * c.kv_len + j;
          for (int64_t d = 0; d < D; ++d) {
            r.dq[row * D + d] += scale * ds * k.value(kl.at(b, kh, j, d));
            r.dk[key_row * D + d] += scale * ds * q.value(ql.at(b, h, i, d));
            r.dv[key_row * D + d] += p[j] * dout.value(ql.at(b, h, i, d));
          }
        }
      }
    }
  }
  return r;
}

std::vector<double> read(const Storage& s, int64_t count) {
  std::vector<double> values(count);
  for (int64_t i = 0; i < count; ++i) values[i] = s.get(i);
  return values;
}

// grad_tol: the gradients' relative tolerance; by default twice the output's (see below).
void run_case(const Case& c, DType dtype, cpu::Isa isa, std::mt19937& rng, double grad_tol = 0) {
  char name[160];
  std::snprintf(name, sizeof name, "%s %s B=%d H=%d Hkv=%d Tq=%d Tk=%d D=%d%s", cpu::isa_name(isa), dtype_name(dtype),
                c.batch, c.heads, c.kv_heads, c.q_len, c.kv_len, c.head_dim, c.strided ? " strided" : "");
  const Layout ql(c, c.heads, c.q_len, c.strided), kl(c, c.kv_heads, c.kv_len, c.strided);
  const Layout ol(c, c.heads, c.q_len, false), dkl(c, c.kv_heads, c.kv_len, false);
  Storage q(dtype, ql.size), k(dtype, kl.size), v(dtype, kl.size), dout(dtype, ql.size);
  for (Storage* s : {&q, &k, &v, &dout}) s->fill_uniform(rng, -1.5, 1.5);
  Storage out(dtype, ol.size), dq(dtype, ol.size), dk(dtype, dkl.size), dv(dtype, dkl.size);
  std::vector<float> lse(static_cast<size_t>(c.batch) * c.heads * c.q_len, NAN), delta(lse.size(), NAN);
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

  p.dout = ql.tensor(dout);
  p.dq = ol.tensor(dq);
  p.dk = dkl.tensor(dk);
  p.dv = dkl.tensor(dv);
  p.delta = delta.data();
  cpu::attention_backward(p);

  // The backward reads the stored (rounded) output, as autograd does.
  Reference r = reference(c, ql, kl, q, k, v, dout, scale);
  const double tol = tolerance(dtype);
  expect_close(std::string(name) + " out", read(out, ol.size), r.out, tol);
  expect_close(std::string(name) + " lse", std::vector<double>(lse.begin(), lse.end()), r.lse, 2e-5);
  // Gradients go through the rounded output (delta) and more sums: twice the output tolerance, relative
  // to at least the inputs' magnitude (dS = P * (dP - delta) cancels to ~0 when one key is visible).
  if (grad_tol == 0) grad_tol = 2 * tol;
  expect_close(std::string(name) + " dq", read(dq, ol.size), r.dq, grad_tol, 1.0);
  expect_close(std::string(name) + " dk", read(dk, dkl.size), r.dk, grad_tol, 1.0);
  expect_close(std::string(name) + " dv", read(dv, dkl.size), r.dv, grad_tol, 1.0);

  // Bitwise identical gradients on 1 thread, which always runs the per-head schedule, and on all
  // threads, which ran the per-tile schedule above when batch * kv_heads == 1 (on 2+ threads).
  std::vector<double> dq_many = read(dq, ol.size), dk_many = read(dk, dkl.size), dv_many = read(dv, dkl.size);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  cpu::attention_backward(p);
  omp_set_num_threads(threads);
  expect(read(dq, ol.size) == dq_many && read(dk, dkl.size) == dk_many && read(dv, dkl.size) == dv_many,
         std::string(name) + ": gradients differ between thread counts");
}

}  // namespace
}  // namespace fastgpt::test

int main() {
  using namespace fastgpt;
  using namespace fastgpt::test;
  const Case cases[] = {
      {1, 1, 1, 1, 1, 16, false},    {2, 2, 1, 17, 17, 64, true},  {1, 4, 2, 97, 97, 80, false},
      {1, 2, 2, 33, 130, 128, true}, {1, 3, 1, 1, 70, 64, false},  {1, 2, 1, 257, 257, 32, false},
      {2, 1, 1, 65, 200, 24, true},  {1, 1, 1, 130, 130, 256, false},
  };
  // Long sequences in float32, MQA and GQA (q_len < kv_len, a head_dim summed in two chunks): dK and dV
  // sum group * q_len terms per key. Summed in one float32 chain, their largest error at MQA was 1.2e-6
  // to 2.4e-6 of the largest gradient (per instruction set); in float64 accumulators, 2e-7 to 4e-7. The
  // tolerance sits between, 40x below the general one; run_case's thread-count check runs both schedules.
  const Case long_cases[] = {{1, 4, 1, 1024, 1024, 64, false}, {1, 4, 2, 777, 1100, 96, true}};
  std::mt19937 rng(1234);
  for_each_isa([&](cpu::Isa isa) {
    for (const Case& c : cases) {
      for (DType dtype : {DType::kFloat32, DType::kBFloat16}) run_case(c, dtype, isa, rng);
    }
    for (const Case& c : long_cases) run_case(c, DType::kFloat32, isa, rng, 1e-6);
  });
  return report("test_attention");
}
