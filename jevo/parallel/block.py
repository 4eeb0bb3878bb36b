"""One Evoformer (or extra-MSA) block with Dynamic Axial Parallelism.

Per block, with n devices on the axis (each step on 1/n of the data):

    m rows layout (by sequence):  MSA row attention      <- pair bias, gathered  [H, R, R]
    m -> columns (all_to_all):    MSA column attention, MSA transition
                                  outer product mean     <- right projection, gathered
    m -> rows (all_to_all)
    z rows layout (by row):       triangle multiplication, outgoing  <- projection, ring
                                  triangle multiplication, incoming  -> partial sums, ring
                                  triangle attention, starting node  <- bias, gathered
    z -> columns (all_to_all):    triangle attention, ending node    <- bias, gathered
                                  pair transition
    z -> rows (all_to_all)

The outer product mean of the pair rows i that a device holds needs its own MSA columns i and
all columns j, so it runs in the MSA's columns layout and writes z's rows layout directly. The
triangle multiplications pass blocks of their projections around a ring of devices
(`jevo.parallel.ring`); the incoming one sums over the pair rows k, each device adding its
rows' part to partial sums that travel to the rows' owner, so the pair stays in rows layout
until the ending-node attention.
"""

from __future__ import annotations

import jax

from jevo.nn import _common as c
from jevo.nn.block import NUM_DROPOUT_KEYS, EvoformerBlock, ExtraMSABlock, check_block_inputs
from jevo.nn.dropout import RngsLike, draws_from_own_streams, dropout_keys
from jevo.parallel import mesh as mesh_lib
from jevo.parallel.dropout import shared_dropout
from jevo.parallel.layout import COLUMNS, ROWS, DapAxis
from jevo.parallel.msa import msa_row_attention, outer_product_mean
from jevo.parallel.pair import triangle_attention, triangle_multiplication
from jevo.parallel.sharded import Masks, Sizes, run_sharded
from jevo.parallel.validation import check_module


def block_on_shard(block: EvoformerBlock, m: jax.Array, z: jax.Array, masks: Masks,
                   keys: list[jax.Array | None], ax: DapAxis, sizes: Sizes, *,
                   chunk_size: c.BlockChunkSize) -> tuple[jax.Array, jax.Array]:
  """`block(m, z, ...)` on this device's shards: m, z in rows layout in and out.

  keys: the block's `NUM_DROPOUT_KEYS` dropout keys, or Nones to draw from its own streams.
  """
  def cs(name):  # the sub-module's chunk size, as in EvoformerBlock
    return dict(chunk_size=c.sub_module_chunk_size(chunk_size, name))

  msa_shape, pair_shape = sizes.msa(block.c_m), sizes.pair(block.c_z)

  def add(x, update, dropout=None, key=None, *, shape=None, split_axis=None):
    if dropout is not None:
      update = shared_dropout(dropout, update, key, shape=shape, split_axis=split_axis, ax=ax)
    return x + update.astype(x.dtype)

  # Named scopes as in EvoformerBlock, so that profiles name each sub-module; the layout
  # changes between them stay outside, where a profile shows them on their own.
  with jax.named_scope("msa_row_attention"):
    m = add(m, msa_row_attention(block.msa_row_attention, m, z, masks.msa_rows, ax,
                                 **cs("msa_row_attention")),
            block.msa_dropout, keys[0], shape=msa_shape, split_axis=ROWS)
  m = ax.to_columns(m)
  with jax.named_scope("msa_column_attention"):
    m = add(m, block.msa_column_attention(m, masks.msa_cols, **cs("msa_column_attention")))
  with jax.named_scope("msa_transition"):
    m = add(m, block.msa_transition(m, masks.msa_cols, **cs("msa_transition")))
  with jax.named_scope("outer_product_mean"):
    z = add(z, outer_product_mean(block.outer_product_mean, m, masks.msa_cols, ax,
                                  **cs("outer_product_mean")))
  m = ax.to_rows(m)

  rowwise, columnwise = block.pair_dropout_rowwise, block.pair_dropout_columnwise
  with jax.named_scope("triangle_multiplication_outgoing"):
    z = add(z, triangle_multiplication(block.triangle_multiplication_outgoing, z,
                                       masks.pair_rows, ax,
                                       **cs("triangle_multiplication_outgoing")),
            rowwise, keys[1], shape=pair_shape, split_axis=ROWS)
  with jax.named_scope("triangle_multiplication_incoming"):
    z = add(z, triangle_multiplication(block.triangle_multiplication_incoming, z,
                                       masks.pair_rows, ax,
                                       **cs("triangle_multiplication_incoming")),
            rowwise, keys[2], shape=pair_shape, split_axis=ROWS)
  with jax.named_scope("triangle_attention_starting_node"):
    z = add(z, triangle_attention(block.triangle_attention_starting_node, z, masks.pair_rows,
                                  ax, **cs("triangle_attention_starting_node")),
            rowwise, keys[3], shape=pair_shape, split_axis=ROWS)
  z = ax.to_columns(z)
  with jax.named_scope("triangle_attention_ending_node"):
    z = add(z, triangle_attention(block.triangle_attention_ending_node, z, masks.pair_cols,
                                  ax, **cs("triangle_attention_ending_node")),
            columnwise, keys[4], shape=pair_shape, split_axis=COLUMNS)
  with jax.named_scope("pair_transition"):
    z = add(z, block.pair_transition(z, masks.pair_cols, **cs("pair_transition")))
  return m, ax.to_rows(z)


def dap_evoformer_block(block: EvoformerBlock, m: jax.Array, z: jax.Array,
                        msa_mask: jax.Array | None = None, pair_mask: jax.Array | None = None,
                        *, mesh: mesh_lib.MeshLike | None = None,
                        axis: str = mesh_lib.DEFAULT_AXIS, rngs: RngsLike = None,
                        chunk_size: c.BlockChunkSize = None) -> tuple[jax.Array, jax.Array]:
  """`block(m, z, msa_mask, pair_mask, rngs=rngs, chunk_size=chunk_size)`, spread over `axis`.

  Same arguments, parameters and results as calling the `EvoformerBlock` (or `ExtraMSABlock`)
  itself, the same dropout masks for the same key, computed with Dynamic Axial Parallelism
  over the devices of mesh axis `axis` (`mesh` defaults to the one set by `jax.set_mesh`).
  m `[*B, N_seq, N_res, c_m]` and z `[*B, N_res, N_res, c_z]` are split along N_seq and along
  pair rows; sizes that do not divide by the axis size are padded and masked. Without `rngs`,
  dropout (training mode) draws from the block's own streams and advances them, as the block
  does. Works under `jax.jit`, `jax.grad` and `jax.checkpoint`.

  Example:
    >>> mesh = jevo.parallel.make_dap_mesh()
    >>> m, z = jax.jit(lambda m, z: dap_evoformer_block(block, m, z, mesh=mesh))(m, z)
  """
  check_module("block", block, (EvoformerBlock, ExtraMSABlock))
  msa_mask, pair_mask = check_block_inputs(m, z, msa_mask, pair_mask, block.c_m, block.c_z)
  c.check_block_chunk_size(chunk_size)
  keys = dropout_keys(rngs, NUM_DROPOUT_KEYS)

  def body(block, m, z, masks, keys, ax, sizes):
    return block_on_shard(block, m, z, masks, keys, ax, sizes, chunk_size=chunk_size)

  return run_sharded(body, block, m, z, msa_mask, pair_mask, keys, mesh=mesh, axis=axis,
                     write_back=rngs is None and draws_from_own_streams(block))
