"""`jax.export` of jevo's op and modules: serialised, deserialised, called, differentiated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import jevo
from jevo.ops import cuda_backend

SHAPE = (1, 3, 17, 2, 8)  # [B, N, S, H, D]: S odd, so the chunked backend pads a chunk


def _inputs(n=3, s=17, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (1, n, s, 2, 8)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  mask = jax.random.uniform(keys[3], (1, n, 1, 1, s)) > 0.2
  mask = mask.at[0, 0, 0, 0, :].set(False)  # one fully masked row
  bias = 3.0 * jax.random.normal(keys[4], (1, 1, 2, s, s), dtype)
  return q, k, v, mask, bias


def _attention(implementation):
  return jax.jit(lambda q, k, v, mask, bias: jevo.evoformer_attention(
      q, k, v, mask=mask, bias=bias, implementation=implementation))


def _spec(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _loss_grads(fn, q, k, v, mask, bias):
  return jax.grad(lambda q, k, v, bias: jnp.sum(fn(q, k, v, mask, bias) * v), argnums=(0, 1, 2, 3))(
      q, k, v, bias)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_op_round_trips_through_serialisation_with_its_gradient(implementation):
  f = _attention(implementation)
  args = _inputs()
  restored = export.deserialize(export.export(f)(*args).serialize(vjp_order=1))
  np.testing.assert_allclose(restored.call(*args), f(*args), rtol=0, atol=1e-6)
  for got, want in zip(_loss_grads(restored.call, *args), _loss_grads(f, *args)):
    assert np.abs(np.asarray(want)).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_symbolic_batch_dims_serve_every_size():
  b, n = export.symbolic_shape("b, n")
  s, h, d = SHAPE[2:]
  exported = export.export(_attention(None))(
      _spec((b, n, s, h, d)), _spec((b, n, s, h, d)), _spec((b, n, s, h, d)),
      _spec((b, n, 1, 1, s), jnp.bool_), _spec((b, 1, h, s, s)))
  restored = export.deserialize(exported.serialize())
  for rows in (3, 5):
    args = _inputs(n=rows, seed=rows)
    np.testing.assert_allclose(restored.call(*args), _attention(None)(*args), rtol=0, atol=1e-6)


def test_symbolic_attended_axis_needs_the_xla_backend():
  (s,) = export.symbolic_shape("s")
  specs = (_spec((1, 3, s, 2, 8)),) * 3 + (_spec((1, 3, 1, 1, s), jnp.bool_), _spec((1, 1, 2, s, s)))
  with pytest.raises(ValueError, match="S must be a concrete size"):
    export.export(_attention("xla_chunked"))(*specs)
  restored = export.export(_attention("xla"))(*specs)
  args = _inputs(s=11)
  np.testing.assert_allclose(restored.call(*args), _attention("xla")(*args), rtol=0, atol=1e-6)


def test_evoformer_block_round_trips_with_parameters_as_plain_arrays():
  # nnx.State holds flax types that jax.export cannot serialise; its pure-dict form can.
  block = jevo.nn.EvoformerBlock(16, 8, num_heads_msa=2, c_hidden_msa_att=4, num_heads_pair=2,
                                 c_hidden_pair_att=4, c_hidden_opm=4, c_hidden_mul=8,
                                 transition_n=2, rngs=nnx.Rngs(0))
  block.eval()
  graphdef, param_state, rest = nnx.split(block, nnx.Param, ...)
  params = nnx.to_pure_dict(param_state)
  # Zero-initialised output projections would make the block the identity: perturb them.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)

  def forward(params, m, z, msa_mask, pair_mask):
    nnx.replace_by_pure_dict(param_state, params)
    block = nnx.merge(graphdef, param_state, rest)
    return block(m, z, msa_mask=msa_mask, pair_mask=pair_mask)

  keys = jax.random.split(jax.random.key(2), 4)
  args = (params, jax.random.normal(keys[0], (5, 7, 16)), jax.random.normal(keys[1], (7, 7, 8)),
          jax.random.uniform(keys[2], (5, 7)) > 0.2, jax.random.uniform(keys[3], (7, 7)) > 0.2)
  f = jax.jit(forward)
  restored = export.deserialize(export.export(f)(*args).serialize())
  got, want = restored.call(*args), f(*args)
  assert np.abs(np.asarray(want[1]) - np.asarray(args[2])).max() > 0.1  # the block acted
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_kernels_export_for_cuda_only_with_their_custom_calls_accepted():
  # Lowered for CUDA without running it (works on any machine): the kernels' custom calls are
  # refused by default and accepted with jevo.export_disabled_checks(), forward and backward.
  q = jnp.ones((1, 2, 16, 2, 16), jnp.bfloat16)
  mask, bias = jnp.ones((1, 2, 16), bool), jnp.ones((1, 2, 16, 16), jnp.bfloat16)
  f = jax.jit(lambda q, k, v, bias: cuda_backend.attention(q, k, v, mask, bias, scale=0.25,
                                                           deterministic=False))
  with pytest.raises(ValueError, match="custom calls"):
    export.export(f, platforms=["cuda"])(q, q, q, bias)
  exported = export.export(f, platforms=["cuda"], disabled_checks=jevo.export_disabled_checks())(
      q, q, q, bias)
  restored = export.deserialize(exported.serialize(vjp_order=1))
  assert restored.platforms == ("cuda",)
  assert cuda_backend.FORWARD_TARGET in restored.mlir_module()
  assert cuda_backend.BACKWARD_TARGET in restored.vjp().mlir_module()


def test_pallas_transition_exports_for_cuda_with_its_custom_call_accepted():
  # The fused transition's kernels lower to XLA's Triton custom call (lowered for CUDA without
  # running, on any machine with Pallas's Triton backend): refused by default, accepted with
  # jevo.export_disabled_checks().
  tp = pytest.importorskip("jevo.ops.transition_pallas")
  from jevo.bench.implementations import transition_inputs
  x, params, _ = transition_inputs((64,), 32, 4, jnp.bfloat16, 0)
  f = jax.jit(lambda x, *p: tp.transition(x, *p, eps=1e-5))
  with pytest.raises(ValueError, match="custom calls"):
    export.export(f, platforms=["cuda"])(x, *params)
  exported = export.export(f, platforms=["cuda"], disabled_checks=jevo.export_disabled_checks())(
      x, *params)
  assert "xla.gpu.triton" in export.deserialize(exported.serialize()).mlir_module()


@pytest.mark.gpu
def test_cuda_backend_round_trips_on_the_gpu():
  f = _attention("cuda")
  args = _inputs(dtype=jnp.bfloat16)
  exported = export.export(f, disabled_checks=jevo.export_disabled_checks())(*args)
  restored = export.deserialize(exported.serialize(vjp_order=1))
  np.testing.assert_array_equal(np.asarray(restored.call(*args), np.float32),
                                np.asarray(f(*args), np.float32))
  for got, want in zip(_loss_grads(restored.call, *args), _loss_grads(f, *args)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
