"""Helpers the stack and DAP benchmark scripts share. Timing, shapes, traces and the block are
the profile benchmark's own (`jevo.bench`), so that every figure is measured the same way."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess

from jevo.bench import block_case, presets
from jevo.bench.measure import median_ms as _median
from jevo.bench.profile_summary import BLOCK_SUBMODULES  # noqa: F401  (re-exported)
from jevo.bench.trace import without_command_buffers  # noqa: F401  (re-exported)
from jevo.bench.trace import write_trace


def median_ms(fn, args, repeats: int, *, batch: int = 1, warmup: int = 0) -> float:
  """`jevo.bench.measure.median_ms`'s median, in ms."""
  return _median(fn, args, repeats, batch=batch, warmup=warmup)["ms"]


def parse_shape(text: str) -> tuple[int, int]:
  """'512x384' -> (512, 384): N_seq x N_res, for argparse."""
  try:
    return presets.parse_shape(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def block_and_inputs(shape: tuple[int, int], implementation: str | None):
  """An EvoformerBlock at AlphaFold's sizes in bf16 (fp32 parameters, dropout on) and random
  bf16 inputs with all-valid masks: (block, m, z, msa_mask, pair_mask)."""
  block, inputs = block_case.make_block(presets.BlockCase("evoformer_block", *shape),
                                        implementation)
  return (block,) + inputs


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


# DIR/NAME.hlo.txt and DIR/trace_NAME, which `jevo.bench.profile_summary` reads.
write_profile = write_trace


def write_results(out: str | pathlib.Path, meta: dict, results: list[dict],
                  markdown: str) -> pathlib.Path:
  """Writes OUT.json (meta and results) and OUT.md (the given text); returns OUT as a path."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
  out.with_suffix(".md").write_text(markdown)
  return out
