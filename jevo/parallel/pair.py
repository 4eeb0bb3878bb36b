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
  left = (mask.astype(x.dtype) * module.left_projection(x)
          * jax.nn.sigmoid(module.left_gate(x)))
  right = (mask.astype(x.dtype) * module.right_projection(x)
           * jax.nn.sigmoid(module.right_gate(x)))

  def finish(act, x_gate):
    act = module.output_projection(module.center_norm(act))
    return act * jax.nn.sigmoid(module.output_gate(x_gate))

  if module.outgoing:
    right = ax.gather(right, axis=-3)

    def rows(left_i, x_i):
      return finish(jnp.einsum("...ikc,...jkc->...ijc", left_i, right), x_i)

    return chunked(rows, (left, x), (-3, -3), out_axis=-3, chunk_size=chunk_size)

  right = ax.gather(right, axis=-2)

  def rows(right_i, x_i):  # output rows i: all of them, for this device's columns j
    return finish(jnp.einsum("...kjc,...kic->...ijc", left, right_i), x_i)

  return chunked(rows, (right, x), (-2, -3), out_axis=-3, chunk_size=chunk_size)


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
