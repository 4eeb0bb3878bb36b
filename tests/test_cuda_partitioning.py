"""The CUDA backend's sharding rules (`jevo.ops.partitioning`): the rule pieces, the 4-device
tests in a subprocess, and on 2 or more GPUs a data-parallel training step.

The host device count is fixed when JAX starts, so test_cuda_partitioning_multidevice.py runs in
its own pytest process with 4 CPU devices, whose result (and output, on failure) is reported
here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jevo
from jevo.ops import cuda_backend, partitioning
from four_cpu_devices import run_pytest
from partitioning_hlo import gathers_of, input_shapes, kernel_calls


def test_multidevice_partitioning_tests_pass_on_four_cpu_devices():
  proc, output = run_pytest("test_cuda_partitioning_multidevice.py")
  assert proc.returncode == 0, output
  summary = proc.stdout.strip().splitlines()[-1]
  passed = re.search(r"(\d+) passed", summary)
  assert passed and int(passed[1]) >= 35 and "skipped" not in summary, output


# ------------------------------------------------------------------------ the rule pieces


def _layouts(operands, results, like=None):
  return partitioning.Layouts(tuple(operands), tuple(results),
                              tuple(like or (None,) * len(results)))


def test_shardy_rule_keeps_batch_n_and_heads_and_replicates_the_rest():
  fwd = _layouts(cuda_backend._FORWARD_OPERANDS, ("bnihd", "bnhi"))
  rule, kwargs = partitioning.sharding_rule(fwd)
  assert rule == "b n i h d, b n j h d, b n j h d, b n j, b h i j -> b n i h d, b n h i"
  assert kwargs == {"need_replication_factors": ("i", "d", "j")}  # first appearance first
  # Absent mask and bias: (0,) placeholders, each a replicated factor of its own.
  absent = fwd._replace(operands=fwd.operands[:3] + ("z", "z"))
  rule, kwargs = partitioning.sharding_rule(absent)
  assert rule.startswith("b n i h d, b n j h d, b n j h d, z0, z1 ->")
  assert kwargs["need_replication_factors"] == ("i", "d", "j", "z0", "z1")


def test_factor_axes_keep_dividing_axes_of_b_n_h_only():
  mesh = {"x": 2, "y": 2, "z": 3}
  shape = (4, 6, 8, 2, 16)
  axes = partitioning.factor_axes(mesh, P("x", "z", "y"), shape, "bnihd")
  assert axes == {"b": ("x",), "n": ("z",)}  # S's axis is dropped: S is gathered
  assert partitioning.factor_axes(mesh, P(("x", "y"), None, None, None, "z"), shape,
                                  "bnihd") == {"b": ("x", "y")}  # D's axis is dropped
  assert partitioning.factor_axes(mesh, P(None, None, None, "y"), shape, "bnihd") == {
      "h": ("y",)}
  # H = 2 over z (3 devices) and B = 4 over x and z (6 devices) do not divide: left whole
  # rather than padded.
  assert partitioning.factor_axes(mesh, P(None, None, None, "z"), shape, "bnihd") == {}
  assert partitioning.factor_axes(mesh, P(("x", "z")), shape, "bnihd") == {}


def test_specs_and_the_sum_over_n():
  bwd = _layouts(cuda_backend._BACKWARD_OPERANDS, cuda_backend._BACKWARD_RESULTS)
  axes = {"b": ("x",), "n": ("y",), "h": ("z", "w")}
  assert partitioning.spec_for("bnihd", axes) == P("x", "y", None, ("z", "w"), None)
  assert partitioning.spec_for("bhij", axes) == P("x", ("z", "w"), None, None)
  assert partitioning.spec_for("z", axes) == P(None)
  assert [partitioning.summed_axes(x, bwd, axes) for x in bwd.results] == [(), (), (), ("y",)]
  assert partitioning.summed_axes("z", bwd, axes) == ()  # no bias, no bias gradient


def test_one_device_lowers_the_plain_kernel_calls():
  # Single-device programs (and jax.export, tests/test_export.py) see the FFI calls themselves.
  q = jnp.ones((1, 2, 16, 2, 16), jnp.bfloat16)
  mask, bias = jnp.ones((1, 2, 16), bool), jnp.ones((1, 2, 16, 16), jnp.bfloat16)
  f = jax.jit(jax.grad(lambda q, bias: jnp.sum(cuda_backend.attention(
      q, q, q, mask, bias, scale=0.25, deterministic=False).astype(jnp.float32)), argnums=(0, 1)))
  text = f.trace(q, bias).lower(lowering_platforms=("cuda",)).as_text()
  assert cuda_backend.FORWARD_TARGET in text and cuda_backend.BACKWARD_TARGET in text
  assert "CustomSPMDPartitioning" not in text
  # In a process with one device the partitioned primitive is not even traced: the program is
  # the one it was before partitioning existed.
  if jax.device_count() == 1:
    jaxpr = str(jax.make_jaxpr(f)(q, bias))
    assert partitioning._sharded_kernel_p.name not in jaxpr


# --------------------------------------------------------------- on two or more GPUs


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


def _model_inputs(batch, n=8, s=64, c=32, heads=4, head_dim=32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  normal = lambda key, shape, scale=1.0: scale * jax.random.normal(key, shape, jnp.float32)
  params = {"wq": normal(keys[0], (c, heads * head_dim), c ** -0.5),
            "wk": normal(keys[1], (c, heads * head_dim), c ** -0.5),
            "wv": normal(keys[2], (c, heads * head_dim), c ** -0.5),
            "wb": normal(keys[3], (c, heads), c ** -0.5),
            "wo": normal(keys[4], (heads * head_dim, c), (heads * head_dim) ** -0.5)}
  m = normal(keys[5], (batch, n, s, c)).astype(jnp.bfloat16)   # MSA-like rows
  z = normal(keys[6], (batch, s, s, c)).astype(jnp.bfloat16)   # pair representation
  mask = jax.random.uniform(keys[7], (batch, n, s)) > 0.1
  return params, m, z, mask, (batch, n, s, heads, head_dim)


def _row_attention_loss(params, m, z, mask, shape):
  """MSA row attention with pair bias, as a model would call the op, and a loss."""
  b, n, s, h, d = shape
  dt = jnp.bfloat16
  proj = lambda w: (m @ params[w].astype(dt)).reshape(b, n, s, h, d)
  bias = jnp.einsum("bijc,ch->bhij", z, params["wb"].astype(dt))[:, None]
  out = jevo.evoformer_attention(proj("wq"), proj("wk"), proj("wv"),
                                 mask=mask[:, :, None, None, :], bias=bias,
                                 implementation="cuda")
  y = out.reshape(b, n, s, h * d) @ params["wo"].astype(dt)
  return jnp.mean(jnp.square(y.astype(jnp.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["Auto", "Explicit"])
def test_data_parallel_training_step_gathers_no_attention_inputs(kind):
  gpus = _gpus()
  if len(gpus) < 2:
    pytest.skip(f"needs 2 or more GPUs, found {len(gpus)}")
  if kind == "Auto":
    mesh = Mesh(np.array(gpus), ("data",))
  else:
    mesh = jax.make_mesh((len(gpus),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=gpus)
  params, m, z, mask, shape = _model_inputs(batch=2 * len(gpus))
  step = jax.jit(jax.value_and_grad(lambda p, m, z, mask: _row_attention_loss(p, m, z, mask,
                                                                              shape)))
  want_loss, want_grads = step(params, m, z, mask)  # one GPU

  data = NamedSharding(mesh, P("data"))
  args = (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(m, data),
          jax.device_put(z, data), jax.device_put(mask, data))
  compiled = step.lower(*args).compile()
  hlo = compiled.as_text()
  gathered = gathers_of(hlo, input_shapes(shape))
  assert not gathered, f"attention inputs gathered: {gathered}"
  block = (shape[0] // len(gpus),) + shape[1:]
  calls = kernel_calls(hlo)
  assert calls.get(cuda_backend.FORWARD_TARGET) and calls.get(cuda_backend.BACKWARD_TARGET), calls
  for target, shapes in calls.items():
    assert all(s == block for s in shapes), (target, shapes, block)

  loss, grads = compiled(*args)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-3)
  for name in params:
    got, want = np.asarray(grads[name], np.float32), np.asarray(want_grads[name], np.float32)
    assert np.abs(want).max() > 0, name
    # The same kernels on each device's rows; only the order of the sums over B differs.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max(),
                               err_msg=name)


def test_hlo_readers():
  hlo = ("%all-gather.1 = f32[4,4,8,2,8]{4,3,2,1,0} all-gather(%x), dimensions={0}\n"
         "%ag = bf16[2,2,8,8]{3,2,1,0} all-gather(%y), dimensions={0}\n"
         "%ar = f32[4,4,8,2,8]{4,3,2,1,0} all-reduce(%z), to_apply=%sum\n"
         '%c = (bf16[1,4,16,2,16]{4,3,2,1,0}, f32[1,4,2,16]{3,2,1,0}) custom-call(%a), '
         'custom_call_target="jevo_attention_fwd"\n')
  # The gather of q and the one of a block of the bias; the all-reduce is no gather.
  assert len(gathers_of(hlo, input_shapes((4, 4, 8, 2, 8)))) == 2
  assert not gathers_of(hlo, input_shapes((4, 4, 6, 2, 6)))
  assert kernel_calls(hlo) == {"jevo_attention_fwd": [(1, 4, 16, 2, 16)]}
