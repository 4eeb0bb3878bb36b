"""`kernel_where_undifferentiated`: an op that runs a fast forward-only kernel where it is not
differentiated (inference) and a reference implementation's forward and backward where it is.

JAX calls a `custom_vjp` function's primal only where none of its inputs is differentiated,
and its rules everywhere else. With the kernel as the primal and the reference's own `jax.vjp`
as the rules, wherever gradients flow through the op it computes what the reference computes
(its residuals included, with their checkpoint names, so remat policies see them as before),
and elsewhere (inference, or a frozen part of a model being trained) the kernel runs. The two
must return the same shapes and dtypes; the kernel's rounding may differ.
"""

from __future__ import annotations

from collections.abc import Callable

import jax


def kernel_where_undifferentiated(kernel: Callable, reference: Callable) -> Callable:
  """f(*args): kernel(*args) where f is not differentiated; reference(*args), its forward and
  its backward, where it is. args may be any pytrees of arrays."""

  @jax.custom_vjp
  def f(args):
    return kernel(*args)

  def fwd(args):
    return jax.vjp(lambda a: reference(*a), args)

  def bwd(reference_vjp, g):
    return reference_vjp(g)

  f.defvjp(fwd, bwd)
  return lambda *args: f(args)
