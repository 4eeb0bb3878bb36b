"""Where a computation will run, as far as can be told before it runs: concrete inputs that live
off the GPU, or a default device (`jax.default_device`) that is not one. Traced inputs under
`jax.jit` have no placement yet; XLA places them. Shared by the CUDA backend and the Pallas
kernels' platform checks."""

from __future__ import annotations

import jax


def placement_reason(*arrays, target: str = "a GPU") -> str | None:
  """Why a computation on `arrays` will not run on `target` (words for the message), or None."""
  for x in arrays:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      platforms = sorted({d.platform for d in x.devices()})
      if platforms and platforms != ["gpu"]:
        return f"the inputs live on {', '.join(platforms)}, not on {target}"
  default = jax.config.jax_default_device
  platform = default if isinstance(default, str) else getattr(default, "platform", None)
  if platform is not None and platform not in ("gpu", "cuda"):
    return f"the default device (jax.default_device) is {default}, not {target}"
  return None
