"""A sweep of the triangle multiplication's two Pallas kernels' launch settings on a GPU: rows
per program, warps and pipeline stages of the input side (`gated_projections_pallas`: LayerNorm,
the five projections, gates and mask, channel-major operands, as the module's whole forward
runs it) and of the output side (`triangle_epilogue_pallas`), forward ms (median) for each,
with each setting's output compared to the module's current setting's.

    python benchmarks/triangle_kernel_tiles.py [--sizes 384 768] [--repeats 30]

The settings are the kernel modules' BLOCK_ROWS, NUM_WARPS and NUM_STAGES, read when a call is
traced, so each setting is a fresh trace. Inputs: bfloat16 pair activations, float32 parameters
(random), random pair masks with about 10% masked; c_z = c_hidden = 128.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jevo.bench.measure import median_ms  # noqa: E402
from jevo.ops import gated_projections_pallas as gp  # noqa: E402
from jevo.ops import triangle_epilogue_pallas as te  # noqa: E402

C = 128
# No loop runs inside a program (each takes its whole c_z reduction in one product), so
# pipeline stages are expected not to matter; --stages sweeps them anyway.
ROWS, WARPS, STAGES = (32, 64, 128, 256), (4, 8), (1,)


def log(*args):
  print(*args, flush=True)


@contextlib.contextmanager
def setting(module, **values):
  old = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for name, value in old.items():
      setattr(module, name, value)


def normal(i, shape, scale=1.0, dtype=jnp.float32):
  return (scale * jax.random.normal(jax.random.key(i), shape, jnp.float32)).astype(dtype)


def input_side(n):
  z = normal(1, (n, n, C), dtype=jnp.bfloat16)
  mask = (jax.random.uniform(jax.random.key(2), (n, n, 1)) > 0.1).astype(jnp.bfloat16)
  kernels = [normal(10 + i, (C, C), C ** -0.5) for i in range(5)]
  biases = [normal(20 + i, (C,), 0.1) for i in range(5)]
  scale, offset = 1 + normal(3, (C,), 0.1), normal(4, (C,), 0.1)

  def call():
    return jax.jit(lambda z, m: gp.gated_projections(
        z, m, scale, offset, kernels, biases, eps=1e-5, dtype=jnp.bfloat16,
        channel_major=True))
  return call, (z, mask)


def output_side(n):
  product = normal(5, (C, n * n), 4.0, jnp.bfloat16)
  gate = normal(6, (n * n, C), dtype=jnp.bfloat16)
  scale, offset = 1 + normal(7, (C,), 0.1), normal(8, (C,), 0.1)
  kernel, bias = normal(9, (C, C), C ** -0.5), normal(30, (C,), 0.1)

  def call():
    return jax.jit(lambda p, g: te.triangle_epilogue(p, g, scale, offset, kernel, bias,
                                                     eps=1e-5, dtype=jnp.bfloat16))
  return call, (product, gate)


def max_rel_diff(got, want):
  diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                 / max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30))
           for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  return max(diffs)


def sweep(label, module, make, n, repeats, rows, warps, stage_counts):
  """[(ms, setting, max difference, " (current)" or "")], fastest first."""
  call, args = make(n)
  names = ["BLOCK_ROWS", "NUM_WARPS", "NUM_STAGES"]
  axes = [rows, warps, stage_counts]
  current = tuple(getattr(module, name) for name in names)
  want = call()(*args)
  results = []
  for values in itertools.product(*axes):
    text = ", ".join(f"{name.lower()} {value}" for name, value in zip(names, values))
    with setting(module, **dict(zip(names, values))):
      try:
        fn = call()
        diff = max_rel_diff(fn(*args), want)
        ms = median_ms(fn, args, repeats, batch=5)["ms"]
      except Exception as err:  # a setting the compiler refuses (registers, shared memory)
        log(f"{label} {n}: {text}: failed: {type(err).__name__}: {str(err)[:300]}")
        continue
    mark = " (current)" if values == current else ""
    log(f"{label} {n}: {text}: {ms:.4f} ms, max diff / max |ref| {diff:.1e}{mark}")
    results.append((ms, text, diff, mark))
  return sorted(results)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[384, 768])
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
  p.add_argument("--warps", type=int, nargs="+", default=list(WARPS))
  p.add_argument("--stages", type=int, nargs="+", default=list(STAGES))
  p.add_argument("--kernels", nargs="+", choices=["input", "output"], default=["input", "output"])
  args = p.parse_args(argv)
  log(jax.devices()[0].device_kind, "jax", jax.__version__)
  table = []
  for n in args.sizes:
    for kind, module, make in (("input", gp, input_side), ("output", te, output_side)):
      if kind not in args.kernels:
        continue
      label = f"{kind} side"
      results = sweep(label, module, make, n, args.repeats, args.rows, args.warps, args.stages)
      current = [r for r in results if r[3]]
      for ms, text, diff, mark in results[:3] + [r for r in current if r not in results[:3]]:
        table.append(f"| {label} | {n} | {text} | {ms:.4f}{mark} | {diff:.1e} |")
  log("\n## triangle multiplication kernels: the three fastest settings (and the current one), "
      "forward ms (median)")
  log("| kernel | N | setting | ms | max diff / max |ref| |\n|---|---|---|---|---|")
  for row in table:
    log(row)


if __name__ == "__main__":
  main()
