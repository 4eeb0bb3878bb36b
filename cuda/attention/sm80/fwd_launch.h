// Launches the sm_80 forward kernel: its shared-memory size, the opt-in above 48 KiB and the grid.
#pragma once

#include <cuda_runtime.h>

#include "attention/launch.h"
#include "attention/sm80/fwd_kernel.h"

namespace jevo {
namespace sm80 {

template <typename Traits, bool kWriteResidual>
cudaError_t launch_fwd_kernel(const FwdParams& p, cudaStream_t stream) {
  constexpr int kStageElems =
      2 * Traits::kTileElemsKV + BiasTileLayout<Traits::kBlockM, Traits::kBlockN>::kElems;
  constexpr int kSmem =
      (Traits::kTileElemsQ + Traits::kStagesFwd * kStageElems) * sizeof(typename Traits::Element);
  const int64_t m_tiles = (p.shape.seq + Traits::kBlockM - 1) / Traits::kBlockM;
  return launch_kernel(attention_fwd_kernel<Traits, kWriteResidual>,
                       tile_grid(m_tiles, p.shape.heads, p.shape.batch * p.shape.n), Traits::kNThreads,
                       kSmem, stream, p);
}

template <typename Traits>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  return with_residual_choice(p, [&](auto residual) {
    return launch_fwd_kernel<Traits, decltype(residual)::value>(p, stream);
  });
}

}  // namespace sm80
}  // namespace jevo
