"""The pair-side modules of a block on one DAP shard, with the modules' own parameters.

Both triangle multiplications and starting-node attention work on pair rows (rows layout);
ending-node attention on pair columns (columns layout). Each gathers only what every device
needs whole: the outgoing multiplication's gated projection `[*B, N_res, N_res, c_hidden]`, the
triangle bias `[*B, 1, H, N_res, N_res]` of attention. The incoming multiplication instead sums
partial products over the devices with a reduce-scatter of the same size. The transition works
on each position alone, so its module is called on the shard as it is.
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
  """The update of this device's shard of `z`, both in rows layout `[*B, N_res/n, N_res, c_z]`
  (mask_local: the pair mask's shard, `[*B, N_res/n, N_res]`).

  Outgoing: `z_ij <- sum_k l_ik r_jk`, with `r` gathered over rows so that every j is here.
  Incoming: `z_ij <- sum_k l_kj r_ki`. The rows this device holds are the k of the sum, so it
  forms the partial sum over its k for every (i, j), and a reduce-scatter adds the devices'
  partials and leaves each its rows i. That keeps the pair in rows layout, where the
  starting-node attention after it works, and saves the all_to_alls to columns layout and back.
  The partials are in the computation's dtype.
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

  # right's residue axis i, [*B, k, N_res, c] -> [*B, k, n, N_res/n, c]: block d holds the rows
  # i of device d, so chunking along N_res/n takes the same rows of every device's block.
  n = ax.size
  right = right.reshape(right.shape[:-2] + (n, right.shape[-2] // n, right.shape[-1]))

  def rows(right_i, g_i):  # right_i: [*B, k, n, chunk, c]; g_i: this device's rows of the chunk
    # The module's own sum over k, for the rows (d, i) of every device d: [*B, n * chunk, N_res,
    # c], then split by device for the reduce-scatter.
    merged = right_i.reshape(right_i.shape[:-3] + (-1, right_i.shape[-1]))
    partial = module.combine(left, merged)
    partial = partial.reshape(right_i.shape[:-4] + right_i.shape[-3:-1] + partial.shape[-2:])
    return finish(ax.sum_scatter(partial, axis=-4), g_i)

  # Splitting this reduce-scatter into independent pieces, so that sending one could overlap
  # multiplying the next, made the 2-GPU training step slower (857 against 806 ms with 4 pieces).
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
