"""Whether the device has room for the planner's allocator check in another process."""

from jevo.plan import room

GIB = 2 ** 30


def test_a_check_needs_its_limit_and_a_margin_free():
  limit = 40 * GIB
  assert room.why_no_room(limit, limit + room.MARGIN_BYTES) == ""
  assert room.why_no_room(limit, None) == ""  # not known: the check runs and says what it finds
  why = room.why_no_room(limit, 35 * GIB)
  assert "the device had 35.00 GiB free" in why and "40.00 GiB limit" in why


def test_no_gpu_is_found_where_none_is_visible(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
  assert room.device_free_bytes() is None
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
  monkeypatch.setenv("PATH", "")  # no nvidia-smi
  assert room.device_free_bytes() is None
