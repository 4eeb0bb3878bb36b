// The logits of one [kBlockM queries, kBlockN keys] tile, as every kernel recomputes them:
// scale * q.k + bias[q, k] in the log2 domain, -inf where the key is masked or past S.
// The bias tile is staged in shared memory (coalesced loads, read back without bank
// conflicts); the key mask of a tile is one 64-bit word per warp, built with a ballot.
#pragma once

#include "attention/tile_utils.h"

namespace jevo {

// Where the accumulator values of this thread sit in an m16n8k16 tile of kNWarps warps stacked
// along M (checked against CuTe's partition of an identity tensor): row-major (rows, cols)
// view indices r, c as given by acc_rowcol_layout.
template <int kNWarps>
struct AccCoords {
  int row0, col0;
  CUTE_DEVICE explicit AccCoords(int tid)
      : row0((tid / 32) * 16 + (tid % 32) / 4), col0((tid % 4) * 2) {}
  CUTE_DEVICE int row(int r) const { return row0 + 8 * (r & 1) + 16 * kNWarps * (r >> 1); }
  CUTE_DEVICE int col(int c) const { return col0 + (c >> 1) * 8 + (c & 1); }
};

// Bit j set when key n0 + j exists and is not masked; the same value in every lane of the warp.
template <int kBlockN>
CUTE_DEVICE uint64_t key_valid_bits(const uint8_t* mask, int n0, int S) {
  static_assert(kBlockN == 64, "one 64-bit word per key tile");
  const int lane = threadIdx.x % 32;
  const int j0 = n0 + lane, j1 = n0 + 32 + lane;
  const bool v0 = j0 < S && (mask == nullptr || mask[j0] != 0);
  const bool v1 = j1 < S && (mask == nullptr || mask[j1] != 0);
  return uint64_t(__ballot_sync(0xffffffff, v0)) | (uint64_t(__ballot_sync(0xffffffff, v1)) << 32);
}

// Shared tile of the bias: kBlockM rows of kBlockN keys, padded by 8 elements a row so that the
// 8 rows a warp reads at once fall in different banks.
template <int kBlockM, int kBlockN>
struct BiasTileLayout {
  static constexpr int kStride = kBlockN + 8;
  static constexpr int kElems = kBlockM * kStride;
};

// Stages bias[m0 : m0 + kBlockM, n0 : n0 + kBlockN] (rows of S) in shared memory. 16-byte
// cp.async when every row start is 16-byte aligned (S % 8 == 0), plain loads otherwise.
template <int kBlockM, int kBlockN, int kNThreads, typename Element>
CUTE_DEVICE void load_bias_tile(Element* sbias, const Element* bias, int m0, int n0, int S, int tid) {
  using Layout = BiasTileLayout<kBlockM, kBlockN>;
  if (S % 8 == 0) {
    constexpr int kChunksPerRow = kBlockN / 8;
    using Copy = SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>;
#pragma unroll
    for (int c = tid; c < kBlockM * kChunksPerRow; c += kNThreads) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = m0 + r < S && n0 + col < S;
      const Element* src = valid ? bias + int64_t(m0 + r) * S + n0 + col : bias;
      Copy::copy(*reinterpret_cast<const uint128_t*>(src),
                 *reinterpret_cast<uint128_t*>(sbias + r * Layout::kStride + col), valid);
    }
  } else {
    for (int e = tid; e < kBlockM * kBlockN; e += kNThreads) {
      const int r = e / kBlockN, col = e % kBlockN;
      const bool valid = m0 + r < S && n0 + col < S;
      sbias[r * Layout::kStride + col] = valid ? bias[int64_t(m0 + r) * S + n0 + col] : Element(0.f);
    }
  }
}

// s: the (rows, cols) view of the fp32 accumulator of Q K^T. sbias: the staged bias tile or
// nullptr. valid: key_valid_bits of this tile.
template <int kNWarps, typename Element, typename STensor>
CUTE_DEVICE void logits_log2(STensor& s, AccCoords<kNWarps> const& at, float scale_log2,
                             const Element* sbias, uint64_t valid) {
  constexpr int kRows = decltype(size<0>(s))::value;
  constexpr int kCols = decltype(size<1>(s))::value;
  constexpr int kStride = kCols * 4 + 8;  // BiasTileLayout<., kBlockN>::kStride, kCols = kBlockN / 4
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; c += 2) {
      const int col = at.col(c);
      float x0 = s(r, c) * scale_log2, x1 = s(r, c + 1) * scale_log2;
      if (sbias) {
        const auto pair = *reinterpret_cast<const cutlass::Array<Element, 2>*>(
            sbias + at.row(r) * kStride + col);
        x0 += static_cast<float>(pair[0]) * kLog2e;
        x1 += static_cast<float>(pair[1]) * kLog2e;
      }
      s(r, c) = (valid >> col) & 1 ? x0 : -INFINITY;
      s(r, c + 1) = (valid >> (col + 1)) & 1 ? x1 : -INFINITY;
    }
  }
}

}  // namespace jevo
