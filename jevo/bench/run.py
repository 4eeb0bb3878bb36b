"""Runs a preset: a probe of the machine, then every (case, implementation) in a fresh process
(so that each peak of device memory is its own), then a trace of the block; returns the records
that `jevo.bench.report` turns into tables, JSON and plots."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from jevo.bench import floor, implementations
from jevo.bench.progress import Progress
from jevo.bench.trace import without_command_buffers

WORKER = [sys.executable, "-m", "jevo.bench.worker"]
# The file in the output directory that holds every finished job's records, one JSON object a
# line, while the run goes on.
RECORDS_SO_FAR = "records_so_far.jsonl"


@dataclasses.dataclass
class Options:
  preset: object                 # presets.Preset
  backends: tuple[str, ...]      # attention implementations to run (block: jevo's among them)
  cases: tuple[str, ...] | None  # None: every case of the preset
  repeats: int | None            # None: 20 on a GPU, 5 on a CPU
  out: pathlib.Path
  trace: bool = True
  timeout_s: int = 900
  plan_budget: str | None = None  # also run the preset's stack under a plan for this budget
  plan_blocks: int | None = None
  plan_candidates: tuple[str, ...] = ()  # empty: all


def plan_and_run(preset: str, budget: str, blocks: int, repeats: int, candidates=(),
                 progress: Progress | None = None, timeout_s: int = 900,
                 inference: bool = False, per_sub_module: bool = True) -> dict:
  """Plans `preset`'s stack of `blocks` blocks for `budget` (jevo.plan) and runs the planned
  step: the worker's record (the plan, and the measured step where it ran) with `budget`,
  `blocks` and `planning_wall_s`. Planning runs steps of 2 and 3 blocks of every candidate on
  the device, and the allocator's peak is a running maximum over a process: so one worker
  plans and a fresh one runs the plan it made. `inference`: plan the inference forward of a
  preset that trains; `per_sub_module`: `plan_stack`'s."""
  spec = dict(mode="plan", preset=preset, budget=budget, blocks=blocks, repeats=repeats,
              candidates=list(candidates), inference=inference, per_sub_module=per_sub_module)
  start = time.perf_counter()
  planned = run_worker(dict(spec, plan_only=True), progress, timeout_s=timeout_s)
  planning_s = time.perf_counter() - start
  if planned.get("status") == "ok":
    ran = run_worker(dict(spec, given_plan=planned["plan"]), progress, timeout_s=timeout_s)
    planned = dict(ran, plan=planned["plan"], description=planned["description"]) if (
        ran.get("status") == "ok") else ran
  return dict(planned, budget=budget, blocks=blocks, planning_wall_s=planning_s)


def run_worker(spec: dict, progress: Progress | None = None, env: dict | None = None,
               timeout_s: int = 900) -> dict:
  """Runs one worker; passes its "@stage" lines to `progress`; returns its last JSON line, or a
  record of why there was none (crash, out of host memory, timeout)."""
  with tempfile.TemporaryFile("w+") as stderr:
    proc = subprocess.Popen(WORKER + [json.dumps(spec)], stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env=env)
    record = None
    try:
      for line in proc.stdout:
        if line.startswith("@stage ") and progress is not None:
          progress.update(line.removeprefix("@stage ").strip())
        elif line.startswith("{"):
          record = json.loads(line)
      proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      return dict(status="error", reason=f"timed out after {timeout_s} s")
    if record is None:
      stderr.seek(0)
      tail = stderr.read().strip()[-400:]
      return dict(status="error", reason=f"worker exited with code {proc.returncode}: {tail}")
    return record


def _pass_records(base: dict, worker_record: dict, passes: tuple[str, ...]) -> list[dict]:
  """One record per pass from a worker's record ({"fwd": {...}, "fwdbwd": {...}})."""
  out = []
  for key in passes:
    if key in worker_record:
      out.append(dict(base, **{"pass": key}, **worker_record[key]))
    elif "status" in worker_record and worker_record["status"] != "ok":
      out.append(dict(base, **{"pass": key}, status=worker_record["status"],
                      reason=worker_record.get("reason", "")))
    else:  # an earlier pass failed, so this one did not run
      out.append(dict(base, **{"pass": key}, status="skipped",
                      reason="not run: the forward failed"))
  return out


def _passes(case) -> tuple[str, ...]:
  return ("fwd",) if case.forward_only else ("fwd", "fwdbwd")


def run(options: Options) -> dict:
  preset = options.preset
  progress = Progress(1)
  progress.begin("probe the machine and the implementations")
  meta = run_worker(dict(mode="probe", preset=preset.name), progress)
  if meta.get("status") == "error":
    raise RuntimeError(f"the probe worker failed: {meta['reason']}")
  progress.finish(f"{meta['device_kind']} ({meta['platform']})")
  on_gpu = meta["platform"] == "gpu"
  repeats = options.repeats or (20 if on_gpu else 5)
  batch = 5 if on_gpu else 1
  cases = [c for c in preset.attention if options.cases is None or c.name in options.cases]
  run_block = preset.block is not None and (
      options.cases is None or preset.block.name in options.cases or "block" in options.cases)
  jobs = []
  for case in cases:
    for name in options.backends:
      impl = implementations.get(name)
      base = dict(kind="attention", case=case.name, variant=case.variant, shape=case.shape,
                  bias=case.bias, backend=name, label=impl.label, jevo=impl.jevo)
      jobs.append((case, base, dict(mode="attention", case=case.name, backend=name),
                   meta["unavailable"].get(f"{case.name}/{name}")))
  block_backends = [b for b in implementations.BLOCK_BACKENDS if b in options.backends]
  if run_block:
    block = preset.block
    for name in block_backends:
      base = dict(kind="block", case=block.name, variant="one Evoformer block" +
                  (" (extra MSA)" if block.extra_msa else ""), shape=(block.n_seq, block.n_res),
                  backend=name, label=f"jevo modules, {name} attention", jevo=True,
                  chunk_size=block.chunk_size)
      reason = meta["cuda_status"]["reason"] if name == "cuda" and not meta["cuda_status"]["available"] else None
      jobs.append((block, base, dict(mode="block", backend=name), reason))
  trace_backend = next((b for b in ("cuda", "xla_chunked", "xla") if b in block_backends and
                        (b != "cuda" or meta["cuda_status"]["available"])), None)
  do_trace = options.trace and run_block and trace_backend is not None
  do_plan = options.plan_budget is not None and preset.block is not None

  progress = Progress(len(jobs) + do_trace + do_plan)
  records = []
  # Each job's records as soon as it ends, so that a run cut short (a time limit, a lost
  # machine) keeps what it measured; results.json is written only at the end.
  partial = options.out / RECORDS_SO_FAR
  partial.write_text("")
  for case, base, spec, reason in jobs:
    label = f"{base['case']} / {base['backend']}"
    progress.begin(label)
    if reason is not None:
      new = [dict(base, **{"pass": p}, status="unavailable", reason=reason)
             for p in _passes(case)]
      done = f"unavailable: {reason[:60]}"
    else:
      spec = dict(spec, preset=preset.name, repeats=repeats, batch=batch)
      worker_record = run_worker(spec, progress, timeout_s=options.timeout_s)
      new = _pass_records(base, worker_record, _passes(case))
      done = ", ".join(f"{r['pass']} {r['ms']:.3g} ms" if r["status"] == "ok"
                       else f"{r['pass']} {r['status']}" for r in new)
    records += new
    with partial.open("a") as f:
      f.writelines(json.dumps(r, default=str) + "\n" for r in new)
    progress.finish(done)

  profile = None
  if do_trace:
    progress.begin(f"trace the block ({trace_backend})")
    trace_dir = options.out / "trace"
    env = dict(os.environ, XLA_FLAGS=without_command_buffers(os.environ.get("XLA_FLAGS", "")))
    spec = dict(mode="block", backend=trace_backend, preset=preset.name, repeats=1, batch=1,
                trace_dir=str(trace_dir), trace_only=True)
    traced = run_worker(spec, progress, env=env, timeout_s=options.timeout_s)
    profile = _profile(traced, trace_backend)
    progress.finish("written" if profile.get("summary") else f"failed: {profile.get('reason')}")
  planned = None
  if do_plan:
    blocks = options.plan_blocks or (4 if preset.block.extra_msa or not on_gpu else 48)
    progress.begin(f"plan {blocks} blocks for {options.plan_budget} and run the plan")
    planned = plan_and_run(preset.name, options.plan_budget, blocks, min(repeats, 5),
                           options.plan_candidates, progress, options.timeout_s)
    progress.finish("ran" if planned.get("status") == "ok" else
                    f"failed: {planned.get('reason', '')[:80]}")
  progress.close()
  add_derived(records, meta)
  return dict(meta=meta, records=records, profile=profile, repeats=repeats, batch=batch,
              planned=planned)


def _profile(traced: dict, backend: str) -> dict:
  from jevo.bench import profile_summary
  trace = traced.get("trace")
  if not trace:
    reason = traced.get("reason") or (traced.get("fwdbwd") or traced.get("fwd") or {}).get("reason")
    return dict(backend=backend, reason=reason or "no trace was written")
  summary = profile_summary.analyse(pathlib.Path(trace["trace_dir"]), pathlib.Path(trace["hlo"]),
                                    trace["steps"])
  return dict(backend=backend, trace_dir=trace["trace_dir"], hlo=trace["hlo"],
              pass_traced=trace.get("pass"), summary=summary)


def add_derived(records: list[dict], meta: dict) -> None:
  """Effective TFLOP/s and the floor (attention), and each row's speed against the best other
  implementation of the same case and pass."""
  from jevo.bench import presets
  rates = floor.device_rates(meta.get("device_kind", "")) if meta.get("platform") == "gpu" else None
  for r in records:
    if r["kind"] != "attention" or r["status"] != "ok":
      continue
    case = presets.AttentionCase(r["case"], r["variant"], tuple(r["shape"]), r["bias"])
    backward = r["pass"] == "fwdbwd"
    r["tflops"] = floor.attention_flops(case, backward) / (r["ms"] * 1e-3) / 1e12
    if rates is not None:
      r["floor_ms"] = floor.attention_floor_ms(case, backward, rates)
      r["x_floor"] = r["ms"] / r["floor_ms"]
  for r in records:
    if r["status"] != "ok":
      continue
    others = [o["ms"] for o in records if o is not r and o["status"] == "ok" and
              o["case"] == r["case"] and o["pass"] == r["pass"] and o["kind"] == r["kind"]]
    if others:
      r["best_other_ms"] = min(others)
      r["speedup_vs_best_other"] = min(others) / r["ms"]


def choose_default(gpu_default: str) -> str:
  """The preset to run when none is named: `gpu_default` when JAX sees a GPU, else the CPU
  preset. Asked of a worker, so that this process never claims device memory."""
  from jevo.bench import presets
  meta = run_worker(dict(mode="platform"))
  return gpu_default if meta.get("platform") == "gpu" else presets.CPU_DEFAULT
