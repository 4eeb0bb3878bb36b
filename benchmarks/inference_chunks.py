"""A preset's stack with chunk sizes picked by hand, beside the planner's plan for a budget:
each stack in a fresh process (the allocator's peak is a running maximum over a process),
measured time and peak in one table.

    python benchmarks/inference_chunks.py --preset long-inference --blocks 48 \
        --chunk-sizes none 512 256 128 --budget 16GB
    python benchmarks/inference_chunks.py --preset cpu-small --blocks 2 --chunk-sizes none 4 \
        outer_product_mean=4,triangle_attention_starting_node=8

Every preset runs its inference forward (eval mode) unless `--training`, which runs the
training step with every block keeping only its inputs (`remat="block"`). With
`--budget`, the planner plans the same stack for it (`jevo.plan`, from its cache where it can)
and its plan runs as the table's last row. `--out PATH` writes the records as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jevo.bench.report import gib_text  # noqa: E402
from jevo.bench.run import plan_and_run, run_worker  # noqa: E402
from jevo.plan.cli import add_chunking_flags, per_sub_module  # noqa: E402



def _one_size(text: str):
  if text.lower() == "none":
    return None
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"a chunk size must be 'none' or at least 1, got {text}")
  return value


def chunk_value(text: str):
  """'none', a size, or sizes per sub-module: 'outer_product_mean=128,pair_transition=512'
  (the sub-modules not named run whole)."""
  if "=" not in text:
    return _one_size(text)
  from jevo.nn import BLOCK_SUB_MODULES
  sizes = {}
  for item in text.split(","):
    name, _, size = item.partition("=")
    if name not in BLOCK_SUB_MODULES:
      raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(BLOCK_SUB_MODULES)}")
    sizes[name] = _one_size(size)
  return sizes


def _alone_env() -> dict:
  """A hand-picked stack's process runs alone on the device: with JAX's preallocated pool (95%
  of the device unless set), whatever the caller's environment says. Without preallocation the
  pool grows in pieces as compiling and autotuning ask for memory, and at 128 x 4096 no piece
  could then hold the step's 36 GiB buffer on a 139 GiB H200."""
  return dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="true",
              XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                            "0.95"))


def row(record: dict) -> str:
  """| label | ms (min-max) | allocator's peak GiB | XLA's whole step GiB |"""
  label = record.get("label", "?")
  if record.get("status") != "ok":
    return f"| {label} | {record.get('status')}: {record.get('reason', '')[:160]} | | |"
  measured = record.get("measured", {})
  peak = gib_text(measured.get("absolute_peak_bytes"))
  if measured.get("peak_is_upper_bound"):  # the process peaked before the step ran
    peak += " (upper bound)"
  return (f"| {label} | {measured.get('ms', 0):.1f} ({measured.get('min_ms', 0):.1f}-"
          f"{measured.get('max_ms', 0):.1f}) | {peak} | "
          f"{gib_text(record.get('xla_whole_step_bytes'))} |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="long-inference")
  p.add_argument("--blocks", type=int, default=48)
  p.add_argument("--chunk-sizes", type=chunk_value, nargs="*", default=[None, 256, 128],
                 help="the hand-picked chunk sizes (none given: only the plan, with --budget)")
  p.add_argument("--budget", help="also plan the stack for this budget and run the plan")
  p.add_argument("--training", action="store_true",
                 help="run the training step (every block keeping its inputs) instead")
  add_chunking_flags(p)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--timeout", type=int, default=1200, help="seconds per process")
  p.add_argument("--out", type=pathlib.Path)
  args = p.parse_args(argv)
  if args.blocks < 1:
    p.error(f"--blocks must be at least 1, got {args.blocks}")
  if not args.chunk_sizes and args.budget is None:
    p.error("nothing to run: give --chunk-sizes, or --budget for the plan")
  records = []

  def keep(record):
    records.append(record)
    print(row(record), flush=True)
    if args.out is not None:
      with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")

  for chunk in args.chunk_sizes:
    spec = dict(mode="stack", preset=args.preset, blocks=args.blocks, chunk_size=chunk,
                repeats=args.repeats, inference=not args.training)
    record = run_worker(spec, env=_alone_env(), timeout_s=args.timeout)
    keep(dict(record, label=f"chunk_size {chunk}"))
  if args.budget is not None:
    record = plan_and_run(args.preset, args.budget, args.blocks, args.repeats,
                          timeout_s=args.timeout, inference=not args.training,
                          per_sub_module=per_sub_module(args))
    plan = record.get("plan") or {}
    keep(dict(record, label=f"plan for {args.budget}: chunk_size {plan.get('chunk_size')}, "
                            f"predicted {plan.get('predicted_ms', 0):.1f} ms"))
  mode = "training step" if args.training else "inference forward"
  print(f"\n## {args.preset}, {args.blocks} blocks, {mode}")
  print("| run | ms (min-max) | allocator's peak GiB | XLA's whole step GiB |\n|---|---|---|---|")
  for record in records:
    print(row(record))


if __name__ == "__main__":
  main()
