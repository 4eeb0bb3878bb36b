"""The inference forward's cost from one compiled depth, and the allocator check's inputs."""

import jax
import numpy as np
import pytest

from jevo.plan import StackSpec, costs

SMALL = dict(c_m=32, c_z=16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
             c_hidden_pair_att=8, c_hidden_opm=16, c_hidden_mul=8)
SPEC = StackSpec(8, 40, tuple(sorted(SMALL.items())))

pytestmark = pytest.mark.usefixtures("own_plan_cache")


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_one_depth_predicts_a_deeper_stack_without_compiling_another(chunk_size):
  cost = costs.inference_cost(SPEC, chunk_size, measure=False)
  # Only the 2-block stack was compiled for the cost.
  assert costs.whole_step_cached(SPEC, costs.DEPTHS[0], (), chunk_size, False)
  assert not costs.whole_step_cached(SPEC, costs.DEPTHS[0] + 1, (), chunk_size, False)
  assert cost.kept == 0 and cost.io_per_block > 0
  for blocks in (3, 5):
    xla = costs.whole_step_bytes(SPEC, blocks, (), chunk_size, False)["bytes"]
    # Never below XLA's figure, and above it by at most a few bytes a block (scalars of the
    # block's state that XLA does not pass as buffers).
    assert xla <= cost.peak(blocks) <= xla + 64 * blocks


def test_the_checks_inputs_have_the_steps_shapes_and_are_not_zeros():
  for training in (False, True):
    _, args, concrete = costs.stack_step(SPEC, 2, "none", None, training)
    real = concrete(for_peak=True)
    same = jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype),
                                  args, real)
    assert jax.tree_util.tree_all(same)
    for x in (real[2], real[3], *jax.tree_util.tree_leaves(real[0])[:3]):
      values = np.asarray(x, np.float32)
      assert np.isfinite(values).all() and np.abs(values).max() > 0
