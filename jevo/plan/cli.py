"""`python -m jevo.plan`: the fastest stack settings that fit a memory budget."""

from __future__ import annotations

import argparse
import json
import sys


def _spec_for(args):
  from jevo.bench import presets
  from jevo.plan.costs import StackSpec
  if args.shape:
    n_seq, n_res = presets.parse_shape(args.shape)
    return StackSpec(n_seq, n_res), 48
  preset = presets.get_preset(args.preset)
  if preset.block is None:
    raise ValueError(f"preset {args.preset!r} has no block to plan")
  block = preset.block
  blocks = 4 if block.extra_msa else 48
  return StackSpec(block.n_seq, block.n_res, tuple(sorted(block.block_kwargs.items())),
                   block.extra_msa), blocks


def add_chunking_flags(parser: argparse.ArgumentParser) -> None:
  """The inference plan's choice of chunking: `--one-chunk-size`, or `--per-sub-module` (the
  default; accepted so that commands written before it was the default still run). Read it
  back with `per_sub_module(args)`."""
  chunking = parser.add_mutually_exclusive_group()
  chunking.add_argument("--one-chunk-size", action="store_true",
                        help="inference: one chunk size for every sub-module, instead of "
                             "chunking only the sub-modules that do not fit whole (the default)")
  chunking.add_argument("--per-sub-module", action="store_true",
                        help="inference: a chunk size per sub-module (the default)")


def per_sub_module(args) -> bool:
  """`plan_stack`'s `per_sub_module` for the flags of `add_chunking_flags`."""
  return not args.one_chunk_size


def main(argv=None) -> int:
  from jevo.bench import presets
  p = argparse.ArgumentParser(prog="python -m jevo.plan", description=__doc__.splitlines()[0])
  which = p.add_mutually_exclusive_group()
  which.add_argument("--preset", default="af2-finetune",
                     choices=sorted(n for n, v in presets.PRESETS.items() if v.block is not None),
                     help="the stack's sizes (default: %(default)s)")
  which.add_argument("--shape", metavar="N_SEQxN_RES", help="an Evoformer stack at these sizes")
  p.add_argument("--budget", required=True, help="device memory, e.g. 16GiB, 40GB")
  p.add_argument("--blocks", type=int, help="blocks in the stack (default: 48; 4 for extra-msa)")
  p.add_argument("--inference", action="store_true", help="plan the inference forward")
  time_source = p.add_mutually_exclusive_group()
  time_source.add_argument("--measure", dest="measure", action="store_true", default=None,
                           help="time each candidate on the device (the default on a GPU)")
  time_source.add_argument("--estimate", dest="measure", action="store_false",
                           help="time from XLA's cost analysis (the default elsewhere)")
  p.add_argument("--candidates", nargs="+", metavar="NAME",
                 help="what the planner may choose per block (default: all of everything, "
                 "all_products, linear_outputs, block_inputs, offload)")
  p.add_argument("--no-verify", action="store_true",
                 help="skip the check of the chosen plan against XLA's memory analysis of the "
                 "whole planned step (one compile of the stack per plan checked)")
  p.add_argument("--no-device-check", action="store_true",
                 help="on a GPU, check the plan against XLA's analysis only, without running its "
                 "whole step once in a fresh process for the allocator's peak")
  p.add_argument("--headroom", metavar="SIZE",
                 help="device memory XLA's figure must leave free for the allocator (default: "
                 "256MiB on a GPU, 0 elsewhere)")
  p.add_argument("--compile-workers", type=int, metavar="N",
                 help="training steps compiled at a time (default: one per four CPU cores on "
                 "a GPU machine, one elsewhere)")
  add_chunking_flags(p)
  p.add_argument("--no-cache", action="store_true", help="recompute instead of reading the cache")
  p.add_argument("--json", action="store_true", help="print the plan as JSON")
  args = p.parse_args(argv)

  from jevo.plan import plan as planning
  try:
    budget = planning.parse_bytes(args.budget)
    if args.headroom is not None:
      planning.parse_headroom(args.headroom)
    spec, blocks = _spec_for(args)
  except ValueError as err:
    p.error(str(err))
  blocks = args.blocks or blocks
  from jevo.plan.candidates import by_name
  try:
    chosen = [by_name(n) for n in args.candidates] if args.candidates else None
  except ValueError as err:
    p.error(f"--candidates: {err}")
  if blocks <= 0:
    p.error(f"--blocks must be positive, got {blocks}")
  if args.compile_workers is not None and args.compile_workers < 1:
    p.error(f"--compile-workers must be at least 1, got {args.compile_workers}")
  try:
    result = planning.plan_stack(spec, blocks, budget=budget, training=not args.inference,
                                 measure=args.measure, use_cache=not args.no_cache,
                                 candidates=chosen,
                                 verify=(False if args.no_verify else
                                         "xla" if args.no_device_check else True),
                                 headroom=args.headroom,
                                 compile_workers=args.compile_workers,
                                 per_sub_module=per_sub_module(args))
  except planning.PlanError as err:
    print(f"jevo.plan: {err}", file=sys.stderr)
    return 1
  if args.json:
    import dataclasses
    print(json.dumps(dataclasses.asdict(result), indent=1))
  else:
    print(result.describe())
  return 0
