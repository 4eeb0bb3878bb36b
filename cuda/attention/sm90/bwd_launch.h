// Launches the sm_90a backward: the dK/dV kernel, the dQ / bias-gradient kernel and the bias
// gradient's reduction (shared with sm80, bwd_common.h), with their shared-memory sizes; the
// grids are those of the sm80 backward.
#pragma once

#include <cuda_runtime.h>

#include "attention/launch.h"
#include "attention/sm90/bwd_kernel.h"
#include "attention/sm90/tma.h"

namespace jevo {
namespace sm90 {

// The backward kernels' TMA descriptors (one set serves both). The bias's needs 16-byte row strides (S % 8 == 0): the
// handler runs other shapes with a bias on the sm80 backward (Sm90BwdSupports).
template <typename Traits>
cudaError_t encode_dkdv_maps(const BwdParams& p, DkdvTensorMaps* maps) {
  using Element = typename Traits::Element;
  constexpr int kBoxD = Traits::kBoxD;
  const AttentionShape& sh = p.shape;
  cudaError_t err;
  if ((err = encode_activation_map<Element>(&maps->q, p.q, sh, Traits::kBlockM, kBoxD)) ||
      (err = encode_activation_map<Element>(&maps->dout, p.dout, sh, Traits::kBlockM, kBoxD)) ||
      (err = encode_activation_map<Element>(&maps->k, p.k, sh, Traits::kBlockN, kBoxD)) ||
      (err = encode_activation_map<Element>(&maps->v, p.v, sh, Traits::kBlockN, kBoxD))) {
    return err;
  }
  return encode_optional_bias_map<Element>(&maps->bias, p.bias, sh, Traits::kBlockM,
                                           Traits::kBlockN, maps->q);
}

template <typename Traits, int kGroup, bool kHasBias>
cudaError_t launch_dq(const BwdParams& p, const DqTensorMaps& maps, unsigned m_tiles, cudaStream_t stream) {
  return launch_kernel(attention_bwd_dq_kernel<Traits, kGroup, kHasBias>,
                       tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.n_chunks), Traits::kNThreads,
                       int(sizeof(DqSmem<Traits, kGroup, kHasBias>)), stream, p, maps);
}

template <typename Traits>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  const AttentionShape& sh = p.shape;
  const unsigned m_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockM - 1) / Traits::kBlockM);
  const unsigned n_tiles = static_cast<unsigned>((sh.seq + Traits::kBlockN - 1) / Traits::kBlockN);

  DkdvTensorMaps maps;
  cudaError_t err = encode_dkdv_maps<Traits>(p, &maps);
  if (err != cudaSuccess) return err;
  err = launch_kernel(attention_bwd_dkdv_kernel<Traits>, tile_grid(n_tiles, sh.heads, sh.batch * sh.n),
                      Traits::kNThreads, int(sizeof(DkdvSmem<Traits>)), stream, p, maps);
  if (err != cudaSuccess) return err;

  err = p.bias ? launch_dq<Traits, Traits::kDqGroup, true>(p, maps, m_tiles, stream)
               : launch_dq<Traits, 1, false>(p, maps, m_tiles, stream);
  if (err != cudaSuccess) return err;

  return launch_reduce_dbias<Element>(p, stream);
}

}  // namespace sm90
}  // namespace jevo
