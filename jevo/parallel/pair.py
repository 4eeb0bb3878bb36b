"""The pair-side modules of a block on one DAP shard, with the modules' own parameters and code.

Both triangle multiplications and starting-node attention work on pair rows (rows layout);
ending-node attention on pair columns (columns layout). Attention gathers the triangle bias
`[*B, 1, H, N_res, N_res]`, which every device needs whole. The triangle multiplications
gather nothing: their `[*B, N_res/n, N_res, c_hidden]` projections travel around the ring of
devices block by block (`jevo.parallel.ring`), so that no device holds a tensor of the whole
pair's size. The transition works on each position alone, so its module is called on the
shard as it is.
"""

from __future__ import annotations

import functools

import jax

from jevo.nn.chunking import chunked
from jevo.nn.triangle_attention import TriangleAttention
from jevo.nn.triangle_multiplication import TriangleMultiplication
from jevo.parallel.layout import DapAxis
from jevo.parallel.ring import gathered_product, scattered_product


def triangle_multiplication(module: TriangleMultiplication, z_local: jax.Array,
                            mask_local: jax.Array, ax: DapAxis, *,
                            chunk_size: int | None) -> jax.Array:
  """The update of this device's shard of `z`, both in rows layout `[*B, N_res/n, N_res, c_z]`
  (mask_local: the pair mask's shard, `[*B, N_res/n, N_res]`).

  Outgoing: `z_ij <- sum_k l_ik r_jk`: this device's rows i of `l` meet the rows j of `r` of
  every device, whose blocks travel around the ring (`gathered_product`). Incoming:
  `z_ij <- sum_k l_kj r_ki`: the rows this device holds are the k of the sum, so it adds its
  part of each output block to a partial sum that travels around the ring and ends on the
  device that holds those rows i (`scattered_product`). Both keep the pair in rows layout and
  hold one block of `[*B, N_res/n, N_res, c_hidden]` at a time, never the whole of it; each
  block's product is the module's own `combine`.
  """
  mask = mask_local[..., None]
  x = module.layer_norm_in(z_local)
  # Unchunked, the output gate joins the other four projections in one product; chunked, it is
  # projected per chunk so that its [.., c_z] logits never exist whole.
  left, right, gate = module.projections(x, mask, output_gate=chunk_size is None)
  product = gathered_product if module.outgoing else scattered_product
  act = product(module.combine, ax, -2, left, right)
  if gate is not None:
    return module.finish(act, gate)

  def rows(act_i, x_i):
    return module.finish(act_i, module.output_gate(x_i))

  return chunked(rows, (act, x), (-3, -3), out_axis=-3, chunk_size=chunk_size)


def triangle_attention(module: TriangleAttention, z_local: jax.Array, mask_local: jax.Array,
                       ax: DapAxis, *, chunk_size: int | None) -> jax.Array:
  """The update of this device's shard of `z`, by the module's own `update`.

  Starting node: z_local and mask_local in rows layout (`[*B, N_res/n, N_res, ...]`); ending
  node: in columns layout (`[*B, N_res, N_res/n, ...]`), i.e. the rows of the transposed pair
  that the module attends along. The bias rows are gathered. The result has z_local's layout.
  """
  return module.update(z_local, mask_local, chunk_size=chunk_size,
                       gather_bias=functools.partial(ax.gather, axis=-2))
