"""Runs test files in their own pytest process on 4 CPU host devices. The host device count is
fixed when JAX starts (`--xla_force_host_platform_device_count`), and the rest of the suite runs
in one process with one CPU device; the callers report the subprocess's result (and its output,
on failure)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
# Four host devices; LLVM optimisation off: these tiny programs compile in half the time.
XLA_FLAGS = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


def run_pytest(*files: str) -> tuple[subprocess.CompletedProcess, str]:
  """(the finished pytest process over tests/`files`, the tail of its output)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip())
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       *(str(TESTS / f) for f in files)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  return proc, (proc.stdout + proc.stderr)[-6000:]
