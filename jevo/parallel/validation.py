"""Argument checks of the public DAP functions: errors that name the argument."""

from __future__ import annotations

from flax import nnx


def check_module(name: str, module: object, types: tuple[type[nnx.Module], ...]) -> None:
  """Raises TypeError unless `module` is an instance of one of `types`."""
  if not isinstance(module, types):
    expected = " or ".join(t.__name__ for t in types)
    raise TypeError(f"{name} must be a jevo.nn {expected}, got {type(module).__name__}")

