"""Triangle multiplicative update with outgoing or incoming edges (supplement Alg. 11, 12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.chunking import chunked


class TriangleMultiplication(nnx.Module):
  """Updates z_ij from the edges of triangles (i, j, k); returns the update of `z`.

  With `left`/`right` the masked, gated projections of `LayerNorm(z)`:
  outgoing: z_ij <- sum_k left_ik * right_jk; incoming: z_ij <- sum_k left_kj * right_ki
  (AlphaFold's `equation`s 'ikc,jkc->ijc' and 'kjc,kic->ijc', so that AlphaFold's
  `left_projection`/`right_projection` weights load unchanged), then LayerNorm, the output
  projection (zero-initialised) and a sigmoid gate from `LayerNorm(z)`.

  Example:
    >>> tri = TriangleMultiplication(16, 8, outgoing=False, rngs=nnx.Rngs(0))
    >>> tri(jnp.ones((5, 5, 16))).shape
    (5, 5, 16)
  """

  def __init__(self, c_z: int = 128, c_hidden: int = 128, *, outgoing: bool = True,
               kernel_init: c.Initializer = c.linear_init,
               output_kernel_init: c.Initializer = c.final_init,
               gate_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c.check_positive("c_z", c_z)
    c.check_positive("c_hidden", c_hidden)
    self.c_z, self.c_hidden, self.outgoing = c_z, c_hidden, bool(outgoing)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    gate = dict(kernel_init=gate_kernel_init, bias_init=nnx.initializers.ones, **kw)
    self.layer_norm_in = c.layer_norm(c_z, eps=layer_norm_eps, **kw)
    self.left_projection = c.linear(c_z, c_hidden, kernel_init=kernel_init, **kw)
    self.right_projection = c.linear(c_z, c_hidden, kernel_init=kernel_init, **kw)
    self.left_gate = c.linear(c_z, c_hidden, **gate)
    self.right_gate = c.linear(c_z, c_hidden, **gate)
    self.center_norm = c.layer_norm(c_hidden, eps=layer_norm_eps, **kw)
    self.output_projection = c.linear(c_hidden, c_z, kernel_init=output_kernel_init, **kw)
    self.output_gate = c.linear(c_z, c_z, **gate)

  def __call__(self, z: jax.Array, pair_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_input("z", z, 3, self.c_z, "[*B, N_res, N_res, c_z]")
    if z.shape[-2] != z.shape[-3]:
      raise ValueError(f"z must be square in its residue axes [*B, N_res, N_res, c_z], "
                       f"got {z.shape}")
    c.check_chunk_size(chunk_size)
    mask = c.check_mask("pair_mask", pair_mask, z.shape[:-1])[..., None]
    x = self.layer_norm_in(z)

    def left(xs, ms):
      return ms.astype(xs.dtype) * self.left_projection(xs) * jax.nn.sigmoid(self.left_gate(xs))

    def right(xs, ms):
      return ms.astype(xs.dtype) * self.right_projection(xs) * jax.nn.sigmoid(self.right_gate(xs))

    # Output rows i are independent: one operand is projected whole, the other (and the output
    # gate) only for the rows in the chunk, which bounds memory to one [N_res, N_res, c_hidden].
    if self.outgoing:
      other = right(x, mask)

      def rows(x_i, m_i, x_gate):
        return self._finish(jnp.einsum("...ikc,...jkc->...ijc", left(x_i, m_i), other), x_gate)

      args, axes = (x, mask, x), (-3, -3, -3)
    else:
      other = left(x, mask)

      def rows(x_i, m_i, x_gate):
        return self._finish(jnp.einsum("...kjc,...kic->...ijc", other, right(x_i, m_i)), x_gate)

      args, axes = (x, mask, x), (-2, -2, -3)
    return chunked(rows, args, axes, out_axis=-3, chunk_size=chunk_size)

  def _finish(self, act: jax.Array, x_gate: jax.Array) -> jax.Array:
    act = self.output_projection(self.center_norm(act))
    return act * jax.nn.sigmoid(self.output_gate(x_gate))
