"""The triangle multiplication's fused input side (`jevo.ops.gated_projections_pallas`): where
it can run, and the call, with Pallas imported only when the kernel is used."""

from __future__ import annotations

from jevo.ops.pallas_platform import kernels_reason
from jevo.ops.varying import match_varying_axes


def unsupported_reason(z, c_hidden: int, dtype) -> str | None:
  """Why the fused kernel cannot compute the input side of z `[..., c_z]` here in `dtype`, or
  None: the platform first (no Pallas import off a GPU), then the shapes and dtypes."""
  return kernels_reason(z, "gated_projections_pallas", z, c_hidden, dtype)


def fused(z, mask, ln_scale, ln_offset, kernels, biases, **kwargs):
  """`jevo.ops.gated_projections_pallas.gated_projections`, with the operands made to vary
  alike inside `jax.shard_map` (the kernel's outputs vary as its inputs)."""
  from jevo.ops import gated_projections_pallas
  z, mask, ln_scale, ln_offset, *params = match_varying_axes(z, mask, ln_scale, ln_offset,
                                                             *kernels, *biases)
  n = len(kernels)
  return gated_projections_pallas.gated_projections(z, mask, ln_scale, ln_offset, params[:n],
                                                    params[n:], **kwargs)
