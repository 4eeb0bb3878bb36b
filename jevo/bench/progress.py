"""A progress bar on stderr, with the current step and its elapsed time: redrawn in place on a
terminal, one line per finished step elsewhere (logs, CI)."""

from __future__ import annotations

import sys
import time


class Progress:
  def __init__(self, total: int, *, stream=None, width: int = 24):
    self.total, self.done, self.width = total, 0, width
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.perf_counter()
    self.label = ""
    self.step_start = self.start

  def _bar(self) -> str:
    filled = round(self.width * self.done / max(self.total, 1))
    return "[" + "#" * filled + "-" * (self.width - filled) + f"] {self.done}/{self.total}"

  def begin(self, label: str) -> None:
    self.label, self.step_start = label, time.perf_counter()
    self.update("starting")

  def update(self, stage: str) -> None:
    if self.tty:
      elapsed = time.perf_counter() - self.step_start
      line = f"\r{self._bar()} {self.label}: {stage} ({elapsed:.0f} s)"
      self.stream.write(line[:160].ljust(100))
      self.stream.flush()

  def finish(self, outcome: str) -> None:
    self.done += 1
    elapsed = time.perf_counter() - self.step_start
    line = f"{self._bar()} {self.label}: {outcome} ({elapsed:.1f} s)"
    self.stream.write(("\r" + line.ljust(100) + "\n") if self.tty else line + "\n")
    self.stream.flush()

  def close(self) -> None:
    total = time.perf_counter() - self.start
    self.stream.write(f"done in {total:.0f} s\n")
    self.stream.flush()
