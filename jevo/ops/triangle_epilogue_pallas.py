"""The triangle multiplication's output side fused into one Pallas (Triton) kernel, forward only:
the centre LayerNorm of the product over k, the output projection and the sigmoid gate.

    out = (LayerNorm(product) @ W_o + b_o) * sigmoid(gate_logits)

`product` comes channel-major (`[c_hidden, rows]`), the layout in which the triangle update's
matrix product (batched over channels) writes it; each program reads a `[c_hidden, block]`
slab of it and transposes it on chip, so that neither the transposing copy nor the normalised
product nor the ungated projection reach memory. XLA runs these as a transpose or a strided
layer-norm fusion, a matrix product and an elementwise fusion.

Numerics as `jevo.ops.gated_projections_pallas`: the layer norm, the bias and the sigmoid in
float32 on the parameters as given; the matrix product in the output's dtype (bfloat16 or
float16) with float32 accumulation; the output rounded once. This module imports Pallas.

`TriangleMultiplication` does not call it yet: whether it is faster than XLA's output side on
a GPU is what `benchmarks/triangle_multiplication_gpu.py` measures, beside colabfold-kernels'
fused epilogue, before it becomes part of the module's kernel path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jevo.ops.pallas_rows import (F32, KERNEL_DTYPES, layer_norm, matrix_spec, mm, out_struct,
                                  row_mask, vec, vector_spec)

# A program holds the whole [c_hidden, c_z] weight and a [rows, c] float32 product: up to 128
# channels, as the input side's kernel.
MIN_CHANNELS, MAX_CHANNELS = 16, 128
BLOCK_ROWS, NUM_WARPS, NUM_STAGES = 64, 4, 1


def unsupported_reason(product_cm, gate_logits, dtype) -> str | None:
  """Why the kernel cannot take these shapes and dtypes, or None (where it runs is the
  caller's question)."""
  if jnp.dtype(dtype) not in KERNEL_DTYPES:
    return f"the Pallas kernel computes in bfloat16 or float16, got {jnp.dtype(dtype)}"
  if product_cm.ndim != 2 or gate_logits.ndim != 2:
    return (f"the kernel takes a [c_hidden, rows] product and [rows, c_z] gate logits, got "
            f"shapes {product_cm.shape} and {gate_logits.shape}")
  c_hidden, rows = product_cm.shape
  if gate_logits.shape[0] != rows:
    return (f"the product has {rows} rows (its second axis) and the gate logits "
            f"{gate_logits.shape[0]}")
  for name, c in (("c_z", gate_logits.shape[1]), ("c_hidden", c_hidden)):
    if c & (c - 1) or not MIN_CHANNELS <= c <= MAX_CHANNELS:
      return (f"the Pallas kernel takes power-of-two channel counts from {MIN_CHANNELS} to "
              f"{MAX_CHANNELS}, got {name} = {c}")
  if rows == 0:
    return "there are no rows"
  if rows * max(c_hidden, gate_logits.shape[1]) >= 2 ** 31:
    return "the Pallas kernel takes fewer than 2**31 elements per array"  # 32-bit offsets
  return None


def _kernel(product_ref, gate_ref, scale_ref, offset_ref, w_ref, b_ref, out_ref, *, eps, rows,
            block_rows):
  valid = row_mask(pl.program_id(0) * block_rows, block_rows, rows)
  # [c_hidden, block] as it lies in memory, then rows first for the layer norm over channels.
  product = plgpu.load(product_ref, mask=valid.T, other=0.0).astype(F32).T
  y = layer_norm(product, vec(scale_ref), vec(offset_ref), eps, w_ref.dtype)
  projected = mm(y, w_ref[...]) + vec(b_ref)[None, :]
  gate = plgpu.load(gate_ref, mask=valid, other=0.0).astype(F32)
  plgpu.store(out_ref, (projected * jax.nn.sigmoid(gate)).astype(out_ref.dtype), mask=valid)


def triangle_epilogue(product_cm, gate_logits, center_scale, center_offset, kernel, bias, *,
                      eps: float, dtype, interpret: bool = False):
  """`[rows, c_z]` in `dtype`: (LayerNorm(product) @ kernel + bias) * sigmoid(gate_logits),
  with `product_cm` `[c_hidden, rows]` (channel-major), `gate_logits` `[rows, c_z]`, the
  centre LayerNorm's `center_scale`/`center_offset` `[c_hidden]` and the output projection's
  `kernel` `[c_hidden, c_z]` and `bias` `[c_z]`. `unsupported_reason` must be None;
  `interpret=True` runs Pallas's interpreter (tests)."""
  c_hidden, rows = product_cm.shape
  c_z = gate_logits.shape[1]
  if kernel.shape != (c_hidden, c_z) or bias.shape != (c_z,):
    raise ValueError(f"the output projection must be [{c_hidden}, {c_z}] with a [{c_z}] bias, "
                     f"got {kernel.shape} and {bias.shape}")
  if center_scale.shape != (c_hidden,) or center_offset.shape != (c_hidden,):
    raise ValueError(f"the centre LayerNorm's scale and offset must be [{c_hidden}], got "
                     f"{center_scale.shape} and {center_offset.shape}")
  block = min(BLOCK_ROWS, max(16, pl.next_power_of_2(rows)))
  run = pl.pallas_call(
      functools.partial(_kernel, eps=float(eps), rows=rows, block_rows=block),
      grid=(pl.cdiv(rows, block),),
      in_specs=[pl.BlockSpec((c_hidden, block), lambda i: (0, i)),
                pl.BlockSpec((block, c_z), lambda i: (i, 0)),
                vector_spec(c_hidden), vector_spec(c_hidden),
                matrix_spec((c_hidden, c_z)), vector_spec(c_z)],
      out_specs=pl.BlockSpec((block, c_z), lambda i: (i, 0)),
      out_shape=out_struct((rows, c_z), dtype, gate_logits),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="jevo_triangle_epilogue_fwd",
  )
  return run(product_cm, gate_logits, center_scale, center_offset, kernel.astype(dtype), bias)
