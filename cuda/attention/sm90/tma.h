// Host side of the sm90 kernels' TMA loads: tensor maps (CUtensorMap) for the [B * N, S, H, D]
// activations and the [B, H, S, S] bias, encoded with the driver's cuTensorMapEncodeTiled, which
// is reached through the runtime's driver entry point so that the library needs no libcuda at
// link time.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cutlass/numeric_types.h>

#include "attention/params.h"

namespace jevo {
namespace sm90 {

// cuTensorMapEncodeTiled's signature (as cudaTypedefs.h's PFN_cuTensorMapEncodeTiled_v12000,
// which that header declares for the host compilation pass only).
using TensorMapEncoder = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                      const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                      const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                      CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline TensorMapEncoder tensor_map_encoder() {
  static TensorMapEncoder fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<TensorMapEncoder>(ptr);
  }();
  return fn;
}

inline CUtensorMapSwizzle swizzle_for_row_bytes(int bytes) {
  return bytes >= 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                      : (bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_32B);
}

template <typename Element>
constexpr CUtensorMapDataType tensor_map_type() {
  static_assert(sizeof(Element) == 2, "the kernels take bfloat16 or float16");
  return std::is_same_v<Element, cutlass::half_t> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                  : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// Tiles of `rows` token rows by `box_d` head-dim elements of one (b * n, head) of a
// [B * N, S, H, D] tensor: dims (D, H, S, B * N), so that the strides grow; elements past D or
// S read as zeros. The box's row is box_d * 2 bytes, swizzled as the GMMA layouts expect.
template <typename Element>
cudaError_t encode_activation_map(CUtensorMap* map, const void* base, const AttentionShape& sh,
                                  int rows, int box_d) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[4] = {cuuint64_t(sh.head_dim), cuuint64_t(sh.heads), cuuint64_t(sh.seq),
                              cuuint64_t(sh.batch * sh.n)};
  const cuuint64_t elem = sizeof(Element);
  const cuuint64_t strides[3] = {elem * sh.head_dim, elem * sh.head_dim * sh.heads,
                                 elem * sh.head_dim * sh.heads * sh.seq};
  const cuuint32_t box[4] = {cuuint32_t(box_d), 1, cuuint32_t(rows), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  CUresult r = encode(map, tensor_map_type<Element>(), 4, const_cast<void*>(base), dims, strides, box, unit,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle_for_row_bytes(box_d * int(elem)),
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// [rows, cols] tiles of one (b, h) of the [B, H, S, S] bias: dims (S, S, B * H), 128-byte
// swizzle (cols = 64 16-bit elements). Needs S % 8 == 0 (16-byte row strides).
template <typename Element>
cudaError_t encode_bias_map(CUtensorMap* map, const void* base, const AttentionShape& sh, int rows,
                            int cols) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t elem = sizeof(Element);
  const cuuint64_t dims[3] = {cuuint64_t(sh.seq), cuuint64_t(sh.seq), cuuint64_t(sh.batch * sh.heads)};
  const cuuint64_t strides[2] = {elem * sh.seq, elem * sh.seq * sh.seq};
  const cuuint32_t box[3] = {cuuint32_t(cols), cuuint32_t(rows), 1};
  const cuuint32_t unit[3] = {1, 1, 1};
  CUresult r = encode(map, tensor_map_type<Element>(), 3, const_cast<void*>(base), dims, strides, box, unit,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The bias's map where there is a bias (needs S % 8 == 0: the handler runs other shapes with a
// bias on sm80), else a copy of `placeholder`, which the kernels never read.
template <typename Element>
cudaError_t encode_optional_bias_map(CUtensorMap* map, const void* bias, const AttentionShape& sh,
                                     int rows, int cols, const CUtensorMap& placeholder) {
  if (bias == nullptr) {
    *map = placeholder;
    return cudaSuccess;
  }
  if (sh.seq % 8 != 0) return cudaErrorInvalidValue;
  return encode_bias_map<Element>(map, bias, sh, rows, cols);
}

}  // namespace sm90
}  // namespace jevo
