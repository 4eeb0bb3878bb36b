"""Runs the multi-device DAP tests on 4 CPU host devices, in a subprocess.

The host device count is fixed when JAX starts (`--xla_force_host_platform_device_count`), and
the rest of the suite runs in one process with one CPU device; so test_parallel_multidevice.py
and test_parallel_modules.py run in their own pytest process, whose result (and output, on
failure) is reported here.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
# Four host devices; LLVM optimisation off: these tiny programs compile in half the time.
XLA_FLAGS = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


def test_multidevice_dap_tests_pass_on_four_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip())
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       str(TESTS / "test_parallel_multidevice.py"), str(TESTS / "test_parallel_modules.py")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  output = (proc.stdout + proc.stderr)[-6000:]
  assert proc.returncode == 0, output
  summary = proc.stdout.strip().splitlines()[-1]
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed[1]) >= 10 and "skipped" not in summary, output
