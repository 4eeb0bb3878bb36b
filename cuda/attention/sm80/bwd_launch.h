// Launches the sm_80 backward: the dK/dV kernel, the dQ / bias-gradient kernel and the bias
// gradient's reduction, with their shared-memory sizes and grids.
#pragma once

#include <cuda_runtime.h>

#include "attention/launch.h"
#include "attention/sm80/bwd_kernel.h"

namespace jevo {
namespace sm80 {

template <typename Traits, int kGroup, bool kHasBias>
cudaError_t launch_dq(const BwdParams& p, unsigned m_tiles, cudaStream_t stream) {
  return launch_kernel(attention_bwd_dq_kernel<Traits, kGroup, kHasBias>,
                       tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.n_chunks), Traits::kNThreads,
                       DqSmem<Traits, kGroup, kHasBias>::kBytes, stream, p);
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
  cudaError_t err = launch_kernel(attention_bwd_dkdv_kernel<Traits>, tile_grid(n_tiles, sh.heads, sh.batch * sh.n),
                                  Traits::kNThreads, kSmemDkdv, stream, p);
  if (err != cudaSuccess) return err;

  err = p.bias ? launch_dq<Traits, Traits::kDqGroup, true>(p, m_tiles, stream)
               : launch_dq<Traits, 1, false>(p, m_tiles, stream);
  if (err != cudaSuccess) return err;

  return launch_reduce_dbias<Element>(p, stream);
}

}  // namespace sm80
}  // namespace jevo
