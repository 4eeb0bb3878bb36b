"""The benchmark's outputs: terminal tables, the Markdown report, the JSON results file and the
before/after comparison of two results files."""

from __future__ import annotations

import json
import pathlib

from jevo.bench.floor import FLOOR_FORMULA, device_rates

SCHEMA = "jevo.bench/1"
PASS_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward"}
GIB = 2 ** 30
SHORT_NAMES = {"cuda": "jevo cuda", "xla_chunked": "jevo xla_chunked", "xla": "jevo xla",
               "cudnn": "cuDNN", "cuequivariance": "cuEquivariance",
               "colabfold": "colabfold-kernels"}


def _num(x, fmt):
  return "-" if x is None else format(x, fmt)


def _gib(nbytes):
  return None if nbytes is None else nbytes / GIB


def gib_text(nbytes, fmt: str = ".2f") -> str:
  """Bytes as GiB in `fmt`, or "-" where there is no figure."""
  return _num(_gib(nbytes), fmt)


def _row_cells(r: dict) -> list[str]:
  if r["status"] != "ok":
    return [r["status"]] + [""] * 6
  xla_temp = _gib(r.get("xla", {}).get("temp_size"))
  speedup = r.get("speedup_vs_best_other")
  peak = gib_text(r.get("peak_bytes"), ".3f")
  if r.get("peak_is_upper_bound"):
    peak = "<= " + peak  # the process's running peak was already this high before the call
  return [f"{r['ms']:.3f}", _num(r.get("tflops"), ".3g"), peak,
          _num(r.get("x_floor"), ".2f"), "-" if speedup is None else f"{speedup:.2f}x",
          _num(xla_temp, ".3f"), f"{r['compile_s']:.1f}"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def attention_tables(records: list[dict]) -> str:
  header = ["case", "implementation", "ms", "TFLOP/s", "peak GiB", "x floor", "vs best other",
            "XLA temp GiB", "compile s"]
  parts = []
  for key, title in PASS_TITLES.items():
    rows = []
    for r in records:
      if r["kind"] == "attention" and r["pass"] == key and r["status"] != "unavailable":
        shape = "x".join(str(s) for s in r["shape"]) + (" +bias" if r["bias"] else "")
        rows.append([f"{r['case']} ({shape})", r["label"]] + _row_cells(r))
    if rows:
      parts.append(f"### Attention, {title}\n\n" + markdown_table(header, rows))
  return "\n\n".join(parts)


def block_table(records: list[dict]) -> str:
  header = ["block", "attention backend", "pass", "ms", "peak GiB", "vs best other",
            "XLA temp GiB", "compile s"]
  rows = []
  for r in records:
    if r["kind"] != "block" or r["status"] == "unavailable":
      continue
    cells = _row_cells(r)
    shape = "x".join(str(s) for s in r["shape"])
    chunk = f", chunk {r['chunk_size']}" if r.get("chunk_size") else ""
    rows.append([f"{r['case']} ({shape}{chunk})", r["backend"], PASS_TITLES[r["pass"]], cells[0],
                 cells[2], cells[4], cells[5], cells[6]])
  return "### Whole block\n\n" + markdown_table(header, rows) if rows else ""


def side_by_side(records: list[dict]) -> str:
  """One row per case, one column per implementation: forward / forward+backward ms (and, for
  jevo's CUDA kernels, the ratio to the floor), the compact view of a run."""
  names = list(dict.fromkeys(r["backend"] for r in records if r["status"] != "unavailable"))
  cases = list(dict.fromkeys((r["kind"], r["case"]) for r in records))
  rows = []
  for kind, case in cases:
    mine = [r for r in records if r["kind"] == kind and r["case"] == case]
    shape = "x".join(str(s) for s in mine[0]["shape"])
    row = [f"{case} ({shape})"]
    for name in names:
      cells = []
      for p in PASS_TITLES:
        r = next((r for r in mine if r["backend"] == name and r["pass"] == p), None)
        if r is None:
          continue
        if r["status"] != "ok":
          cells.append({"unavailable": "n/a"}.get(r["status"], r["status"]))
        else:
          cells.append(f"{r['ms']:.3g}" + (f" ({r['x_floor']:.1f}x)" if "x_floor" in r and
                                           r["jevo"] else ""))
      row.append(" / ".join(cells) if cells else "")
    rows.append(row)
  if not rows:
    return ""
  return ("### Side by side: forward / forward+backward ms (jevo's ratio to the floor; the "
          "block runs jevo's modules with each of jevo's attention backends)\n\n" +
          markdown_table(["case"] + [SHORT_NAMES.get(n, n) for n in names], rows))


def reasons(records: list[dict]) -> str:
  """Why the rows that did not run did not, each (implementation, reason) once."""
  seen = {}
  for r in records:
    if r["status"] != "ok":
      seen.setdefault((r["label"], r.get("reason", "")), []).append(f"{r['case']} {r['pass']}")
  if not seen:
    return ""
  lines = [f"- {label}: {reason} ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
           for (label, reason), where in seen.items()]
  return "Not measured:\n\n" + "\n".join(lines)


def profile_table(profile: dict | None) -> str:
  if not profile:
    return ""
  summary = profile.get("summary")
  if not summary:
    return f"### Where the block's time goes\n\nNo profile: {profile.get('reason')}"
  rows = [[name] + [f"{row[p]:.3f}" for p in ("forward", "recompute", "backward", "total")] +
          [f"{100 * row['total'] / summary['total_ms']:.0f}%"]
          for name, row in summary["modules"].items()]
  if summary.get("unattributed_ms") is not None:
    rows.append(["(not attributed)", "-", "-", "-", f"{summary['unattributed_ms']:.3f}", ""])
  kinds = ", ".join(f"{k} {v:.2f} ms" for k, v in list(summary["kinds"].items())[:6])
  return (f"### Where the block's time goes ({profile['backend']} attention, pass "
          f"{profile.get('pass_traced')}, {summary['total_ms']:.2f} ms of device time per step)"
          f"\n\n" + markdown_table(["sub-module", "forward ms", "recompute ms", "backward ms",
                                    "total ms", "share"], rows) +
          f"\n\nBy kind: {kinds}.\n\nTrace (TensorBoard / Perfetto): `{profile['trace_dir']}`")


def plan_table(planned: dict | None, on_gpu: bool) -> str:
  """The planner's prediction beside what the planned step measured."""
  if not planned:
    return ""
  title = f"### Under a plan: {planned['blocks']} blocks within {planned['budget']}"
  if planned.get("status") != "ok":
    return f"{title}\n\nNo plan: {planned.get('reason')}"
  plan, measured = planned["plan"], planned["measured"]
  peak = measured.get("absolute_peak_bytes") if on_gpu else None
  peak_label = ("allocator's peak" if on_gpu else
                "XLA's memory analysis of the whole step (no allocator on a CPU)")
  measured_peak = peak if peak is not None else planned["xla_whole_step_bytes"]
  if peak is not None and measured.get("peak_is_upper_bound"):
    peak_label += "; reached before the step ran, so the step's own peak is at most this"
  planned_peak = f"{plan['predicted_peak'] / GIB:.3f} GiB"
  if plan.get("xla_peak") is not None:
    planned_peak += (f" (checked at planning: XLA's analysis of the whole step "
                     f"{plan['xla_peak'] / GIB:.3f} GiB)")
  rows = [["peak device memory", planned_peak,
           f"{measured_peak / GIB:.3f} GiB ({peak_label})"],
          ["step time", f"{plan['predicted_ms']:.1f} ms ({plan['time_source']})",
           f"{measured['ms']:.1f} ms"]]
  return (f"{title}\n\n" + markdown_table(["", "planned", "measured"], rows) +
          f"\n\n```\n{planned['description']}\n```")


def header_text(results: dict) -> str:
  meta = results["meta"]
  versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
  rates = device_rates(meta["device_kind"]) if meta["platform"] == "gpu" else None
  floor_line = (f"Floor on {rates.name}: {FLOOR_FORMULA}; exp_rate {rates.exp_per_s:.3g}/s, "
                f"tensor_rate {rates.tensor_flops_per_s:.3g} FLOP/s."
                if rates else f"No floor: the device ({meta['device_kind']}) is not in the "
                f"table of known GPUs ({FLOOR_FORMULA}).")
  return (f"# jevo.bench: {results['preset']} on {meta['device_kind']} ({meta['platform']})\n\n"
          f"{results['date']}; `{results['command']}`; {versions}.\n\n"
          f"Median of {results['repeats']} samples, each the mean of {results['batch']} calls "
          "queued back to back, after 2 warm-up calls; bf16 inputs, random (10% of keys "
          "masked). Each (case, implementation) ran in a fresh process. Peak = the allocator's "
          "peak above the bytes in use before the call (inputs and the output's cotangent "
          "count as inputs; the output and every temporary count). Inputs are made on the host, "
          "so that no generator temporaries stay in the allocator's running peak; '<=' marks a "
          "peak already reached before the call (forward+backward runs after the forward, in "
          "the same process), so an upper bound. CPUs have no allocator statistics: see XLA's "
          "temp bytes. 'vs best other' = the best other implementation's time / this one's "
          "(above 1: this one is faster). TFLOP/s counts 4*B*N*H*S*S*D FLOPs forward, 3.5x "
          f"that forward+backward.\n\n{floor_line}")


def markdown_report(results: dict) -> str:
  parts = [header_text(results), side_by_side(results["records"]),
           attention_tables(results["records"]),
           block_table(results["records"]), profile_table(results.get("profile")),
           plan_table(results.get("planned"), results["meta"]["platform"] == "gpu"),
           reasons(results["records"])]
  notes = results.get("notes") or []
  if notes:
    parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes))
  return "\n\n".join(p for p in parts if p) + "\n"


def write_json(path: pathlib.Path, results: dict) -> None:
  path.write_text(json.dumps(dict(results, schema=SCHEMA), indent=1, default=str))


def load(path: str | pathlib.Path) -> dict:
  data = json.loads(pathlib.Path(path).read_text())
  if data.get("schema") != SCHEMA:
    raise ValueError(f"{path} is not a jevo.bench results file (schema {SCHEMA!r}), "
                     f"got schema {data.get('schema')!r}")
  return data


def compare(before: dict, after: dict) -> str:
  """A before/after table of every (case, implementation, pass) that both runs measured."""
  def key(r):
    return (r["kind"], r["case"], r["backend"], r["pass"])
  old = {key(r): r for r in before["records"]}
  rows = []
  for r in after["records"]:
    o = old.get(key(r))
    if o is None:
      continue
    ok = r["status"] == "ok" and o["status"] == "ok"
    change = f"{o['ms'] / r['ms']:.2f}x" if ok else "-"
    peak = lambda x: gib_text(x.get("peak_bytes"), ".3f") if x["status"] == "ok" else x["status"]  # noqa: E731
    ms = lambda x: f"{x['ms']:.3f}" if x["status"] == "ok" else x["status"]  # noqa: E731
    rows.append([r["case"], r["label"], PASS_TITLES[r["pass"]], ms(o), ms(r), change, peak(o),
                 peak(r)])
  title = (f"Before: {before['date']} {before['meta']['device_kind']} "
           f"(jevo {before['meta']['versions'].get('jevo')}); after: {after['date']} "
           f"{after['meta']['device_kind']} (jevo {after['meta']['versions'].get('jevo')}). "
           "'speed-up' = before ms / after ms.\n\n")
  if not rows:
    return title + "The two runs have no (case, implementation, pass) in common.\n"
  return title + markdown_table(["case", "implementation", "pass", "before ms", "after ms",
                                 "speed-up", "before peak GiB", "after peak GiB"], rows) + "\n"
