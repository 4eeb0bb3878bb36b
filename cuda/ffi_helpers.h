// Small helpers shared by every FFI handler: CUDA errors as ffi::Error, checked size casts,
// shape checks whose messages name the buffer, the expected and the actual value.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <sstream>
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

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < dims.size(); ++i) out << (i ? ", " : "") << dims[i];
  out << "]";
  return out.str();
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
  std::ostringstream out;
  out << "jevo: " << name << " must have shape [";
  i = 0;
  for (int64_t e : expected) out << (i++ ? ", " : "") << e;
  out << "], got " << DimsToString(dims);
  return ffi::Error::InvalidArgument(out.str());
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
