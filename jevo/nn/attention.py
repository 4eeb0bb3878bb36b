"""Gated multi-head attention (AlphaFold's `Attention`) and the two MSA attention modules.

All attention goes through `jevo.evoformer_attention` with q, k, v laid out `[*B, N, S, H, D]`
(N: the independent axis, S: the attended one), so no module here forms `[N, H, S, S]` logits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.chunking import chunked
from jevo.nn.linear import linear
from jevo.ops.attention import evoformer_attention


class GatedAttention(nnx.Module):
  """Self-attention along axis -2 of `x [*B, N, S, C]`, independently over N, with a sigmoid gate.

  Supplement Alg. 7/8/13/14 lines 1-6 (AlphaFold's `Attention` with `gating=True`): q, k, v and
  the gate are projected from `x`; the gate (weights 0, bias 1 at init) scales the attention
  output per head before the output projection (zero-initialised).

  Example:
    >>> att = GatedAttention(16, 2, 8, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((3, 5, 16))).shape
    (3, 5, 16)
  """

  def __init__(self, c_in: int, num_heads: int, head_dim: int, *,
               implementation: str | None = None,
               kernel_init: c.Initializer = c.glorot_init,
               output_kernel_init: c.Initializer = c.final_init,
               gate_kernel_init: c.Initializer = c.final_init,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, value in (("c_in", c_in), ("num_heads", num_heads), ("head_dim", head_dim)):
      c.check_positive(name, value)
    self.c_in, self.num_heads, self.head_dim = c_in, num_heads, head_dim
    self.implementation = implementation
    hd = num_heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = linear(c_in, hd, use_bias=False, kernel_init=kernel_init, **kw)
    self.key = linear(c_in, hd, use_bias=False, kernel_init=kernel_init, **kw)
    self.value = linear(c_in, hd, use_bias=False, kernel_init=kernel_init, **kw)
    self.gate = linear(c_in, hd, kernel_init=gate_kernel_init, bias_init=nnx.initializers.ones,
                         **kw)
    self.output = linear(hd, c_in, kernel_init=output_kernel_init, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """x `[*B, N, S, C]` (normalised); mask bool `[*B, N, S]`; bias `[*B, 1, H, S, S]`."""
    heads = x.shape[:-1] + (self.num_heads, self.head_dim)
    q = self.query(x).reshape(heads)
    k = self.key(x).reshape(heads)
    v = self.value(x).reshape(heads)
    if mask is not None:
      mask = mask[..., None, None, :]  # [*B, N, 1, 1, S]: one key mask per attention row
    if bias is not None:
      bias = bias.astype(q.dtype)
    o = evoformer_attention(q, k, v, mask=mask, bias=bias, implementation=self.implementation)
    o = o * jax.nn.sigmoid(self.gate(x)).reshape(heads).astype(o.dtype)
    return self.output(o.reshape(x.shape[:-1] + (self.num_heads * self.head_dim,)))


def pair_to_bias(z_normed: jax.Array, projection: nnx.Linear) -> jax.Array:
  """Projects a normalised pair `[*B, S, S, c_z]` to the op's shared bias `[*B, 1, H, S, S]`."""
  return jnp.moveaxis(projection(z_normed), -1, -3)[..., None, :, :, :]


def _optional_mask(name: str, mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
  # No mask at all is passed on as None so that the op skips masking.
  return None if mask is None else c.check_mask(name, mask, shape)


class MSARowAttentionWithPairBias(nnx.Module):
  """Row-wise gated self-attention over the MSA, biased by the pair representation (Alg. 7).

  Returns the update of `m [*B, N_seq, N_res, c_m]`; the bias is `LayerNorm(z) @ W` `[H]` per
  residue pair, shared by all rows.

  Example:
    >>> att = MSARowAttentionWithPairBias(32, 16, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((4, 6, 32)), jnp.ones((6, 6, 16))).shape
    (4, 6, 32)
  """

  def __init__(self, c_m: int = 256, c_z: int = 128, *, num_heads: int = 8, head_dim: int = 32,
               implementation: str | None = None,
               kernel_init: c.Initializer = c.glorot_init,
               output_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c.check_positive("c_m", c_m)
    c.check_positive("c_z", c_z)
    self.c_m, self.c_z = c_m, c_z
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_norm = c.layer_norm(c_m, eps=layer_norm_eps, **kw)
    self.pair_norm = c.layer_norm(c_z, eps=layer_norm_eps, **kw)
    self.pair_bias = linear(c_z, num_heads, use_bias=False, kernel_init=c.pair_bias_init(c_z),
                              **kw)
    self.attention = GatedAttention(c_m, num_heads, head_dim, implementation=implementation,
                                    kernel_init=kernel_init,
                                    output_kernel_init=output_kernel_init, **kw)

  def __call__(self, m: jax.Array, z: jax.Array, msa_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_input("m", m, 3, self.c_m, "[*B, N_seq, N_res, c_m]")
    c.check_input("z", z, 3, self.c_z, "[*B, N_res, N_res, c_z]")
    c.check_chunk_size(chunk_size)
    if z.shape[:-1] != m.shape[:-3] + (m.shape[-2], m.shape[-2]):
      raise ValueError(f"z must have shape [*B, N_res, N_res, c_z] = "
                       f"{m.shape[:-3] + (m.shape[-2], m.shape[-2], self.c_z)} to match m "
                       f"{m.shape}, got {z.shape}")
    mask = _optional_mask("msa_mask", msa_mask, m.shape[:-1])
    return self.update(m, z, mask, chunk_size=chunk_size)

  def update(self, m: jax.Array, z: jax.Array, mask: jax.Array | None, *,
             chunk_size: int | None = None,
             gather_bias: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`__call__` without its argument checks, for callers that hold slices of m and z.

    m `[*B, N, N_res, c_m]` (any N sequences), mask bool `[*B, N, N_res]` or None; z
    `[*B, R, N_res, c_z]`, some R of the pair's rows. The bias of those rows,
    `[*B, 1, H, R, N_res]`, passes through `gather_bias` (identity when None), which returns
    the bias of all N_res rows: an all-gather where each device holds a slice of z's rows
    (`jevo.parallel`).
    """
    bias = pair_to_bias(self.pair_norm(z), self.pair_bias)
    if gather_bias is not None:
      bias = gather_bias(bias)

    def rows(m_rows, mask_rows):
      return self.attention(self.query_norm(m_rows), mask_rows, bias)

    return chunked(rows, (m, mask), (-3, -2), out_axis=-3, chunk_size=chunk_size)


class MSAColumnAttention(nnx.Module):
  """Column-wise gated self-attention over the MSA (Alg. 8): rows of the transposed MSA.

  Example:
    >>> att = MSAColumnAttention(32, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((4, 6, 32))).shape
    (4, 6, 32)
  """

  def __init__(self, c_m: int = 256, *, num_heads: int = 8, head_dim: int = 32,
               implementation: str | None = None,
               kernel_init: c.Initializer = c.glorot_init,
               output_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c.check_positive("c_m", c_m)
    self.c_m = c_m
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_norm = c.layer_norm(c_m, eps=layer_norm_eps, **kw)
    self.attention = GatedAttention(c_m, num_heads, head_dim, implementation=implementation,
                                    kernel_init=kernel_init,
                                    output_kernel_init=output_kernel_init, **kw)

  def __call__(self, m: jax.Array, msa_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_input("m", m, 3, self.c_m, "[*B, N_seq, N_res, c_m]")
    c.check_chunk_size(chunk_size)
    mask = _optional_mask("msa_mask", msa_mask, m.shape[:-1])
    m_t = jnp.swapaxes(m, -2, -3)
    mask_t = None if mask is None else jnp.swapaxes(mask, -1, -2)

    def columns(m_cols, mask_cols):
      return self.attention(self.query_norm(m_cols), mask_cols)

    out = chunked(columns, (m_t, mask_t), (-3, -2), out_axis=-3, chunk_size=chunk_size)
    return jnp.swapaxes(out, -2, -3)
