"""What `jax.export` needs to serialise functions that run jevo's CUDA kernels.

`jax.export` refuses custom calls outside its list of targets with stable semantics, since an
exported artefact may be run by another build. jevo's kernels are such custom calls, so
exporting a function that uses `implementation="cuda"` needs them named as accepted:

    exported = jax.export.export(jax.jit(f), disabled_checks=jevo.export_disabled_checks())(*args)

The process that calls the deserialised function must `import jevo` first, which registers the
targets, and must load a jevo whose kernels take the same operands (the same version). The
pure-JAX backends export without this.
"""

from __future__ import annotations

import jax

# From _cuda_lib, not cuda_backend: backends are imported on first use, keeping `import jevo` light.
from jevo._cuda_lib import BACKWARD_TARGET, FORWARD_TARGET


def export_disabled_checks() -> list:
  """The `disabled_checks` of `jax.export.export` that accept jevo's kernels' custom calls."""
  return [jax.export.DisabledSafetyCheck.custom_call(target)
          for target in (FORWARD_TARGET, BACKWARD_TARGET)]
