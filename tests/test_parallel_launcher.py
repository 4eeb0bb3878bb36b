"""Runs the multi-device DAP tests on 4 CPU host devices, in a subprocess.

The host device count is fixed when JAX starts (`--xla_force_host_platform_device_count`), and
the rest of the suite runs in one process with one CPU device; so test_parallel_multidevice.py
and test_parallel_modules.py run in their own pytest process, whose result (and output, on
failure) is reported here.
"""

from __future__ import annotations

import re

from four_cpu_devices import run_pytest


def test_multidevice_dap_tests_pass_on_four_cpu_devices():
  proc, output = run_pytest("test_parallel_multidevice.py", "test_parallel_modules.py")
  assert proc.returncode == 0, output
  summary = proc.stdout.strip().splitlines()[-1]
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed[1]) >= 10 and "skipped" not in summary, output
