"""The AlphaFold 2 parameter converter on synthetic npz files with AlphaFold's names and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import EvoformerBlock, EvoformerStack, ExtraMSABlock, ExtraMSAStack
from jevo.nn.alphafold_params import (EVOFORMER_PREFIX, EXTRA_MSA_PREFIX, block_entries,
                                      load_alphafold_params)

S = ref.TINY
NUM_BLOCKS = 2


def _npz(tmp_path, *, extra: bool, **overrides):
  """A synthetic params_model_*.npz holding one stack (plus an unrelated AlphaFold array)."""
  arrays = ref.random_stack_npz_dict(np.random.default_rng(), S, NUM_BLOCKS, extra=extra)
  arrays["alphafold/alphafold_iteration/evoformer/preprocess_1d//weights"] = np.zeros((22, 8))
  arrays.update(overrides)
  path = tmp_path / "params_model_1.npz"
  np.savez(path, **arrays)
  return path, arrays


def _stack(cls):
  return cls(NUM_BLOCKS, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls, extra, prefix", [(EvoformerStack, False, EVOFORMER_PREFIX),
                                                (ExtraMSAStack, True, EXTRA_MSA_PREFIX)])
def test_every_array_lands_in_its_parameter(tmp_path, cls, extra, prefix):
  path, arrays = _npz(tmp_path, extra=extra)
  stack = _stack(cls)
  load_alphafold_params(stack, path)
  entries = block_entries(stack.blocks)
  names = {f"{prefix}/{name}" for name, _, _ in entries}
  assert names == {k for k in arrays if k.startswith(prefix + "/")}  # all of them, exactly
  for name, var, _ in entries:
    np.testing.assert_array_equal(np.asarray(var[...]),
                                  arrays[f"{prefix}/{name}"].reshape(var.shape))
  # Every parameter of the stack is covered by exactly one array.
  covered = {id(var) for _, var, _ in entries}
  params = [v for _, v in nnx.iter_graph(stack) if isinstance(v, nnx.Param)]
  assert len(covered) == len(entries) == len(params) and covered == {id(v) for v in params}


def test_loaded_stack_matches_reference_blocks(tmp_path):
  path, arrays = _npz(tmp_path, extra=False)
  stack = _stack(EvoformerStack)
  load_alphafold_params(stack, path)
  stack.eval()
  m, z, mm, pm = ref.random_inputs(np.random.default_rng(), 4, 6, S.c_m, S.c_z)
  out_m, out_z = nnx.jit(lambda s, m, z: s(m, z, mm, pm))(stack, m, z)
  exp_m, exp_z = m.astype(np.float64), z.astype(np.float64)
  for i in range(NUM_BLOCKS):
    exp_m, exp_z = ref.evoformer_block(ref.block_from_npz_dict(arrays, i, extra=False),
                                       exp_m, exp_z, mm, pm)
  # Two stacked blocks with random parameters compound float32 rounding: at 1e-5 about 3% of
  # random draws failed (worst 3e-5), with Flax's LayerNorm as with jevo's. A wrongly loaded
  # block is off by O(1).
  np.testing.assert_allclose(out_m, exp_m, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out_z, exp_z, rtol=1e-4, atol=1e-4)


def test_single_block_takes_the_indexed_block(tmp_path):
  path, arrays = _npz(tmp_path, extra=True)
  block = ExtraMSABlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  load_alphafold_params(block, path, block_index=1)
  key = f"{EXTRA_MSA_PREFIX}/msa_column_global_attention/attention//key_w"
  np.testing.assert_array_equal(block.msa_column_attention.key.kernel[...], arrays[key][1])
  with pytest.raises(ValueError, match="block_index"):
    load_alphafold_params(block, path)
  with pytest.raises(ValueError, match=r"expected shape \(N > 2"):
    load_alphafold_params(block, path, block_index=2)


def _snapshot(module):
  return jax.tree.map(np.array, nnx.state(module, nnx.Param))


def _unchanged(before, module):
  after = _snapshot(module)
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_missing_array_is_refused_by_name(tmp_path):
  _, arrays = _npz(tmp_path, extra=False)
  gone = f"{EVOFORMER_PREFIX}/triangle_attention_ending_node/attention//gating_b"
  del arrays[gone]
  stack = _stack(EvoformerStack)
  before = _snapshot(stack)
  with pytest.raises(ValueError, match=r"1 array\(s\) missing") as err:
    load_alphafold_params(stack, arrays)
  assert gone in str(err.value) and "(2, 3, 4)" in str(err.value)  # name, expected shape
  assert _unchanged(before, stack)  # nothing half-loaded


def test_misshaped_arrays_are_refused_with_expected_and_actual(tmp_path):
  _, arrays = _npz(tmp_path, extra=False)
  name = f"{EVOFORMER_PREFIX}/msa_row_attention_with_pair_bias/attention//query_w"
  arrays[name] = arrays[name].reshape(NUM_BLOCKS, S.c_m, S.dim_msa, S.heads_msa)  # H, D swapped
  stack = _stack(EvoformerStack)
  before = _snapshot(stack)
  with pytest.raises(ValueError, match="mis-shaped") as err:
    load_alphafold_params(stack, arrays)
  assert name in str(err.value) and "expected shape (2, 16, 2, 8)" in str(err.value)
  assert "got (2, 16, 8, 2)" in str(err.value)
  assert _unchanged(before, stack)
  # A file with another number of blocks than the stack's.
  one_block = {k: v[:1] for k, v in arrays.items() if k.startswith(EVOFORMER_PREFIX)}
  with pytest.raises(ValueError, match=r"expected shape \(2, .*got \(1, "):
    load_alphafold_params(stack, one_block)


def test_unrecognised_or_absent_layouts_are_refused(tmp_path):
  # An array jevo does not know under the prefix (e.g. a fused multimer triangle update).
  extra_name = f"{EVOFORMER_PREFIX}/triangle_multiplication_outgoing/projection//weights"
  _, arrays = _npz(tmp_path, extra=False, **{extra_name: np.zeros((NUM_BLOCKS, 12, 12))})
  with pytest.raises(ValueError, match="not recognised") as err:
    load_alphafold_params(_stack(EvoformerStack), arrays)
  assert extra_name in str(err.value)
  # The extra-MSA stack's arrays are not in an Evoformer-only file.
  with pytest.raises(ValueError, match="no arrays under the prefix"):
    load_alphafold_params(_stack(ExtraMSAStack), arrays)
  with pytest.raises(TypeError, match="target"):
    load_alphafold_params(jnp.zeros(3), arrays)
  with pytest.raises(ValueError, match="block_index"):
    load_alphafold_params(EvoformerBlock(S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0)),
                          arrays, block_index=-1)
