"""One Evoformer block (supplement Alg. 6, lines 2-10) and one extra-MSA block (Alg. 18)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.attention import MSAColumnAttention, MSARowAttentionWithPairBias
from jevo.nn.dropout import RngsLike, dropout_keys
from jevo.nn.global_attention import MSAColumnGlobalAttention
from jevo.nn.outer_product_mean import OuterProductMean
from jevo.nn.transition import Transition
from jevo.nn.triangle_attention import TriangleAttention
from jevo.nn.triangle_multiplication import TriangleMultiplication

# Dropout layers drawn per block call: MSA row attention, 2 triangle multiplications,
# 2 triangle attentions.
NUM_DROPOUT_KEYS = 5


class EvoformerBlock(nnx.Module):
  """MSA row/column attention, MSA transition, outer product mean, triangle updates, pair transition.

  `__call__(m, z, msa_mask, pair_mask)` returns the updated `(m, z)`: m `[*B, N_seq, N_res, c_m]`,
  z `[*B, N_res, N_res, c_z]`, masks broadcastable to `[*B, N_seq, N_res]` and `[*B, N_res, N_res]` (1 = valid).
  Dropout is shared along rows (MSA row attention: rate `msa_dropout`; triangle multiplications
  and starting-node attention: `pair_dropout`) or along columns (ending-node attention). It
  draws from the `rngs` given at construction, or from a call-time `rngs`; `.eval()` turns it
  off. `chunk_size` bounds memory along each module's independent axis, in training too (each
  slice is recomputed in the backward pass, `jevo.nn.chunking`): one size for every sub-module,
  or a mapping from sub-module names (`jevo.nn.BLOCK_SUB_MODULES`, the attributes' names) to
  sizes, the others unchunked, e.g. `{"outer_product_mean": 128}`.

  Example:
    >>> block = EvoformerBlock(32, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
    ...                        c_hidden_pair_att=8, c_hidden_opm=4, c_hidden_mul=8,
    ...                        rngs=nnx.Rngs(0))
    >>> m, z = block(jnp.ones((3, 5, 32)), jnp.ones((5, 5, 16)))
  """

  _global_column_attention = False

  def __init__(self, c_m: int = 256, c_z: int = 128, *, num_heads_msa: int = 8,
               c_hidden_msa_att: int = 32, num_heads_pair: int = 4, c_hidden_pair_att: int = 32,
               c_hidden_opm: int = 32, c_hidden_mul: int = 128, transition_n: int = 4,
               msa_dropout: float = 0.15, pair_dropout: float = 0.25,
               implementation: str | None = None,
               output_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, rate in (("msa_dropout", msa_dropout), ("pair_dropout", pair_dropout)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
    self.c_m, self.c_z = c_m, c_z
    kw = dict(output_kernel_init=output_kernel_init, layer_norm_eps=layer_norm_eps, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    op = dict(implementation=implementation)
    self.msa_row_attention = MSARowAttentionWithPairBias(
        c_m, c_z, num_heads=num_heads_msa, head_dim=c_hidden_msa_att, **op, **kw)
    if self._global_column_attention:
      self.msa_column_attention = MSAColumnGlobalAttention(
          c_m, num_heads=num_heads_msa, head_dim=c_hidden_msa_att, **kw)
    else:
      self.msa_column_attention = MSAColumnAttention(
          c_m, num_heads=num_heads_msa, head_dim=c_hidden_msa_att, **op, **kw)
    self.msa_transition = Transition(c_m, factor=transition_n, **kw)
    self.outer_product_mean = OuterProductMean(c_m, c_z, c_hidden_opm, **kw)
    self.triangle_multiplication_outgoing = TriangleMultiplication(
        c_z, c_hidden_mul, outgoing=True, **kw)
    self.triangle_multiplication_incoming = TriangleMultiplication(
        c_z, c_hidden_mul, outgoing=False, **kw)
    pair_att = dict(num_heads=num_heads_pair, head_dim=c_hidden_pair_att, **op, **kw)
    self.triangle_attention_starting_node = TriangleAttention(c_z, starting=True, **pair_att)
    self.triangle_attention_ending_node = TriangleAttention(c_z, starting=False, **pair_att)
    self.pair_transition = Transition(c_z, factor=transition_n, **kw)
    # Axis -3 shared: one mask per row position for all rows; axis -2: one per column.
    self.msa_dropout = nnx.Dropout(msa_dropout, broadcast_dims=(-3,), rngs=rngs)
    self.pair_dropout_rowwise = nnx.Dropout(pair_dropout, broadcast_dims=(-3,), rngs=rngs)
    self.pair_dropout_columnwise = nnx.Dropout(pair_dropout, broadcast_dims=(-2,), rngs=rngs)

  def __call__(self, m: jax.Array, z: jax.Array, msa_mask: jax.Array | None = None,
               pair_mask: jax.Array | None = None, *, rngs: RngsLike = None,
               chunk_size: c.BlockChunkSize = None) -> tuple[jax.Array, jax.Array]:
    msa_mask, pair_mask = check_block_inputs(m, z, msa_mask, pair_mask, self.c_m, self.c_z)
    c.check_block_chunk_size(chunk_size)
    k = dropout_keys(rngs, NUM_DROPOUT_KEYS)

    def add(x, name, update_fn, dropout=None, key=None):
      # Each update runs under a named scope, so that profiles and HLO name the sub-module;
      # update_fn takes the sub-module's chunk size.
      with jax.named_scope(name):
        update = update_fn(c.sub_module_chunk_size(chunk_size, name))
        if dropout is not None:
          update = dropout(update, rngs=key)
        return x + update.astype(x.dtype)

    m = add(m, "msa_row_attention",
            lambda cs: self.msa_row_attention(m, z, msa_mask, chunk_size=cs),
            self.msa_dropout, k[0])
    m = add(m, "msa_column_attention",
            lambda cs: self.msa_column_attention(m, msa_mask, chunk_size=cs))
    m = add(m, "msa_transition", lambda cs: self.msa_transition(m, msa_mask, chunk_size=cs))
    z = add(z, "outer_product_mean",
            lambda cs: self.outer_product_mean(m, msa_mask, chunk_size=cs))
    z = add(z, "triangle_multiplication_outgoing",
            lambda cs: self.triangle_multiplication_outgoing(z, pair_mask, chunk_size=cs),
            self.pair_dropout_rowwise, k[1])
    z = add(z, "triangle_multiplication_incoming",
            lambda cs: self.triangle_multiplication_incoming(z, pair_mask, chunk_size=cs),
            self.pair_dropout_rowwise, k[2])
    z = add(z, "triangle_attention_starting_node",
            lambda cs: self.triangle_attention_starting_node(z, pair_mask, chunk_size=cs),
            self.pair_dropout_rowwise, k[3])
    z = add(z, "triangle_attention_ending_node",
            lambda cs: self.triangle_attention_ending_node(z, pair_mask, chunk_size=cs),
            self.pair_dropout_columnwise, k[4])
    z = add(z, "pair_transition", lambda cs: self.pair_transition(z, pair_mask, chunk_size=cs))
    return m, z


class ExtraMSABlock(EvoformerBlock):
  """An Evoformer block over the extra MSA (c_e channels) with global column attention.

  Same layout, masks, dropout and chunking as `EvoformerBlock`; AlphaFold's sizes: c_e 64,
  row and column attention 8 heads x 8.

  Example:
    >>> block = ExtraMSABlock(16, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
    ...                       c_hidden_pair_att=8, c_hidden_opm=4, c_hidden_mul=8,
    ...                       rngs=nnx.Rngs(0))
    >>> e, z = block(jnp.ones((7, 5, 16)), jnp.ones((5, 5, 16)))
  """

  _global_column_attention = True

  def __init__(self, c_e: int = 64, c_z: int = 128, *, num_heads_msa: int = 8,
               c_hidden_msa_att: int = 8, **kwargs):
    super().__init__(c_e, c_z, num_heads_msa=num_heads_msa, c_hidden_msa_att=c_hidden_msa_att,
                     **kwargs)


def check_block_inputs(m, z, msa_mask, pair_mask, c_m: int, c_z: int
                       ) -> tuple[jax.Array | None, jax.Array | None]:
  """Checks that m, z and the masks fit one another and the block's sizes (ValueError or
  TypeError naming the argument); returns the masks as bool arrays broadcast to
  `[*B, N_seq, N_res]` and `[*B, N_res, N_res]` (1 / True = valid; None stays None)."""
  c.check_input("m", m, 3, c_m, "[*B, N_seq, N_res, c_m]")
  c.check_input("z", z, 3, c_z, "[*B, N_res, N_res, c_z]")
  n_res = m.shape[-2]
  expected_z = m.shape[:-3] + (n_res, n_res, c_z)
  if z.shape != expected_z:
    raise ValueError(f"z must have shape [*B, N_res, N_res, c_z] = {expected_z} for m of shape "
                     f"{m.shape}, got {z.shape}")
  msa_mask = None if msa_mask is None else c.check_mask("msa_mask", msa_mask, m.shape[:-1])
  pair_mask = None if pair_mask is None else c.check_mask("pair_mask", pair_mask, z.shape[:-1])
  return msa_mask, pair_mask
