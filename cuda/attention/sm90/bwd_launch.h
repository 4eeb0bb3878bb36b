// Launches the sm_90a backward: the dK/dV kernel, the dQ / bias-gradient kernel and the bias
// gradient's reduction (shared with sm80, bwd_common.h), with their shared-memory sizes; the
// grids are those of the sm80 backward.
#pragma once

#include <cuda_runtime.h>

#include "attention/launch.h"
#include "attention/sm90/bwd_kernel.h"

namespace jevo {
namespace sm90 {

template <typename Traits, int kGroup, bool kHasBias>
cudaError_t launch_dq(const BwdParams& p, unsigned m_tiles, cudaStream_t stream) {
  return launch_kernel(attention_bwd_dq_kernel<Traits, kGroup, kHasBias>,
                       tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.n_chunks), Traits::kNThreads,
                       int(sizeof(DqSmem<Traits, kGroup, kHasBias>)), stream, p);
}

template <typename Traits>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  const AttentionShape& sh = p.shape;
  const unsigned m_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockM - 1) / Traits::kBlockM);
  const unsigned n_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockN - 1) / Traits::kBlockN);

  cudaError_t err = launch_kernel(attention_bwd_dkdv_kernel<Traits>, tile_grid(n_tiles, sh.heads, sh.batch * sh.n),
                                  Traits::kNThreads, int(sizeof(DkdvSmem<Traits>)), stream, p);
  if (err != cudaSuccess) return err;

  err = p.bias ? launch_dq<Traits, Traits::kDqGroup, true>(p, m_tiles, stream)
               : launch_dq<Traits, 1, false>(p, m_tiles, stream);
  if (err != cudaSuccess) return err;

  return launch_reduce_dbias<Element>(p, stream);
}

}  // namespace sm90
}  // namespace jevo
