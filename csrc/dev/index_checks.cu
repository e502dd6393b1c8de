/*
Checks, on the CPU (no GPU needed), the index arithmetic of the csrc/cuda kernels:
- the shared-memory tiles and mma.sync fragment addressing of tile.cuh for every tile shape the
  attention and GEMM kernels use: the real address functions feed a model of ldmatrix.x4 (plain and
  .trans) and of mma.m16n8k16 written from the PTX ISA, and the warp-level products must equal the
  products computed directly; every swizzle is a bijection, and ldmatrix phases and accumulator stores
  are free of shared-memory bank conflicts;
- the causal block ranges of attention.cuh: the blocks each kernel visits hold every visible key (or
  query), and the blocks or tiles it leaves unmasked need no mask.

Compile and run (from csrc/dev; tests/test_cuda_compile.py does this):
  nvcc -std=c++17 -O1 index_checks.cu -o index_checks && ./index_checks
*/
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

#include "../cuda/attention.cuh"
#include "../cuda/gemm.cuh"
#include "../cuda/tile.cuh"

using namespace fastgpt::cuda;
using Bf16 = __nv_bfloat16;

static int failures = 0;

static void check(bool ok, const char* what, const char* detail) {
  if (!ok) {
    ++failures;
    if (failures <= 20) printf("FAIL %s: %s\n", what, detail);
  }
}

// ---- A shared-memory tile image holding a logical (rows x cols) matrix of small integers ----------

template <class Tile>
struct TileImage {
  std::vector<uint8_t> bytes = std::vector<uint8_t>(Tile::kBytes, 0xff);
  std::vector<float> logical = std::vector<float>(Tile::kRows * Tile::kCols);

  explicit TileImage(std::mt19937& rng) {
    std::uniform_int_distribution<int> value(-8, 8);  // exact in bfloat16, and so are the products' sums
    for (int r = 0; r < Tile::kRows; ++r) {
      for (int c = 0; c < Tile::kCols; ++c) {
        const float v = static_cast<float>(value(rng));
        logical[r * Tile::kCols + c] = v;
        const Bf16 b = __float2bfloat16(v);
        memcpy(bytes.data() + Tile::element_offset(r, c), &b, 2);
      }
    }
  }
  float at(int r, int c) const { return logical[r * Tile::kCols + c]; }
};

// ---- Models of the instructions (PTX ISA) ------------------------------------------------------------

static uint16_t element_at(const std::vector<uint8_t>& smem, int row_offset, int col) {
  uint16_t v;
  memcpy(&v, smem.data() + row_offset + 2 * col, 2);
  return v;
}

// ldmatrix.x4: lanes 8i..8i+7 address the rows of matrix i; register i of lane l gets
// (row l/4, cols 2(l%4), +1) plain, or (rows 2(l%4), +1, col l/4) with .trans.
static void ldmatrix_model(const std::vector<uint8_t>& smem, const int (&offsets)[32], bool trans, uint32_t (&regs)[32][4]) {
  for (int i = 0; i < 4; ++i) {
    for (int l = 0; l < 32; ++l) {
      uint16_t lo, hi;
      if (!trans) {
        lo = element_at(smem, offsets[8 * i + l / 4], 2 * (l % 4));
        hi = element_at(smem, offsets[8 * i + l / 4], 2 * (l % 4) + 1);
      } else {
        lo = element_at(smem, offsets[8 * i + 2 * (l % 4)], l / 4);
        hi = element_at(smem, offsets[8 * i + 2 * (l % 4) + 1], l / 4);
      }
      regs[l][i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

static float low(uint32_t v) {
  float lo, hi;
  unpack_pair<Bf16>(v, lo, hi);
  return lo;
}
static float high(uint32_t v) {
  float lo, hi;
  unpack_pair<Bf16>(v, lo, hi);
  return hi;
}

// d += a (16x16) @ b (16x8) with the m16n8k16 fragment layouts.
static void mma_model(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], float (&d)[32][4]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    A[g][2 * t] = low(a[l][0]), A[g][2 * t + 1] = high(a[l][0]);
    A[g + 8][2 * t] = low(a[l][1]), A[g + 8][2 * t + 1] = high(a[l][1]);
    A[g][2 * t + 8] = low(a[l][2]), A[g][2 * t + 9] = high(a[l][2]);
    A[g + 8][2 * t + 8] = low(a[l][3]), A[g + 8][2 * t + 9] = high(a[l][3]);
    B[2 * t][g] = low(b[l][0]), B[2 * t + 1][g] = high(b[l][0]);
    B[2 * t + 8][g] = low(b[l][1]), B[2 * t + 9][g] = high(b[l][1]);
  }
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 4; ++e) {
      const int row = l / 4 + 8 * (e / 2), col = 2 * (l % 4) + e % 2;
      for (int k = 0; k < 16; ++k) d[l][e] += A[row][k] * B[k][col];
    }
  }
}

static void split_pair(const uint32_t (&pair)[32][4], uint32_t (&first)[32][2], uint32_t (&second)[32][2]) {
  for (int l = 0; l < 32; ++l) {
    first[l][0] = pair[l][0], first[l][1] = pair[l][1];
    second[l][0] = pair[l][2], second[l][1] = pair[l][3];
  }
}

// ---- Layout checks -------------------------------------------------------------------------------

template <class Tile>
static void check_tile_layout(const char* name) {
  std::set<int> seen;
  bool ok = true;
  for (int r = 0; r < Tile::kRows; ++r) {
    for (int c = 0; c < Tile::kChunksPerRow; ++c) {
      const int offset = Tile::chunk_offset(r, c);
      ok = ok && offset % 16 == 0 && offset >= 0 && offset + 16 <= Tile::kBytes && seen.insert(offset).second;
    }
  }
  check(ok, name, "chunk_offset is not a bijection onto 16-byte chunks inside the tile");
}

// The 8 lanes of each ldmatrix phase must hit 8 distinct 16-byte bank groups.
template <class Tile, class OffsetFunction>
static void check_conflict_free(const char* name, OffsetFunction offset, int rows_step, int cols_step) {
  for (int r0 = 0; r0 + rows_step <= Tile::kRows; r0 += 16) {
    for (int c0 = 0; c0 + cols_step <= Tile::kCols; c0 += 16) {
      for (int i = 0; i < 4; ++i) {
        std::set<int> groups;
        for (int l = 8 * i; l < 8 * i + 8; ++l) groups.insert((offset(r0, c0, l) / 16) % 8);
        check(groups.size() == 8, name, "an ldmatrix phase has a shared-memory bank conflict");
      }
    }
  }
}

// store_accumulators: the 32 lanes' 4-byte stores hit 32 distinct banks.
template <class Tile>
static void check_accumulator_stores(const char* name) {
  for (int r0 = 0; r0 + 16 <= Tile::kRows; r0 += 16) {
    for (int c0 = 0; c0 + 8 <= Tile::kCols; c0 += 8) {
      for (int half = 0; half < 2; ++half) {
        std::set<int> banks;
        for (int l = 0; l < 32; ++l) {
          const int offset = Tile::element_offset(r0 + accumulator_row(l, 2 * half), c0 + accumulator_col(l, 0));
          banks.insert((offset / 4) % 32);
        }
        check(banks.size() == 32, name, "accumulator stores have a shared-memory bank conflict");
      }
    }
  }
}

// ---- Warp products through the real address functions ------------------------------------------

// A is logically (m, k), stored [m][k] or, transposed, [k][m]; B is logically (n, k), stored [n][k] or,
// transposed, [k][n]. Checks the 16 x 16 output block (m0, n0) of A @ B^T over the whole k extent.
template <class ATile, bool kATransposed, class BTile, bool kBTransposed>
static void check_product(const char* name, int m0, int n0, int k_extent, std::mt19937& rng) {
  const TileImage<ATile> a_image(rng);
  const TileImage<BTile> b_image(rng);
  auto a_at = [&](int m, int k) { return kATransposed ? a_image.at(k, m) : a_image.at(m, k); };
  auto b_at = [&](int n, int k) { return kBTransposed ? b_image.at(k, n) : b_image.at(n, k); };
  float d[2][32][4] = {};
  for (int k0 = 0; k0 < k_extent; k0 += 16) {
    int a_offsets[32], b_offsets[32];
    for (int l = 0; l < 32; ++l) {
      a_offsets[l] = kATransposed ? a_transposed_fragment_offset<ATile>(m0, k0, l) : a_fragment_offset<ATile>(m0, k0, l);
      b_offsets[l] = kBTransposed ? b_pair_transposed_offset<BTile>(n0, k0, l) : b_pair_offset<BTile>(n0, k0, l);
    }
    uint32_t a[32][4], b[32][4], b_first[32][2], b_second[32][2];
    ldmatrix_model(a_image.bytes, a_offsets, kATransposed, a);
    ldmatrix_model(b_image.bytes, b_offsets, kBTransposed, b);
    split_pair(b, b_first, b_second);
    mma_model(a, b_first, d[0]);
    mma_model(a, b_second, d[1]);
  }
  bool ok = true;
  for (int j = 0; j < 2; ++j) {
    for (int l = 0; l < 32; ++l) {
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + accumulator_row(l, e), n = n0 + 8 * j + accumulator_col(l, e);
        float expected = 0.0f;
        for (int k = 0; k < k_extent; ++k) expected += a_at(m, k) * b_at(n, k);
        ok = ok && d[j][l][e] == expected;
      }
    }
  }
  check(ok, name, "the warp product differs from the direct product");
}

// P (or dS) in accumulator registers (two adjacent n8 tiles) fed back as the A operand through
// accumulators_to_a, times B from a tile: the P @ V, P^T @ dO, dS^T @ Q and dS @ K products.
template <class BTile, bool kBTransposed>
static void check_accumulator_product(const char* name, int n0, int k0, std::mt19937& rng) {
  const TileImage<BTile> b_image(rng);
  auto b_at = [&](int n, int k) { return kBTransposed ? b_image.at(k, n) : b_image.at(n, k); };
  std::uniform_int_distribution<int> value(-8, 8);
  float p[16][16];
  for (auto& row : p)
    for (float& v : row) v = static_cast<float>(value(rng));
  float left[32][4], right[32][4];
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 4; ++e) {
      left[l][e] = p[accumulator_row(l, e)][accumulator_col(l, e)];
      right[l][e] = p[accumulator_row(l, e)][8 + accumulator_col(l, e)];
    }
  }
  uint32_t a[32][4];
  for (int l = 0; l < 32; ++l) accumulators_to_a<Bf16>(a[l], left[l], right[l]);
  int b_offsets[32];
  for (int l = 0; l < 32; ++l) {
    b_offsets[l] = kBTransposed ? b_pair_transposed_offset<BTile>(n0, k0, l) : b_pair_offset<BTile>(n0, k0, l);
  }
  uint32_t b[32][4], b_first[32][2], b_second[32][2];
  ldmatrix_model(b_image.bytes, b_offsets, kBTransposed, b);
  split_pair(b, b_first, b_second);
  float d[2][32][4] = {};
  mma_model(a, b_first, d[0]);
  mma_model(a, b_second, d[1]);
  bool ok = true;
  for (int j = 0; j < 2; ++j) {
    for (int l = 0; l < 32; ++l) {
      for (int e = 0; e < 4; ++e) {
        const int m = accumulator_row(l, e), n = n0 + 8 * j + accumulator_col(l, e);
        float expected = 0.0f;
        for (int k = 0; k < 16; ++k) expected += p[m][k] * b_at(n, k0 + k);
        ok = ok && d[j][l][e] == expected;
      }
    }
  }
  check(ok, name, "the accumulator-fed product differs from the direct product");
}

// ---- Every tile of every kernel ------------------------------------------------------------------

template <class Tile>
static void check_tile(const char* name) {
  check_tile_layout<Tile>(name);
  check_accumulator_stores<Tile>(name);
  // Plain loads (A of [m][k], B pairs of [n][k]) and transposed ones (B pairs of [k][n], A of [k][m]).
  check_conflict_free<Tile>(name, [](int r0, int c0, int l) { return a_fragment_offset<Tile>(r0, c0, l); }, 16, 16);
  check_conflict_free<Tile>(name, [](int r0, int c0, int l) { return b_pair_offset<Tile>(r0, c0, l); }, 16, 16);
  check_conflict_free<Tile>(name, [](int r0, int c0, int l) { return b_pair_transposed_offset<Tile>(c0, r0, l); }, 16, 16);
  check_conflict_free<Tile>(name, [](int r0, int c0, int l) { return a_transposed_fragment_offset<Tile>(c0, r0, l); }, 16, 16);
}

template <int kHeadDim>
static void check_attention(std::mt19937& rng) {
  char name[96];
  using Fwd = ForwardTiles<kHeadDim>;
  using KV = BackwardKVTiles<kHeadDim>;
  using Q = BackwardQTiles<kHeadDim>;
  snprintf(name, sizeof(name), "forward Q tile, head_dim %d", kHeadDim);
  check_tile<typename Fwd::QTile>(name);
  snprintf(name, sizeof(name), "forward K/V tile, head_dim %d", kHeadDim);
  check_tile<typename Fwd::KVTile>(name);
  snprintf(name, sizeof(name), "backward tiles, head_dim %d", kHeadDim);
  check_tile<typename KV::KVTile>(name);
  check_tile<typename KV::QTile>(name);
  check_tile<typename Q::QTile>(name);
  check_tile<typename Q::KVTile>(name);

  // Forward: S = Q K^T for each warp's m16 tiles; O += P V.
  for (int m0 = 0; m0 < Fwd::kBlockM; m0 += 16) {
    for (int n0 = 0; n0 < Fwd::kBlockN; n0 += 16) {
      snprintf(name, sizeof(name), "forward S = Q K^T, head_dim %d", kHeadDim);
      check_product<typename Fwd::QTile, false, typename Fwd::KVTile, false>(name, m0, n0, kHeadDim, rng);
    }
  }
  for (int k0 = 0; k0 < Fwd::kBlockN; k0 += 16) {
    for (int n0 = 0; n0 < kHeadDim; n0 += 16) {
      snprintf(name, sizeof(name), "forward O += P V, head_dim %d", kHeadDim);
      check_accumulator_product<typename Fwd::KVTile, true>(name, n0, k0, rng);
    }
  }
  // dK/dV kernel: S^T = K Q^T and dP^T = V dO^T; dV += P^T dO and dK += dS^T Q.
  for (int m0 = 0; m0 < KV::kBlockN; m0 += 16) {
    for (int n0 = 0; n0 < KV::kBlockM; n0 += 16) {
      snprintf(name, sizeof(name), "backward S^T = K Q^T, head_dim %d", kHeadDim);
      check_product<typename KV::KVTile, false, typename KV::QTile, false>(name, m0, n0, kHeadDim, rng);
    }
  }
  for (int k0 = 0; k0 < KV::kBlockM; k0 += 16) {
    for (int n0 = 0; n0 < kHeadDim; n0 += 16) {
      snprintf(name, sizeof(name), "backward dV += P^T dO, head_dim %d", kHeadDim);
      check_accumulator_product<typename KV::QTile, true>(name, n0, k0, rng);
    }
  }
  // dQ kernel: S = Q K^T, dP = dO V^T; dQ += dS K.
  for (int m0 = 0; m0 < Q::kBlockM; m0 += 16) {
    for (int n0 = 0; n0 < Q::kBlockN; n0 += 16) {
      snprintf(name, sizeof(name), "backward S = Q K^T (dQ), head_dim %d", kHeadDim);
      check_product<typename Q::QTile, false, typename Q::KVTile, false>(name, m0, n0, kHeadDim, rng);
    }
  }
  for (int k0 = 0; k0 < Q::kBlockN; k0 += 16) {
    for (int n0 = 0; n0 < kHeadDim; n0 += 16) {
      snprintf(name, sizeof(name), "backward dQ += dS K, head_dim %d", kHeadDim);
      check_accumulator_product<typename Q::KVTile, true>(name, n0, k0, rng);
    }
  }
}

// ---- Causal block ranges -------------------------------------------------------------------------

// Query side (forward and dQ kernels): the KV blocks visited hold every key a stored row sees, the last
// one is needed, and the leading unmasked blocks are entirely visible to every stored row. Key side
// (dK/dV kernel): the query blocks skipped see no key of the block, and tiles left unmasked hold only
// valid, visible (query, key) pairs.
static void check_causal_ranges(const char* name, int block_m, int block_n) {
  for (int q_len : {1, 2, 17, 63, 64, 65, 97, 128, 129, 257, 300}) {
    for (int extra : {0, 1, 2, 5, 31, 62, 63, 64, 65, 126, 127, 200}) {
      const int kv_len = q_len + extra, diagonal = extra;
      for (int q0 = 0; q0 < q_len; q0 += block_m) {
        const int num_blocks = causal_kv_blocks(q0, block_m, block_n, kv_len, diagonal);
        const int num_unmasked = causal_unmasked_blocks(q0, block_n, num_blocks, diagonal);
        const int rows_end = std::min(q0 + block_m, q_len);
        bool ok = num_blocks * block_n >= rows_end + diagonal && (num_blocks - 1) * block_n <= rows_end - 1 + diagonal;
        for (int b = 0; b < num_unmasked; ++b) {
          for (int i = q0; i < rows_end; ++i) {
            for (int j = b * block_n; j < (b + 1) * block_n; ++j) ok = ok && j < kv_len && j <= i + diagonal;
          }
        }
        check(ok, name, "the KV blocks visited or left unmasked by a query block are wrong");
      }
      for (int k0 = 0; k0 < kv_len; k0 += block_n) {
        const int first = causal_first_q_block(k0, block_m, diagonal);
        const int keys_end = std::min(k0 + block_n, kv_len);
        bool ok = first * block_m <= q_len - 1 && k0 <= q_len - 1 + diagonal;
        for (int i = 0; i < first * block_m; ++i) ok = ok && k0 > i + diagonal;
        for (int q0 = first * block_m; q0 < q_len; q0 += block_m) {
          if (causal_tile_needs_mask(q0, block_m, k0, block_n, q_len, kv_len, diagonal)) continue;
          for (int i = q0; i < q0 + block_m; ++i) {
            for (int j = k0; j < k0 + block_n; ++j) ok = ok && i < q_len && j < keys_end && j <= i + diagonal;
          }
        }
        check(ok, name, "the query blocks visited or left unmasked by a key block are wrong");
      }
    }
  }
}

template <bool kATransposed, bool kBTransposed>
static void check_gemm(std::mt19937& rng) {
  using gemm_config::OperandTile;
  char name[96];
  snprintf(name, sizeof(name), "GEMM a%s b%s", kATransposed ? "^T" : "", kBTransposed ? "^T" : "");
  for (int m0 = 0; m0 < gemm_config::kBlockM; m0 += 16) {
    for (int n0 = 0; n0 < gemm_config::kBlockN; n0 += 16) {
      check_product<OperandTile<kATransposed>, kATransposed, OperandTile<kBTransposed>, kBTransposed>(
          name, m0, n0, gemm_config::kBlockK, rng);
    }
  }
}

int main() {
  std::mt19937 rng(1234);
  // Rows of a quad of lanes: the softmax reduces a row with xor-shuffles over lanes 1 and 2.
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 4; ++e) {
      check(accumulator_row(l, e) == accumulator_row(l ^ 1, e) && accumulator_row(l, e) == accumulator_row(l ^ 2, e) &&
                accumulator_row(l, e) == accumulator_row(l, e ^ 1),
            "accumulator rows", "a row is not held by one quad of lanes");
    }
  }
  check_attention<32>(rng);
  check_attention<64>(rng);
  check_attention<96>(rng);
  check_attention<128>(rng);
  check_causal_ranges("forward block ranges", ForwardTiles<128>::kBlockM, ForwardTiles<128>::kBlockN);
  check_causal_ranges("dK/dV block ranges", BackwardKVTiles<128>::kBlockM, BackwardKVTiles<128>::kBlockN);
  check_causal_ranges("dQ block ranges", BackwardQTiles<128>::kBlockM, BackwardQTiles<128>::kBlockN);
  check_tile<gemm_config::OperandTile<false>>("GEMM K-major tile");
  check_tile<gemm_config::OperandTile<true>>("GEMM transposed tile");
  check_gemm<false, false>(rng);
  check_gemm<false, true>(rng);
  check_gemm<true, false>(rng);
  check_gemm<true, true>(rng);
  if (failures != 0) {
    printf("%d index check(s) failed\n", failures);
    return 1;
  }
  printf("all index checks passed\n");
  return 0;
}
