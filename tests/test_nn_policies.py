"""jevo.nn.policies: each named policy, as a stack's remat, keeps what its name says (and no
more), and gives the gradients of remat="none"."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import jevo
import nn_reference as ref
from jevo.nn import EvoformerStack, policies

S = ref.TINY
N_SEQ, N_RES = 4, 6


def _loss_and_params(remat):
  stack = EvoformerStack(2, S.c_m, S.c_z, **S.block_kwargs(), remat=remat, rngs=nnx.Rngs(1))
  ref.randomize_params(stack, 1)
  m, z, mm, pm = (jnp.asarray(x) for x in ref.random_inputs(np.random.default_rng(2), N_SEQ,
                                                            N_RES, S.c_m, S.c_z))
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

  def loss(params):
    out_m, out_z = nnx.merge(graphdef, params, rest)(m, z, mm, pm, rngs=jax.random.key(0))
    return jnp.sum(out_m ** 2) + jnp.sum(out_z ** 2)

  return loss, params


def _saved(policy):
  """What one block keeps for its backward pass under `policy`: a line per value, as
  `print_saved_residuals` describes it."""
  block = jevo.nn.EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  block.eval()
  m, z, mm, pm = (jnp.asarray(x) for x in ref.random_inputs(np.random.default_rng(0), N_SEQ,
                                                            N_RES, S.c_m, S.c_z))
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)

  def f(params, m, z):
    m = jax.ad_checkpoint.checkpoint_name(m, policies.BLOCK_INPUT_NAMES[0])
    z = jax.ad_checkpoint.checkpoint_name(z, policies.BLOCK_INPUT_NAMES[1])
    out_m, out_z = nnx.merge(graphdef, params, rest)(m * 2, z * 2, mm, pm)
    return jnp.sum(out_m) + jnp.sum(out_z)

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(jax.checkpoint(f, policy=policy), params, m, z)
  # The block's own arguments (parameters, inputs) and constants are kept whatever the policy.
  return [line for line in printed.getvalue().splitlines()
          if "from the argument" not in line and "from a constant" not in line]


def _saved_names(policy):
  """The checkpoint names of the values one block keeps under `policy`."""
  return [line.split("named '")[1].split("'")[0] for line in _saved(policy) if "named '" in line]


def test_names_are_the_ones_the_modules_use():
  assert jevo.nn.LINEAR_OUTPUT_NAME == policies.LINEAR_OUTPUT_NAME
  assert jevo.nn.stack.BLOCK_INPUT_NAMES == policies.BLOCK_INPUT_NAMES


def test_save_linear_outputs_keeps_every_linear_output_and_nothing_else_by_name():
  names = _saved_names(policies.save_linear_outputs)
  # One per projection group of the block: attention q/k/v/gate and outputs, transitions, ...
  assert len(names) > 10 and set(names) == {policies.LINEAR_OUTPUT_NAME}


def test_save_block_inputs_keeps_only_the_block_inputs():
  assert sorted(_saved_names(policies.save_block_inputs)) == sorted(policies.BLOCK_INPUT_NAMES)


def test_save_all_products_keeps_the_linear_outputs_and_the_other_products():
  names = _saved_names(policies.save_all_products)
  assert sorted(names) == sorted(_saved_names(policies.save_linear_outputs))
  # The other products (the outer product mean's and the triangle updates' einsums) are
  # unnamed dot_generals: kept too.
  unnamed = [line for line in _saved(policies.save_all_products) if "named '" not in line]
  assert unnamed and not [line for line in _saved(policies.save_linear_outputs)
                          if "named '" not in line]


def test_offload_block_inputs_keeps_only_the_block_inputs_in_host_memory():
  saved = _saved(policies.offload_block_inputs)
  shapes = sorted(line.split()[0] for line in saved)
  assert shapes == [f"f32<host>[{N_SEQ},{N_RES},{S.c_m}]",
                    f"f32<host>[{N_RES},{N_RES},{S.c_z}]"], saved


@pytest.mark.parametrize("name", ["save_block_inputs", "save_linear_outputs",
                                  "save_all_products"])
def test_policy_gives_the_gradients_of_no_remat(name):
  loss, params = _loss_and_params("none")
  want_loss, want = jax.jit(jax.value_and_grad(loss))(params)
  loss, params = _loss_and_params(getattr(policies, name))
  got_loss, got = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
