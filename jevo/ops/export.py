"""What `jax.export` needs to serialise functions that run jevo's CUDA and Pallas kernels.

`jax.export` refuses custom calls outside its list of targets with stable semantics, since an
exported artefact may be run by another build. jevo's kernels are such custom calls: the
attention kernels (`implementation="cuda"`, the default on a GPU) and the fused transition's
Pallas kernels, which lower to XLA's Triton custom call (`Transition`'s default on a GPU for
bf16/fp16 at c <= 128). Exporting a function that uses them needs them named as accepted:

    exported = jax.export.export(jax.jit(f), disabled_checks=jevo.export_disabled_checks())(*args)

The process that calls the deserialised function must `import jevo` first, which registers the
targets, and must load a jevo whose kernels take the same operands (the same version). The
pure-JAX backends export without this.
"""

from __future__ import annotations

import jax

# From _cuda_lib, not cuda_backend: backends are imported on first use, keeping `import jevo` light.
from jevo._cuda_lib import BACKWARD_TARGET, FORWARD_TARGET

# The custom call that Pallas's Triton backend lowers every kernel to (jevo.ops.transition_pallas).
TRITON_TARGET = "__gpu$xla.gpu.triton"


def export_disabled_checks() -> list:
  """The `disabled_checks` of `jax.export.export` that accept jevo's kernels' custom calls."""
  return [jax.export.DisabledSafetyCheck.custom_call(target)
          for target in (FORWARD_TARGET, BACKWARD_TARGET, TRITON_TARGET)]
