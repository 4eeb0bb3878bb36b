"""The registry of attention backends behind `evoformer_attention(implementation=...)`.

A backend is a module with two functions, called with inputs in the canonical layout
(leading batch dims flattened to one `B`, mask and bias already broadcast):

    unsupported_reason(q, k, v, mask, bias) -> str | None
        None if the backend can run these inputs, else a sentence saying why not.
    attention(q, k, v, mask, bias, *, scale: float, deterministic: bool) -> out

with q, k, v `[B, N, S, H, D]`, mask bool `[B, N, S]` or None (True = attend), bias
`[B, H, S, S]` in q.dtype or None, and out `[B, N, S, H, D]` in q.dtype. With
`deterministic=True` a backend must give bitwise-identical outputs and gradients on every run of
one compiled program; every backend here always does (no float atomics, no scatter-adds), so
none of them needs to read the flag. Modules are imported on first use so that `import jevo`
stays light.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "cuda": "jevo.ops.cuda_backend",
    "xla_chunked": "jevo.ops.xla_chunked",
    "xla": "jevo.ops.xla",
}
# The CUDA kernels of one architecture family only, instead of the family each device picks:
# for tests and measurements of a family (see jevo.ops.cuda_backend).
_CUDA_FAMILIES = {"cuda_sm80": "sm80", "cuda_sm90": "sm90"}

# Every name `implementation=` accepts.
NAMES: tuple[str, ...] = tuple(_MODULES) + tuple(_CUDA_FAMILIES)

# The backends that are `custom_vjp`s, with reverse-mode derivatives only.
REVERSE_MODE_ONLY: tuple[str, ...] = ("cuda", "xla_chunked") + tuple(_CUDA_FAMILIES)

# What `implementation=None` tries, in order: the first whose unsupported_reason is None runs.
# xla_chunked runs everything, so the search always ends.
AUTO_ORDER: tuple[str, ...] = ("cuda", "xla_chunked")


def get(name: str) -> ModuleType:
  """The backend module registered under `name` (one of `NAMES`)."""
  if name in _CUDA_FAMILIES:
    return importlib.import_module(_MODULES["cuda"]).family_backend(_CUDA_FAMILIES[name])
  try:
    module_name = _MODULES[name]
  except KeyError:
    raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(NAMES)}") from None
  return importlib.import_module(module_name)
