"""Helpers the benchmark scripts share: timing and command-line shapes."""

from __future__ import annotations

import argparse
import time


def median_ms(fn, args, repeats: int, *, batch: int = 1, warmup: int = 0) -> float:
  """Median over `repeats` of the mean wall time of `batch` calls of `fn(*args)` queued back to
  back (batch > 1 lets the host's dispatch overlap the device's work), after `warmup` calls."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batch):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / batch)
  times.sort()
  return times[len(times) // 2]


def parse_shape(text: str) -> tuple[int, int]:
  """'512x384' -> (512, 384): N_seq x N_res, for argparse."""
  try:
    n_seq, n_res = (int(part) for part in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a shape is N_SEQxN_RES, e.g. 512x384, got {text!r}")
  if n_seq <= 0 or n_res <= 0:
    raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
  return n_seq, n_res
