"""Argument checks of the public DAP functions: errors that name the argument."""

from __future__ import annotations

from flax import nnx


def check_module(name: str, module: object, types: tuple[type[nnx.Module], ...]) -> None:
  """Raises TypeError unless `module` is an instance of one of `types`."""
  if not isinstance(module, types):
    expected = " or ".join(t.__name__ for t in types)
    raise TypeError(f"{name} must be a jevo.nn {expected}, got {type(module).__name__}")


def check_chunk_size(chunk_size: int | None) -> None:
  """Raises ValueError unless `chunk_size` is None or a positive int."""
  if chunk_size is None:
    return
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
