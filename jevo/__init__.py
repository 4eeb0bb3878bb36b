"""jevo: fast, memory-lean Evoformer attention for JAX.

    out = jevo.evoformer_attention(q, k, v, mask=mask, bias=pair_bias)

`jevo.cuda_status()` says whether the fused CUDA kernels can run here (and if not, why);
without them the pure-JAX backends run everywhere.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from jevo import nn, parallel  # Flax NNX Evoformer modules; Dynamic Axial Parallelism
from jevo._cuda_lib import cuda_status
from jevo.ops import DS4Sci_EvoformerAttention, evoformer_attention, export_disabled_checks

try:
  __version__ = _version("jevo")
except PackageNotFoundError:  # Running from a source tree that was never installed.
  __version__ = "0.1.0+unknown"

__all__ = ["DS4Sci_EvoformerAttention", "__version__", "cuda_status", "evoformer_attention",
           "export_disabled_checks", "nn", "parallel"]
