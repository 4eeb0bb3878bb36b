"""The planning process's cap on its own allocator pool, which leaves the budget free on the
device for the allocator check's fresh process."""

import os

import pytest

from jevo.plan import PlanError, room
from jevo.plan import plan as planning

GIB = 2 ** 30
H200 = 143771 * 2 ** 20  # what nvidia-smi reports for an H200, in bytes


def test_the_pool_leaves_the_budget_and_a_margin_free():
  fraction = room.pool_fraction(64 * 10 ** 9, H200)
  assert fraction == pytest.approx((H200 - 64 * 10 ** 9 - room.MARGIN_BYTES) / H200)
  assert fraction * H200 + 64 * 10 ** 9 + room.MARGIN_BYTES == pytest.approx(H200)
  # A budget JAX's default share already leaves free changes nothing; one near the whole
  # device still leaves the planner the least share.
  assert room.pool_fraction(16 * 10 ** 9, H200) is None
  assert room.pool_fraction(H200, H200) == room.MIN_FRACTION


def test_the_cap_is_set_once_and_the_check_runs_without_it():
  env = {}
  fraction = room.leave_room_for_check(64 * 10 ** 9, env, total=H200)
  assert env[room.FRACTION] == f"{fraction:.3f}" and 0.5 < fraction < 0.6
  child = room.check_env(env)
  assert room.FRACTION not in child and room.CAPPED not in child
  # A fraction the user chose stays, in this process and the check's.
  mine = {room.FRACTION: "0.5"}
  assert room.leave_room_for_check(64 * 10 ** 9, mine, total=H200) is None
  assert mine == {room.FRACTION: "0.5"} and room.check_env(mine) == mine



def test_nothing_is_capped_without_a_gpu(monkeypatch):
  monkeypatch.setattr(room, "device_total_bytes", lambda: None)
  env = {}
  assert room.leave_room_for_check(64 * 10 ** 9, env) is None and env == {}


def test_no_gpu_is_found_on_a_cpu_platform(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert room.device_total_bytes() is None
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
  assert room.device_total_bytes() is None


def test_the_cli_caps_its_pool_unless_the_check_is_off(monkeypatch):
  from jevo.plan import cli
  monkeypatch.setattr(room, "device_total_bytes", lambda: H200)
  monkeypatch.delenv(room.FRACTION, raising=False)
  monkeypatch.delenv(room.CAPPED, raising=False)
  seen = []

  def fake_plan_stack(spec, blocks, **kwargs):
    seen.append(os.environ.get(room.FRACTION))
    raise PlanError("no plan (a test)", 1)

  monkeypatch.setattr(planning, "plan_stack", fake_plan_stack)
  try:
    assert cli.main(["--preset", "cpu-small", "--budget", "64GB", "--no-device-check"]) == 1
    assert seen.pop() is None
    assert cli.main(["--preset", "cpu-small", "--budget", "64GB"]) == 1
    assert seen.pop() == f"{room.pool_fraction(64 * 10 ** 9, H200):.3f}"
  finally:  # the cap went into this process's environment: take it out again
    os.environ.pop(room.FRACTION, None)
    os.environ.pop(room.CAPPED, None)
