"""EvoformerBlock / ExtraMSABlock against the independent NumPy reference, and their dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import EvoformerBlock, ExtraMSABlock
from jevo.nn.alphafold_params import load_alphafold_params

S = ref.TINY
N_SEQ, N_RES = 5, 9


@pytest.mark.parametrize("extra", [False, True], ids=["evoformer", "extra_msa"])
def test_block_matches_reference(extra):
  rng = np.random.default_rng()
  arrays = ref.random_stack_npz_dict(rng, S, 2, extra=extra)
  block = (ExtraMSABlock if extra else EvoformerBlock)(S.c_m, S.c_z, **S.block_kwargs(),
                                                        rngs=nnx.Rngs(0))
  load_alphafold_params(block, arrays, block_index=1)
  block.eval()
  m, z, mm, pm = ref.random_inputs(rng, N_SEQ, N_RES, S.c_m, S.c_z)
  out_m, out_z = jax.jit(lambda *a: block(*a))(m, z, mm, pm)
  exp_m, exp_z = ref.evoformer_block(ref.block_from_npz_dict(arrays, 1, extra=extra),
                                     m.astype(np.float64), z.astype(np.float64), mm, pm,
                                     extra=extra)
  # Elementwise: |jevo - reference| <= 1e-5 * (1 + |reference|).
  np.testing.assert_allclose(out_m, exp_m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_z, exp_z, rtol=1e-5, atol=1e-5)
  assert np.abs(exp_m - m).max() > 0.1 and np.abs(exp_z - z).max() > 0.1  # the block acted


def _block_with_one_active_module(name: str, seed: int) -> EvoformerBlock:
  """A fresh block (zero output projections: every update 0) with one module randomised."""
  block = EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), msa_dropout=0.4, pair_dropout=0.3,
                         rngs=nnx.Rngs(seed))
  ref.randomize_params(getattr(block, name), seed)
  return block


@pytest.mark.parametrize("name, rate, shared_axis", [
    ("msa_row_attention", 0.4, -3),                 # one mask for all sequences
    ("triangle_multiplication_incoming", 0.3, -3),  # one mask for all rows of the pair
    ("triangle_attention_ending_node", 0.3, -2),    # one mask for all columns of the pair
])
def test_dropout_is_shared_along_rows_or_columns(name, rate, shared_axis):
  block = _block_with_one_active_module(name, seed=11)
  m, z, mm, pm = (jnp.asarray(x) for x in ref.random_inputs(
      np.random.default_rng(5), N_SEQ, N_RES, S.c_m, S.c_z))
  residual = 0 if name == "msa_row_attention" else 1

  def update(key):
    return block(m, z, mm, pm, rngs=key)[residual] - (m, z)[residual]

  block.eval()
  clean = np.asarray(jax.jit(update)(None))
  block.train()
  update = jax.jit(update)  # traced in train mode
  dropped = np.asarray(update(jax.random.key(0)))
  live = np.abs(clean) > 1e-3
  assert live.mean() > 0.5
  ratio = np.where(live, dropped / np.where(live, clean, 1.0), np.nan)
  keep = 1.0 - rate
  # The update is read back as (x + u) - x in float32: with |x| up to ~4 and |u| down to 1e-3,
  # that rounding alone moves the ratio by a few 1e-4.
  kept = np.isclose(ratio, 1.0 / keep, rtol=2e-3)
  assert np.all(kept | np.isclose(ratio, 0.0, atol=1e-5) | ~live)
  assert 0.3 < kept[live].mean() < 0.95  # some dropped, most kept, roughly 1 - rate
  # The same mask along the shared axis: wherever two entries on it are live, kept agrees.
  kept_f = np.where(live, kept.astype(float), np.nan)
  spread = np.nanmax(kept_f, axis=shared_axis) - np.nanmin(kept_f, axis=shared_axis)
  assert np.nanmax(spread) == 0.0
  # A different key draws a different mask; the same key the same one.
  np.testing.assert_array_equal(np.asarray(update(jax.random.key(0))), dropped)
  assert not np.array_equal(np.asarray(update(jax.random.key(1))), dropped)


def test_dropout_draws_from_construction_rngs_and_eval_turns_it_off():
  block = _block_with_one_active_module("msa_row_attention", seed=5)
  m, z, mm, pm = ref.random_inputs(np.random.default_rng(), N_SEQ, N_RES, S.c_m, S.c_z)
  forward = nnx.jit(lambda b, m, z: b(m, z, mm, pm)[0])
  first, second = forward(block, m, z), forward(block, m, z)
  assert not np.array_equal(first, second)  # the stored stream advanced between the calls
  block.eval()
  np.testing.assert_array_equal(forward(block, m, z), forward(block, m, z))
  assert not np.array_equal(forward(block, m, z), first)


# Head dims the CUDA kernels take (multiples of 8), other sizes still small and distinct.
CUDA_SIZES = ref.Sizes(c_m=32, c_z=24, heads_msa=2, dim_msa=16, heads_pair=3, dim_pair=8,
                       c_opm=5, c_mul=12, n_transition=2)


@pytest.mark.gpu
def test_block_in_bfloat16_with_cuda_is_as_close_to_reference_as_xla():
  """In bf16 the block with the cuda backend is as close to the float64 reference as with the
  xla backend (masks with padding)."""
  rng = np.random.default_rng(7)
  s = CUDA_SIZES
  arrays = ref.random_stack_npz_dict(rng, s, 1, extra=False)
  m, z, mm, pm = ref.random_inputs(rng, 40, 37, s.c_m, s.c_z)
  exp_m, exp_z = ref.evoformer_block(ref.block_from_npz_dict(arrays, 0, extra=False),
                                     m.astype(np.float64),
                                     z.astype(np.float64), mm, pm)

  def error(implementation):
    block = EvoformerBlock(s.c_m, s.c_z, **s.block_kwargs(), implementation=implementation,
                           dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    load_alphafold_params(block, arrays, block_index=0)
    block.eval()
    out_m, out_z = jax.jit(lambda *a: block(*a))(m, z, mm, pm)
    return [float(np.max(np.abs(np.asarray(o, np.float64) - e)) / np.max(np.abs(e)))
            for o, e in ((out_m, exp_m), (out_z, exp_z))]

  cuda, xla = error("cuda"), error("xla")
  for name, c, x in zip(("m", "z"), cuda, xla):
    assert c <= 1.5 * x + 1e-3, (name, c, x)
    assert c < 0.05, (name, c)  # bf16 rounding, not a wrong result
