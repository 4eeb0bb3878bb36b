"""The memory-budget planner over a sweep of budgets: for each, the plan (`jevo.plan`) and the
planned step run in a fresh process, planned against measured peak and time, in one table.

    python benchmarks/plan_budgets.py --preset af2-finetune --budgets 120GB 40GB 16GB 8GB 4GB
    python benchmarks/plan_budgets.py --preset extra-msa --budgets 16GB
    python benchmarks/plan_budgets.py --preset long-inference --budgets 16GB --blocks 48

The first budget plans from whatever the planner's cache holds (an empty one compiles and
times every candidate), in a process of its own; each budget's planned step then runs in
another fresh process (the allocator's peak is a running maximum over a process), planning
again from the cache. `--out PATH` also writes the records as JSON lines, each as soon as its
budget is done (so that a run stopped early keeps the budgets it finished); each plan's
description (what was chosen and why, the plans its checks turned down included) goes to
standard error as it comes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jevo.bench.report import gib_text  # noqa: E402
from jevo.bench.run import plan_and_run  # noqa: E402



def row(record: dict) -> str:
  if record.get("status") != "ok":
    smallest = record.get("smallest_budget")
    why = record.get("reason", "")[:160]
    return (f"| {record['budget']} | {record.get('status')}: {why} | "
            f"smallest {gib_text(smallest)} GiB | | | |")
  plan, measured = record["plan"], record.get("measured", {})
  runs = " + ".join(f"{r['blocks']} x {r['candidate']}" for r in plan["runs"]) or "-"
  if plan.get("chunk_size") is not None:
    runs += f", chunk {plan['chunk_size']}"
  peak = measured.get("absolute_peak_bytes")
  flag = " (upper bound)" if measured.get("peak_is_upper_bound") else ""
  return (f"| {record['budget']} | {runs} | {plan['predicted_ms']:.1f} ms / "
          f"{gib_text(plan['predicted_peak'])} GiB | XLA {gib_text(plan.get('xla_peak'))}, "
          f"allocator in planning {gib_text(plan.get('device_peak'))} GiB | "
          f"{measured.get('ms', 0):.1f} ms "
          f"({measured.get('min_ms', 0):.1f}-{measured.get('max_ms', 0):.1f}) / "
          f"{gib_text(peak)} GiB{flag} | {record['planning_wall_s']:.0f} s |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="af2-finetune")
  p.add_argument("--budgets", nargs="+", default=["120GB", "40GB", "16GB", "8GB", "4GB"])
  p.add_argument("--blocks", type=int, default=48)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--timeout", type=int, default=1200, help="seconds per process")
  p.add_argument("--out", help="also write the records here, one JSON line each")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out) if args.out else None
  if out is not None:
    out.write_text("")
  print("| budget | plan | predicted step / peak | checked peaks | measured step (min-max) / "
        "allocator's peak | planning wall |", flush=True)
  print("|---|---|---|---|---|---|", flush=True)
  for budget in args.budgets:
    record = plan_and_run(args.preset, budget, args.blocks, args.repeats,
                          timeout_s=args.timeout)
    if record.get("description"):
      print(f"{budget}: {record['description']}", file=sys.stderr, flush=True)
    print(row(record), flush=True)
    if out is not None:
      with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
