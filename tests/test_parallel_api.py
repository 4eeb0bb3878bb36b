"""jevo.parallel's public API on this process's devices: meshes, argument errors, one device.

Multi-device results are checked by test_parallel_multidevice.py (4 host devices, run by
test_parallel_launcher.py) and test_parallel_multiprocess.py (two processes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jevo.parallel
import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import EvoformerBlock, EvoformerStack, ExtraMSAStack
from jevo.parallel import (dap_evoformer_block, dap_evoformer_stack, dap_extra_msa_stack,
                           make_dap_mesh)

S = ref.TINY


@pytest.fixture(scope="module")
def stack():
  stack = EvoformerStack(1, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  ref.randomize_params(stack, 1)
  stack.eval()
  return stack


@pytest.fixture(scope="module")
def arrays():
  return tuple(jnp.asarray(x) for x in ref.random_inputs(np.random.default_rng(0), 3, 5,
                                                         S.c_m, S.c_z))


def test_public_names():
  assert set(jevo.parallel.__all__) == {"dap_evoformer_block", "dap_evoformer_stack",
                                        "dap_extra_msa_stack", "make_dap_mesh"}


def test_make_dap_mesh():
  mesh = make_dap_mesh()
  assert mesh.axis_names == ("dap",) and mesh.size == jax.device_count()
  assert make_dap_mesh(1, axis="x").axis_names == ("x",)
  for bad in (0, jax.device_count() + 1, 1.0, True):
    with pytest.raises(ValueError, match=r"num_devices must be an int in \[1, \d+\]"):
      make_dap_mesh(bad)
  with pytest.raises(ValueError, match="axis must be a non-empty str"):
    make_dap_mesh(axis="")


def test_one_device_mesh_matches_the_stack(stack, arrays):
  expected = jax.jit(lambda *a: stack(*a))(*arrays)
  mesh = make_dap_mesh(1)
  actual = jax.jit(lambda *a: dap_evoformer_stack(stack, *a, mesh=mesh))(*arrays)
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
  with jax.set_mesh(mesh):  # the ambient mesh
    ambient = jax.jit(lambda *a: dap_evoformer_stack(stack, *a))(*arrays)
  for a, e in zip(ambient, expected):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["block", "offload"])
def test_one_device_mesh_gradients_match_the_stack_under_remat(arrays, remat):
  """DAP applies the stack's `remat` setting through the same wrapper as the stack itself."""
  stack = EvoformerStack(1, S.c_m, S.c_z, **S.block_kwargs(), remat=remat, rngs=nnx.Rngs(0))
  ref.randomize_params(stack, 1)
  stack.eval()
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  mesh = make_dap_mesh(1)

  def loss(params, dap):
    module = nnx.merge(graphdef, params, rest)
    out = dap_evoformer_stack(module, *arrays, mesh=mesh) if dap else module(*arrays)
    return jnp.sum(out[0] ** 2) + jnp.sum(out[1] ** 2)

  expected = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
  actual = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
  assert scale > 0
  # The DAP program orders float32 sums differently; a remat bug is far larger.
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * scale)


def test_wrong_module_types(stack, arrays):
  mesh = make_dap_mesh(1)
  with pytest.raises(TypeError, match="block must be a jevo.nn EvoformerBlock or "
                                      "ExtraMSABlock, got EvoformerStack"):
    dap_evoformer_block(stack, *arrays, mesh=mesh)
  block = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="stack must be a jevo.nn EvoformerStack or "
                                      "ExtraMSAStack, got EvoformerBlock"):
    dap_evoformer_stack(block, *arrays, mesh=mesh)
  with pytest.raises(TypeError, match="stack must be a jevo.nn ExtraMSAStack, got "
                                      "EvoformerStack"):
    dap_extra_msa_stack(stack, *arrays, mesh=mesh)
  extra = ExtraMSAStack(1, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="block must be a jevo.nn EvoformerBlock or "
                                      "ExtraMSABlock, got ExtraMSAStack"):
    dap_evoformer_block(extra, *arrays, mesh=mesh)


def test_mesh_and_axis_errors(stack, arrays):
  with pytest.raises(ValueError, match=r"mesh is None and no mesh is set: pass mesh="):
    dap_evoformer_stack(stack, *arrays)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or AbstractMesh, got "
                                      "str"):
    dap_evoformer_stack(stack, *arrays, mesh="dap")
  with pytest.raises(ValueError, match=r"axis must name an axis of the mesh, one of "
                                       r"\('dap',\), got 'model'"):
    dap_evoformer_stack(stack, *arrays, mesh=make_dap_mesh(1), axis="model")


def test_input_errors(stack, arrays):
  m, z, msa_mask, pair_mask = arrays
  mesh = make_dap_mesh(1)
  with pytest.raises(ValueError, match=r"z must have shape \[\*B, N_res, N_res, c_z\] = "
                                       r"\(5, 5, 12\) for m of shape \(3, 5, 16\), got "
                                       r"\(4, 4, 12\)"):
    dap_evoformer_stack(stack, m, z[:4, :4], mesh=mesh)
  with pytest.raises(ValueError, match=r"m must have 16 channels"):
    dap_evoformer_stack(stack, m[..., :8], z, mesh=mesh)
  with pytest.raises(ValueError,
                     match=r"msa_mask must be broadcastable to \(3, 5\), got shape \(3, 4\)"):
    dap_evoformer_stack(stack, m, z, msa_mask[:, :4], pair_mask, mesh=mesh)
  with pytest.raises(ValueError,
                     match="chunk_size must be None, a positive int or a mapping .*, got 0"):
    dap_evoformer_stack(stack, m, z, mesh=mesh, chunk_size=0)


def test_eval_mode_and_call_time_keys_leave_the_module_state_alone(arrays):
  stack = EvoformerStack(1, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(stack, nnx.RngCount))
  mesh = make_dap_mesh(1)
  dap_evoformer_stack(stack, *arrays, mesh=mesh, rngs=jax.random.key(0))  # training mode
  stack.eval()
  dap_evoformer_stack(stack, *arrays, mesh=mesh)
  after = jax.tree.map(np.asarray, nnx.state(stack, nnx.RngCount))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
