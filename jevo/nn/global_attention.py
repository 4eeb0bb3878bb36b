"""Column-wise global attention of the extra-MSA stack (supplement Alg. 19).

One query per column (the masked mean over sequences) attends to all sequences with a single
shared key/value head, so the logits are only `[N_res, H, N_seq]`: this is its own small
computation, not a call of the Evoformer attention op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.chunking import chunked
from jevo.nn.linear import linear


class MSAColumnGlobalAttention(nnx.Module):
  """Gated global attention along MSA columns; returns the update of `m [*B, N_seq, N_res, c]`.

  A fully masked column gives a zero attention average (as the Evoformer attention op does for
  fully masked rows), never NaN.

  Example:
    >>> att = MSAColumnGlobalAttention(16, num_heads=2, head_dim=4, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((5, 3, 16))).shape
    (5, 3, 16)
  """

  def __init__(self, c_m: int = 64, *, num_heads: int = 8, head_dim: int = 8,
               kernel_init: c.Initializer = c.glorot_init,
               output_kernel_init: c.Initializer = c.final_init,
               gate_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, value in (("c_m", c_m), ("num_heads", num_heads), ("head_dim", head_dim)):
      c.check_positive(name, value)
    self.c_m, self.num_heads, self.head_dim = c_m, num_heads, head_dim
    hd = num_heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_norm = c.layer_norm(c_m, eps=layer_norm_eps, **kw)
    self.query = linear(c_m, hd, use_bias=False, kernel_init=kernel_init, **kw)
    self.key = linear(c_m, head_dim, use_bias=False, kernel_init=kernel_init, **kw)
    self.value = linear(c_m, head_dim, use_bias=False, kernel_init=kernel_init, **kw)
    self.gate = linear(c_m, hd, kernel_init=gate_kernel_init, bias_init=nnx.initializers.ones,
                         **kw)
    self.output = linear(hd, c_m, kernel_init=output_kernel_init, **kw)

  def __call__(self, m: jax.Array, msa_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_input("m", m, 3, self.c_m, "[*B, N_seq, N_res, c_m]")
    c.check_chunk_size(chunk_size)
    mask = c.check_mask("msa_mask", msa_mask, m.shape[:-1])
    out = chunked(self._columns, (jnp.swapaxes(m, -2, -3), jnp.swapaxes(mask, -1, -2)), (-3, -2),
                  out_axis=-3, chunk_size=chunk_size)
    return jnp.swapaxes(out, -2, -3)

  def _columns(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x `[*B, N_res, N_seq, c]` (columns first), mask bool `[*B, N_res, N_seq]`."""
    x = self.query_norm(x)
    maskf = mask[..., None].astype(jnp.float32)
    # The mean query of each column over its valid sequences (AlphaFold's mask_mean, eps 1e-10).
    q_avg = (jnp.sum(maskf * x, axis=-2) / (jnp.sum(maskf, axis=-2) + 1e-10)).astype(x.dtype)
    q = self.query(q_avg).reshape(q_avg.shape[:-1] + (self.num_heads, self.head_dim))
    k = self.key(x)  # [*B, R, S, D], one head shared by all query heads
    v = self.value(x)
    logits = jnp.einsum("...hd,...sd->...hs", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits * self.head_dim ** -0.5
    valid = mask[..., None, :]
    logits = jnp.where(valid, logits, -jnp.inf)
    # initial: an extra MSA with no sequences has nothing to take the maximum of.
    row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked column
    p = jnp.where(valid, jnp.exp(logits - row_max), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    avg = jnp.einsum("...hs,...sd->...hd", p, v.astype(jnp.float32)).astype(v.dtype)
    gate = jax.nn.sigmoid(self.gate(x)).reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
    o = avg[..., None, :, :] * gate.astype(avg.dtype)  # [*B, R, S, H, D]
    return self.output(o.reshape(x.shape[:-1] + (self.num_heads * self.head_dim,)))
