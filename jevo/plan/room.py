"""Room on the device for the planner's allocator check.

On a GPU the planner runs the chosen step once in a fresh process for the allocator's peak
(`jevo.plan.device_peak`), while the planning process is still alive. Without preallocation
JAX's allocator grows its pool as the planner's measurements ask and never gives it back, up to
75% of the device by default: on an H200, planning 128 x 4096 left the check's process too little
memory to run a 48 GiB step within a 64 GB budget. So a process that plans and nothing else
(`python -m jevo.plan`, the profile benchmark's planning worker) caps its own pool, before JAX
starts, at what the budget and a margin leave, and the check's process runs without that cap.

A process that already holds the device (a user's call of `plan_stack`) cannot change its pool;
there the check gets what that process leaves free.
"""

from __future__ import annotations

import os
import subprocess

FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# Set beside FRACTION when the cap below set it, so that the check's process drops it.
CAPPED = "JEVO_PLAN_CAPPED_MEM_FRACTION"
# JAX's default share of the device for its pool, and the least the planning process keeps.
DEFAULT_FRACTION = 0.75
MIN_FRACTION = 0.1
# Left free beyond the budget: two processes' CUDA contexts and the allocator's rounding.
MARGIN_BYTES = 2 * 2 ** 30


def device_total_bytes() -> int | None:
  """The first visible GPU's memory, from nvidia-smi (JAX must not start before the cap is
  set); None where there is no GPU or no nvidia-smi."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu", "tpu"):
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  first = visible.split(",")[0].strip() if visible else "0"
  if not first or first == "-1":
    return None
  try:
    done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                           "nounits", "-i", first], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines or not lines[0].strip().isdigit():
    return None
  return int(lines[0].strip()) * 2 ** 20  # MiB


def pool_fraction(budget: int, total: int) -> float | None:
  """The share of a device of `total` bytes the planning process may pool so that `budget`
  and the margin stay free; None where JAX's default already leaves them."""
  fraction = (total - budget - MARGIN_BYTES) / total
  if fraction >= DEFAULT_FRACTION:
    return None
  return max(fraction, MIN_FRACTION)


def leave_room_for_check(budget: int, env=None, total: int | None = None) -> float | None:
  """Caps this process's pool (in `env`, os.environ by default, which JAX reads when it starts
  on the GPU) so that the check's process finds `budget` free. Returns the fraction set, or None
  where nothing was set: no GPU, a fraction the user chose, or a budget JAX's default leaves."""
  env = os.environ if env is None else env
  if FRACTION in env:
    return None
  total = device_total_bytes() if total is None else total
  if total is None:
    return None
  fraction = pool_fraction(budget, total)
  if fraction is not None:
    env[FRACTION] = f"{fraction:.3f}"
    env[CAPPED] = env[FRACTION]
  return fraction


def check_env(env) -> dict:
  """The environment of the check's process: this one's without the cap set above."""
  env = dict(env)
  if CAPPED in env:
    if env.get(FRACTION) == env[CAPPED]:
      env.pop(FRACTION)
    env.pop(CAPPED)
  return env
