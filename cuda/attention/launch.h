// Host entry points of the attention kernels, one explicit instantiation per (element type,
// padded head dim) in cuda/kernels/*.cu.
#pragma once

#include <cuda_runtime.h>

#include "attention/params.h"

namespace jevo {

template <typename Element, int kHeadDim>
cudaError_t run_attention_fwd(const FwdParams& p, cudaStream_t stream);

template <typename Element, int kHeadDim>
cudaError_t run_attention_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace jevo
