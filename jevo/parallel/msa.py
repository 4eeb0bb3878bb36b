"""The MSA-side modules of a block on one DAP shard, with the modules' own parameters and code.

Each function calls the single-device module's `update` on this device's shard, passing the
gather that brings what every device needs whole: the pair bias `[*B, 1, H, N_res, N_res]` of
MSA row attention, the right projection `[*B, N_seq, N_res, c_hidden]` (and mask) of the outer
product mean. Column attention and the transitions work on each column (position) alone, so
their modules are called on the shard as they are.
"""

from __future__ import annotations

import functools

import jax

from jevo.nn.attention import MSARowAttentionWithPairBias
from jevo.nn.outer_product_mean import OuterProductMean
from jevo.parallel.layout import DapAxis


def msa_row_attention(module: MSARowAttentionWithPairBias, m_rows: jax.Array,
                      z_rows: jax.Array, mask_rows: jax.Array, ax: DapAxis, *,
                      chunk_size: int | None) -> jax.Array:
  """The update of `m` for this device's sequences.

  m_rows `[*B, N_seq/n, N_res, c_m]`, mask_rows `[*B, N_seq/n, N_res]` (rows layout);
  z_rows `[*B, N_res/n, N_res, c_z]` (rows layout), whose bias rows are gathered.
  """
  return module.update(m_rows, z_rows, mask_rows, chunk_size=chunk_size,
                       gather_bias=functools.partial(ax.gather, axis=-2))


def outer_product_mean(module: OuterProductMean, m_cols: jax.Array, mask_cols: jax.Array,
                       ax: DapAxis, *, chunk_size: int | None) -> jax.Array:
  """The update of the pair rows i that are this device's MSA columns (rows layout of z).

  m_cols `[*B, N_seq, N_res/n, c_m]`, mask_cols `[*B, N_seq, N_res/n]` (columns layout); the
  right projection and mask of the other columns j are gathered. Returns
  `[*B, N_res/n, N_res, c_z]`.
  """
  return module.update(m_cols, mask_cols, chunk_size=chunk_size,
                       gather=functools.partial(ax.gather, axis=-2))
