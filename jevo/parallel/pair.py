"""The pair-side modules of a block on one DAP shard, with the modules' own parameters.

Outgoing triangle multiplication and starting-node attention work on pair rows (rows layout);
incoming multiplication and ending-node attention on pair columns (columns layout). Each
gathers only what every device needs whole: one gated projection `[*B, N_res, N_res, c_hidden]`
of the triangle multiplication, the triangle bias `[*B, 1, H, N_res, N_res]` of attention.
The transition works on each position alone, so its module is called on the shard as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jevo.nn.attention import pair_to_bias
from jevo.nn.chunking import chunked
from jevo.nn.triangle_attention import TriangleAttention
from jevo.nn.triangle_multiplication import TriangleMultiplication
from jevo.parallel.layout import DapAxis


def triangle_multiplication(module: TriangleMultiplication, z_local: jax.Array,
                            mask_local: jax.Array, ax: DapAxis, *,
                            chunk_size: int | None) -> jax.Array:
  """The update of this device's shard of `z`.

  Outgoing: z_local `[*B, N_res/n, N_res, c_z]` (rows layout), `z_ij <- sum_k l_ik r_jk` with
  `r` gathered over rows. Incoming: z_local `[*B, N_res, N_res/n, c_z]` (columns layout),
  `z_ij <- sum_k l_kj r_ki` with `r` gathered over columns. mask_local: the pair mask's shard
  in the same layout. The result has z_local's layout.
  """
  mask = mask_local[..., None]
  x = module.layer_norm_in(z_local)
  # Unchunked, the output gate joins the other four projections in one product; chunked, it is
  # projected per chunk so that its [.., c_z] logits never exist whole.
  left, right, gate = module.projections(x, mask, output_gate=chunk_size is None)
  gate_source = x if gate is None else gate

  def finish(act, g):
    return module.finish(act, module.output_gate(g) if gate is None else g)

  if module.outgoing:
    right = ax.gather(right, axis=-3)

    def rows(left_i, g_i):
      return finish(module.combine(left_i, right), g_i)

    return chunked(rows, (left, gate_source), (-3, -3), out_axis=-3, chunk_size=chunk_size)

  right = ax.gather(right, axis=-2)

  def rows(right_i, g_i):  # output rows i: all of them, for this device's columns j
    return finish(module.combine(left, right_i), g_i)

  return chunked(rows, (right, gate_source), (-2, -3), out_axis=-3, chunk_size=chunk_size)


def triangle_attention(module: TriangleAttention, z_local: jax.Array, mask_local: jax.Array,
                       ax: DapAxis, *, chunk_size: int | None) -> jax.Array:
  """The update of this device's shard of `z`.

  Starting node: z_local and mask_local in rows layout (`[*B, N_res/n, N_res, ...]`); ending
  node: in columns layout (`[*B, N_res, N_res/n, ...]`), i.e. the rows of the transposed pair
  that the module attends along. The bias rows are gathered. The result has z_local's layout.
  """
  if not module.starting:
    z_local = jnp.swapaxes(z_local, -2, -3)
    mask_local = jnp.swapaxes(mask_local, -1, -2)
  x = module.query_norm(z_local)
  bias = ax.gather(pair_to_bias(x, module.pair_bias), axis=-2)

  def rows(x_r, mask_r):
    return module.attention(x_r, mask_r, bias)

  out = chunked(rows, (x, mask_local), (-3, -2), out_axis=-3, chunk_size=chunk_size)
  return out if module.starting else jnp.swapaxes(out, -2, -3)
