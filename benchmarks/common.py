"""Helpers the benchmark scripts share: timing, command-line shapes, one Evoformer block at
AlphaFold's sizes, results and profiles."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
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


# EvoformerBlock's sub-modules, in the order the block applies them; also the names of the
# named scopes it puts them under, which profiles show.
BLOCK_SUBMODULES = (
    "msa_row_attention", "msa_column_attention", "msa_transition", "outer_product_mean",
    "triangle_multiplication_outgoing", "triangle_multiplication_incoming",
    "triangle_attention_starting_node", "triangle_attention_ending_node", "pair_transition",
)


def without_command_buffers(xla_flags: str) -> str:
  """XLA_FLAGS with command buffers off, so that a profile attributes each kernel to its own
  HLO operation instead of to the command buffer that launched it."""
  return f"{xla_flags} --xla_gpu_enable_command_buffer=".strip()


def block_and_inputs(shape: tuple[int, int], implementation: str | None):
  """An EvoformerBlock at AlphaFold's sizes in bf16 (fp32 parameters, dropout on) and random
  bf16 inputs m, z with all-valid masks: (block, m, z, msa_mask, pair_mask)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jevo.nn import EvoformerBlock

  n_seq, n_res = shape
  block = EvoformerBlock(dtype=jnp.bfloat16, implementation=implementation, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(1), 2)
  m = jax.random.normal(keys[0], (n_seq, n_res, block.c_m), jnp.bfloat16)
  z = jax.random.normal(keys[1], (n_res, n_res, block.c_z), jnp.bfloat16)
  return block, m, z, jnp.ones((n_seq, n_res), bool), jnp.ones((n_res, n_res), bool)


def run_worker(cmd: list[str], env: dict | None = None, timeout: int | None = None) -> dict:
  """Runs one benchmark configuration in a fresh process and returns the JSON record it printed
  last, or {"error": ...} when it timed out, crashed or was killed (e.g. out of host memory)."""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {timeout} s")
  line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("{")), None)
  if line is None:
    tail = (proc.stderr.strip() or proc.stdout.strip())[-300:]
    return dict(error=f"worker exited with {proc.returncode}: {tail}")
  return json.loads(line)


def write_profile(directory: str | pathlib.Path, name: str, compiled, args, steps: int = 2) -> None:
  """Writes DIR/NAME.hlo.txt (the optimised HLO) and DIR/trace_NAME (a jax.profiler trace of
  `steps` calls of `compiled(*args)`), the pair that summarize_profile.py reads."""
  import jax
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{name}.hlo.txt").write_text(compiled.as_text())
  with jax.profiler.trace(str(directory / f"trace_{name}")):
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))


def write_results(out: str | pathlib.Path, meta: dict, results: list[dict],
                  markdown: str) -> pathlib.Path:
  """Writes OUT.json (meta and results) and OUT.md (the given text); returns OUT as a path."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
  out.with_suffix(".md").write_text(markdown)
  return out
