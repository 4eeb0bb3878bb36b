"""Inside `jax.shard_map`, arrays carry the mesh axes along which they vary. A `custom_vjp` needs
its inputs to agree: a replicated bias combined with a sharded q must become "varying" first, so
that its cotangent is summed over the devices (the transpose of that cast is a psum)."""

from __future__ import annotations

import jax


def _vma(x):
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # earlier spelling


def vary_like(x, *refs):
  """`x` cast to vary along every axis that any of `refs` (None passes) varies on."""
  refs = [r for r in refs if r is not None]
  union = frozenset().union(*(_vma(r) for r in refs)) if refs else frozenset()
  missing = tuple(sorted(union - _vma(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def match_varying_axes(*arrays):
  """The arrays (None passes through), each cast to vary along every axis any of them varies on."""
  return tuple(None if x is None else vary_like(x, *arrays) for x in arrays)
