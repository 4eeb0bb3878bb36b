"""Summarises a `jax.profiler` trace of an Evoformer block: device time per sub-module and phase
(forward, forward recomputed under remat, backward), per kind of operation, and the most
expensive operations, using the optimised HLO (written beside the trace) to name what each
kernel belongs to: the block runs each sub-module under a named scope, which XLA keeps in every
instruction's op_name.

Needs only the standard library (the trace is Chrome-trace JSON). On a GPU it reads the kernels
on the device's streams; traces taken with XLA's command buffers on work too: a fusion's kernel
is found by its name, and the kernels that are not fusions (cuBLAS, jevo's attention) are listed
by kernel name as "(not attributed)". On a CPU, where there are no device streams, it reads the
host threads' XLA thunks, each named after its HLO instruction.

    python -m jevo.bench.profile_summary DIR      # every trace_NAME with NAME.hlo.txt in DIR
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# EvoformerBlock's sub-modules, in the order the block applies them; also the names of the
# named scopes it puts them under.
BLOCK_SUBMODULES = (
    "msa_row_attention", "msa_column_attention", "msa_transition", "outer_product_mean",
    "triangle_multiplication_outgoing", "triangle_multiplication_incoming",
    "triangle_attention_starting_node", "triangle_attention_ending_node", "pair_transition",
)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")


def parse_hlo(text: str) -> dict[str, dict]:
  """Instruction name -> {opcode, kind, target, op_name} for every instruction in the module."""
  table = {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    # The opcode is the first "word(" after the result type (which may hold "(" in tuples).
    opcode = next((m.group(1) for m in _OPCODE.finditer(" " + rest)
                   if not m.group(1).startswith(("bf16", "f32", "f16", "s32", "u32", "pred"))),
                  "?")
    kind = re.search(r"kind=(k\w+)", rest)
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    table[name] = dict(opcode=opcode, kind=kind.group(1) if kind else "",
                       target=target.group(1) if target else "",
                       op_name=op_name.group(1) if op_name else "")
  return table


def module_of(op_name: str) -> str:
  hits = [(op_name.find(s), s) for s in BLOCK_SUBMODULES if s in op_name]
  return min(hits)[1] if hits else "(between modules)"


def phase_of(op_name: str) -> str:
  if "rematted_computation" in op_name:
    return "recompute"
  if "transpose(" in op_name:
    return "backward"
  return "forward"


# Where events with no HLO instruction go: copies, and kernels other than fusions launched from
# command buffers.
UNATTRIBUTED = ("(not attributed)", "-")


def place_of(info: dict) -> tuple[str, str]:
  """(sub-module, phase) of an HLO instruction's info, or UNATTRIBUTED without one."""
  if not info:
    return UNATTRIBUTED
  return module_of(info.get("op_name", "")), phase_of(info.get("op_name", ""))


def kind_of(info: dict, kernel: str) -> str:
  if info.get("target", "").startswith("jevo") or kernel.startswith("void jevo::attention"):
    return "jevo attention kernel"
  if "gemm" in info.get("target", "") or any(
      word in kernel.lower() for word in ("gemm", "cutlass", "nvjet")):
    return "matmul"
  if info.get("kind") == "kCustom":
    return "matmul"  # fusions XLA emits through Triton are matrix products here
  if info.get("opcode") == "fusion":
    return {"kLoop": "elementwise fusion", "kInput": "reduction fusion",
            "kOutput": "output fusion"}.get(info.get("kind"), "fusion")
  return info.get("opcode") or "other"


def hlo_op_of(event: dict, hlo: dict[str, dict]) -> str:
  """The HLO instruction that launched a kernel event. Kernels launched from an XLA command
  buffer (a CUDA graph) carry the command buffer's name instead of their own; a fusion's kernel
  is named after the fusion, with "_N" for ".N", so such kernels are looked up by name. Other
  kernels inside a command buffer (cuBLAS, custom calls) are keyed by their kernel name, which
  says their kind but not their sub-module."""
  name = event["name"]
  op = event.get("args", {}).get("hlo_op") or name
  in_command_buffer = op.startswith("command_buffer")
  if op in hlo and not in_command_buffer:
    return op
  for candidate in (name, re.sub(r"_(\d+)$", r".\1", name)):
    if candidate in hlo:
      return candidate
  return name if in_command_buffer else op


def device_events(trace: dict) -> list[dict]:
  """Kernel and copy events on the first GPU's streams (not the derived 'XLA Ops' lines), each
  with its stream's name under "stream". Without a GPU in the trace: the XLA thunks that the
  CPU client ran on its host threads (events that name their HLO module and instruction)."""
  names, threads = {}, {}
  for e in trace["traceEvents"]:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  events = []
  for e in trace["traceEvents"]:
    stream = threads.get((e.get("pid"), e.get("tid")), "")
    if (e.get("ph") == "X" and names.get(e.get("pid"), "") == "/device:GPU:0"
        and stream.startswith("Stream")):
      events.append(dict(e, stream=stream))
  if events:
    return events
  for e in trace["traceEvents"]:
    args = e.get("args", {})
    if (e.get("ph") == "X" and names.get(e.get("pid"), "").startswith("/host")
        and "hlo_module" in args and "hlo_op" in args):
      events.append(dict(e, stream=threads.get((e.get("pid"), e.get("tid")), "host")))
  return events


def _union_ms(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total / 1e3


def timeline(events: list[dict], steps: int) -> list[str]:
  """Per stream: busy time; overall: span, time with any stream busy, copies hidden under
  kernels (a copy overlapped by compute costs nothing)."""
  span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3
  lines = ["| stream | events / step | busy ms / step |", "|---|---|---|"]
  streams = collections.defaultdict(list)
  for e in events:
    streams[e["stream"]].append((e["ts"], e["ts"] + e["dur"]))
  for stream, spans in sorted(streams.items()):
    lines.append(f"| {stream} | {len(spans) // steps} | {_union_ms(spans) / steps:.3f} |")
  is_copy = lambda e: "memcpy" in e["name"].lower()
  kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if not is_copy(e)]
  copies = [(e["ts"], e["ts"] + e["dur"]) for e in events if is_copy(e)]
  busy = _union_ms(kernels + copies)
  copy_only = busy - _union_ms(kernels)
  lines += ["", f"Span {span / steps:.2f} ms / step; some stream busy {busy / steps:.2f} ms; "
            f"kernels {_union_ms(kernels) / steps:.2f} ms; copies {_union_ms(copies) / steps:.2f} "
            f"ms, of which {copy_only / steps:.2f} ms with no kernel running.", ""]
  return lines


def analyse(trace_dir: pathlib.Path, hlo_path: pathlib.Path, steps: int) -> dict | None:
  """Device time per step of the trace in `trace_dir`, by sub-module and phase, by kind and by
  HLO operation (ms), with the timeline lines; None when the trace has no device events."""
  trace_file = sorted(trace_dir.rglob("*.trace.json.gz"))[-1]
  trace = json.load(gzip.open(trace_file))
  hlo = parse_hlo(hlo_path.read_text()) if hlo_path.exists() else {}
  events = device_events(trace)
  if not events:
    return None
  by_module = collections.defaultdict(float)
  by_kind = collections.defaultdict(float)
  by_op = collections.defaultdict(float)
  count = collections.Counter()
  info_of = {}
  for e in events:
    op = hlo_op_of(e, hlo)
    info = hlo.get(op, {})
    info_of[op] = (info, e["name"])
    ms = e["dur"] / 1e3 / steps
    by_module[place_of(info)] += ms
    by_kind[kind_of(info, e["name"])] += ms
    by_op[op] += ms
    count[op] += 1
  modules = {}
  for module in BLOCK_SUBMODULES + ("(between modules)",):
    row = {p: by_module.get((module, p), 0.0) for p in ("forward", "recompute", "backward")}
    modules[module] = dict(row, total=sum(row.values()))
  ops = []
  for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:40]:
    info, kernel = info_of[op]
    ops.append(dict(op=op, kind=kind_of(info, kernel), calls=count[op] // steps, ms=ms,
                    place=" / ".join(place_of(info)), op_name=info.get("op_name", "")))
  return dict(trace_file=str(trace_file), total_ms=sum(by_op.values()),
              kernels_per_step=sum(count.values()) / steps, modules=modules,
              unattributed_ms=by_module.get(UNATTRIBUTED),
              kinds=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])), top_ops=ops,
              timeline=timeline(events, steps))


def render(name: str, summary: dict) -> str:
  """The analysis as Markdown: timeline, sub-module x phase table, kinds, top operations."""
  total = summary["total_ms"]
  lines = [f"## {name}: {total:.2f} ms of device time per step, "
           f"{summary['kernels_per_step']:.0f} kernels per step", ""] + summary["timeline"] + [
           "| sub-module | forward | recompute | backward | total |", "|---|---|---|---|---|"]
  for module, row in summary["modules"].items():
    cells = [row[p] for p in ("forward", "recompute", "backward", "total")]
    lines.append(f"| {module} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
  if summary["unattributed_ms"] is not None:
    lines.append(f"| {UNATTRIBUTED[0]} | - | - | - | {summary['unattributed_ms']:.3f} |")
  lines += ["", "| kind | ms | share |", "|---|---|---|"]
  for kind, ms in summary["kinds"].items():
    lines.append(f"| {kind} | {ms:.3f} | {100 * ms / total:.0f}% |")
  lines += ["", "| operation | kind | calls | ms | sub-module / phase | op_name (tail) |",
            "|---|---|---|---|---|---|"]
  for op in summary["top_ops"]:
    lines.append(f"| {op['op'][:60]} | {op['kind']} | {op['calls']} | {op['ms']:.3f} | "
                 f"{op['place']} | {op['op_name'][-70:]} |")
  return "\n".join(lines) + "\n"


def summarize(trace_dir: pathlib.Path, hlo_path: pathlib.Path, steps: int) -> str:
  summary = analyse(trace_dir, hlo_path, steps)
  if summary is None:
    return f"{trace_dir.name}: no device events in its trace\n"
  return render(trace_dir.name, summary)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory", type=pathlib.Path)
  parser.add_argument("--steps", type=int, default=2, help="steps in each trace")
  args = parser.parse_args(argv)
  for trace_dir in sorted(args.directory.glob("trace_*")):
    name = trace_dir.name.removeprefix("trace_")
    print(summarize(trace_dir, args.directory / f"{name}.hlo.txt", args.steps))


if __name__ == "__main__":
  main()
