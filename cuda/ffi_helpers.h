// Small helpers shared by every FFI handler: CUDA errors as ffi::Error, checked size casts,
// shape checks whose messages name the buffer, the expected and the actual value.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jevo {
namespace ffi = xla::ffi;

inline ffi::Error CudaError(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jevo: ") + what + ": " + cudaGetErrorName(status) + ": " +
                              cudaGetErrorString(status));
}

// The error of the last launch on this thread, if any.
inline ffi::Error LastLaunchError(const char* kernel) { return CudaError(cudaGetLastError(), kernel); }

// Messages are built with std::string and std::to_string only. With jax 0.11.2 on an H200, every
// handler error whose message went through std::ostringstream ended the process with a
// segmentation fault, while the errors built this way became Python exceptions (the cause inside
// the C++ runtime was not found; tests/test_cuda_attention.py covers the three kinds of check).
template <typename Ints>
std::string DimsToString(const Ints& dims) {
  std::string out = "[";
  bool first = true;
  for (int64_t d : dims) {
    out += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return out + "]";
}

// Checks that `buffer` has rank `rank`; its name goes into the message.
template <typename Buffer>
ffi::Error CheckRank(const Buffer& buffer, size_t rank, const char* name) {
  auto dims = buffer.dimensions();
  if (dims.size() == rank) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jevo: ") + name + " must have rank " +
                                     std::to_string(rank) + ", got shape " + DimsToString(dims));
}

template <typename Buffer>
ffi::Error CheckDims(const Buffer& buffer, std::initializer_list<int64_t> expected, const char* name) {
  auto dims = buffer.dimensions();
  bool ok = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) {
    if (!ok) break;
    ok = dims[i++] == e;
  }
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jevo: ") + name + " must have shape " +
                                     DimsToString(expected) + ", got " + DimsToString(dims));
}

// Narrows a 64-bit size to int, failing instead of wrapping.
inline bool FitsInt(int64_t value) {
  return value >= 0 && value <= std::numeric_limits<int>::max();
}

}  // namespace jevo

#define JEVO_RETURN_IF_ERROR(expr)        \
  do {                                    \
    ::xla::ffi::Error _err = (expr);      \
    if (_err.failure()) return _err;      \
  } while (0)
