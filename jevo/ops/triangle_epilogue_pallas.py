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

`TriangleMultiplication`'s kernel path calls `triangle_epilogue`. `triangle_epilogue_gate_from_z`
computes the gate's logits in the kernel instead, from the module's input:
`LayerNorm_in(z) @ W_g + b_g`, so that the input side need not write them (its kernel then runs
four projections, not five) nor this kernel read them; it reads z instead, as many bytes as
the logits, for one more matrix product per row.
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


def _kernel(product_ref, gate_source_ref, *refs, eps, rows, block_rows, gate_eps):
  # gate_eps None: gate_source_ref holds the gate's logits; else it holds z, and refs start
  # with the input LayerNorm's scale and offset and the gate layer's kernel and bias.
  if gate_eps is None:
    (scale_ref, offset_ref, w_ref, b_ref, out_ref), gate_refs = refs, ()
  else:
    gate_refs, (scale_ref, offset_ref, w_ref, b_ref, out_ref) = refs[:4], refs[4:]
  valid = row_mask(pl.program_id(0) * block_rows, block_rows, rows)
  # [c_hidden, block] as it lies in memory, then rows first for the layer norm over channels.
  product = plgpu.load(product_ref, mask=valid.T, other=0.0).astype(F32).T
  y = layer_norm(product, vec(scale_ref), vec(offset_ref), eps, w_ref.dtype)
  projected = mm(y, w_ref[...]) + vec(b_ref)[None, :]
  source = plgpu.load(gate_source_ref, mask=valid, other=0.0).astype(F32)
  if gate_eps is None:
    gate = source
  else:
    ln_scale, ln_offset, wg_ref, bg_ref = gate_refs
    z_norm = layer_norm(source, vec(ln_scale), vec(ln_offset), gate_eps, wg_ref.dtype)
    gate = mm(z_norm, wg_ref[...]) + vec(bg_ref)[None, :]
  plgpu.store(out_ref, (projected * jax.nn.sigmoid(gate)).astype(out_ref.dtype), mask=valid)


def _check_output_side(c_hidden, c_z, center_scale, center_offset, kernel, bias):
  if kernel.shape != (c_hidden, c_z) or bias.shape != (c_z,):
    raise ValueError(f"the output projection must be [{c_hidden}, {c_z}] with a [{c_z}] bias, "
                     f"got {kernel.shape} and {bias.shape}")
  if center_scale.shape != (c_hidden,) or center_offset.shape != (c_hidden,):
    raise ValueError(f"the centre LayerNorm's scale and offset must be [{c_hidden}], got "
                     f"{center_scale.shape} and {center_offset.shape}")


def _call(product_cm, gate_source, gate_params, center_scale, center_offset, kernel, bias, *,
          eps, gate_eps, dtype, interpret, name):
  c_hidden, rows = product_cm.shape
  c_z = gate_source.shape[1]
  block = min(BLOCK_ROWS, max(16, pl.next_power_of_2(rows)))
  gate_specs = ([vector_spec(c_z), vector_spec(c_z), matrix_spec((c_z, c_z)), vector_spec(c_z)]
                if gate_params else [])
  run = pl.pallas_call(
      functools.partial(_kernel, eps=float(eps), rows=rows, block_rows=block,
                        gate_eps=gate_eps),
      grid=(pl.cdiv(rows, block),),
      in_specs=[pl.BlockSpec((c_hidden, block), lambda i: (0, i)),
                pl.BlockSpec((block, c_z), lambda i: (i, 0))] + gate_specs
               + [vector_spec(c_hidden), vector_spec(c_hidden),
                  matrix_spec((c_hidden, c_z)), vector_spec(c_z)],
      out_specs=pl.BlockSpec((block, c_z), lambda i: (i, 0)),
      out_shape=out_struct((rows, c_z), dtype, gate_source),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name=name,
  )
  return run(product_cm, gate_source, *gate_params, center_scale, center_offset,
             kernel.astype(dtype), bias)


def triangle_epilogue(product_cm, gate_logits, center_scale, center_offset, kernel, bias, *,
                      eps: float, dtype, interpret: bool = False):
  """`[rows, c_z]` in `dtype`: (LayerNorm(product) @ kernel + bias) * sigmoid(gate_logits),
  with `product_cm` `[c_hidden, rows]` (channel-major), `gate_logits` `[rows, c_z]`, the
  centre LayerNorm's `center_scale`/`center_offset` `[c_hidden]` and the output projection's
  `kernel` `[c_hidden, c_z]` and `bias` `[c_z]`. `unsupported_reason` must be None;
  `interpret=True` runs Pallas's interpreter (tests)."""
  c_hidden, c_z = product_cm.shape[0], gate_logits.shape[1]
  _check_output_side(c_hidden, c_z, center_scale, center_offset, kernel, bias)
  return _call(product_cm, gate_logits, (), center_scale, center_offset, kernel, bias, eps=eps,
               gate_eps=None, dtype=dtype, interpret=interpret, name="jevo_triangle_epilogue_fwd")


def triangle_epilogue_gate_from_z(product_cm, z, ln_scale, ln_offset, gate_kernel, gate_bias,
                                  center_scale, center_offset, kernel, bias, *, ln_eps: float,
                                  eps: float, dtype, interpret: bool = False):
  """`triangle_epilogue` with the gate's logits computed here from the module's input z
  `[rows, c_z]`: `LayerNorm(z; ln_scale, ln_offset, ln_eps) @ gate_kernel + gate_bias`
  (`[c_z]`, `[c_z]`, `[c_z, c_z]`, `[c_z]`), the logits kept in float32.
  `unsupported_reason(product_cm, z, dtype)` must be None."""
  c_hidden, c_z = product_cm.shape[0], z.shape[1]
  _check_output_side(c_hidden, c_z, center_scale, center_offset, kernel, bias)
  if (gate_kernel.shape != (c_z, c_z) or gate_bias.shape != (c_z,) or ln_scale.shape != (c_z,)
      or ln_offset.shape != (c_z,)):
    raise ValueError(f"the gate layer must be [{c_z}, {c_z}] with a [{c_z}] bias and the input "
                     f"LayerNorm's scale and offset [{c_z}], got {gate_kernel.shape}, "
                     f"{gate_bias.shape}, {ln_scale.shape} and {ln_offset.shape}")
  gate_params = (ln_scale, ln_offset, gate_kernel.astype(dtype), gate_bias)
  return _call(product_cm, z, gate_params, center_scale, center_offset, kernel, bias, eps=eps,
               gate_eps=float(ln_eps), dtype=dtype, interpret=interpret,
               name="jevo_triangle_epilogue_gate_from_z_fwd")
