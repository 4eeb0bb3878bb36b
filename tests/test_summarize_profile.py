"""jevo.bench.profile_summary on a small hand-made trace and HLO: device time lands on the
right sub-module, phase and kind, and copies hidden under kernels are told from exposed ones."""

import gzip
import json
import pathlib
import sys

import pytest

from jevo.bench import profile_summary as sp

HLO = """
HloModule jit_step
ENTRY %main {
  %fusion.1 = bf16[4,8]{1,0} fusion(bf16[4,8]{1,0} %p), kind=kLoop, calls=%f1, metadata={op_name="jit(step)/jvp()/msa_transition/add"}
  %ffi_call.2 = bf16[4,8]{1,0} custom-call(bf16[4,8]{1,0} %p), custom_call_target="jevo_attention_bwd", metadata={op_name="jit(step)/transpose(jvp())/checkpoint/msa_row_attention/ffi_call"}
  %custom-call.3 = (bf16[4,8]{1,0}, s8[16]{0}) custom-call(bf16[4,8]{1,0} %p), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp())/checkpoint/rematted_computation/triangle_attention_ending_node/dot_general"}
  ROOT %fusion.4 = f32[8]{0} fusion(bf16[4,8]{1,0} %p), kind=kInput, calls=%f4, metadata={op_name="jit(step)/transpose(jvp())/checkpoint/pair_transition/reduce_sum"}
}
"""


def _trace(events):
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=1, tid=7, name="thread_name", args=dict(name="Stream #7(Compute)")),
          dict(ph="M", pid=1, tid=8, name="thread_name", args=dict(name="Stream #8(MemcpyD2H)")),
          dict(ph="M", pid=1, tid=9, name="thread_name", args=dict(name="XLA Ops")),
          dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU"))]
  return dict(traceEvents=meta + events)


def _event(tid, ts, dur, op, name="kernel", pid=1):
  return dict(ph="X", pid=pid, tid=tid, ts=ts, dur=dur, name=name, args=dict(hlo_op=op))


@pytest.fixture
def profile_dir(tmp_path):
  events = [
      # two steps, 1000 us of kernels each
      *[_event(7, 0 + s * 2000, 100, "fusion.1") for s in range(2)],
      *[_event(7, 100 + s * 2000, 500, "ffi_call.2") for s in range(2)],
      *[_event(7, 600 + s * 2000, 300, "custom-call.3", name="nvjet_gemm") for s in range(2)],
      *[_event(7, 900 + s * 2000, 100, "fusion.4") for s in range(2)],
      # a copy half under a kernel (900..1100; the last kernel ends at 1000): 100 us exposed
      *[_event(8, 900 + s * 2000, 200, "copy.5", name="MemcpyD2H") for s in range(2)],
      # lines that must not count: the derived "XLA Ops" line and host events
      _event(9, 0, 5000, "fusion.1"), _event(7, 0, 5000, "fusion.1", pid=2),
  ]
  trace_dir = tmp_path / "trace_block_test" / "plugins" / "profile" / "run"
  trace_dir.mkdir(parents=True)
  with gzip.open(trace_dir / "host.trace.json.gz", "wt") as f:
    json.dump(_trace(events), f)
  (tmp_path / "block_test.hlo.txt").write_text(HLO)
  return tmp_path


def test_time_is_attributed_to_module_phase_and_kind(profile_dir):
  text = sp.summarize(profile_dir / "trace_block_test", profile_dir / "block_test.hlo.txt",
                      steps=2)
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.splitlines() if line.startswith("| ")}
  # sub-module rows: forward, recompute, backward, total (ms per step)
  assert rows["msa_transition"] == ["0.100", "0.000", "0.000", "0.100"]
  assert rows["msa_row_attention"] == ["0.000", "0.000", "0.500", "0.500"]
  assert rows["triangle_attention_ending_node"] == ["0.000", "0.300", "0.000", "0.300"]
  assert rows["pair_transition"] == ["0.000", "0.000", "0.100", "0.100"]
  assert rows["jevo attention kernel"][0] == "0.500"
  assert rows["matmul"][0] == "0.300"
  assert rows["elementwise fusion"][0] == "0.100"
  assert rows["reduction fusion"][0] == "0.100"
  assert "kernels 1.00 ms; copies 0.20 ms, of which 0.10 ms with no kernel running" in text
  assert "1.20 ms of device time per step" in text


def test_main_pairs_each_trace_with_its_hlo(profile_dir, capsys):
  sp.main([str(profile_dir)])
  out = capsys.readouterr().out
  assert "## trace_block_test" in out and "msa_row_attention" in out


def test_parse_hlo_reads_opcode_kind_target_and_name():
  table = sp.parse_hlo(HLO)
  assert table["fusion.1"]["kind"] == "kLoop"
  assert table["custom-call.3"]["opcode"] == "custom-call"
  assert table["custom-call.3"]["target"] == "__cublas$gemm"
  assert table["fusion.4"]["op_name"].endswith("pair_transition/reduce_sum")


def test_kernels_launched_from_command_buffers(tmp_path):
  """With XLA's command buffers on, every kernel carries the command buffer's name: a fusion's
  kernel is found by its own name ("fusion_1" for %fusion.1); cuBLAS and jevo kernels get their
  kind from the kernel name and are counted as not attributed."""
  events = [
      *[_event(7, s * 2000, 100, "command_buffer_9", name="fusion_1") for s in range(2)],
      *[_event(7, 100 + s * 2000, 300, "command_buffer_9", name="nvjet_sm90_tst_128x128")
        for s in range(2)],
      *[_event(7, 400 + s * 2000, 500, "command_buffer_9",
               name="void jevo::attention_fwd_kernel<T>(jevo::FwdParams)") for s in range(2)],
  ]
  trace_dir = tmp_path / "trace_stack_test" / "plugins" / "profile" / "run"
  trace_dir.mkdir(parents=True)
  with gzip.open(trace_dir / "host.trace.json.gz", "wt") as f:
    json.dump(_trace(events), f)
  hlo = HLO.replace("ROOT %fusion.4", "%command_buffer_9 = () custom-call(), custom_call_target=\"x\"\n  ROOT %fusion.4")
  (tmp_path / "stack_test.hlo.txt").write_text(hlo)
  text = sp.summarize(tmp_path / "trace_stack_test", tmp_path / "stack_test.hlo.txt", steps=2)
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.splitlines() if line.startswith("| ")}
  assert rows["msa_transition"] == ["0.100", "0.000", "0.000", "0.100"]
  assert rows["(not attributed)"] == ["-", "-", "-", "0.800"]
  assert rows["matmul"][0] == "0.300"
  assert rows["jevo attention kernel"][0] == "0.500"
  assert rows["elementwise fusion"][0] == "0.100"
