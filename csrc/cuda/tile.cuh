// Shared-memory tiles and the mma.sync m16n8k16 fragment layouts, shared by every tensor-core kernel.
//
// Fragments of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), for lane l with
// g = l / 4 and t = l % 4, each register holding two 16-bit elements (lower column/k in the low half):
//   A (16x16, rows m, cols k):  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..2t+1)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B (16x8, rows k, cols n):   b0 = (k 2t..2t+1, n g)   b1 = (k 2t+8..2t+9, n g)
//   C (16x8 float32):           c0, c1 = (g, 2t..2t+1)   c2, c3 = (g+8, 2t..2t+1)
// The layout helpers below are __host__ __device__ so that csrc/dev/index_checks.cu can check them
// on the CPU against a model of ldmatrix and mma.
#pragma once

#include <cstdint>

#include "mma.cuh"

namespace fastgpt::cuda {

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles

// A kRows x kCols tile of 16-bit elements, stored as 16-byte chunks of 8 elements, so that cp.async
// writes whole chunks and each ldmatrix phase (8 lanes, one 16-byte row each, the same logical chunk
// of 8 consecutive tile rows) touches 8 distinct 16-byte bank groups:
//   rows of 8k chunks: chunk c of row r is stored at c ^ (r % 8)          (XOR swizzle, no padding)
//   rows of 4 chunks:  chunk c of row r is stored at c ^ ((r / 2) % 4)    (two rows share 128 bytes)
//   other even counts: rows are padded by one chunk (an odd stride in chunks)
template <int kRows_, int kCols_>
struct SmemTile {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr bool kXor8 = kChunksPerRow % 8 == 0;
  static constexpr bool kXor4 = kChunksPerRow == 4;
  static constexpr int kRowStride = (kXor8 || kXor4) ? kChunksPerRow : kChunksPerRow + 1;  // in chunks
  static constexpr int kBytes = kRows * kRowStride * 16;
  static_assert(kCols % 8 == 0, "tiles are made of 16-byte chunks");
  static_assert(kRows % 8 == 0, "the swizzles assume tiles of whole 8-row groups");
  static_assert(kXor8 || kXor4 || kChunksPerRow % 2 == 0, "a padded row needs an odd stride in chunks");

  // Byte offset, from the tile start, of logical chunk `chunk` of row `row`.
  __host__ __device__ static constexpr int chunk_offset(int row, int chunk) {
    if constexpr (kXor8) {
      return 16 * (row * kRowStride + (chunk ^ (row & 7)));
    } else if constexpr (kXor4) {
      return 16 * (row * kRowStride + (chunk ^ ((row >> 1) & 3)));
    } else {
      return 16 * (row * kRowStride + chunk);
    }
  }

  // Byte offset of element (row, col).
  __host__ __device__ static constexpr int element_offset(int row, int col) {
    return chunk_offset(row, col >> 3) + 2 * (col & 7);
  }
};

// ---------------------------------------------------------------------------------------------
// ldmatrix.x4 lane addresses: which tile row and chunk (relative to the 16x16 block being loaded) lane
// `lane` points at.

struct LaneOffset {
  int row;
  int chunk;
};

// Lanes 0-15 point at rows 0-15 of chunk 0, lanes 16-31 at rows 0-15 of chunk 1.
//   plain, on a tile stored [m][k]:  the A fragment of the 16x16 block
//   .trans, on a tile stored [k][n]: B fragments of two n8 tiles, {r0, r1} for n 0-7, {r2, r3} for n 8-15
__host__ __device__ constexpr LaneOffset ldmatrix_rows16(int lane) { return {lane & 15, lane >> 4}; }

// Lanes 0-7 point at rows 0-7 of chunk 0, 8-15 at rows 0-7 of chunk 1, 16-23 at rows 8-15 of chunk 0,
// 24-31 at rows 8-15 of chunk 1.
//   plain, on a tile stored [n][k]:  B fragments of two n8 tiles, {r0, r1} for rows 0-7, {r2, r3} rows 8-15
//   .trans, on a tile stored [k][m]: the A fragment of the 16x16 block
__host__ __device__ constexpr LaneOffset ldmatrix_rows8(int lane) { return {(lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1}; }

// Position of element e (0..3) of a 16x8 accumulator fragment held by `lane`.
__host__ __device__ constexpr int accumulator_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
__host__ __device__ constexpr int accumulator_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

// The A fragment (16x16) formed by two adjacent 16x8 accumulator tiles, `left` holding k 0-7 and
// `right` k 8-15: how P and dS are fed back into the tensor cores without leaving registers.
template <typename T>
__host__ __device__ inline void accumulators_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack_pair<T>(left[0], left[1]);
  a[1] = pack_pair<T>(left[2], left[3]);
  a[2] = pack_pair<T>(right[0], right[1]);
  a[3] = pack_pair<T>(right[2], right[3]);
}

// ---------------------------------------------------------------------------------------------
// Fragment addresses: the byte offset within the tile that lane `lane` hands to ldmatrix.x4. Block
// origins are multiples of 16 rows and of 16 columns (two chunks).

// A fragment of the 16x16 block at (row0, col0) of a tile stored [m][k] (plain ldmatrix).
template <class Tile>
__host__ __device__ constexpr int a_fragment_offset(int row0, int col0, int lane) {
  const LaneOffset o = ldmatrix_rows16(lane);
  return Tile::chunk_offset(row0 + o.row, (col0 >> 3) + o.chunk);
}

// A fragment of the 16x16 block (m0.., k0..) of a tile stored [k][m], a transposed operand (.trans).
template <class Tile>
__host__ __device__ constexpr int a_transposed_fragment_offset(int m0, int k0, int lane) {
  const LaneOffset o = ldmatrix_rows8(lane);
  return Tile::chunk_offset(k0 + o.row, (m0 >> 3) + o.chunk);
}

// B fragments of the n8 tiles n0.. and n0+8.. over k0..k0+15 of a tile stored [n][k] (plain):
// registers 0, 1 for the first, 2, 3 for the second.
template <class Tile>
__host__ __device__ constexpr int b_pair_offset(int n0, int k0, int lane) {
  const LaneOffset o = ldmatrix_rows8(lane);
  return Tile::chunk_offset(n0 + o.row, (k0 >> 3) + o.chunk);
}

// The same two B fragments from a tile stored [k][n] (.trans).
template <class Tile>
__host__ __device__ constexpr int b_pair_transposed_offset(int n0, int k0, int lane) {
  const LaneOffset o = ldmatrix_rows16(lane);
  return Tile::chunk_offset(k0 + o.row, (n0 >> 3) + o.chunk);
}

#if defined(__CUDACC__)

// ---------------------------------------------------------------------------------------------
// Fragment loads (`tile` is the tile's shared-memory address).

template <class Tile>
__device__ inline void load_a(uint32_t (&a)[4], uint32_t tile, int row0, int col0, int lane) {
  ldmatrix_x4(a, tile + a_fragment_offset<Tile>(row0, col0, lane));
}

template <class Tile>
__device__ inline void load_a_transposed(uint32_t (&a)[4], uint32_t tile, int m0, int k0, int lane) {
  ldmatrix_x4_trans(a, tile + a_transposed_fragment_offset<Tile>(m0, k0, lane));
}

template <class Tile>
__device__ inline void load_b_pair(uint32_t (&b)[4], uint32_t tile, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + b_pair_offset<Tile>(n0, k0, lane));
}

template <class Tile>
__device__ inline void load_b_pair_transposed(uint32_t (&b)[4], uint32_t tile, int n0, int k0, int lane) {
  ldmatrix_x4_trans(b, tile + b_pair_transposed_offset<Tile>(n0, k0, lane));
}

// ---------------------------------------------------------------------------------------------
// Global <-> shared tile copies

// Starts the copy of a global tile into `tile` with cp.async, all kThreads threads taking part: rows
// [0, valid_rows) and chunks [0, valid_chunks) are read from `src` (row r at src + r * row_stride,
// 16-byte aligned), everything else is zero-filled. `src` must point inside the tensor.
template <class Tile, int kThreads, typename T>
__device__ inline void copy_tile_async(uint32_t tile, const T* src, int64_t row_stride, int valid_rows,
                                       int valid_chunks, int tid) {
  constexpr int kChunks = Tile::kRows * Tile::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < ceil_div(kChunks, kThreads); ++i) {
    const int index = tid + i * kThreads;
    if (kChunks % kThreads == 0 || index < kChunks) {
      const int row = index / Tile::kChunksPerRow;
      const int chunk = index % Tile::kChunksPerRow;
      const bool valid = row < valid_rows && chunk < valid_chunks;
      const T* from = valid ? src + row * row_stride + chunk * 8 : src;
      cp_async_16(tile + Tile::chunk_offset(row, chunk), from, valid);
    }
  }
}

// Writes rows [row0, row0 + kRows) of a shared tile to global memory (row r of the tile goes to
// dst + (r - row0) * row_stride) with 16-byte stores, by the `kLanes` threads numbered `lane`; rows at
// or beyond valid_rows (counted from row0) and chunks at or beyond valid_chunks are skipped.
template <class Tile, int kRows, int kLanes, typename T>
__device__ inline void store_tile_rows(T* dst, int64_t row_stride, const uint8_t* tile, int row0, int valid_rows,
                                       int valid_chunks, int lane) {
  constexpr int kChunks = kRows * Tile::kChunksPerRow;
  static_assert(kChunks % kLanes == 0, "every lane stores the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kLanes; ++i) {
    const int index = lane + i * kLanes;
    const int row = index / Tile::kChunksPerRow;
    const int chunk = index % Tile::kChunksPerRow;
    if (row < valid_rows && chunk < valid_chunks) {
      const uint4 value = *reinterpret_cast<const uint4*>(tile + Tile::chunk_offset(row0 + row, chunk));
      *reinterpret_cast<uint4*>(dst + row * row_stride + chunk * 8) = value;
    }
  }
}

// Stores a 16x8 float32 accumulator tile, rounded to T, at (row0, col0) of a shared tile.
template <class Tile, typename T>
__device__ inline void store_accumulators(uint8_t* tile, const float (&c)[4], int row0, int col0, int lane) {
  const int row = row0 + accumulator_row(lane, 0);
  const int col = col0 + accumulator_col(lane, 0);
  *reinterpret_cast<uint32_t*>(tile + Tile::element_offset(row, col)) = pack_pair<T>(c[0], c[1]);
  *reinterpret_cast<uint32_t*>(tile + Tile::element_offset(row + 8, col)) = pack_pair<T>(c[2], c[3]);
}

#endif  // __CUDACC__

}  // namespace fastgpt::cuda
