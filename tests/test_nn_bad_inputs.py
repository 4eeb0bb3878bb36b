"""Modules, blocks and stacks given inputs a new user gets wrong, or edge sizes: each works or
raises an error naming the argument."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nn_reference as ref
from jevo.nn import EvoformerBlock, EvoformerStack, ExtraMSAStack, Transition, TriangleAttention
from jevo.ops import backends

S = ref.TINY
N_SEQ, N_RES = 4, 6
EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _stack(cls=EvoformerStack, **kwargs):
  stack = cls(2, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0), **kwargs)
  ref.randomize_params(stack, 0)
  stack.eval()
  return stack


def _inputs(n_seq=N_SEQ, n_res=N_RES):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((n_seq, n_res, S.c_m)), jnp.float32),
          jnp.asarray(rng.standard_normal((n_res, n_res, S.c_z)), jnp.float32))


@pytest.mark.parametrize("which", ["m", "z"])
def test_stack_refuses_integer_activations(which):
  """Integer m or z would stay integer, and every block's update would be truncated away."""
  m, z = _inputs()
  m, z = (m.astype(jnp.int32), z) if which == "m" else (m, z.astype(jnp.int32))
  with pytest.raises(TypeError, match=rf"{which} must be a floating-point array .*got dtype "
                                      r"int32; cast it first"):
    _stack()(m, z)


def test_block_and_modules_refuse_integer_activations():
  m, z = _inputs()
  block = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"m must be a floating-point array"):
    block(m.astype(jnp.int8), z)
  with pytest.raises(TypeError, match=r"x must be a floating-point array .*got dtype int32"):
    Transition(S.c_z, rngs=nnx.Rngs(0))(z.astype(jnp.int32))
  with pytest.raises(TypeError, match=r"z must be a floating-point array .*got dtype bool"):
    TriangleAttention(S.c_z, num_heads=2, head_dim=4, rngs=nnx.Rngs(0))(z > 0)


@pytest.mark.parametrize("cls", [EvoformerStack, ExtraMSAStack])
@pytest.mark.parametrize("n_seq, n_res", [(0, N_RES), (N_SEQ, 0)], ids=["no_seqs", "no_res"])
def test_stacks_run_with_no_sequences_or_no_residues(cls, n_seq, n_res):
  stack = _stack(cls)
  m, z = _inputs(n_seq, n_res)
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

  def loss(params, m, z):
    out_m, out_z = nnx.merge(graphdef, params, rest)(m, z)
    return jnp.sum(out_m) + jnp.sum(out_z ** 2), (out_m, out_z)

  (_, (out_m, out_z)), grads = jax.value_and_grad(loss, has_aux=True)(params, m, z)
  assert out_m.shape == m.shape and out_z.shape == z.shape
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  if n_seq == 0 and n_res > 0:
    # No MSA: the outer product mean adds nothing, the pair track still runs.
    assert bool(jnp.all(jnp.isfinite(out_z))) and not np.allclose(out_z, z)


def test_stacks_take_broadcastable_masks_like_the_modules():
  stack = _stack()
  m, z = _inputs()
  residues = jnp.arange(N_RES) < N_RES - 1
  full = stack(m, z, jnp.broadcast_to(residues, (N_SEQ, N_RES)),
               residues[:, None] & residues[None, :])
  broadcast = stack(m, z, residues, residues[None, :] & residues[:, None])
  for a, b in zip(full, broadcast):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"msa_mask must be broadcastable to \(4, 6\), got shape "
                                       r"\(5,\)"):
    stack(m, z, jnp.ones(5, bool))


@pytest.mark.parametrize("example", ["train_step.py", "inference.py"])
def test_examples_offer_the_op_s_implementation_names(example, capsys):
  """The examples' --implementation takes what the op takes; omitting it picks the backend."""
  spec = importlib.util.spec_from_file_location(example[:-3] + "_example", EXAMPLES / example)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(SystemExit):
    module.main(["--implementation", "auto"])
  assert "invalid choice: 'auto'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    module.main(["--help"])
  assert "{" + ",".join(backends.NAMES) + "}" in capsys.readouterr().out
