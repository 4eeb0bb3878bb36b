"""The triangle multiplication's input side fused into one Pallas (Triton) kernel, forward only:
`LayerNorm(z)`, its five projections (left and right projections and gates, output gate), the
sigmoid gates and the pair mask, per block of rows.

    left  = mask * (y @ W_lp + b_lp) * sigmoid(y @ W_lg + b_lg)
    right = mask * (y @ W_rp + b_rp) * sigmoid(y @ W_rg + b_rg)
    gate  = y @ W_g + b_g                      (the output gate's logits)
    with y = LayerNorm(z)

The kernel also takes fewer layers: without the output gate's (for an output side that
computes the gate from z itself, `jevo.ops.triangle_epilogue_pallas.triangle_epilogue_gate_from_z`,
which saves writing and reading the `[rows, c_z]` logits), and with one (projection, gate)
pair instead of two (for a chunk of rows that needs only one of the operands).

XLA runs these as a layer norm, one matrix product of 4 c_hidden + c_z outputs and an
elementwise fusion, writing and reading the normalised input and the `[rows, 4 c_hidden + c_z]`
product through memory; here each program keeps its rows on chip from z to the three outputs.

Numerics: the layer norm, the biases and the sigmoids run in float32 on the parameters as
given (the XLA path of a bf16 module rounds them to bf16 first); the matrix products take the
outputs' dtype (bfloat16 or float16) and accumulate in float32; each output is rounded once.
This module imports Pallas.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jevo.ops.pallas_rows import (F32, KERNEL_DTYPES, layer_norm, matrix_spec, mm, out_struct,
                                  row_mask, vec, vector_spec)

# Each program holds whole [c_z, c] weights and two [rows, c] float32 products: up to 128
# channels, the sizes tested; wider ones would need the products split over columns.
MIN_CHANNELS, MAX_CHANNELS = 16, 128
BLOCK_ROWS, NUM_WARPS, NUM_STAGES = 64, 4, 1


def unsupported_reason(z, c_hidden: int, dtype) -> str | None:
  """Why the kernel cannot take these shapes and dtypes, or None (where it runs is the
  caller's question)."""
  c_z = z.shape[-1]
  if jnp.dtype(dtype) not in KERNEL_DTYPES:
    return f"the Pallas kernel computes in bfloat16 or float16, got {jnp.dtype(dtype)}"
  for name, c in (("c_z", c_z), ("c_hidden", c_hidden)):
    if c & (c - 1) or not MIN_CHANNELS <= c <= MAX_CHANNELS:
      return (f"the Pallas kernel takes power-of-two channel counts from {MIN_CHANNELS} to "
              f"{MAX_CHANNELS}, got {name} = {c}")
  if z.size == 0:
    return "there are no rows"
  if z.size // c_z * max(c_z, c_hidden) >= 2 ** 31:
    return "the Pallas kernel takes fewer than 2**31 elements per array"  # 32-bit offsets
  return None


def _kernel(z_ref, mask_ref, scale_ref, offset_ref, *refs, eps, rows, block_rows,
            channel_major, layers):
  # The layers' kernels and biases come as separate operands: Triton's tensors have
  # power-of-two sizes, and the five side by side have 4 c_hidden + c_z columns.
  weights, biases, outs = refs[:layers], refs[layers:2 * layers], refs[2 * layers:]
  pairs = layers // 2
  valid = row_mask(pl.program_id(0) * block_rows, block_rows, rows)
  z = plgpu.load(z_ref, mask=valid, other=0.0).astype(F32)
  m = plgpu.load(mask_ref, mask=valid[:, 0], other=0.0).astype(F32)[:, None]
  y = layer_norm(z, vec(scale_ref), vec(offset_ref), eps, weights[0].dtype)

  def project(w_ref, b_ref):
    return mm(y, w_ref[...]) + vec(b_ref)[None, :]

  def store_operand(ref, x):  # [block, c], or its transpose into a [c, rows] output
    x = x.astype(ref.dtype)
    if channel_major:
      plgpu.store(ref, x.T, mask=valid.T)
    else:
      plgpu.store(ref, x, mask=valid)

  for k in range(pairs):  # (projection, gate) pairs: left, then right
    projected = project(weights[2 * k], biases[2 * k])
    store_operand(outs[k], m * projected * jax.nn.sigmoid(project(weights[2 * k + 1],
                                                                    biases[2 * k + 1])))
  if layers % 2:
    gate_ref = outs[pairs]
    plgpu.store(gate_ref, project(weights[-1], biases[-1]).astype(gate_ref.dtype), mask=valid)


def gated_projections(z, mask, ln_scale, ln_offset, kernels, biases, *, eps: float, dtype,
                      channel_major: bool = False, interpret: bool = False):
  """(left, right, gate logits) of z `[..., c_z]` in `dtype`: `[..., c_hidden]` twice and
  `[..., c_z]`. mask: broadcastable to `[..., 1]` (1 = valid); kernels and biases: the five
  layers' (`[c_z, c_hidden]` four times, then `[c_z, c_z]`; `[c_hidden]` four times, then
  `[c_z]`), in the order above. Fewer layers give fewer outputs: (projection, gate) pairs
  first, one or two, each giving one operand, then optionally the output gate's layer; the
  result is the operands and then the gate logits, None without that layer (so four layers
  give (left, right, None), two give (operand, None), three (operand, gate logits)).
  `channel_major=True` gives the operands as
  `[c_hidden, ...]`, the layout of the triangle update's batched matrix product (batched over
  channels), which a custom call's row-major output would otherwise reach only through a
  transposing copy. `unsupported_reason` must be None; `interpret=True` runs Pallas's
  interpreter (tests)."""
  c_z = z.shape[-1]
  c_hidden = kernels[0].shape[1]
  layers = len(kernels)
  if layers not in (2, 3, 4, 5) or len(biases) != layers:
    raise ValueError(f"gated_projections takes the kernels and biases of 2 to 5 layers, got "
                     f"{len(kernels)} kernels and {len(biases)} biases")
  pairs, gated = layers // 2, layers % 2
  lead = z.shape[:-1]
  rows = z.size // c_z
  z2 = z.reshape(rows, c_z)
  mask2 = jnp.broadcast_to(mask, lead + (1,)).reshape(rows).astype(dtype)
  weights = [w.astype(dtype) for w in kernels]
  block = min(BLOCK_ROWS, max(16, pl.next_power_of_2(rows)))
  if channel_major:
    operand_shape, operand_spec = (c_hidden, rows), pl.BlockSpec((c_hidden, block),
                                                                 lambda i: (0, i))
  else:
    operand_shape, operand_spec = (rows, c_hidden), pl.BlockSpec((block, c_hidden),
                                                                 lambda i: (i, 0))
  run = pl.pallas_call(
      functools.partial(_kernel, eps=float(eps), rows=rows, block_rows=block,
                        channel_major=channel_major, layers=layers),
      grid=(pl.cdiv(rows, block),),
      in_specs=[pl.BlockSpec((block, c_z), lambda i: (i, 0)),
                pl.BlockSpec((block,), lambda i: (i,)),
                vector_spec(c_z), vector_spec(c_z)]
               + [matrix_spec((c_z, c_hidden))] * (2 * pairs) + [matrix_spec((c_z, c_z))] * gated
               + [vector_spec(c_hidden)] * (2 * pairs) + [vector_spec(c_z)] * gated,
      out_specs=[operand_spec] * pairs
                + [pl.BlockSpec((block, c_z), lambda i: (i, 0))] * gated,
      out_shape=[out_struct(operand_shape, dtype, z2)] * pairs
                + [out_struct((rows, c_z), dtype, z2)] * gated,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="jevo_gated_projections_fwd",
  )
  outs = run(z2, mask2, ln_scale, ln_offset, *weights, *biases)
  operand = (c_hidden,) + lead if channel_major else lead + (c_hidden,)
  gate = outs[pairs].reshape(lead + (c_z,)) if gated else None
  return tuple(x.reshape(operand) for x in outs[:pairs]) + (gate,)
