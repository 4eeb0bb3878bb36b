"""Where jevo's Pallas (Triton) kernels can run: decided without importing Pallas, so that
callers can choose an implementation on any machine."""

from __future__ import annotations

import importlib

import jax

from jevo.ops.placement import placement_reason

# Pallas's Triton backend (and XLA's Triton) needs Ampere or newer.
_MIN_COMPUTE_CAPABILITY = (8, 0)


def platform_reason(x) -> str | None:
  """Why Pallas's Triton kernels cannot run x here, or None: the platform, decided when the
  computation is traced (the default backend, concrete inputs' devices, `jax.default_device`,
  every device's compute capability)."""
  if jax.default_backend() != "gpu":
    return f"JAX's default backend is {jax.default_backend()}, not a GPU"
  reason = placement_reason(x)
  if reason is not None:
    return reason
  for device in jax.devices():
    capability = _compute_capability(device)
    if capability is None:
      return f"{device} is not an NVIDIA GPU (no compute capability)"
    if capability < _MIN_COMPUTE_CAPABILITY:
      return (f"the Pallas Triton kernels need compute capability 8.0 or newer, "
              f"{device} has {'.'.join(map(str, capability))}")
  return None


def _compute_capability(device) -> tuple[int, ...] | None:
  try:
    return tuple(int(p) for p in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):
    return None


def kernels_reason(x, kernels: str, *args) -> str | None:
  """Why the kernels of module `jevo.ops.<kernels>` cannot run x here, or None: the platform
  first (so that Pallas is not imported off a GPU), then that module's
  `unsupported_reason(*args)` for the shapes and dtypes."""
  reason = platform_reason(x)
  if reason is not None:
    return reason
  try:
    module = importlib.import_module(f"jevo.ops.{kernels}")
  except ImportError as err:  # a jax without Pallas's Triton backend
    return f"Pallas's Triton backend cannot be imported ({err})"
  return module.unsupported_reason(*args)
