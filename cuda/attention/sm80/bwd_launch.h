// Launches the sm_80 backward: the dK/dV kernel, the dQ / bias-gradient kernel and the bias
// gradient's reduction, with their shared-memory sizes and grids.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "attention/sm80/bwd_kernel.h"

namespace jevo {
namespace sm80 {

template <typename Traits, int kGroup, bool kHasBias>
cudaError_t launch_dq(const BwdParams& p, unsigned m_tiles, cudaStream_t stream) {
  constexpr int kSmem = DqSmem<Traits, kGroup, kHasBias>::kBytes;
  auto dq = attention_bwd_dq_kernel<Traits, kGroup, kHasBias>;
  if (kSmem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  dq<<<tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.n_chunks), Traits::kNThreads, kSmem,
       stream>>>(p);
  return cudaGetLastError();
}

template <typename Traits>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  const AttentionShape& sh = p.shape;
  const unsigned m_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockM - 1) / Traits::kBlockM);
  const unsigned n_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockN - 1) / Traits::kBlockN);
  constexpr int kBiasElems = BiasTileLayout<Traits::kBlockM, Traits::kBlockN>::kElems;

  constexpr int kSmemDkdv =
      (2 * Traits::kTileElemsKV + 2 * Traits::kTileElemsP + 2 * (2 * Traits::kTileElemsQ + kBiasElems)) *
      sizeof(Element);
  auto dkdv = attention_bwd_dkdv_kernel<Traits>;
  if (kSmemDkdv > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemDkdv);
    if (err != cudaSuccess) return err;
  }
  dkdv<<<tile_grid(n_tiles, sh.heads, sh.batch * sh.n), Traits::kNThreads, kSmemDkdv, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  err = p.bias ? launch_dq<Traits, Traits::kDqGroup, true>(p, m_tiles, stream)
               : launch_dq<Traits, 1, false>(p, m_tiles, stream);
  if (err != cudaSuccess || p.bias == nullptr) return err;

  const int64_t count = sh.batch * sh.heads * sh.seq * sh.seq;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((count + 255) / 256, 65536));
  reduce_dbias_kernel<Element><<<blocks, 256, 0, stream>>>(
      p.dbias_partial, p.n_chunks, count, static_cast<Element*>(p.dbias));
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace jevo
