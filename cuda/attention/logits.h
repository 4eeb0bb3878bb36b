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

// The key mask of one key tile as 64 bits (bit j: key n0 + j exists and is not masked), built
// in two halves so that the byte loads of the next tile are in flight while this one is
// computed: fetch() issues them, bits() turns them into the word (the same in every lane).
struct KeyMaskPrefetch {
  uint8_t lo = 1, hi = 1;  // the bytes of keys n0 + lane and n0 + 32 + lane (0: masked or past S)

  template <int kBlockN>
  CUTE_DEVICE void fetch(const uint8_t* mask, int n0, int S) {
    static_assert(kBlockN == 64, "one 64-bit word per key tile");
    const int j0 = n0 + threadIdx.x % 32, j1 = j0 + 32;
    lo = j0 < S ? (mask ? mask[j0] : uint8_t(1)) : uint8_t(0);
    hi = j1 < S ? (mask ? mask[j1] : uint8_t(1)) : uint8_t(0);
  }
  CUTE_DEVICE uint64_t bits() const {
    return uint64_t(__ballot_sync(0xffffffff, lo != 0)) |
           (uint64_t(__ballot_sync(0xffffffff, hi != 0)) << 32);
  }
};

// Shared tile of the bias: kBlockM rows of kBlockN keys, padded by 8 elements a row so that the
// 8 rows a warp reads at once fall in different banks.
template <int kBlockM, int kBlockN>
struct BiasTileLayout {
  static constexpr int kStride = kBlockN + 8;
  static constexpr int kElems = kBlockM * kStride;
};

// Stages bias[m0 : m0 + kBlockM, n0 : n0 + kBlockN] (rows of S) in shared memory.
template <int kBlockM, int kBlockN, int kNThreads, typename Element>
CUTE_DEVICE void load_bias_tile(Element* sbias, const Element* bias, int m0, int n0, int S, int tid) {
  load_square_tile<kBlockM, kBlockN, BiasTileLayout<kBlockM, kBlockN>::kStride, kNThreads>(
      sbias, bias, m0, n0, S, tid);
}

// Where a thread's bias pairs sit in a staged bias tile. Both readers take the accumulator
// coordinates (r, c) of s, with c even: the pair (row(r), col(c)), (row(r), col(c) + 1).
// PaddedBiasTile: the BiasTileLayout above (rows kBlockN + 8 elements apart).
template <int kBlockN, typename Element>
struct PaddedBiasTile {
  const Element* tile;
  template <int kNWarps>
  CUTE_DEVICE cutlass::Array<Element, 2> pair(AccCoords<kNWarps> const& at, int r, int c) const {
    return *reinterpret_cast<const cutlass::Array<Element, 2>*>(
        tile + at.row(r) * BiasTileLayout<16, kBlockN>::kStride + at.col(c));
  }
};

// Swizzle128BiasTile: rows of 64 16-bit elements (128 bytes) whose 16-byte chunks are permuted
// by chunk ^= row % 8, as TMA's 128-byte swizzle writes them (no padding, no bank conflicts).
// A thread's rows are row0 + 8 k, so row % 8 is the same for all of them.
template <typename Element>
struct Swizzle128BiasTile {
  const Element* tile;
  template <int kNWarps>
  CUTE_DEVICE cutlass::Array<Element, 2> pair(AccCoords<kNWarps> const& at, int r, int c) const {
    const int row = at.row(r);
    const int chunk = (c >> 1) ^ (at.row0 & 7);  // at.col(c) = col0 + 8 (c / 2) + c % 2, col0 < 8
    return *reinterpret_cast<const cutlass::Array<Element, 2>*>(tile + row * 64 + chunk * 8 +
                                                                at.col0);
  }
};

// s: the (rows, cols) view of the fp32 accumulator of Q K^T, replaced by the logits
// scale * q.k + bias[q, k] (natural units), -inf where the key is masked or past S.
// bias: the staged bias tile's reader (unused without kHasBias). valid: the KeyMaskPrefetch
// bits of this tile. The callers exponentiate with one fused multiply-add:
// exp2(x log2(e) - m log2(e)).
// kMasked = false: every key of the tile exists and is unmasked (valid is all ones), so the
// selects are left out.
template <bool kHasBias, bool kMasked = true, int kNWarps, typename BiasTile, typename STensor>
CUTE_DEVICE void logits_tile(STensor& s, AccCoords<kNWarps> const& at, float scale,
                             BiasTile const& bias, uint64_t valid) {
  constexpr int kRows = decltype(size<0>(s))::value;
  constexpr int kCols = decltype(size<1>(s))::value;
  static_assert(kCols == 16, "a thread holds columns col0 + 8 j + {0, 1}, j < 8, of a 64-key tile");
  // This thread's columns sit at bits 8 j + {0, 1} of `mine`: constant positions, one test each.
  const uint64_t mine = valid >> at.col0;
  const uint32_t mine_lo = static_cast<uint32_t>(mine), mine_hi = static_cast<uint32_t>(mine >> 32);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; c += 2) {
      float x0 = s(r, c) * scale, x1 = s(r, c + 1) * scale;
      if constexpr (kHasBias) {
        const auto pair = bias.pair(at, r, c);
        x0 += static_cast<float>(pair[0]);
        x1 += static_cast<float>(pair[1]);
      }
      if constexpr (kMasked) {
        const int bit = (c >> 1) * 8;  // a compile-time constant once unrolled
        const uint32_t word = bit < 32 ? mine_lo : mine_hi;
        x0 = (word >> (bit & 31)) & 1u ? x0 : -INFINITY;
        x1 = (word >> ((bit + 1) & 31)) & 1u ? x1 : -INFINITY;
      }
      s(r, c) = x0;
      s(r, c + 1) = x1;
    }
  }
}

// logits_tile with the bias and mask branches taken once per tile (a null tile: no bias; a
// tile whose 64 keys are all there and unmasked, as most are with AlphaFold's padding masks:
// no selects). `valid` is the same in every lane, so the branches do not diverge.
template <int kNWarps, typename BiasTile, typename STensor>
CUTE_DEVICE void logits_from(STensor& s, AccCoords<kNWarps> const& at, float scale,
                             BiasTile const& bias, uint64_t valid) {
  const bool all_valid = valid == ~uint64_t(0);
  if (bias.tile != nullptr) {
    if (all_valid) {
      logits_tile<true, false>(s, at, scale, bias, valid);
    } else {
      logits_tile<true, true>(s, at, scale, bias, valid);
    }
  } else if (all_valid) {
    logits_tile<false, false>(s, at, scale, bias, valid);
  } else {
    logits_tile<false, true>(s, at, scale, bias, valid);
  }
}

// The padded-tile form the sm80 kernels use: `sbias` is the staged tile or nullptr; the bias
// branch only (their register budgets were tuned without the unmasked variants).
template <int kNWarps, typename Element, typename STensor>
CUTE_DEVICE void logits(STensor& s, AccCoords<kNWarps> const& at, float scale, const Element* sbias,
                        uint64_t valid) {
  const PaddedBiasTile<decltype(size<1>(s))::value * 4, Element> bias{sbias};
  if (sbias != nullptr) {
    logits_tile<true>(s, at, scale, bias, valid);
  } else {
    logits_tile<false>(s, at, scale, bias, valid);
  }
}

}  // namespace jevo
