"""The triangle multiplication's fused output side (`jevo.ops.triangle_epilogue_pallas`): the
call, with Pallas imported only when the kernel is used. It runs wherever the input side's
kernel runs (the same channel and dtype limits), which is how the module decides."""

from __future__ import annotations

from jevo.ops.varying import match_varying_axes


def fused(product_cm, gate_logits, center_scale, center_offset, kernel, bias, **kwargs):
  """`jevo.ops.triangle_epilogue_pallas.triangle_epilogue`, with the operands made to vary
  alike inside `jax.shard_map`."""
  from jevo.ops import triangle_epilogue_pallas
  args = match_varying_axes(product_cm, gate_logits, center_scale, center_offset, kernel, bias)
  return triangle_epilogue_pallas.triangle_epilogue(*args, **kwargs)


def fused_gate_from_z(product_cm, z, *params, **kwargs):
  """`jevo.ops.triangle_epilogue_pallas.triangle_epilogue_gate_from_z`, with the operands made
  to vary alike inside `jax.shard_map`."""
  from jevo.ops import triangle_epilogue_pallas
  args = match_varying_axes(product_cm, z, *params)
  return triangle_epilogue_pallas.triangle_epilogue_gate_from_z(*args, **kwargs)
