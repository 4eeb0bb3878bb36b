"""The C++ rules of Bazel 4.2.3 under the names rules_cc gives them.

Bazel 4.2.3's built-in packages (@bazel_tools: test launcher, C++ toolchain configuration) load
`@rules_cc//cc:defs.bzl`, which its default WORKSPACE fetches from the network. The rules_cc
release it pins only forwards to the native rules, so offline this stand-in does the same.
(Debian's bazel-rules-cc package is a newer release that needs a newer Bazel.)
"""

def cc_binary(**attrs):
    native.cc_binary(**attrs)

def cc_import(**attrs):
    native.cc_import(**attrs)

def cc_library(**attrs):
    native.cc_library(**attrs)

def cc_proto_library(**attrs):
    native.cc_proto_library(**attrs)

def cc_test(**attrs):
    native.cc_test(**attrs)

def cc_toolchain(**attrs):
    native.cc_toolchain(**attrs)

def cc_toolchain_suite(**attrs):
    native.cc_toolchain_suite(**attrs)

def fdo_prefetch_hints(**attrs):
    native.fdo_prefetch_hints(**attrs)

def fdo_profile(**attrs):
    native.fdo_profile(**attrs)

def objc_import(**attrs):
    native.objc_import(**attrs)

def objc_library(**attrs):
    native.objc_library(**attrs)
