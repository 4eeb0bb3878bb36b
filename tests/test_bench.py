"""The profile benchmark, `python -m jevo.bench`: the CPU preset end to end (files, JSON schema,
named scopes in the trace), the floor formula, the missing-peer path, and `--compare`."""

import json
import pathlib
import subprocess
import sys

import pytest

from jevo.bench import floor, implementations, presets, report, run


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
  """One run of the default command (on this GPU-less machine: the cpu-small preset)."""
  out = tmp_path_factory.mktemp("bench") / "run"
  proc = subprocess.run([sys.executable, "-m", "jevo.bench", "--out", str(out)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return out, proc


def test_default_run_writes_json_plots_report_and_trace(cpu_run):
  out, proc = cpu_run
  for name in ("results.json", "report.md", "time.png", "memory.png"):
    assert (out / name).stat().st_size > 0, name
  assert (out / "time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  traces = list((out / "trace" / "trace_block").rglob("*.trace.json.gz"))
  assert traces, "no profiler trace of the block"
  assert "### Attention, forward" in proc.stdout and "### Whole block" in proc.stdout
  assert "] " in proc.stderr and "/" in proc.stderr  # the progress lines


def test_every_job_s_records_are_written_as_the_run_goes(cpu_run):
  """records_so_far.jsonl holds, a line each, the records of every finished job (what a run cut
  short keeps): by the end, the same cases, implementations and passes as results.json."""
  out, _ = cpu_run
  lines = (out / run.RECORDS_SO_FAR).read_text().splitlines()
  final = [r for r in json.loads((out / "results.json").read_text())["records"]]
  key = lambda r: (r["kind"], r["case"], r["backend"], r["pass"], r["status"])  # noqa: E731
  assert sorted(key(json.loads(line)) for line in lines) == sorted(key(r) for r in final)
  assert any(json.loads(line)["status"] == "ok" for line in lines)


def test_a_run_cut_short_keeps_the_jobs_it_finished(tmp_path, monkeypatch):
  """The records of each finished job are on disk before the next job starts: a run stopped in
  its second job (here by an exception from the worker) leaves the first job's records."""
  calls = []

  def worker(spec, progress=None, env=None, timeout_s=900):
    calls.append(spec["mode"])
    if spec["mode"] == "probe":
      return dict(status="ok", device_kind="test", platform="cpu", unavailable={},
                  cuda_status=dict(available=False, reason="none here"))
    if len(calls) == 2:
      return dict(fwd=dict(status="ok", ms=1.5), fwdbwd=dict(status="ok", ms=4.0))
    raise KeyboardInterrupt("cut short")

  monkeypatch.setattr(run, "run_worker", worker)
  options = run.Options(preset=presets.get_preset("cpu-small"), backends=("xla",), cases=None,
                        repeats=1, out=tmp_path, trace=False)
  with pytest.raises(KeyboardInterrupt):
    run.run(options)
  kept = [json.loads(line) for line in (tmp_path / run.RECORDS_SO_FAR).read_text().splitlines()]
  assert [(r["pass"], r["ms"]) for r in kept] == [("fwd", 1.5), ("fwdbwd", 4.0)]
  assert kept[0]["backend"] == "xla" and len(calls) == 3


def test_results_json_schema(cpu_run):
  out, _ = cpu_run
  data = report.load(out / "results.json")
  assert data["preset"] == "cpu-small"
  assert data["meta"]["platform"] == "cpu"
  assert {"jax", "jaxlib", "python"} <= set(data["meta"]["versions"])
  assert data["command"].startswith("python -m jevo.bench")
  records = data["records"]
  cases = {(r["kind"], r["case"]) for r in records}
  assert cases == {("attention", "msa_row"), ("attention", "msa_col"), ("attention", "tri_start"),
                   ("attention", "tri_end"), ("block", "evoformer_block")}
  for r in records:
    assert r["status"] in ("ok", "unavailable", "error", "oom", "skipped"), r
    assert r["pass"] in ("fwd", "fwdbwd")
    if r["status"] == "ok":
      assert r["ms"] > 0 and r["min_ms"] <= r["ms"] <= r["max_ms"]
      assert r["xla"]["temp_size"] >= 0 and r["xla"]["flops"] > 0
    else:
      assert r["reason"]
  ok = {(r["case"], r["backend"], r["pass"]) for r in records if r["status"] == "ok"}
  for case in ("msa_row", "msa_col", "tri_start", "tri_end", "evoformer_block"):
    for backend in ("xla_chunked", "xla"):
      for p in ("fwd", "fwdbwd"):
        assert (case, backend, p) in ok
  # Attention rows carry effective TFLOP/s and their speed against the best other backend.
  row = next(r for r in records if r["case"] == "msa_row" and r["backend"] == "xla" and
             r["pass"] == "fwd")
  other = next(r for r in records if r["case"] == "msa_row" and r["backend"] == "xla_chunked" and
               r["pass"] == "fwd")
  assert row["speedup_vs_best_other"] == pytest.approx(other["ms"] / row["ms"])
  assert row["tflops"] == pytest.approx(
      presets.get_preset("cpu-small").attention_case("msa_row").flops_forward / row["ms"] / 1e9)
  # No floor on a CPU: the device is not in the table of known GPUs.
  assert "floor_ms" not in row


def test_peers_that_cannot_run_are_reported_with_the_reason(cpu_run):
  out, proc = cpu_run
  records = json.loads((out / "results.json").read_text())["records"]
  by_backend = {r["backend"]: r for r in records if r["case"] == "msa_row" and r["pass"] == "fwd"}
  assert by_backend["cudnn"]["status"] == "unavailable"
  assert "needs a CUDA GPU" in by_backend["cudnn"]["reason"]
  assert by_backend["cuda"]["status"] == "unavailable"
  for peer in ("cuequivariance", "colabfold"):
    assert by_backend[peer]["status"] == "unavailable"
  assert "Not measured:" in proc.stdout


def test_the_trace_names_every_sub_module(cpu_run):
  out, _ = cpu_run
  data = json.loads((out / "results.json").read_text())
  summary = data["profile"]["summary"]
  hlo = (out / "trace" / "block.hlo.txt").read_text()
  for name in ("msa_row_attention", "msa_column_attention", "msa_transition", "outer_product_mean",
               "triangle_multiplication_outgoing", "triangle_multiplication_incoming",
               "triangle_attention_starting_node", "triangle_attention_ending_node",
               "pair_transition"):
    assert name in hlo
    assert summary["modules"][name]["total"] > 0, name
    # a training step: the backward pass of every sub-module runs too
    assert summary["modules"][name]["backward"] > 0, name


def test_floor_matches_the_h200_figures():
  rates = floor.device_rates("NVIDIA H200")
  case = presets.get_preset("af2-finetune").attention_case("msa_row")  # 1 x 512 x 384 x 8 x 32
  # forward: 6.04e8 exponentials at 4.18e12/s outweigh 7.7e10 FLOPs at 7.9e14/s
  assert floor.attention_floor_ms(case, False, rates) == pytest.approx(0.1444, rel=2e-3)
  # forward+backward: 3.5x the FLOPs now outweigh twice the exponentials
  assert floor.attention_floor_ms(case, True, rates) == pytest.approx(0.3420, rel=2e-3)
  assert floor.device_rates("NVIDIA A100-SXM4-80GB").name == "A100"
  assert floor.device_rates("NVIDIA H100 PCIe").name == "H100 PCIe"
  assert floor.device_rates("cpu") is None


class _Missing(implementations.Implementation):
  name, label, module, install = "missing", "a missing peer", "jevo_no_such_module", "pip install x"


def test_a_missing_peer_says_it_is_not_installed():
  case = presets.get_preset("cpu-small").attention[0]
  assert _Missing().unavailable_reason(case, "gpu") == "not installed (pip install x)"
  assert "needs a CUDA GPU" in implementations.get("cudnn").unavailable_reason(case, "cpu")
  with pytest.raises(ValueError, match="backend must be one of"):
    implementations.get("nope")


def test_a_worker_that_fails_is_a_record_not_a_crash():
  record = run.run_worker(dict(mode="attention", preset="cpu-small", case="no_such_case",
                               backend="xla", repeats=1))
  assert record["status"] == "error"
  assert "case must be one of" in record["reason"]


def _results(ms, date):
  rec = dict(kind="attention", case="msa_row", backend="cuda", label="jevo cuda", status="ok",
             ms=ms, peak_bytes=2 ** 29)
  return dict(schema=report.SCHEMA, date=date, records=[dict(rec, **{"pass": "fwd"})],
              meta=dict(device_kind="NVIDIA H200", versions=dict(jevo="0.1.0")))


def test_compare_prints_before_and_after(tmp_path):
  before, after = tmp_path / "before.json", tmp_path / "after.json"
  before.write_text(json.dumps(_results(2.0, "2026-11-01")))
  after.write_text(json.dumps(_results(0.5, "2026-12-01")))
  proc = subprocess.run([sys.executable, "-m", "jevo.bench", "--compare", str(before), str(after)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  row = next(l for l in proc.stdout.splitlines() if l.startswith("| msa_row"))
  assert [c.strip() for c in row.split("|")[1:-1]] == [
      "msa_row", "jevo cuda", "forward", "2.000", "0.500", "4.00x", "0.500", "0.500"]


def test_compare_rejects_a_file_that_is_not_a_results_file(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  proc = subprocess.run([sys.executable, "-m", "jevo.bench", "--compare", str(bad), str(bad)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "not a jevo.bench results file" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--shape", "512by384"], "N_SEQxN_RES"),
    (["--shape", "0x384"], "positive"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--preset", "cpu-small", "--cases", "nope"], "not in preset"),
])
def test_bad_arguments_exit_with_a_message(args, message, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jevo.bench", "--out", str(tmp_path), *args],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_presets_and_shapes():
  assert presets.parse_shape("256x512") == (256, 512)
  shaped = presets.resolve("shape-256x512")
  assert shaped.attention_case("msa_row").shape == (1, 256, 512, 8, 32)
  assert shaped.attention_case("msa_col").shape == (1, 512, 256, 8, 32)
  extra = presets.get_preset("extra-msa")
  assert extra.attention_case("msa_row").shape == (1, 5120, 384, 8, 8) and extra.block.extra_msa
  long = presets.get_preset("long-inference")
  assert all(c.forward_only for c in long.attention) and long.block.chunk_size == 128
  with pytest.raises(ValueError, match="preset must be one of"):
    presets.get_preset("af3")


def test_a_preset_under_a_plan_reports_planned_against_measured(tmp_path):
  out = tmp_path / "planned"
  proc = subprocess.run([sys.executable, "-m", "jevo.bench", "--preset", "cpu-small", "--cases",
                         "msa_row", "--backends", "xla", "--no-trace", "--plan-budget", "1GiB",
                         "--plan-blocks", "2", "--plan-candidates", "everything",
                         "block_inputs", "--out", str(out)],
                        capture_output=True, text=True, timeout=900,
                        env=dict(__import__("os").environ, XDG_CACHE_HOME=str(tmp_path / "c")))
  assert proc.returncode == 0, proc.stderr[-2000:]
  planned = json.loads((out / "results.json").read_text())["planned"]
  assert planned["status"] == "ok", planned
  plan = planned["plan"]
  assert sum(r["blocks"] for r in plan["runs"]) == 2
  assert plan["predicted_peak"] <= 2 ** 30
  # The planner's prediction is XLA's figure for the whole planned step, to within 10%.
  assert abs(plan["predicted_peak"] - planned["xla_whole_step_bytes"]) <= (
      0.1 * planned["xla_whole_step_bytes"])
  assert planned["measured"]["ms"] > 0
  assert "### Under a plan: 2 blocks within 1GiB" in proc.stdout


def test_hand_picked_chunk_sizes_run_each_in_its_own_process(tmp_path):
  out = tmp_path / "chunks.jsonl"
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "inference_chunks.py"
  proc = subprocess.run([sys.executable, str(script), "--preset", "cpu-small", "--blocks", "2",
                         "--chunk-sizes", "none", "4", "--repeats", "1", "--out", str(out)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["chunk_size"] for r in records] == [None, 4]
  for r in records:
    assert r["status"] == "ok" and not r["training"] and r["runs"] == [], r
    assert r["measured"]["ms"] > 0 and r["xla_whole_step_bytes"] > 0
  assert "| chunk_size 4 |" in proc.stdout
  bad = subprocess.run([sys.executable, str(script), "--chunk-sizes", "0"], capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "at least 1, got 0" in bad.stderr


def test_the_stack_worker_runs_a_training_step_as_given():
  record = run.run_worker(dict(mode="stack", preset="cpu-small", blocks=2, chunk_size=None,
                               repeats=1, candidate="offload"), timeout_s=900)
  assert record["status"] == "ok", record
  assert record["training"] and record["runs"] == [[2, "offload"]]
  assert record["measured"]["ms"] > 0


def test_the_plan_worker_runs_a_given_plan_without_planning_again():
  # A budget of 1 byte cannot be planned for: a worker that planned again would fail.
  given = dict(runs=[dict(blocks=2, candidate="offload", remat="offload")], chunk_size=None)
  record = run.run_worker(dict(mode="plan", preset="cpu-small", budget="1B", blocks=2,
                               repeats=1, given_plan=given), timeout_s=900)
  assert record["status"] == "ok", record
  assert record["measured"]["ms"] > 0 and record["xla_whole_step_bytes"] > 0
