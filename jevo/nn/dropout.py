"""Dropout keys from a call-time `rngs`, and whether a module's dropout is on.

Blocks and stacks (and their DAP versions) take `rngs=` at call time as an `nnx.Rngs`, an
`nnx.RngStream` or a key; without one, each `nnx.Dropout` draws from the streams it was built
with, which then advance.
"""

from __future__ import annotations

import jax
from flax import nnx

RngsLike = nnx.Rngs | nnx.RngStream | jax.Array | None


def one_key(rngs: RngsLike) -> jax.Array | None:
  """One key from a call-time `rngs` (Rngs: its `dropout` stream; RngStream; key), or None."""
  if isinstance(rngs, nnx.Rngs):
    return rngs.dropout()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  return rngs


def dropout_keys(rngs: RngsLike, n: int) -> list[jax.Array | None]:
  """`n` independent keys from a call-time `rngs`, or `n` Nones without one."""
  key = one_key(rngs)
  return [None] * n if key is None else list(jax.random.split(key, n))


def is_active(dropout: nnx.Dropout) -> bool:
  """Whether `dropout` would change its input (training mode, positive rate)."""
  return not dropout.deterministic and dropout.rate > 0


def draws_from_own_streams(module: nnx.Module) -> bool:
  """Whether a call without `rngs` advances the module's stored dropout RNG streams: as in
  `nnx.Dropout` itself, only where some dropout is on, so that a frozen (e.g. closed-over)
  state is never written to otherwise."""
  return any(isinstance(node, nnx.Dropout) and is_active(node)
             for _, node in nnx.iter_graph(module))
