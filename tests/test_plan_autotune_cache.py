"""The planner's compiles keep XLA's GPU autotuning results on disk (jevo.plan.costs)."""

import types

import jax
import pytest

from jevo.plan import costs


def test_known_compile_options_keeps_only_what_xla_accepts():
  names = costs.AUTOTUNE_CACHE_OPTIONS + ("xla_gpu_no_such_option_for_jevo",)
  known = costs.known_compile_options(names)
  assert "xla_gpu_no_such_option_for_jevo" not in known
  # This jaxlib (>= 0.10) knows the per-fusion cache; a compile naming it must succeed.
  assert "xla_gpu_per_fusion_autotune_cache_dir" in known
  assert set(known) <= set(costs.AUTOTUNE_CACHE_OPTIONS)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks a machine without a GPU")
def test_no_autotune_options_off_the_gpu():
  assert costs.autotune_cache_options() == {}
  assert costs.compiler_options("none") is None


def test_on_a_gpu_every_known_option_names_the_plan_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  known = costs.known_compile_options(costs.AUTOTUNE_CACHE_OPTIONS)  # probed on the real CPU
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(platform="gpu")])
  options = costs.autotune_cache_options()
  directory = tmp_path / "jevo" / "plan" / "autotune"
  assert options == {name: str(directory) for name in known} and options
  assert directory.is_dir()
