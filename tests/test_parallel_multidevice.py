"""DAP on 2 and 4 devices against one device: outputs, gradients, dropout, compiled collectives.

Needs 4 devices. On CPU, `test_parallel_launcher.py` runs this module in a subprocess with 4
host devices; run alone without them, it skips saying so. By hand:

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m pytest tests/test_parallel_multidevice.py
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import EvoformerBlock, EvoformerStack, ExtraMSABlock, ExtraMSAStack
from jevo.parallel import dap_evoformer_block, dap_evoformer_stack, make_dap_mesh

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices; test_parallel_launcher.py runs it with 4 CPU devices")

S = ref.TINY
DROPOUT = dict(msa_dropout=0.3, pair_dropout=0.4)
# N_seq x N_res of the training runs: divisible by 2 (no padding), padded for 4 devices.
TRAIN_SIZES = {2: (6, 8), 4: (6, 10)}


def close(actual, expected, what: str) -> None:
  """fp32 agreement: |a - e| <= 1e-5 * (|e| + max |e|), elementwise."""
  ref.assert_close(actual, expected, what, 1e-5)


def random_module(cls, *args, seed: int = 0, **kwargs):
  """A tiny module with every parameter random (fresh ones are the identity)."""
  module = cls(*args, S.c_m, S.c_z, **S.block_kwargs(), rngs=nnx.Rngs(seed), **kwargs)
  ref.randomize_params(module, seed + 1)
  return module


def inputs(n_seq: int, n_res: int, seed: int, batch=()):
  """m, z and masks (the last sequence and the last two residues padded)."""
  return tuple(jnp.asarray(x) for x in ref.random_inputs(np.random.default_rng(seed), n_seq,
                                                         n_res, S.c_m, S.c_z, batch))


# ------------------------------------------------------------------ compiled-HLO collectives

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "pred": 1, "s32": 4, "u32": 4}
_COLLECTIVE = re.compile(r"=\s*(?P<result>\S.*?)\s+(?P<op>all-gather|all-to-all|reduce-scatter"
                         r"|all-reduce|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_IN_SHARD_MAP = re.compile(r'op_name="[^"]*\bshard_map\b')


class Collective(NamedTuple):
  op: str
  dtype: str
  bytes: int
  in_shard_map: bool  # from the per-shard code (the blocks), not the padding around it


def collectives(hlo: str) -> list[Collective]:
  """Every collective in compiled HLO text, with the dtype and byte size of its result."""
  found = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.search(line)
    if match is None:
      continue
    arrays = _ARRAY.findall(match["result"])
    size = sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in arrays)
    found.append(Collective(match["op"], "/".join(sorted({dtype for dtype, _ in arrays})), size,
                            bool(_IN_SHARD_MAP.search(line))))
  return found


def test_collectives_parser():
  hlo = ('%all-gather.1 = f32[2,8,8]{2,1,0} all-gather(%x), dimensions={1}, '
         'metadata={op_name="jit(f)/shard_map/while/body/all_gather"}\n'
         "%all-to-all.2 = (f32[2,2,16]{2,1,0}, f32[2,2,16]{2,1,0}) all-to-all(%a, %b)\n"
         "%x = pred[4]{0} add(%y, %z)\n")
  assert collectives(hlo) == [("all-gather", "f32", 512, True),
                              ("all-to-all", "f32", 512, False)]


# ------------------------------------------------------------------ a training step of a stack


@functools.cache
def training_run(devices: int | None, sizes: tuple[int, int], extra: bool = False,
                 remat="block") -> dict:
  """Loss, outputs and gradients (params, m, z) of a stack; `devices=None`: no DAP.

  Evoformer: 2 blocks, remat per block; extra MSA: 1 block. Dropout on with an explicit key,
  masked residues and sequences. Also the outputs for a second key and the compiled HLO.
  """
  if extra:
    stack = random_module(ExtraMSAStack, 1, **DROPOUT)
  else:
    stack = random_module(EvoformerStack, 2, remat=remat, **DROPOUT)
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  m, z, msa_mask, pair_mask = inputs(*sizes, seed=3)
  rng = np.random.default_rng(4)
  w_m, w_z = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (m, z))
  mesh = None if devices is None else make_dap_mesh(devices)

  def loss(params, m, z, key):
    module = nnx.merge(graphdef, params, rest)
    if mesh is None:
      out = module(m, z, msa_mask, pair_mask, rngs=key)
    else:
      out = dap_evoformer_stack(module, m, z, msa_mask, pair_mask, mesh=mesh, rngs=key)
    return jnp.sum(out[0] * w_m) + jnp.sum(out[1] * w_z), out

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  compiled = step.lower(params, m, z, jax.random.key(7)).compile()
  (value, out), grads = compiled(params, m, z, jax.random.key(7))
  other = compiled(params, m, z, jax.random.key(8))[0][1]
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs  # one entry per program
  return dict(loss=value, out=out, grads=grads, other=other, hlo=compiled.as_text(),
              flops=float(costs["flops"]))


def _runs(n: int, extra: bool = False) -> tuple[dict, dict]:
  return (training_run(n, TRAIN_SIZES[n], extra), training_run(None, TRAIN_SIZES[n], extra))


@pytest.mark.parametrize("n", [2, 4])
def test_training_step_outputs_match_one_device(n):
  dap, one = _runs(n)
  close(dap["loss"], one["loss"], "loss")
  close(dap["out"][0], one["out"][0], "m")
  close(dap["out"][1], one["out"][1], "z")
  # Dropout is on (another key, other outputs) and drops the same entries on n devices.
  assert not np.allclose(one["other"][1], one["out"][1], atol=1e-2)
  close(dap["other"][0], one["other"][0], "m, second key")
  close(dap["other"][1], one["other"][1], "z, second key")


def _check_gradients(dap: dict, one: dict) -> None:
  (p_dap, m_dap, z_dap), (p_one, m_one, z_one) = dap["grads"], one["grads"]
  close(m_dap, m_one, "d loss / d m")
  close(z_dap, z_one, "d loss / d z")
  leaves_one = dict(jax.tree_util.tree_flatten_with_path(p_one)[0])
  leaves_dap = jax.tree_util.tree_flatten_with_path(p_dap)[0]
  assert len(leaves_dap) == len(leaves_one) > 50  # every parameter of a block
  for path, grad in leaves_dap:
    close(grad, leaves_one[path], f"d loss / d {jax.tree_util.keystr(path)}")
  assert np.abs(np.asarray(z_one)).max() > 0 and np.abs(np.asarray(m_one)).max() > 0


@pytest.mark.parametrize("n", [2, 4])
def test_training_step_gradients_match_one_device(n):
  _check_gradients(*_runs(n))


def test_runs_of_remat_choices_match_one_device():
  """A stack whose blocks keep different things (runs, as a jevo.plan.Plan gives) on 2 devices
  gives the one-device numbers of the same stack with one remat for all."""
  dap = training_run(2, TRAIN_SIZES[2], remat=((1, "none"), (1, "block")))
  one = training_run(None, TRAIN_SIZES[2])
  close(dap["out"][0], one["out"][0], "m")
  close(dap["out"][1], one["out"][1], "z")
  _check_gradients(dap, one)


def test_extra_msa_stack_training_step_matches_one_device():
  dap, one = _runs(4, extra=True)
  close(dap["out"][0], one["out"][0], "extra MSA")
  close(dap["out"][1], one["out"][1], "z")
  _check_gradients(dap, one)


@pytest.mark.parametrize("n", [2, 4])
def test_compiled_step_communicates_shards_and_small_tensors(n):
  n_seq, n_res = TRAIN_SIZES[n]
  seq_p, res_p = -(-n_seq // n) * n, -(-n_res // n) * n
  f32 = 4
  whole_m, whole_z = seq_p * res_p * S.c_m * f32, res_p * res_p * S.c_z * f32
  found = collectives(_runs(n)[0]["hlo"])
  ops = {c.op for c in found if c.in_shard_map}
  assert {"all-to-all", "all-gather", "reduce-scatter", "collective-permute"} <= ops, ops
  # Layout switches move one device's shard of m or z (forward and backward).
  moved = [c.bytes for c in found if c.op == "all-to-all" and c.in_shard_map]
  assert set(moved) == {whole_m // n, whole_z // n}, moved
  # Two switches of m and two of z per block (the incoming triangle multiplication works in
  # rows layout), in the forward, the recomputation and the backward: at most 12 in the step
  # (one scan body). Switching z to columns layout and back around that multiplication
  # too would add two a block to each pass.
  assert len(moved) <= 12, len(moved)
  # Gathered: biases [H, R, R] and the outer product mean's right projection; never a whole
  # MSA or pair representation, nor a triangle multiplication's projection.
  largest = f32 * max(S.heads_msa * res_p ** 2, S.heads_pair * res_p ** 2,
                      seq_p * res_p * S.c_opm)
  assert largest < min(whole_m, whole_z)
  gathered = [c.bytes for c in found if c.op == "all-gather" and c.in_shard_map]
  assert len(gathered) >= 6 and max(gathered) <= largest, gathered
  # Reduce-scattered: the gradients of what the forward gathered; no larger than that.
  scattered = [c.bytes for c in found if c.op == "reduce-scatter" and c.in_shard_map]
  assert scattered and max(scattered) <= largest, scattered
  # Sent around the ring: one device's block [R/n, R, c_hidden] of a triangle multiplication's
  # projection, of a partial sum of its product, or of their cotangents.
  permuted = {c.bytes for c in found if c.op == "collective-permute" and c.in_shard_map}
  assert permuted == {f32 * res_p // n * res_p * S.c_mul}, permuted
  if (seq_p, res_p) == (n_seq, n_res):
    # No padding to cut off: nothing large is gathered outside the blocks either.
    others = [c for c in found if c.op == "all-gather" and not c.in_shard_map]
    assert all(c.bytes <= largest for c in others), others


@pytest.mark.parametrize("n", [2, 4])
def test_each_device_does_its_share_of_the_arithmetic(n):
  """XLA's count of one device's FLOPs is about a 1/n share of the one-device step: no module's
  work is repeated whole on every device (sizes divisible by n: no padding). At these tiny
  sizes masks and layout glue add about 10% on 4 devices (at 64 x 64 with AlphaFold's channels
  the share is 1.00); an update with a ninth of the work, computed whole on each of 4
  devices, would add a third."""
  sizes = (8, 8)
  dap, one = training_run(n, sizes), training_run(None, sizes)
  assert one["flops"] > 0
  share = dap["flops"] * n / one["flops"]
  assert 0.95 < share < 1.2, share


# ------------------------------------------------------------------ blocks, inference, dropout


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("cls", [EvoformerBlock, ExtraMSABlock], ids=["evoformer", "extra_msa"])
def test_block_matches_one_device(cls, n):
  block = random_module(cls, seed=n)
  block.eval()
  args = inputs(5, 7, seed=n)  # padded to (6, 8) or (8, 8)
  mesh = make_dap_mesh(n)
  expected = jax.jit(lambda *a: block(*a))(*args)
  actual = jax.jit(lambda *a: dap_evoformer_block(block, *a, mesh=mesh))(*args)
  close(actual[0], expected[0], "m")
  close(actual[1], expected[1], "z")
  assert np.abs(np.asarray(expected[1]) - np.asarray(args[1])).max() > 0.1  # the block acted


def test_dropout_from_the_blocks_own_streams_matches_one_device():
  # Training mode, no call-time rngs: both draw from (and advance) the block's RNG streams.
  one, dap = (random_module(EvoformerBlock, seed=5, **DROPOUT) for _ in range(2))
  args = inputs(5, 7, seed=5)
  mesh = make_dap_mesh(4)
  run_one = nnx.jit(lambda block, *a: block(*a))
  run_dap = nnx.jit(lambda block, *a: dap_evoformer_block(block, *a, mesh=mesh))
  first = run_one(one, *args), run_dap(dap, *args)
  second = run_one(one, *args), run_dap(dap, *args)
  for (expected, actual), call in ((first, "first"), (second, "second")):
    close(actual[0], expected[0], f"m, {call} call")
    close(actual[1], expected[1], f"z, {call} call")
  assert not np.allclose(first[0][1], second[0][1], atol=1e-2)  # the streams moved on
  counts_one = jax.tree.leaves(nnx.state(one, nnx.RngCount))
  counts_dap = jax.tree.leaves(nnx.state(dap, nnx.RngCount))
  assert [int(c) for c in counts_dap] == [int(c) for c in counts_one]


@pytest.mark.parametrize("chunk_size", [1, {"outer_product_mean": 1,
                                         "triangle_attention_ending_node": 2}])
def test_chunked_inference_on_a_named_axis_matches_one_device(chunk_size):
  stack = random_module(EvoformerStack, 2, seed=6)
  stack.eval()
  args = inputs(5, 7, seed=6)
  mesh = make_dap_mesh(4, axis="model")
  expected = jax.jit(lambda *a: stack(*a))(*args)
  actual = jax.jit(lambda *a: dap_evoformer_stack(stack, *a, mesh=mesh, axis="model",
                                                  chunk_size=chunk_size))(*args)
  close(actual[0], expected[0], "m")
  close(actual[1], expected[1], "z")


def test_ambient_auto_mesh_with_batch_dims_keeps_outputs_split():
  block = random_module(EvoformerBlock, seed=7)
  block.eval()
  args = inputs(4, 6, seed=7, batch=(2,))
  expected = jax.jit(lambda *a: block(*a))(*args)
  mesh = jax.make_mesh((2,), ("dap",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    actual = jax.jit(lambda *a: dap_evoformer_block(block, *a))(*args)
  close(actual[0], expected[0], "m")
  close(actual[1], expected[1], "z")
  # Sizes divide by 2: no padding to cut, m and z stay split along sequences / pair rows.
  for out in actual:
    assert out.sharding.is_equivalent_to(jax.NamedSharding(mesh, P(None, "dap")), out.ndim)
