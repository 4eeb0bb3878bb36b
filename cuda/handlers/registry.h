// Every FFI handler symbol the library exports; binding.cc turns them into PyCapsules.
#pragma once
#include "xla/ffi/api/ffi.h"

namespace jevo {
XLA_FFI_DECLARE_HANDLER_SYMBOL(JevoSelftest);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JevoAttentionFwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JevoAttentionBwd);
}  // namespace jevo
