"""One measurement in its own process, so that its peak device memory is its own:

    python -m jevo.bench.worker '{"mode": "attention", "preset": "cpu-small", ...}'

Prints progress lines ("@stage ...") while it works and one JSON record as its last line.
The parent (`jevo.bench.run`) reads both. Modes: "probe" (the machine, versions, and which
implementation can run which case), "attention" (one case and implementation), "block",
"plan" (plan a preset's stack for a budget, then run the plan), "stack" (run a preset's stack
as given, without planning).
"""

from __future__ import annotations

import json
import platform
import sys
import traceback


def stage(text: str) -> None:
  print(f"@stage {text}", flush=True)


def _error_text(err: BaseException) -> str:
  lines = [l for l in str(err).splitlines() if l.strip()]
  return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def is_out_of_memory(text: str) -> bool:
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _versions() -> dict:
  from importlib.metadata import PackageNotFoundError, version
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "jevo", "flax", "numpy", "cuequivariance-jax",
               "cuequivariance-ops-jax-cu13", "cuequivariance-ops-jax-cu12", "colabfold-kernels"):
    try:
      out[dist] = version(dist)
    except PackageNotFoundError:
      pass
  return out


def probe(spec: dict) -> dict:
  import jax
  from jevo.bench import implementations, presets
  device = jax.devices()[0]
  preset = presets.resolve(spec["preset"])
  available = {}
  for case in preset.attention:
    for name, impl in implementations.ATTENTION_IMPLEMENTATIONS.items():
      try:
        available[f"{case.name}/{name}"] = impl.unavailable_reason(case, device.platform)
      except Exception as err:  # a peer that fails while being asked
        available[f"{case.name}/{name}"] = f"failed to load: {_error_text(err)}"
  import jevo
  status = jevo.cuda_status()
  return dict(platform=device.platform, device_kind=device.device_kind,
              device_count=jax.device_count(), host=platform.node(),
              processor=platform.processor() or platform.machine(), versions=_versions(),
              cuda_status=dict(available=status.available, reason=status.reason),
              unavailable=available,
              memory_bytes=(device.memory_stats() or {}).get("bytes_limit"))


def _vjp_fn(forward, args, diff_argnums):
  """forward+backward: the vjp of `forward` with respect to `args[i]`, i in diff_argnums, for a
  given output cotangent (an input of the timed function, like the others)."""
  import jax

  def forward_backward(*all_args):
    *args_, d_out = all_args

    def of_diff(*diff):
      full = list(args_)
      for i, x in zip(diff_argnums, diff):
        full[i] = x
      return forward(*full)

    _, vjp = jax.vjp(of_diff, *(args_[i] for i in diff_argnums))
    return vjp(d_out)

  return forward_backward


def _run_pass(record, key, fn, args, spec, memory):
  from jevo.bench.measure import measure
  stage(f"compile and time {key}")
  try:
    record[key] = measure(fn, args, repeats=spec["repeats"], batch=spec.get("batch", 1),
                          memory=memory)
  except Exception as err:  # out of memory or unsupported: recorded, not fatal
    text = _error_text(err)
    record[key] = dict(status="oom" if is_out_of_memory(text) else "error", reason=text)
    return False
  record[key]["status"] = "ok"
  return True


def attention(spec: dict) -> dict:
  import jax
  from jevo.bench import implementations, presets
  from jevo.bench.measure import DeviceMemory
  case = presets.resolve(spec["preset"]).attention_case(spec["case"])
  impl = implementations.get(spec["backend"])
  device = jax.devices()[0]
  memory = DeviceMemory(device)
  record = dict(case=case.name, backend=impl.name)
  stage("make inputs")
  setup = impl.setup(case, spec.get("seed", 0))
  jax.block_until_ready(setup.args)
  if not _run_pass(record, "fwd", setup.forward, setup.args, spec, memory):
    return record
  if case.forward_only:
    return record
  # The output's cotangent exists before the measured window, as the inputs do.
  out_shape = jax.eval_shape(setup.forward, *setup.args)
  d_out = implementations.host_normal(7, out_shape.shape, out_shape.dtype)
  fn = _vjp_fn(setup.forward, setup.args, setup.diff_argnums)
  _run_pass(record, "fwdbwd", fn, setup.args + (d_out,), spec, memory)
  return record


def block(spec: dict) -> dict:
  import jax
  from jevo.bench import block_case, presets
  from jevo.bench.measure import DeviceMemory
  case = presets.resolve(spec["preset"]).block
  memory = DeviceMemory(jax.devices()[0])
  record = dict(case=case.name, backend=spec["backend"])
  stage("build the block")
  blk, inputs = block_case.make_block(case, spec["backend"])
  jax.block_until_ready(inputs)
  if spec.get("trace_only"):
    return _trace_block(record, case, blk, inputs, spec["trace_dir"])
  fwd, head = block_case.forward_fn(case, blk)
  if not _run_pass(record, "fwd", fwd, head + inputs, spec, memory):
    return record
  if not case.forward_only:
    step, head = block_case.training_step_fn(blk)
    _run_pass(record, "fwdbwd", step, head + inputs, spec, memory)
  return record


def _trace_block(record, case, blk, inputs, trace_dir):
  """Traces the training step (the forward alone for a forward-only case)."""
  import jax
  from jevo.bench import block_case
  from jevo.bench.trace import write_trace
  if case.forward_only:
    fn, head = block_case.forward_fn(case, blk)
  else:
    fn, head = block_case.training_step_fn(blk)
  stage("compile the traced step")
  compiled = jax.jit(fn).lower(*head, *inputs).compile()
  stage("trace")
  record["trace"] = dict(write_trace(trace_dir, "block", compiled, head + inputs),
                         **{"pass": "fwd" if case.forward_only else "fwdbwd"})
  record["status"] = "ok"
  return record


def planned(spec: dict) -> dict:
  """Plans the preset's stack for a budget (jevo.plan; its inference forward with
  `"inference": true`), then (unless `plan_only`) runs the planned step: the planner's
  predicted peak and time beside the measured ones (on a CPU, where there is no allocator,
  XLA's memory analysis of the whole compiled stack stands for the measured peak). Run the
  planned step in a process that has not planned: planning runs steps on the device, and the
  allocator's peak would be theirs. `"given_plan"` (the plan a `plan_only` worker returned)
  runs that plan without planning again: planning even from a full cache tries on the device
  what the cache does not keep (a stack that ran out of memory)."""
  import dataclasses
  from jevo.plan import PlanError, plan_stack
  from jevo.plan.candidates import by_name
  stack_spec, training = _stack_spec(spec)
  record, given = dict(status="ok"), spec.get("given_plan")
  if given is None:
    stage("plan (compiles each candidate; cached afterwards)")
    try:
      chosen = [by_name(n) for n in spec.get("candidates") or ()] or None
      plan = plan_stack(stack_spec, spec["blocks"], budget=spec["budget"], training=training,
                        candidates=chosen,
                        per_sub_module=bool(spec.get("per_sub_module", True)))
    except PlanError as err:
      return dict(status="error", reason=str(err), smallest_budget=err.smallest_budget)
    record.update(plan=dataclasses.asdict(plan), description=plan.describe())
    if spec.get("plan_only"):
      return record
    given = record["plan"]
  runs = [(r["blocks"], r["candidate"]) for r in given["runs"]]
  return dict(record, **_run_step(stack_spec, spec["blocks"], runs, given["chunk_size"],
                                  training, spec["repeats"], "planned"))


def _stack_spec(spec: dict):
  """(the planner's StackSpec of the spec's preset, whether its step trains): the preset's
  training step unless it is forward-only or the spec says `"inference": true`."""
  from jevo.bench import presets
  from jevo.plan import StackSpec
  case = presets.resolve(spec["preset"]).block
  training = not case.forward_only and not spec.get("inference", False)
  return (StackSpec(case.n_seq, case.n_res, tuple(sorted(case.block_kwargs.items())),
                    case.extra_msa), training)


def _run_step(stack_spec, blocks, runs, chunk_size, training, repeats, what) -> dict:
  """Builds the stack's step (`jevo.plan.costs.planned_step`), then compiles and times it:
  {"measured": ..., "xla_whole_step_bytes": ...}."""
  import jax
  from jevo.bench.measure import DeviceMemory, measure
  from jevo.plan import costs
  fn, _, concrete, remat = costs.planned_step(stack_spec, blocks, runs, chunk_size, training)
  stage(f"build the {what} stack")
  args = concrete()
  jax.block_until_ready(args)
  memory = DeviceMemory(jax.devices()[0])
  stage(f"compile and time the {what} step")
  # Compiled with the planner's autotuning results where it has them (jevo.plan.costs), so
  # that a planned step runs the kernels it was planned with and does not autotune again: on a
  # GPU without preallocation, autotuning's large scratch buffers leave the allocator's pool
  # in pieces (at 128 x 4096 none could then hold the step's 36 GiB buffer).
  measured = measure(fn, args, repeats=repeats, batch=1, memory=memory,
                     compiler_options=costs.compiler_options(remat))
  xla = measured["xla"]
  return dict(measured=measured,
              xla_whole_step_bytes=(xla.get("temp_size", 0) + xla.get("argument_size", 0) +
                                    xla.get("output_size", 0) - xla.get("alias_size", 0)))


def stack(spec: dict) -> dict:
  """The preset's stack of `blocks` blocks run as given, without planning: the inference
  forward chunked by `chunk_size` (null: unchunked) for a forward-only preset or with
  `"inference": true`, else the training step with every block as `candidate` (a
  `jevo.plan.candidates` name, default "block_inputs"), chunked by `chunk_size`. What a user
  would pick by hand, to set beside a plan."""
  from jevo.plan.candidates import by_name
  stack_spec, training = _stack_spec(spec)
  blocks, chunk_size = spec["blocks"], spec.get("chunk_size")
  runs = [(blocks, by_name(spec.get("candidate", "block_inputs")).name)] if training else []
  return dict(status="ok", training=training, chunk_size=chunk_size, runs=runs,
              **_run_step(stack_spec, blocks, runs, chunk_size, training, spec["repeats"],
                          "hand-picked"))


def platform_of(spec: dict) -> dict:
  import jax
  return dict(platform=jax.devices()[0].platform)


MODES = dict(platform=platform_of, plan=planned, probe=probe, attention=attention, block=block,
             stack=stack)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  spec = json.loads(argv[0])
  try:
    record = MODES[spec["mode"]](spec)
  except Exception as err:
    traceback.print_exc()
    record = dict(status="error", reason=_error_text(err))
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
