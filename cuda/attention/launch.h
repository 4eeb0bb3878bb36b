// Host entry points of the attention kernels, one explicit instantiation per (architecture
// family, element type, padded head dim) in cuda/kernels/<family>/*.cu, written by
// cuda/kernels/generate.py.
#pragma once

#include <cuda_runtime.h>

#include "attention/params.h"
#include "attention/tiles.h"

namespace jevo {

template <Arch kArch, typename Element, int kHeadDim>
cudaError_t run_attention_fwd(const FwdParams& p, cudaStream_t stream);

template <Arch kArch, typename Element, int kHeadDim>
cudaError_t run_attention_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace jevo
