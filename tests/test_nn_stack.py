"""EvoformerStack / ExtraMSAStack: scan == loop of blocks, remat, chunked inference, RNG state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import LINEAR_OUTPUT_NAME, EvoformerStack, ExtraMSAStack
from jevo.nn.stack import BLOCK_INPUT_NAMES

S = ref.TINY
N_SEQ, N_RES = 4, 6


def _stack(cls, num_blocks=2, seed=0, **kwargs):
  stack = cls(num_blocks, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(seed), **kwargs)
  ref.randomize_params(stack, seed)
  return stack


def _inputs():
  return tuple(jnp.asarray(x) for x in ref.random_inputs(np.random.default_rng(), N_SEQ, N_RES,
                                                         S.c_m, S.c_z))


@pytest.mark.parametrize("cls", [EvoformerStack, ExtraMSAStack])
def test_scan_equals_loop_of_blocks_with_dropout(cls):
  stack = _stack(cls)
  m, z, mm, pm = _inputs()
  graphdef, state = nnx.split(stack.blocks)  # taken before the call: same params, same streams

  @jax.jit
  def one_block(block_state, m, z):
    return nnx.merge(graphdef, block_state)(m, z, mm, pm)

  loop_m, loop_z = m, z
  for i in range(stack.num_blocks):
    loop_m, loop_z = one_block(jax.tree.map(lambda x, i=i: x[i], state), loop_m, loop_z)
  counts = jax.tree.leaves(nnx.state(stack, nnx.RngCount))
  scan_m, scan_z = nnx.jit(lambda s, m, z: s(m, z, mm, pm))(stack, m, z)
  np.testing.assert_allclose(scan_m, loop_m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scan_z, loop_z, rtol=1e-5, atol=1e-5)
  # Dropout was on, drawing from every block's stored streams, which advanced.
  after = jax.tree.leaves(nnx.state(stack, nnx.RngCount))
  assert len(after) == 3 and all(np.all(b > a) for a, b in zip(counts, after))


def _walk(jaxpr):
  """Every equation anywhere in a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _walk(inner)


def _checkpoints(jaxpr):
  """The `jax.checkpoint` equations anywhere in a jaxpr."""
  return [eqn for eqn in _walk(jaxpr) if eqn.primitive.name in ("checkpoint", "remat", "remat2")]


def test_remat_gives_the_same_loss_and_gradients():
  m, z, mm, pm = _inputs()
  key = jax.random.key(3)  # dropout on: recomputation must redraw the same masks
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  results = {}
  for remat in ("none", "block", "offload", policy):
    stack = _stack(EvoformerStack, seed=4, remat=remat)
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

    def loss(params):
      out_m, out_z = nnx.merge(graphdef, params, rest)(m, z, mm, pm, rngs=key)
      return jnp.sum(jnp.where(mm[..., None], out_m, 0) ** 2) + jnp.sum(
          jnp.where(pm[..., None], out_z, 0) ** 2)

    checkpoints = list(_checkpoints(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    if remat in ("none", "offload"):  # offload recomputes in its own backward scan
      assert not checkpoints
      if remat == "none":
        continue
    else:
      assert checkpoints and all(eqn.params["prevent_cse"] is False for eqn in checkpoints)
    if remat is policy:
      # A custom policy is handed to jax.checkpoint as given (its numerics are JAX's).
      assert all(eqn.params["policy"] is policy for eqn in checkpoints)
      continue
    results[remat] = jax.jit(jax.value_and_grad(loss))(params)
  stack = _stack(EvoformerStack, seed=4)
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  l0, g0 = jax.jit(jax.value_and_grad(loss))(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
  assert float(l0) > 0 and scale > 0
  for remat in ("block", "offload"):
    l1, g1 = results[remat]
    # Recomputation reorders float32 sums (differently again on GPUs); a remat bug is far larger.
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_block_inputs_are_named_for_policies():
  m, z, mm, pm = _inputs()
  stack = _stack(EvoformerStack, seed=4, remat="block")
  stack.eval()  # no dropout: the stack's RNG state is not written under tracing
  jaxpr = jax.make_jaxpr(lambda m, z: stack(m, z, mm, pm))(m, z).jaxpr
  names = [eqn.params["name"] for eqn in _walk(jaxpr) if eqn.primitive.name == "name"]
  # Besides the block inputs, only the linear layers' outputs are named.
  assert LINEAR_OUTPUT_NAME in names
  assert sorted(n for n in names if n != LINEAR_OUTPUT_NAME) == sorted(BLOCK_INPUT_NAMES)


def test_offload_moves_each_block_input_to_the_host_and_back():
  m, z, mm, pm = _inputs()
  stack = _stack(EvoformerStack, seed=4, remat="offload")
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

  def loss(params):
    out_m, out_z = nnx.merge(graphdef, params, rest)(m, z, mm, pm, rngs=jax.random.key(0))
    return jnp.sum(out_m ** 2) + jnp.sum(out_z ** 2)

  moves = [(eqn.params["devices"][0], eqn.outvars[0].aval.shape)
           for eqn in _walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
           if eqn.primitive.name == "device_put"]
  for shape in (m.shape, z.shape):
    assert (jax.memory.Space.Host, shape) in moves     # saved in the forward scan
    assert (jax.memory.Space.Device, shape) in moves   # fetched back in the backward scan
  # Without differentiation, nothing goes to the host.
  forward = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p, rest)(
      m, z, mm, pm, rngs=jax.random.key(0)))(params).jaxpr
  assert not any(eqn.primitive.name == "device_put" for eqn in _walk(forward))


def test_chunked_inference_equals_unchunked():
  stack = _stack(EvoformerStack, seed=7)
  stack.eval()
  m, z, mm, pm = _inputs()
  forward = nnx.jit(lambda s, m, z, chunk_size: s(m, z, mm, pm, chunk_size=chunk_size),
                    static_argnames="chunk_size")
  whole = forward(stack, m, z, None)
  chunked = forward(stack, m, z, 4)  # 4 does not divide the 6 residues: overlapping last chunk
  for a, b in zip(chunked, whole):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_sizes_per_sub_module():
  """A mapping naming every sub-module with one size is that size; one naming some chunks
  those only (the others whole), with the unchunked result; naming the outer product mean
  alone shrinks what its [N_res, N_res, c*c] product needs."""
  from jevo.nn import BLOCK_SUB_MODULES
  stack = _stack(EvoformerStack, seed=7)
  stack.eval()
  m, z, mm, pm = _inputs()
  graphdef, state = nnx.split(stack)

  def forward(chunk_size):
    return jax.jit(lambda state, m, z: nnx.merge(graphdef, state)(
        m, z, mm, pm, chunk_size=chunk_size))

  every = forward(dict.fromkeys(BLOCK_SUB_MODULES, 4))(state, m, z)
  for a, b in zip(every, forward(4)(state, m, z)):
    np.testing.assert_array_equal(a, b)
  some = forward({"outer_product_mean": 4, "triangle_attention_ending_node": 5,
                  "msa_transition": None})(state, m, z)
  for a, b in zip(some, forward(None)(state, m, z)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  big = EvoformerStack(1, 32, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
                       c_hidden_pair_att=8, c_hidden_opm=16, c_hidden_mul=16,
                       rngs=nnx.Rngs(0))
  big.eval()
  graphdef, state = nnx.split(big)
  m, z = jnp.ones((4, 48, 32)), jnp.ones((48, 48, 16))

  def temp_bytes(chunk_size):
    fn = jax.jit(lambda state: nnx.merge(graphdef, state)(m, z, chunk_size=chunk_size))
    return fn.lower(state).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes({"outer_product_mean": 4}) < 0.6 * temp_bytes(None)


def test_bad_chunk_size_mappings_say_what_is_wrong():
  stack = _stack(EvoformerStack, seed=7)
  stack.eval()
  m, z, mm, pm = _inputs()
  with pytest.raises(ValueError, match=r"unknown sub-modules \['outer_product'\]; known: "
                                       r"msa_row_attention, "):
    stack(m, z, mm, pm, chunk_size={"outer_product": 4})
  with pytest.raises(ValueError, match=r"chunk_size\['pair_transition'\] must be None or a "
                                       r"positive int, got 0"):
    stack(m, z, mm, pm, chunk_size={"pair_transition": 0})
  with pytest.raises(ValueError, match="chunk_size must be None, a positive int or a mapping"):
    stack(m, z, mm, pm, chunk_size=2.5)


def _training_step(stack, chunk_size):
  """jitted (grads of a sum of squares with respect to the parameters and both inputs)."""
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

  def loss(params, m, z, mm, pm):
    mo, zo = nnx.merge(graphdef, params, rest)(m, z, mm, pm, chunk_size=chunk_size)
    return jnp.sum(jnp.square(mo)) + jnp.sum(jnp.square(zo))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), params


@pytest.mark.parametrize("remat", ["none", "block"])
def test_chunked_training_gives_the_unchunked_gradients(remat):
  stack = _stack(EvoformerStack, seed=3, remat=remat)
  stack.eval()  # dropout off: the chunked and unchunked steps draw masks in different shapes
  m, z, mm, pm = _inputs()
  whole_step, params = _training_step(stack, None)
  chunked_step, _ = _training_step(stack, 4)  # 4 divides neither 4 sequences' 6 residues
  whole, chunked = whole_step(params, m, z, mm, pm), chunked_step(params, m, z, mm, pm)
  # fp32 sums over slices in another order, compared against the largest gradient: some are
  # rounding noise around zero (the pair bias's layer-norm offset shifts whole softmax rows,
  # which the softmax ignores), so no per-array relative comparison holds.
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(whole))
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_chunked_training_recomputes_each_slice_so_its_memory_shrinks():
  """Chunking bounds a training step's memory too: each slice's internals are recomputed in
  the backward pass rather than kept for every slice at once."""
  stack = EvoformerStack(1, 32, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
                         c_hidden_pair_att=8, c_hidden_opm=8, c_hidden_mul=16, remat="block",
                         rngs=nnx.Rngs(0))
  stack.eval()
  m = jnp.ones((16, 48, 32))
  z = jnp.ones((48, 48, 16))
  mm, pm = jnp.ones((16, 48)), jnp.ones((48, 48))

  def temp_bytes(chunk_size):
    step, params = _training_step(stack, chunk_size)
    return step.lower(params, m, z, mm, pm).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes(8) < 0.6 * temp_bytes(None)


def test_bad_stack_arguments_raise_value_error():
  with pytest.raises(ValueError, match="remat"):
    EvoformerStack(2, S.c_m, S.c_z, **S.block_kwargs(), remat="every", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_blocks"):
    EvoformerStack(0, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  stack = EvoformerStack(1, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(0))
  m, z, mm, pm = _inputs()
  with pytest.raises(ValueError, match="pair_mask"):
    stack(m, z, mm, pm[:-1])
  with pytest.raises(ValueError, match="chunk_size"):
    stack(m, z, mm, pm, chunk_size=-1)
