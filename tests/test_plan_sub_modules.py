"""Inference plans with a chunk size per sub-module (`plan_stack`'s default for inference):
the choice of sizes, each sub-module's cost alone, and a plan that chunks only what does not fit,
compiling only what it needs, checked against XLA's analysis of the whole step and giving the
unchunked forward's result."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jevo.nn import BLOCK_SUB_MODULES, EvoformerStack
from jevo.plan import StackSpec, costs, plan_stack
from jevo.plan import sub_modules as sub

SMALL = dict(c_m=32, c_z=16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
             c_hidden_pair_att=8, c_hidden_opm=16, c_hidden_mul=8)
# The outer product mean's [N_res, N_res, 16 * 16] product dominates at these sizes.
SPEC = StackSpec(8, 48, tuple(sorted(SMALL.items())))


pytestmark = pytest.mark.usefixtures("own_plan_cache")


def test_each_sub_module_takes_the_largest_chunk_that_fits():
  need = {name: {None: 100, 16: 60, 4: 30} for name in BLOCK_SUB_MODULES}
  need["outer_product_mean"] = {None: 500, 16: 200, 4: 80}
  bytes_of = lambda name, chunk: need[name][chunk]  # noqa: E731
  sizes = sub.choose_chunks(bytes_of, (None, 16, 4), room=100)
  assert sizes == dict(dict.fromkeys(BLOCK_SUB_MODULES), outer_product_mean=4)
  assert sub.choose_chunks(bytes_of, (None, 16, 4), room=79) is None


def test_a_chunk_at_or_above_the_chunked_axis_is_not_tried():
  need = {name: {None: 100, 16: 60, 4: 30} for name in BLOCK_SUB_MODULES}
  asked = []

  def bytes_of(name, chunk):
    asked.append((name, chunk))
    return need[name][chunk]

  lengths = dict.fromkeys(BLOCK_SUB_MODULES, 48)
  lengths["msa_row_attention"] = 8  # 16 >= 8: the same as whole, so only 4 is tried
  sizes = sub.choose_chunks(bytes_of, (None, 16, 4), room=70, lengths=lengths)
  assert sizes == dict(dict.fromkeys(BLOCK_SUB_MODULES, 16), msa_row_attention=4)
  assert ("msa_row_attention", 16) not in asked
  assert sub.chunked_axis_length(SPEC, "msa_row_attention") == 8
  assert sub.chunked_axis_length(SPEC, "outer_product_mean") == 48


def test_a_sub_module_alone_needs_less_chunked():
  whole = sub.sub_module_cost(SPEC, "outer_product_mean", None, measure=False)
  chunked = sub.sub_module_cost(SPEC, "outer_product_mean", 4, measure=False)
  assert 0 < chunked["bytes"] < 0.5 * whole["bytes"]
  with pytest.raises(ValueError, match="name must be one of msa_row_attention, "):
    sub.sub_module_cost(SPEC, "outer_product", None, measure=False)


def test_a_plan_per_sub_module_fits_its_check_and_computes_the_forward(monkeypatch):
  """Memory from XLA as always; times set so that chunking costs what it costs on a device
  (XLA's cost analysis counts a chunk loop's body once, so its estimates favour chunks): a
  stack 10 ms a block whole and 20 chunked by one size, a sub-module 1 ms whole and 2
  chunked."""
  unchunked = costs.inference_cost(SPEC, None, measure=False)
  chunked = costs.inference_cost(SPEC, 4, measure=False)
  budget = (unchunked.peak(2) + chunked.peak(2)) // 2  # needs chunking
  real_stack, real_sub = costs.inference_cost, sub.sub_module_cost

  def stack_cost(spec, chunk_size, **kwargs):
    cost = real_stack(spec, chunk_size, **kwargs)
    return dataclasses.replace(cost, ms=10.0 if chunk_size is None else 20.0)

  def sub_module_cost(spec, name, chunk_size, **kwargs):
    return dict(real_sub(spec, name, chunk_size, **kwargs), ms=1.0 if chunk_size is None else 2.0)

  monkeypatch.setattr(costs, "inference_cost", stack_cost)
  monkeypatch.setattr(sub, "sub_module_cost", sub_module_cost)
  one_size = plan_stack(SPEC, 2, budget=budget, training=False, measure=False,
                        per_sub_module=False)
  assert isinstance(one_size.chunk_size, int)
  asked = []
  counted = lambda spec, name, chunk_size, **kw: (  # noqa: E731
      asked.append((name, chunk_size)) or sub_module_cost(spec, name, chunk_size, **kw))
  monkeypatch.setattr(sub, "sub_module_cost", counted)
  plan = plan_stack(SPEC, 2, budget=budget, training=False, measure=False)
  assert isinstance(plan.chunk_size, dict), plan.describe()
  assert plan.chunk_size and set(plan.chunk_size) < set(BLOCK_SUB_MODULES)  # not all chunked
  assert plan.xla_peak <= budget and plan.predicted_ms < one_size.predicted_ms
  assert "per sub-module" in plan.describe()
  # Only what does not fit whole is costed chunked, and the one-size search is not run.
  assert {name for name, chunk in asked if chunk is not None} == set(plan.chunk_size)
  assert plan.checks == 1

  stack = EvoformerStack(2, dtype=jnp.bfloat16, plan=plan, rngs=nnx.Rngs(0), **SMALL)
  stack.eval()
  assert stack.default_chunk_size == plan.chunk_size
  m = jax.random.normal(jax.random.key(0), (8, 48, 32), jnp.bfloat16)
  z = jax.random.normal(jax.random.key(1), (48, 48, 16), jnp.bfloat16)
  graphdef, state = nnx.split(stack)
  run = jax.jit(lambda state, chunk_size: nnx.merge(graphdef, state)(m, z, chunk_size=chunk_size),
                static_argnums=1)
  planned = jax.jit(lambda s: nnx.merge(graphdef, s)(m, z))(state)  # the plan's default
  for a, b in zip(planned, run(state, 1 << 30)):  # 1 << 30: every sub-module whole
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_a_step_that_runs_out_of_device_memory_is_unmeasurable(monkeypatch):
  monkeypatch.setattr(costs, "device_bytes_limit", lambda: None)

  def out_of_memory():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68.00GiB")

  assert costs.measured_ms(None, out_of_memory) == (costs.UNMEASURABLE_MS, costs.OUT_OF_MEMORY)

  def broken():
    raise RuntimeError("INVALID_ARGUMENT: something else")

  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
    costs.measured_ms(None, broken)


def test_a_stack_too_large_to_time_is_planned_from_its_sub_modules_times(monkeypatch):
  """A device that holds each sub-module alone but not the unchunked stack of two blocks (the
  128 x 4096 stack on an H200): the whole stack is not timed, and the plan's time is the sum
  of its sub-modules' as planned, measured."""
  unchunked = costs.inference_cost(SPEC, None, measure=False)
  chunked = costs.inference_cost(SPEC, 4, measure=False)
  budget = (unchunked.peak(2) + chunked.peak(2)) // 2
  stack_bytes = costs.whole_step_bytes(SPEC, costs.DEPTHS[0], (), None, False)["bytes"]
  sub_bytes = max(sum(costs._device_bytes(sub._compiled(SPEC, name, None)))
                  for name in BLOCK_SUB_MODULES)
  assert sub_bytes < stack_bytes
  monkeypatch.setattr(costs, "device_bytes_limit", lambda: stack_bytes - 1)
  whole = costs.inference_cost(SPEC, None, measure=True)
  assert whole.ms == costs.UNMEASURABLE_MS and "too large" in whole.time_source
  made, make = [], sub.make_measurement_inputs
  monkeypatch.setattr(sub, "make_measurement_inputs",
                      lambda spec: made.append(spec) or make(spec))
  plan = plan_stack(SPEC, 2, budget=budget, training=False, measure=True)
  # Every sub-module was timed on one set of inputs, freed once they were.
  assert made == [SPEC] and not sub._inputs
  assert isinstance(plan.chunk_size, dict) and plan.xla_peak <= budget, plan.describe()
  assert np.isfinite(plan.predicted_ms) and plan.predicted_ms > 0
  assert plan.time_source.startswith("measured: the sum"), plan.describe()
  assert "the unchunked block is not timed (too large for the device)" in plan.describe()


def test_an_unchunked_stack_over_the_budget_is_not_timed(monkeypatch, tmp_path):
  """The device could run the unchunked stack, but the budget rules it out: it is compiled for
  its bytes, not timed, not cached as untimed (a larger budget times it), and the plan's time
  is its sub-modules' as planned."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing timed by the tests above
  unchunked = costs.inference_cost(SPEC, None, measure=False)
  chunked = costs.inference_cost(SPEC, 4, measure=False)
  budget = (unchunked.peak(2) + chunked.peak(2)) // 2
  stack_bytes = costs.whole_step_bytes(SPEC, costs.DEPTHS[0], (), None, False)["bytes"]
  assert stack_bytes > budget
  timed, measured_ms = [], costs.measured_ms
  monkeypatch.setattr(costs, "measured_ms",
                      lambda compiled, concrete, *a: timed.append(compiled) or
                      measured_ms(compiled, concrete, *a))
  whole = costs.inference_cost(SPEC, None, measure=True, time_within=budget)
  assert whole.ms == costs.UNMEASURABLE_MS and costs.OVER_BUDGET in whole.time_source
  assert whole.peak(2) == unchunked.peak(2) and not timed
  plan = plan_stack(SPEC, 2, budget=budget, training=False, measure=True)
  assert isinstance(plan.chunk_size, dict) and plan.xla_peak <= budget, plan.describe()
  assert np.isfinite(plan.predicted_ms) and plan.predicted_ms > 0
  assert f"not timed ({costs.OVER_BUDGET})" in plan.describe()
  timed.clear()
  roomy = costs.inference_cost(SPEC, None, measure=True, time_within=2 * stack_bytes)
  assert np.isfinite(roomy.ms) and len(timed) == 1


def test_a_whole_step_the_device_cannot_run_is_planned_again(monkeypatch):
  """XLA's analysis has the unchunked forward within the budget, but the device runs out of
  memory running it in the check: the per-sub-module model takes XLA's figure (there is no
  allocator's peak), finds nothing to chunk, says so, and a single chunk size is checked."""
  from jevo.plan import plan as planning
  monkeypatch.setattr(planning, "_measures_on_device", lambda: True)
  out_of_memory = dict(error="JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory")

  def measured(spec, blocks, runs, chunk_size=None, training=True, *, use_cache=True):
    xla = costs.whole_step_bytes(spec, blocks, runs, chunk_size, training)["bytes"]
    return out_of_memory if chunk_size is None else dict(bytes=xla)

  monkeypatch.setattr(costs, "device_peak", measured)
  budget = 2 * costs.inference_cost(SPEC, None, measure=False).peak(2)
  plan = plan_stack(SPEC, 2, budget=budget, training=False, measure=False, headroom=0)
  assert isinstance(plan.chunk_size, int) and plan.device_peak <= budget, plan.describe()
  text = plan.describe()
  assert "the device ran out of memory running it" in text
  assert "nothing needs chunking, yet the whole step was over the limit" in text
  # Out of memory at every size: no budget fits on this device, and the error says so.
  monkeypatch.setattr(costs, "device_peak", lambda *a, **k: dict(out_of_memory))
  with pytest.raises(planning.PlanError, match="cannot run on this device, whatever the budget"):
    plan_stack(SPEC, 2, budget=budget, training=False, measure=False, headroom=0)
