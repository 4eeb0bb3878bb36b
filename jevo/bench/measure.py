"""How one compiled function is measured: compile time, XLA's own analysis, the allocator's peak
above the inputs, and the median time of repeated calls after a warm-up."""

from __future__ import annotations

import time


def median_ms(fn, args, repeats: int, *, batch: int = 1, warmup: int = 2) -> dict:
  """Times `fn(*args)`: `warmup` calls, then `repeats` samples, each the mean wall time of
  `batch` calls queued back to back (so that the host's dispatch overlaps the device's work).
  Returns the median and the spread in ms."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batch):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / batch)
    del out
  samples.sort()
  return dict(ms=samples[len(samples) // 2], min_ms=samples[0], max_ms=samples[-1],
              samples=len(samples), batch=batch)


def xla_analysis(compiled) -> dict:
  """XLA's cost analysis (FLOPs and bytes it can see; a custom call's kernel is opaque to it)
  and memory analysis (buffer sizes of the compiled executable), as far as the backend has them."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
      cost = cost[0] if cost else {}
    out["flops"] = float(cost.get("flops", 0.0))
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    out["transcendentals"] = float(cost.get("transcendentals", 0.0))
  except Exception as err:  # not every backend implements it
    out["cost_error"] = f"{type(err).__name__}: {err}"[:200]
  try:
    mem = compiled.memory_analysis()
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes"):
      if hasattr(mem, field):
        out[field.removesuffix("_in_bytes")] = int(getattr(mem, field))
  except Exception as err:
    out["memory_error"] = f"{type(err).__name__}: {err}"[:200]
  return out


class DeviceMemory:
  """The allocator's bytes in use and peak on one device (None on a CPU, which has no stats)."""

  def __init__(self, device):
    self.device = device

  def stats(self) -> dict:
    return self.device.memory_stats() or {}

  def in_use(self) -> int | None:
    return self.stats().get("bytes_in_use")

  def peak(self) -> int | None:
    return self.stats().get("peak_bytes_in_use")


def measure(fn, args, *, repeats: int, batch: int, memory: DeviceMemory,
            compiler_options: dict | None = None) -> dict:
  """Compiles `jax.jit(fn)` for `args`, calls it once alone (so that the allocator's peak is its
  own; the process is fresh and the inputs already exist), then times it. Peak extra memory is
  the allocator's peak minus the bytes in use before the call (the inputs, and anything an
  earlier pass of the same process left): the output and every temporary are counted."""
  import jax
  base = memory.in_use()
  start = time.perf_counter()
  compiled = jax.jit(fn, compiler_options=compiler_options).lower(*args).compile()
  result = dict(compile_s=time.perf_counter() - start, xla=xla_analysis(compiled))
  before_call = memory.peak()
  out = compiled(*args)
  jax.block_until_ready(out)
  del out
  if base is not None:
    peak = memory.peak()
    result["peak_bytes"] = peak - base
    # The peak is a running maximum over the process: when something before the call (an
    # earlier pass, compiling or autotuning) reached it first, the call's own peak is at most
    # this figure, and the record says so.
    result["peak_is_upper_bound"] = bool(before_call is not None and before_call >= peak)
    result["absolute_peak_bytes"] = peak
  result.update(median_ms(compiled, args, repeats, batch=batch))
  return result
