"""Outer product mean: the MSA -> pair update (supplement Alg. 10)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jevo.nn import _common as c
from jevo.nn.chunking import chunked
from jevo.nn.linear import linear, project

# Added to the per-pair count of valid sequence pairs before dividing (AlphaFold's epsilon).
NORM_EPS = 1e-3


class OuterProductMean(nnx.Module):
  """`o_ij = Linear(flatten(sum_s a_si (x) b_sj)) / (1e-3 + sum_s mask_si mask_sj)`.

  `a`, `b` are masked projections of `LayerNorm(m)` to `c_hidden`; as in AlphaFold the output
  bias is divided by the count as well. Returns an update of the pair `[*B, N_res, N_res, c_z]`.

  Example:
    >>> opm = OuterProductMean(16, 8, 4, rngs=nnx.Rngs(0))
    >>> opm(jnp.ones((3, 5, 16))).shape
    (5, 5, 8)
  """

  def __init__(self, c_m: int = 256, c_z: int = 128, c_hidden: int = 32, *,
               kernel_init: c.Initializer = c.linear_init,
               output_kernel_init: c.Initializer = c.final_init,
               layer_norm_eps: float = c.LAYER_NORM_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, value in (("c_m", c_m), ("c_z", c_z), ("c_hidden", c_hidden)):
      c.check_positive(name, value)
    self.c_m, self.c_z, self.c_hidden = c_m, c_z, c_hidden
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = c.layer_norm(c_m, eps=layer_norm_eps, **kw)
    self.left_projection = linear(c_m, c_hidden, kernel_init=kernel_init, **kw)
    self.right_projection = linear(c_m, c_hidden, kernel_init=kernel_init, **kw)
    self.output = linear(c_hidden * c_hidden, c_z, kernel_init=output_kernel_init, **kw)

  def __call__(self, m: jax.Array, msa_mask: jax.Array | None = None, *,
               chunk_size: int | None = None) -> jax.Array:
    c.check_input("m", m, 3, self.c_m, "[*B, N_seq, N_res, c_m]")
    c.check_chunk_size(chunk_size)
    mask = c.check_mask("msa_mask", msa_mask, m.shape[:-1])
    return self.update(m, mask, chunk_size=chunk_size)

  def update(self, m: jax.Array, mask: jax.Array, *, chunk_size: int | None = None,
             gather: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`__call__` without its argument checks, for callers that hold a slice of m's residues.

    m `[*B, N_seq, R, c_m]`, some R residues i, and its bool mask `[*B, N_seq, R]`. The right
    side's residues j come from `gather` (identity when None), applied along axis -2 to the
    masked right projection `[*B, N_seq, R, c_hidden]` and to the mask `[*B, N_seq, R, 1]`
    (float32): it returns them for all N_res residues, e.g. an all-gather where each device
    holds a slice of the residues (`jevo.parallel`). Returns the pair rows i,
    `[*B, R, N_res, c_z]`.
    """
    mask = mask[..., None]
    x = self.layer_norm(m)
    a, b = project(x, self.left_projection, self.right_projection)
    a, b = mask.astype(x.dtype) * a, mask.astype(x.dtype) * b
    maskf = mask.astype(jnp.float32)
    maskf_j = maskf
    if gather is not None:
      b, maskf_j = gather(b), gather(maskf)

    def rows(a_i):
      # [*B, S, i, c] x [*B, S, j, d] -> [*B, i, j, c*d]; only `chunk_size` rows i at a time.
      outer = jnp.einsum("...sic,...sjd->...ijcd", a_i, b)
      # The channel count spelt out: a reshape cannot infer it (-1) from an empty array.
      return self.output(outer.reshape(outer.shape[:-2] + (self.c_hidden * self.c_hidden,)))

    out = chunked(rows, (a,), (-2,), out_axis=-3, chunk_size=chunk_size)
    count = jnp.einsum("...sic,...sjc->...ijc", maskf, maskf_j)
    return (out / (NORM_EPS + count)).astype(out.dtype)
