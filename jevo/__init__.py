"""jevo: fast, memory-lean Evoformer attention for JAX.

    out = jevo.evoformer_attention(q, k, v, mask=mask, bias=pair_bias)

`jevo.cuda_status()` says whether the fused CUDA kernels can run here (and if not, why);
without them the pure-JAX backends run everywhere. `jevo.nn` (Flax NNX modules) and
`jevo.parallel` (Dynamic Axial Parallelism) are imported on first use, so that the op alone
needs neither flax nor their import time.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version as _version

from jevo._cuda_lib import cuda_status
from jevo.ops import DS4Sci_EvoformerAttention, evoformer_attention, export_disabled_checks

try:
  __version__ = _version("jevo")
except PackageNotFoundError:  # Running from a source tree that was never installed.
  __version__ = "0.1.0+unknown"

# Subpackages loaded by the first `jevo.<name>`: they import flax (and the modules' layers).
_LAZY_SUBPACKAGES = ("nn", "parallel")


def __getattr__(name):
  if name in _LAZY_SUBPACKAGES:
    # import_module also sets the attribute on this package, so this runs once per name.
    return importlib.import_module(f"jevo.{name}")
  raise AttributeError(f"module 'jevo' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))


__all__ = ["DS4Sci_EvoformerAttention", "__version__", "cuda_status", "evoformer_attention",
           "export_disabled_checks", "nn", "parallel"]
