"""The MSA and pair transitions: a position-wise two-layer MLP (supplement Alg. 9, 15), computed
by `jevo.ops.transition.fused_transition` (fused Pallas kernels on a GPU, XLA elsewhere)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.chunking import chunked
from jevo.nn.linear import linear
from jevo.ops.transition import IMPLEMENTATIONS, fused_transition


class Transition(nnx.Module):
  """`Linear(relu(Linear(LayerNorm(x))))` with hidden width `factor * c_in`; returns the update.

  The update is zero where `mask` is False (OpenFold's convention; AlphaFold leaves padding
  positions as they come, which never reach valid ones). `implementation` is
  `fused_transition`'s: "xla" runs XLA, "pallas" the fused Pallas kernels (a GPU, bfloat16 or
  float16 compute dtype), "pallas_forward" the fused forward kernel where the module is not
  differentiated and XLA where it is; None picks "pallas_forward" where the kernels can run and
  c_in <= 128 (faster forward on an H200 there, slower at 256), else "xla".

  Example:
    >>> t = Transition(16, factor=2, rngs=nnx.Rngs(0))
    >>> t(jnp.ones((3, 5, 16))).shape
    (3, 5, 16)
  """

  def __init__(self, c_in: int = 128, *, factor: int = 4,
               kernel_init: c.Initializer = c.relu_init,
               output_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS, implementation: str | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c.check_positive("c_in", c_in)
    c.check_positive("factor", factor)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be None or one of {', '.join(IMPLEMENTATIONS)}, "
                       f"got {implementation!r}")
    self.c_in, self.factor = c_in, factor
    self.implementation, self.dtype = implementation, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = c.layer_norm(c_in, eps=layer_norm_eps, **kw)
    self.linear_1 = linear(c_in, factor * c_in, kernel_init=kernel_init, **kw)
    self.linear_2 = linear(factor * c_in, c_in, kernel_init=output_kernel_init, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_input("x", x, 2, self.c_in, "[..., c_in]")
    c.check_chunk_size(chunk_size)
    mask = None if mask is None else c.check_mask("mask", mask, x.shape[:-1])[..., None]

    def positions(x_p, mask_p):
      out = self._update(x_p)
      return out if mask_p is None else out * mask_p.astype(out.dtype)

    return chunked(positions, (x, mask), (-2, -2), out_axis=-2, chunk_size=chunk_size)

  def _update(self, x: jax.Array) -> jax.Array:
    params = (self.layer_norm.scale[...], self.layer_norm.bias[...], self.linear_1.kernel[...],
              self.linear_1.bias[...], self.linear_2.kernel[...], self.linear_2.bias[...])
    # The compute dtype as the layers' own: `dtype`, else what x and the parameters promote to.
    dtype = self.dtype or jnp.result_type(x, *params)
    return fused_transition(x.astype(dtype), *params, eps=self.layer_norm.epsilon,
                            implementation=self.implementation)
