// Tile shapes, shared-memory layouts and tensor-core instructions of the sm_90a backward kernels.
// One warpgroup (128 threads) per CTA, as in the forward; every matrix product is a wgmma:
//   S = Q K^T and dP = dO V^T    [queries, keys], both operands K-major in shared memory (SS);
//   dV += P^T dO and dK += dS^T Q [keys, d], both operands read transposed (MN-major, SS);
//   dQ += dS K                   [queries, d], dS from registers, K read transposed (RS).
// The shared tiles are the GMMA swizzle layouts; each is also written by 16-byte cp.async
// chunks (a chunk is 8 contiguous elements of a row in every swizzle), so the loads are those of
// the sm80 kernels and work for any S.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "attention/logits.h"
#include "attention/sm90/fwd_traits.h"
#include "attention/tiles.h"

namespace jevo {
namespace sm90 {
using namespace cute;

template <typename Element_, int kHeadDim_>
struct BwdTraits {
  // The forward's tile shape and its two products, which the backward uses as they are.
  using Fwd = FwdTraits<Element_, kHeadDim_>;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim the kernel runs (>= D)
  static constexpr int kBlockM = Fwd::kBlockM;
  static constexpr int kBlockN = Fwd::kBlockN;
  static constexpr int kNThreads = Fwd::kNThreads;  // one warpgroup
  static constexpr int kNWarps = Fwd::kNWarps;
  static constexpr int kBoxD = Fwd::kBoxD;  // TMA box rows of at most 128 bytes
  static constexpr int kBoxesD = Fwd::kBoxesD;

  using MmaQK = typename Fwd::MmaQK;  // S = Q K^T and dP = dO V^T
  using MmaDQ = typename Fwd::MmaPV;  // dQ += dS K: O += P V's shapes and majors
  using MmaKV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>,
                           GMMA::Major::MN, GMMA::Major::MN>()));

  // [rows, d] tiles (Q, dO, K, V), d contiguous, with a trailing mode of kSlots tiles, and the
  // same bytes seen as [d, rows] (the transposed operands). Rows run first through the atoms
  // (Step<_2, _1, _3>) so that both views tile the bytes alike, as in the forward.
  template <int kSlots>
  using SmemLayoutRows = decltype(tile_to_shape(gmma_k_major_atom<Element, kHeadDim>(),
                                                Shape<Int<kBlockM>, Int<kHeadDim>, Int<kSlots>>{}));
  template <int kSlots>
  using SmemLayoutRowsT = decltype(tile_to_shape(gmma_mn_major_atom<Element, kHeadDim>(),
                                                 Shape<Int<kHeadDim>, Int<kBlockM>, Int<kSlots>>{},
                                                 Step<_2, _1, _3>{}));
  // P and dS of the dK/dV kernel: [queries, keys] as stored, [keys, queries] as read.
  using SmemLayoutP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockN>, Int<kBlockM>>{}));

  static constexpr int kTileElemsQ = kBlockM * kHeadDim;
  static constexpr int kTileElemsKV = kBlockN * kHeadDim;
  static constexpr int kTileElemsP = kBlockM * kBlockN;
  static constexpr int kBiasElems = BiasTileLayout<kBlockM, kBlockN>::kElems;

  // Resident CTAs the register allocation must allow (launch bounds); shared memory allows
  // 3 (head dims up to 32), 2 (64) and 1 (128) for the dK/dV kernel.
  static constexpr int kMinBlocksDkdv = kHeadDim <= 32 ? 3 : (kHeadDim <= 64 ? 2 : 1);
  // n processed together by the dQ / bias-gradient kernel (their dQ accumulators in registers).
  static constexpr int kDqGroup = kHeadDim <= 64 ? 2 : 1;
  static constexpr int kMinBlocksDq = kHeadDim <= 64 ? 2 : 1;
};

}  // namespace sm90
}  // namespace jevo
