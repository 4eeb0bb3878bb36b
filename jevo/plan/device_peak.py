"""The allocator's peak of a planned step, in a process of its own.

XLA's memory analysis of a compiled step is the planner's check, but on an H200 a plan of a
`block_inputs` run followed by an offloaded run peaked at 11.7 GiB on the device where XLA's
analysis of the same step said 5.98 GiB. So on a GPU the planner also runs the planned step
once and reads the allocator's peak. It does that in a fresh process: the peak is a running
maximum over a process, and the planning process has already run the candidates' steps.

    python -m jevo.plan.device_peak < request.pickle    # prints one JSON line

The request is a pickled (StackSpec, blocks, runs, chunk_size, training); the child runs
without preallocating GPU memory (the planning process may hold some of it already).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

# A child gets this long to build, compile and run one step of a whole stack.
TIMEOUT_S = 900


def measure_in_fresh_process(spec, blocks, runs, chunk_size, training,
                             timeout_s: float = TIMEOUT_S) -> dict:
  """{"bytes", "seconds"} from a child process, or {"error": why}; with "xla_bytes" and
  "compile_s" wherever the child compiled the step (see `_run`)."""
  request = pickle.dumps((spec, blocks, tuple(tuple(r) for r in runs), chunk_size, training))
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  start = time.perf_counter()
  try:
    done = subprocess.run([sys.executable, "-m", "jevo.plan.device_peak"], input=request,
                          capture_output=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return dict(error=f"the step did not finish within {timeout_s:.0f} s")
  lines = [l for l in done.stdout.decode(errors="replace").splitlines() if l.startswith("{")]
  if done.returncode != 0 or not lines:
    tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
    return dict(error=f"the child exited with status {done.returncode}: " + " | ".join(tail))
  value = json.loads(lines[-1])
  value.setdefault("seconds", time.perf_counter() - start)
  held = _pool_bytes()
  if "error" in value and held:
    value["error"] += (f" (this planning process held {held / 2 ** 30:.2f} GiB of the device "
                       "in its allocator's pool meanwhile)")
  return value


def _pool_bytes() -> int | None:
  """The device memory this process's allocator holds (free or not), where JAX says."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # no device statistics on this backend
    return None
  return stats.get("pool_bytes") or stats.get("bytes_reserved") or None


def _run(spec, blocks, runs, chunk_size, training) -> dict:
  """{"bytes", "seconds"} and, once the step compiled, XLA's analysis of it as
  `whole_step_bytes` reports it ("xla_bytes", "compile_s"), so that the planning process need
  not compile the same step too; {"error"} instead of "bytes" where the step did not run or
  the device has no allocator statistics."""
  import jax
  from jevo.plan.costs import compile_fn, _device_bytes, planned_step
  device = jax.devices()[0]
  fn, args, concrete, remat = planned_step(spec, blocks, runs, chunk_size, training)
  real = jax.device_put(concrete(for_peak=True), device)
  jax.block_until_ready(real)
  start = time.perf_counter()
  compiled = compile_fn(fn, args, remat)
  out = dict(xla_bytes=sum(_device_bytes(compiled)), compile_s=time.perf_counter() - start)
  try:
    jax.block_until_ready(compiled(*real))
  except Exception as err:  # an out-of-memory is a result too: the plan does not fit
    return dict(out, error=f"{type(err).__name__}: {str(err)[:500]}")
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return dict(out, error=f"{device.platform} reports no allocator statistics")
  return dict(out, bytes=int(stats["peak_bytes_in_use"]), seconds=time.perf_counter() - start)


def main() -> None:
  spec, blocks, runs, chunk_size, training = pickle.loads(sys.stdin.buffer.read())
  try:
    value = _run(spec, blocks, runs, chunk_size, training)
  except Exception as err:  # building or compiling the step failed
    value = dict(error=f"{type(err).__name__}: {str(err)[:500]}")
  print(json.dumps(value), flush=True)


if __name__ == "__main__":
  main()
