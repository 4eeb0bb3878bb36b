"""Whether the device has room for the planner's allocator check.

On a GPU the planner runs the chosen step once in a fresh process for the allocator's peak
(`jevo.plan.device_peak`), while the planning process is still alive. Without preallocation
JAX's allocator grows its pool as the planner's measurements ask and gives nothing back, up to
75% of the device: on an H200, after planning 128 x 4096 (its unchunked stack, 76.5 GiB by XLA,
compiled and autotuned), the check's process had about 35 GiB and ran out of memory on a plan of
44.8 GiB within a 64 GB budget, which runs in 44.5 GiB on its own. Capping the planning process's
pool instead (the budget left free) made that compile's autotuning fail for want of memory. So
a check runs only where the device has the memory it checks for free; elsewhere the plan rests
on XLA's analysis, and says so.
"""

from __future__ import annotations

import os
import subprocess

# Needed free beyond the limit checked: the check process's CUDA context and the allocator's
# rounding.
MARGIN_BYTES = 1 * 2 ** 30


def device_free_bytes() -> int | None:
  """The first visible GPU's free memory now, from nvidia-smi (what another process could
  allocate); None where there is no GPU or no nvidia-smi."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  first = visible.split(",")[0].strip() if visible else "0"
  if not first or first == "-1":
    return None
  try:
    done = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,"
                           "nounits", "-i", first], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines or not lines[0].strip().isdigit():
    return None
  return int(lines[0].strip()) * 2 ** 20  # MiB


def why_no_room(limit: int, free: int | None) -> str:
  """Why a check of a step within `limit` bytes cannot run in another process when the device
  has `free` bytes free ("" where it can, or where the free memory is not known)."""
  if free is None or free >= limit + MARGIN_BYTES:
    return ""
  return (f"the device had {free / 2 ** 30:.2f} GiB free (the planning process's "
          f"allocator holds the rest), less than the {limit / 2 ** 30:.2f} GiB limit and "
          f"{MARGIN_BYTES / 2 ** 30:.0f} GiB the check needs")
