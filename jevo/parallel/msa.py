"""The MSA-side modules of a block on one DAP shard, with the modules' own parameters.

Each function takes the single-device module and computes exactly what the module computes,
restricted to this device's shard; only the tensors that every device needs whole are
gathered: the pair bias `[*B, 1, H, N_res, N_res]` of MSA row attention and the right
projection `[*B, N_seq, N_res, c_hidden]` of the outer product mean. Column attention and the
transitions work on each column (position) alone, so their modules are called on the shard as
they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jevo.nn.attention import MSARowAttentionWithPairBias, pair_to_bias
from jevo.nn.chunking import chunked
from jevo.nn.linear import project
from jevo.nn.outer_product_mean import NORM_EPS, OuterProductMean
from jevo.parallel.layout import DapAxis


def msa_row_attention(module: MSARowAttentionWithPairBias, m_rows: jax.Array,
                      z_rows: jax.Array, mask_rows: jax.Array, ax: DapAxis, *,
                      chunk_size: int | None) -> jax.Array:
  """The update of `m` for this device's sequences.

  m_rows `[*B, N_seq/n, N_res, c_m]`, mask_rows `[*B, N_seq/n, N_res]` (rows layout);
  z_rows `[*B, N_res/n, N_res, c_z]` (rows layout), whose bias rows are gathered.
  """
  bias = ax.gather(pair_to_bias(module.pair_norm(z_rows), module.pair_bias), axis=-2)

  def rows(m_r, mask_r):
    return module.attention(module.query_norm(m_r), mask_r, bias)

  return chunked(rows, (m_rows, mask_rows), (-3, -2), out_axis=-3, chunk_size=chunk_size)


def outer_product_mean(module: OuterProductMean, m_cols: jax.Array, mask_cols: jax.Array,
                       mask: jax.Array, ax: DapAxis, *, chunk_size: int | None) -> jax.Array:
  """The update of the pair rows i that are this device's MSA columns (rows layout of z).

  m_cols `[*B, N_seq, N_res/n, c_m]`, mask_cols `[*B, N_seq, N_res/n]` (columns layout);
  mask `[*B, N_seq, N_res]` (whole). Returns `[*B, N_res/n, N_res, c_z]`.
  """
  mask_cols = mask_cols[..., None]
  x = module.layer_norm(m_cols)
  a, b = project(x, module.left_projection, module.right_projection)
  a = mask_cols.astype(x.dtype) * a
  b = ax.gather(mask_cols.astype(x.dtype) * b, axis=-2)

  def rows(a_i):
    outer = jnp.einsum("...sic,...sjd->...ijcd", a_i, b)
    channels = module.c_hidden * module.c_hidden  # not -1: a reshape cannot infer it when empty
    return module.output(outer.reshape(outer.shape[:-2] + (channels,)))

  out = chunked(rows, (a,), (-2,), out_axis=-3, chunk_size=chunk_size)
  count = jnp.einsum("...sic,...sjc->...ijc", mask_cols.astype(jnp.float32),
                     mask[..., None].astype(jnp.float32))
  return (out / (NORM_EPS + count)).astype(out.dtype)
