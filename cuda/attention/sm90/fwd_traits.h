// Tile shapes, shared-memory layouts and tensor-core instructions of the sm_90a forward kernel.
// One warpgroup (128 threads) owns a tile of 64 queries; both matrix products are wgmma:
// S = Q K^T with Q and K read from shared memory (SS), O += P V with P from registers (RS).
// Shared tiles use the GMMA swizzle layouts that wgmma descriptors expect; the widest swizzle
// whose row fits the head dim.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "attention/tiles.h"

namespace jevo {
namespace sm90 {
using namespace cute;

template <typename Element, int kHeadDim>
constexpr auto gmma_k_major_atom() {
  if constexpr (kHeadDim % 64 == 0) {
    return GMMA::Layout_K_SW128_Atom<Element>{};
  } else if constexpr (kHeadDim % 32 == 0) {
    return GMMA::Layout_K_SW64_Atom<Element>{};
  } else {
    return GMMA::Layout_K_SW32_Atom<Element>{};
  }
}

template <typename Element, int kHeadDim>
constexpr auto gmma_mn_major_atom() {
  if constexpr (kHeadDim % 64 == 0) {
    return GMMA::Layout_MN_SW128_Atom<Element>{};
  } else if constexpr (kHeadDim % 32 == 0) {
    return GMMA::Layout_MN_SW64_Atom<Element>{};
  } else {
    return GMMA::Layout_MN_SW32_Atom<Element>{};
  }
}

template <typename Element_, int kHeadDim_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim the kernel runs (>= D)
  static constexpr int kBlockM = sm90::kBlockM;
  static constexpr int kBlockN = sm90::kBlockN;
  static constexpr int kNThreads = 128;  // one warpgroup
  static constexpr int kNWarps = 4;
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128, "head dim tile must be 16..128, step 16");
  static_assert(kBlockM == 64, "one warpgroup's wgmma covers 64 rows");

  // Stages of the (K, V, bias) ring, filled by TMA. The products of a tile are pipelined across
  // two loop steps (S of tile j is computed while P V of tile j - 1 runs), so a stage is busy
  // for two steps and loads run kStages - 2 tiles ahead. Head dims up to 32: 3 stages, so that
  // 4 CTAs (16 warps) fit an SM; 64: 4 stages, 2 CTAs; 128: 3 stages, 1 CTA.
  static constexpr int kStages = kHeadDim == 64 ? 4 : 3;
  static constexpr int kPrefetch = kStages - 2;
  static constexpr int kMinBlocks = kHeadDim <= 32 ? 4 : (kHeadDim <= 64 ? 2 : 1);
  // A TMA box row is at most 128 bytes (the widest swizzle): head dim 128 loads in two halves.
  static constexpr int kBoxD = kHeadDim > 64 ? 64 : kHeadDim;
  static constexpr int kBoxesD = kHeadDim / kBoxD;

  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));

  // Q [queries, d] and K [keys, d], d contiguous (K-major for both operands of Q K^T).
  using SmemLayoutQ = decltype(tile_to_shape(gmma_k_major_atom<Element, kHeadDim>(),
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(gmma_k_major_atom<Element, kHeadDim>(),
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V as the B operand of P V, [d, keys] with d contiguous (MN-major): the same bytes as K's
  // [keys, d] K-major tile, so one TMA box shape fills both.
  // Keys run first through the atoms (Step<_2, _1, _3>), so that each 64-element half of the
  // head dim is one contiguous [keys, 64] block, as one TMA box writes it (K's tiles are laid
  // out the same way by tile_to_shape's default order).
  using SmemLayoutVt = decltype(tile_to_shape(gmma_mn_major_atom<Element, kHeadDim>(),
                                              Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                              Step<_2, _1, _3>{}));

  static constexpr int kTileElemsQ = kBlockM * kHeadDim;
  static constexpr int kTileElemsKV = kBlockN * kHeadDim;
  static constexpr int kTileElemsBias = kBlockM * kBlockN;  // 64 x 64, 128-byte swizzled rows
  static_assert(kBlockN == 64, "a bias row is one 128-byte swizzle row");
};

}  // namespace sm90
}  // namespace jevo
