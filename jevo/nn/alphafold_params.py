"""Loads the Evoformer and extra-MSA parts of AlphaFold 2's published parameters into jevo.

AlphaFold's `params_model_*.npz` holds flat haiku names, `<module scope>//<param>`, with every
block of a stack stacked on the leading axis, e.g.
`alphafold/alphafold_iteration/evoformer/evoformer_iteration/msa_row_attention_with_pair_bias/attention//query_w`
of shape `[48, c_m, H, D]`. Every array jevo needs must be present with exactly the shape the
module's sizes imply; anything missing, mis-shaped or unrecognised under the prefix is refused
with one ValueError that lists it all, before any parameter is changed. The layout is that of the
monomer models (`params_model_1` .. `_5`, `_ptm`); AlphaFold-Multimer runs the outer product mean
first and v3 fuses the triangle projections, so its blocks are not these.

Example:
  >>> stack = EvoformerStack(rngs=nnx.Rngs(0))                   # AlphaFold's sizes
  >>> load_alphafold_params(stack, "params/params_model_1.npz")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jevo.nn.attention import GatedAttention
from jevo.nn.block import EvoformerBlock, ExtraMSABlock
from jevo.nn.global_attention import MSAColumnGlobalAttention
from jevo.nn.stack import EvoformerStack, ExtraMSAStack, _Stack

EVOFORMER_PREFIX = "alphafold/alphafold_iteration/evoformer/evoformer_iteration"
EXTRA_MSA_PREFIX = "alphafold/alphafold_iteration/evoformer/extra_msa_stack"

_MAX_LISTED = 12  # problems of one kind named in an error message

# (AlphaFold name below the prefix, jevo variable, AlphaFold's per-block shape)
_Entry = tuple[str, nnx.Variable, tuple[int, ...]]


def load_alphafold_params(target: EvoformerStack | ExtraMSAStack | EvoformerBlock,
                          params: Mapping[str, np.ndarray] | str | os.PathLike, *,
                          prefix: str | None = None, block_index: int | None = None) -> None:
  """Copies AlphaFold 2 parameters into `target` in place.

  Args:
    target: an `EvoformerStack` / `ExtraMSAStack` (all blocks; AlphaFold's leading block axis
      must equal `num_blocks`), or one `EvoformerBlock` / `ExtraMSABlock` with `block_index`.
    params: a mapping of AlphaFold names to arrays (e.g. `np.load(path)`) or the npz path.
    prefix: the haiku scope of the stack; defaults to `EVOFORMER_PREFIX`, or
      `EXTRA_MSA_PREFIX` for extra-MSA targets.
    block_index: which of AlphaFold's stacked blocks to load into a single block.

  Example:
    >>> block = ExtraMSABlock(rngs=nnx.Rngs(0))
    >>> load_alphafold_params(block, npz, block_index=3)  # doctest: +SKIP
  """
  if isinstance(params, (str, os.PathLike)):
    with np.load(params) as npz:
      return load_alphafold_params(target, dict(npz), prefix=prefix, block_index=block_index)
  if isinstance(target, _Stack):
    if block_index is not None:
      raise ValueError("block_index selects one block for a single-block target; a stack loads "
                       f"all of its {target.num_blocks} blocks, got block_index={block_index}")
    block, extra, num_blocks = target.blocks, isinstance(target, ExtraMSAStack), target.num_blocks
  elif isinstance(target, EvoformerBlock):
    if not isinstance(block_index, int) or block_index < 0:
      raise ValueError("block_index must be a non-negative int naming which of AlphaFold's "
                       f"stacked blocks to load into this block, got {block_index!r}")
    block, extra, num_blocks = target, isinstance(target, ExtraMSABlock), None
  else:
    raise TypeError("target must be an EvoformerStack, ExtraMSAStack, EvoformerBlock or "
                    f"ExtraMSABlock, got {type(target).__name__}")
  if prefix is None:
    prefix = EXTRA_MSA_PREFIX if extra else EVOFORMER_PREFIX
  prefix = prefix.rstrip("/")
  entries = block_entries(block)
  arrays = _checked_arrays(entries, params, prefix, num_blocks, block_index)
  for (_, var, _), array in zip(entries, arrays):
    var[...] = jnp.asarray(array.reshape(var.shape), dtype=var.dtype)


def _checked_arrays(entries: list[_Entry], params: Mapping[str, np.ndarray], prefix: str,
                    num_blocks: int | None, block_index: int | None) -> list[np.ndarray]:
  missing, misshaped, arrays = [], [], []
  for name, _, shape in entries:
    key = f"{prefix}/{name}"
    if key not in params:
      missing.append(f"{key} (expected shape {_expected(shape, num_blocks)})")
      continue
    array = np.asarray(params[key])
    if num_blocks is not None:
      if array.shape != (num_blocks,) + shape:
        misshaped.append(f"{key}: expected shape {(num_blocks,) + shape} "
                         f"(num_blocks, ...), got {array.shape}")
        continue
    elif array.ndim != len(shape) + 1 or array.shape[1:] != shape or array.shape[0] <= block_index:
      misshaped.append(f"{key}: expected shape (N > {block_index}, *{shape}) (blocks, ...), "
                       f"got {array.shape}")
      continue
    else:
      array = array[block_index]
    arrays.append(array)
  known = {f"{prefix}/{name}" for name, _, _ in entries}
  unexpected = sorted(k for k in params if k.startswith(prefix + "/") and k not in known)
  problems = []
  if not any(k.startswith(prefix + "/") for k in params):
    problems.append(f"no arrays under the prefix {prefix!r}")
  else:
    for what, items in (("missing", missing), ("mis-shaped", misshaped),
                        ("not recognised (another model variant?)", unexpected)):
      if items:
        listed = "\n  ".join(items[:_MAX_LISTED])
        more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        problems.append(f"{len(items)} array(s) {what}:\n  {listed}{more}")
  if problems:
    raise ValueError("cannot load AlphaFold parameters: " + "\n".join(problems))
  return arrays


def _expected(shape: tuple[int, ...], num_blocks: int | None) -> tuple:
  return (num_blocks,) + shape if num_blocks is not None else ("N",) + shape


def block_entries(block: EvoformerBlock) -> list[_Entry]:
  """Every parameter of a (possibly stacked) block with its AlphaFold name and per-block shape."""
  out: list[_Entry] = []
  c_m, c_z = block.c_m, block.c_z

  def layer_norm(scope, ln, n):
    out.extend([(f"{scope}//scale", ln.scale, (n,)), (f"{scope}//offset", ln.bias, (n,))])

  def linear(scope, lin):
    out.extend([(f"{scope}//weights", lin.kernel, (lin.in_features, lin.out_features)),
                (f"{scope}//bias", lin.bias, (lin.out_features,))])

  def attention(scope, att: GatedAttention | MSAColumnGlobalAttention, c_in):
    h, d = att.num_heads, att.head_dim
    kv = (c_in, d) if isinstance(att, MSAColumnGlobalAttention) else (c_in, h, d)
    out.extend([(f"{scope}//query_w", att.query.kernel, (c_in, h, d)),
                (f"{scope}//key_w", att.key.kernel, kv),
                (f"{scope}//value_w", att.value.kernel, kv),
                (f"{scope}//gating_w", att.gate.kernel, (c_in, h, d)),
                (f"{scope}//gating_b", att.gate.bias, (h, d)),
                (f"{scope}//output_w", att.output.kernel, (h, d, c_in)),
                (f"{scope}//output_b", att.output.bias, (c_in,))])

  row = block.msa_row_attention
  scope = "msa_row_attention_with_pair_bias"
  layer_norm(f"{scope}/query_norm", row.query_norm, c_m)
  layer_norm(f"{scope}/feat_2d_norm", row.pair_norm, c_z)
  out.append((f"{scope}//feat_2d_weights", row.pair_bias.kernel,
              (c_z, row.attention.num_heads)))
  attention(f"{scope}/attention", row.attention, c_m)

  col = block.msa_column_attention
  if isinstance(col, MSAColumnGlobalAttention):
    layer_norm("msa_column_global_attention/query_norm", col.query_norm, c_m)
    attention("msa_column_global_attention/attention", col, c_m)
  else:
    layer_norm("msa_column_attention/query_norm", col.query_norm, c_m)
    attention("msa_column_attention/attention", col.attention, c_m)

  for scope, t, n in (("msa_transition", block.msa_transition, c_m),
                      ("pair_transition", block.pair_transition, c_z)):
    layer_norm(f"{scope}/input_layer_norm", t.layer_norm, n)
    linear(f"{scope}/transition1", t.linear_1)
    linear(f"{scope}/transition2", t.linear_2)

  opm = block.outer_product_mean
  layer_norm("outer_product_mean/layer_norm_input", opm.layer_norm, c_m)
  linear("outer_product_mean/left_projection", opm.left_projection)
  linear("outer_product_mean/right_projection", opm.right_projection)
  out.extend([("outer_product_mean//output_w", opm.output.kernel,
               (opm.c_hidden, opm.c_hidden, c_z)),
              ("outer_product_mean//output_b", opm.output.bias, (c_z,))])

  for scope, tri in (("triangle_multiplication_outgoing", block.triangle_multiplication_outgoing),
                     ("triangle_multiplication_incoming", block.triangle_multiplication_incoming)):
    layer_norm(f"{scope}/layer_norm_input", tri.layer_norm_in, c_z)
    for name in ("left_projection", "right_projection", "left_gate", "right_gate",
                 "output_projection"):
      linear(f"{scope}/{name}", getattr(tri, name))
    layer_norm(f"{scope}/center_layer_norm", tri.center_norm, tri.c_hidden)
    linear(f"{scope}/gating_linear", tri.output_gate)

  for scope, tri in (("triangle_attention_starting_node", block.triangle_attention_starting_node),
                     ("triangle_attention_ending_node", block.triangle_attention_ending_node)):
    layer_norm(f"{scope}/query_norm", tri.query_norm, c_z)
    out.append((f"{scope}//feat_2d_weights", tri.pair_bias.kernel,
                (c_z, tri.attention.num_heads)))
    attention(f"{scope}/attention", tri.attention, c_z)
  return out
