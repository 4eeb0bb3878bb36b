"""`python -m jevo.demo` runs end to end and reports what it promises."""

from __future__ import annotations

from jevo import demo


def test_demo_runs_on_a_small_case(capsys):
  demo.main(["--shape", "1", "4", "24", "2", "8", "--repeats", "1", "--dtype", "float32"])
  printed = capsys.readouterr().out
  for expected in ("backend: ", "shape (B, N, S, H, D): (1, 4, 24, 2, 8)", "forward:",
                   "forward+backward:", "max |out - xla reference| = "):
    assert expected in printed, (expected, printed)
  error = float(printed.split("max |out - xla reference| = ")[1].split()[0])
  assert error < 1e-5
