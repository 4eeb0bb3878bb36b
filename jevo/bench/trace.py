"""A `jax.profiler` trace of a compiled function, with its optimised HLO beside it: the pair that
`jevo.bench.profile_summary` turns into a table of where the device time goes."""

from __future__ import annotations

import os
import pathlib

TRACE_STEPS = 2


def without_command_buffers(xla_flags: str) -> str:
  """XLA_FLAGS with command buffers off, so that a profile attributes each kernel to its own
  HLO operation instead of to the command buffer (CUDA graph) that launched it."""
  return f"{xla_flags} --xla_gpu_enable_command_buffer=".strip()


def write_trace(directory: str | os.PathLike, name: str, compiled, args,
                steps: int = TRACE_STEPS) -> dict:
  """Writes DIR/NAME.hlo.txt and DIR/trace_NAME/ (TensorBoard / Perfetto can open it) of `steps`
  calls of `compiled(*args)` after one untraced call; returns the paths and the step count."""
  import jax
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hlo = directory / f"{name}.hlo.txt"
  hlo.write_text(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  trace_dir = directory / f"trace_{name}"
  with jax.profiler.trace(str(trace_dir)):
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
  return dict(trace_dir=str(trace_dir), hlo=str(hlo), steps=steps)
