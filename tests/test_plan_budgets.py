"""benchmarks/plan_budgets.py: each budget's record is written as soon as it is done, and each
plan's description reaches standard error, so that a run stopped early keeps what it finished."""

import importlib.util
import json
import pathlib

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "plan_budgets.py"


@pytest.fixture
def script():
  spec = importlib.util.spec_from_file_location("plan_budgets", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _record(budget):
  plan = dict(runs=[dict(blocks=4, candidate="offload")], chunk_size=None, predicted_ms=10.0,
              predicted_peak=2 ** 30, xla_peak=2 ** 30, device_peak=None)
  return dict(status="ok", plan=plan, description=f"plan for {budget}: 4 x offload",
              measured=dict(ms=9.5, min_ms=9.4, max_ms=9.6, absolute_peak_bytes=2 ** 30),
              budget=budget, blocks=4, planning_wall_s=1.0)


def test_records_are_written_as_each_budget_finishes(script, tmp_path, monkeypatch, capsys):
  out = tmp_path / "records.jsonl"
  seen = []

  def plan_and_run(preset, budget, blocks, repeats, timeout_s):
    # The records of the budgets before this one are already on disk.
    assert [json.loads(line)["budget"] for line in out.read_text().splitlines()] == seen
    seen.append(budget)
    if budget == "1GB":
      return dict(status="error", reason="no plan fits", smallest_budget=2 ** 31,
                  budget=budget, blocks=blocks, planning_wall_s=0.5)
    return _record(budget)

  monkeypatch.setattr(script, "plan_and_run", plan_and_run)
  script.main(["--preset", "cpu-small", "--budgets", "8GB", "1GB", "--blocks", "4",
               "--out", str(out)])
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["budget"] for r in records] == ["8GB", "1GB"]
  captured = capsys.readouterr()
  assert "8GB: plan for 8GB: 4 x offload" in captured.err
  assert "| 8GB | 4 x offload | 10.0 ms / 1.00 GiB |" in captured.out
  assert "| 1GB | error: no plan fits | smallest 2.00 GiB |" in captured.out
