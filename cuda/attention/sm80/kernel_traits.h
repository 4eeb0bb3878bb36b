// Tile shapes, thread counts and shared-memory layouts of the attention kernels, in one place.
// Tensor cores through CuTe's SM80 mma.sync atoms (m16n8k16, fp32 accumulate), which run on
// sm_80 and sm_90a alike; ldmatrix for shared -> register copies; cp.async for global -> shared.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "attention/tiles.h"

namespace jevo {
namespace sm80 {
using namespace cute;

template <typename Element_, int kHeadDim_, int kBlockM_ = sm80::kBlockM, int kBlockN_ = sm80::kBlockN,
          int kNWarps_ = 4>
struct AttentionTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim the kernel runs (>= D)
  static constexpr int kBlockM = kBlockM_;    // query rows per tile
  static constexpr int kBlockN = kBlockN_;    // key rows per tile
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128, "head dim tile must be 16..128, step 16");
  static_assert(kBlockM == 16 * kNWarps, "each warp owns 16 query rows of a tile");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of the mma N x 2");

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  // Warps stacked along M; a 16-wide N tile so that one ldmatrix.x4 feeds two mma along N.
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  // Shared-memory rows are swizzled in 8-element (16-byte) chunks so that ldmatrix reads of a
  // column block and cp.async writes of a row both avoid bank conflicts.
  static constexpr int kSmemRowBlock = kHeadDim >= 64 ? 64 : kHeadDim;
  static constexpr int kSwizzleBits = kSmemRowBlock == 64 ? 3 : (kSmemRowBlock == 32 ? 2 : 1);
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{},
      Layout<Shape<_8, Int<kSmemRowBlock>>, Stride<Int<kSmemRowBlock>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // The same K/V/Q/dO tile seen as [head dim, rows]: the B operand of P V, dS K, P^T dO, dS^T Q.
  using SmemLayoutKVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));

  // [kBlockM, kBlockN] tiles of P and dS kept in shared memory by the backward kernel, and their
  // transposes [kBlockN, kBlockM] (the A operand of P^T dO and dS^T Q).
  static constexpr int kPRowBlock = kBlockN >= 64 ? 64 : kBlockN;
  using SmemLayoutAtomP = decltype(composition(
      Swizzle<kPRowBlock == 64 ? 3 : 2, 3, 3>{},
      Layout<Shape<_8, Int<kPRowBlock>>, Stride<Int<kPRowBlock>, _1>>{}));
  using SmemLayoutP = decltype(tile_to_shape(SmemLayoutAtomP{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPt = decltype(composition(
      SmemLayoutP{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

  // CTAs per SM the register allocation must allow (launch bounds): more resident warps hide
  // the latency of the softmax and the loads; large head dims need the registers instead.
  // Four for head dims up to 32 (128 registers, no spills).
  static constexpr int kMinBlocksFwd = kHeadDim <= 32 ? 4 : (kHeadDim <= 64 ? 3 : 1);
  // Stages of the forward's (K, V, bias) ring: three keep two tiles in flight with one barrier a
  // tile; two (with a second barrier) keep the shared memory of three resident CTAs in bounds.
  static constexpr int kStagesFwd = kHeadDim <= 32 ? 3 : 2;
  // Three resident CTAs for head dims up to 32 (168 registers, no spills of note): the dK/dV
  // loop is short at AlphaFold's sequence lengths, so more warps to switch between pay.
  static constexpr int kMinBlocksDkdv = kHeadDim <= 32 ? 3 : (kHeadDim <= 64 ? 2 : 1);
  // n processed together by the dQ / bias-gradient kernel (their dQ accumulators in registers).
  static constexpr int kDqGroup = kHeadDim <= 64 ? 2 : 1;

  static constexpr int kTileElemsQ = kBlockM * kHeadDim;
  static constexpr int kTileElemsKV = kBlockN * kHeadDim;
  static constexpr int kTileElemsP = kBlockM * kBlockN;
};

}  // namespace sm80
}  // namespace jevo
