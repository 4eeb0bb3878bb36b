"""Triangle self-attention around the starting or the ending node (supplement Alg. 13, 14)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.linear import linear
from jevo.nn.attention import GatedAttention, pair_to_bias
from jevo.nn.chunking import chunked


class TriangleAttention(nnx.Module):
  """Gated attention along rows of the pair (`starting=True`) or along its columns.

  Starting node: pair row i is one attention row, z_ij attends over z_ik with bias b_jk from the
  normalised pair. Ending node: the same on the transposed pair (z_ij attends over z_kj with
  bias b_ki), transposed back. Returns the update of `z [*B, N_res, N_res, c_z]`.

  Example:
    >>> att = TriangleAttention(16, starting=False, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((5, 5, 16))).shape
    (5, 5, 16)
  """

  def __init__(self, c_z: int = 128, *, starting: bool = True, num_heads: int = 4,
               head_dim: int = 32, implementation: str | None = None,
               kernel_init: c.Initializer = c.glorot_init,
               output_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c.check_positive("c_z", c_z)
    self.c_z, self.starting = c_z, bool(starting)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_norm = c.layer_norm(c_z, eps=layer_norm_eps, **kw)
    self.pair_bias = linear(c_z, num_heads, use_bias=False, kernel_init=c.pair_bias_init(c_z),
                              **kw)
    self.attention = GatedAttention(c_z, num_heads, head_dim, implementation=implementation,
                                    kernel_init=kernel_init,
                                    output_kernel_init=output_kernel_init, **kw)

  def __call__(self, z: jax.Array, pair_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_pair("z", z, self.c_z)
    c.check_chunk_size(chunk_size)
    mask = None if pair_mask is None else c.check_mask("pair_mask", pair_mask, z.shape[:-1])
    return self.update(z, mask, chunk_size=chunk_size)

  def update(self, z: jax.Array, mask: jax.Array | None, *, chunk_size: int | None = None,
             gather_bias: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`__call__` without its argument checks, for callers that hold a slice of z.

    Starting node: z `[*B, R, N_res, c_z]`, some R of the pair's rows; ending node:
    `[*B, N_res, R, c_z]`, some R of its columns; mask bool of z's shape without channels, or
    None. The bias of those rows (columns), `[*B, 1, H, R, N_res]`, passes through
    `gather_bias` (identity when None), which returns the bias of all N_res: an all-gather
    where each device holds a slice of z (`jevo.parallel`). The update has z's shape.
    """
    if not self.starting:
      z = jnp.swapaxes(z, -2, -3)
      mask = None if mask is None else jnp.swapaxes(mask, -1, -2)
    x = self.query_norm(z)
    bias = pair_to_bias(x, self.pair_bias)
    if gather_bias is not None:
      bias = gather_bias(bias)

    def rows(x_rows, mask_rows):
      return self.attention(x_rows, mask_rows, bias)

    out = chunked(rows, (x, mask), (-3, -2), out_axis=-3, chunk_size=chunk_size)
    return out if self.starting else jnp.swapaxes(out, -2, -3)
