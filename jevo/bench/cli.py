"""`python -m jevo.bench`: the profile benchmark's command line."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys

from jevo.bench import implementations, presets, report


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jevo.bench",
      description="Times the four Evoformer attentions and one Evoformer block, forward and "
      "forward+backward, on every implementation available here, side by side; writes a table, "
      "a JSON results file, PNG plots and a profiler trace of the block.",
      epilog="Presets: " + "; ".join(f"{n}: {p.description}" for n, p in presets.PRESETS.items()))
  which = p.add_mutually_exclusive_group()
  which.add_argument("--preset", choices=sorted(presets.PRESETS),
                     help=f"what to run (default: {presets.CPU_DEFAULT} without a GPU, the "
                     "--gpu-default preset with one)")
  which.add_argument("--shape", metavar="N_SEQxN_RES",
                     help="AlphaFold 2's Evoformer at explicit sizes, e.g. 256x512")
  p.add_argument("--gpu-default", default=presets.GPU_DEFAULT, choices=sorted(presets.PRESETS),
                 help="the preset run on a GPU when none is named (default: %(default)s)")
  p.add_argument("--backends", nargs="+", default=list(implementations.DEFAULT_BACKENDS),
                 choices=list(implementations.ATTENTION_IMPLEMENTATIONS), metavar="NAME",
                 help="implementations to run: %(choices)s (default: all but cuda_sm80 and "
                 "cuda_sm90, jevo's single kernel families; the block runs with jevo's backends "
                 "among them)")
  p.add_argument("--cases", nargs="+", metavar="CASE",
                 help="cases to run (msa_row, msa_col, tri_start, tri_end, block; default: all)")
  p.add_argument("--repeats", type=int, help="timed samples per pass (default: 20 on a GPU, 5 "
                 "on a CPU)")
  p.add_argument("--out", type=pathlib.Path,
                 help="directory for the results (default: jevo-bench/PRESET-TIME under the "
                 "current directory)")
  p.add_argument("--no-trace", action="store_true", help="skip the profiler trace of the block")
  p.add_argument("--plan-budget", metavar="BUDGET",
                 help="also plan the preset's stack for this device memory (e.g. 16GiB, with "
                 "jevo.plan) and run the plan: planned against measured peak and time")
  p.add_argument("--plan-candidates", nargs="+", metavar="NAME",
                 help="what the planner may choose per block (default: all of "
                 "everything, all_products, linear_outputs, block_inputs, offload)")
  p.add_argument("--plan-blocks", type=int, metavar="N",
                 help="blocks of the planned stack (default: 48 on a GPU; 4 on a CPU and for "
                 "the extra-MSA stack)")
  p.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
  p.add_argument("--compare", nargs="+", metavar="RESULTS.json",
                 help="one file: run, then compare it (before) with this run (after); two files: "
                 "compare them and run nothing")
  return p


def _check(args, p):
  if args.repeats is not None and args.repeats < 1:
    p.error(f"--repeats must be at least 1, got {args.repeats}")
  if args.compare and len(args.compare) > 2:
    p.error(f"--compare takes one or two results files, got {len(args.compare)}")
  if args.shape is not None:
    try:
      presets.parse_shape(args.shape)
    except ValueError as err:
      p.error(f"--shape: {err}")
  if args.plan_budget is not None:
    from jevo.plan import parse_bytes
    try:
      parse_bytes(args.plan_budget)
    except ValueError as err:
      p.error(f"--plan-budget: {err}")
  if args.plan_candidates:
    from jevo.plan.candidates import by_name
    for name in args.plan_candidates:
      try:
        by_name(name)
      except ValueError as err:
        p.error(f"--plan-candidates: {err}")
  if args.plan_blocks is not None and args.plan_blocks < 1:
    p.error(f"--plan-blocks must be at least 1, got {args.plan_blocks}")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = parser()
  args = p.parse_args(argv)
  _check(args, p)
  if args.compare:
    try:
      before = report.load(args.compare[0])
      if len(args.compare) == 2:
        print(report.compare(before, report.load(args.compare[1])))
        return 0
    except (OSError, ValueError) as err:
      p.error(f"--compare: {err}")

  from jevo.bench import run
  if args.shape is not None:
    name = "shape-{}x{}".format(*presets.parse_shape(args.shape))
  elif args.preset is not None:
    name = args.preset
  else:
    name = run.choose_default(args.gpu_default)
  preset = presets.resolve(name)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  out = args.out or pathlib.Path("jevo-bench") / f"{preset.name}-{stamp}"
  out.mkdir(parents=True, exist_ok=True)
  cases = None
  if args.cases:
    known = [c.name for c in preset.attention] + (
        ["block", preset.block.name] if preset.block is not None else [])
    unknown = [c for c in args.cases if c not in known]
    if unknown:
      p.error(f"--cases: {unknown} not in preset {preset.name!r}, which has {known}")
    cases = tuple(args.cases)
  print(f"jevo.bench: preset {preset.name} ({preset.description}); results in {out}",
        file=sys.stderr)
  results = run.run(run.Options(preset=preset, backends=tuple(args.backends), cases=cases,
                                repeats=args.repeats, out=out, trace=not args.no_trace,
                                timeout_s=args.timeout, plan_budget=args.plan_budget,
                                plan_blocks=args.plan_blocks,
                                plan_candidates=tuple(args.plan_candidates or ())))
  results.update(preset=preset.name, date=datetime.date.today().isoformat(),
                 command="python -m jevo.bench " + shlex.join(argv),
                 notes=list(preset.notes) + [
                     "trifast (PyTorch/Triton) is not run here: it is not a JAX library."])
  report.write_json(out / "results.json", results)
  text = report.markdown_report(results)
  (out / "report.md").write_text(text)
  written = [out / "results.json", out / "report.md"]
  try:
    from jevo.bench import plots
    written += plots.plot(results, out)
  except ImportError:
    print("plots skipped: matplotlib is not installed (pip install 'jevo[bench]')",
          file=sys.stderr)
  print(text)
  if len(args.compare or ()) == 1:
    comparison = report.compare(before, results)
    (out / "compare.md").write_text(comparison)
    print("## Compared with " + args.compare[0] + "\n\n" + comparison)
  print("wrote " + ", ".join(str(w) for w in written) +
        (f", {results['profile']['trace_dir']}" if (results.get("profile") or {}).get("trace_dir")
         else ""))
  return 0
