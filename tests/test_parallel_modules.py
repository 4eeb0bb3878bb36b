"""DAP's per-module pieces on 4 devices against the single-device modules (outputs and
gradients, sizes divisible by 4 or padded), and the memory of the triangle multiplications'
rings.

Needs 4 devices. On CPU, `test_parallel_launcher.py` runs this module in a subprocess with 4
host devices; run alone without them, it skips saying so. By hand:

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m pytest tests/test_parallel_modules.py
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import (MSARowAttentionWithPairBias, OuterProductMean, TriangleAttention,
                     TriangleMultiplication)
from jevo.parallel import make_dap_mesh
from jevo.parallel.msa import msa_row_attention, outer_product_mean
from jevo.parallel.pair import triangle_attention, triangle_multiplication
from jevo.parallel.sharded import run_sharded

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices; test_parallel_launcher.py runs it with 4 CPU devices")

DEVICES = 4
C = 8  # c_z = c_hidden, as in AlphaFold (128 and 128)
C_M = 6


def close(actual, expected, what: str) -> None:
  """fp32 agreement: |a - e| <= 1e-6 * (|e| + max |e|), elementwise."""
  ref.assert_close(actual, expected, what, 1e-6)


def inputs(n_seq: int, n_res: int, c_m: int, c_z: int, seed: int):
  """m, z, masks (padding at the end, as in AlphaFold's crops) and weights of a linear loss."""
  rng = np.random.default_rng(seed)
  m, z, msa_mask, pair_mask = ref.random_inputs(rng, n_seq, n_res, c_m, c_z)
  w_m, w_z = (rng.standard_normal(x.shape).astype(np.float32) for x in (m, z))
  return tuple(jnp.asarray(x) for x in (m, z, msa_mask, pair_mask, w_m, w_z))


def compare(module, one_device, on_shard, arrays, what: str) -> None:
  """Outputs and gradients (parameters, m, z) of `one_device(module, m, z, msa_mask,
  pair_mask) -> (m_update, z_update)` against `on_shard(module, m_rows, z_rows, masks, ax)`
  run by `run_sharded` on 4 devices (inputs padded there when sizes do not divide by 4)."""
  m, z, msa_mask, pair_mask, w_m, w_z = arrays
  graphdef, params = nnx.split(module, nnx.Param)
  mesh = make_dap_mesh(DEVICES)

  def body(module, m, z, masks, replicated, ax, sizes):
    del replicated, sizes
    return on_shard(module, m, z, masks, ax)

  def loss(params, m, z, dap):
    module = nnx.merge(graphdef, params)
    if dap:
      out = run_sharded(body, module, m, z, msa_mask, pair_mask, None, mesh=mesh, axis="dap",
                        write_back=False)
    else:
      out = one_device(module, m, z, msa_mask, pair_mask)
    return jnp.sum(out[0] * w_m) + jnp.sum(out[1] * w_z), out

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, out_dap), grads_dap = step(params, m, z, True)
  (_, out_one), grads_one = step(params, m, z, False)
  close(out_dap[0], out_one[0], f"{what}: m")
  close(out_dap[1], out_one[1], f"{what}: z update")
  assert np.abs(np.asarray(out_one[0])).max() + np.abs(np.asarray(out_one[1])).max() > 0
  leaves_one = dict(jax.tree_util.tree_flatten_with_path(grads_one)[0])
  for path, grad in jax.tree_util.tree_flatten_with_path(grads_dap)[0]:
    close(grad, leaves_one[path], f"{what}: d loss / d {jax.tree_util.keystr(path)}")
  for path, grad in jax.tree_util.tree_flatten_with_path(grads_one[0])[0]:
    assert np.abs(np.asarray(grad)).max() > 0, f"{what}: {jax.tree_util.keystr(path)}"


# ------------------------------------------------------------------ triangle multiplication


def triangle_module(outgoing: bool, c: int = C, seed: int = 0) -> TriangleMultiplication:
  module = TriangleMultiplication(c, c, outgoing=outgoing, rngs=nnx.Rngs(seed))
  ref.randomize_params(module, seed + 1)
  return module


def _one_device_triangle(chunk_size):
  def run(module, m, z, msa_mask, pair_mask):
    del msa_mask
    return m, module(z, pair_mask, chunk_size=chunk_size)
  return run


def _on_shard_triangle(chunk_size):
  def run(module, m, z, masks, ax):
    return m, triangle_multiplication(module, z, masks.pair_rows, ax, chunk_size=chunk_size)
  return run


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("n_res", [12, 10], ids=["divisible", "padded"])
@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_triangle_multiplication_matches_one_device(outgoing, n_res, chunk_size):
  arrays = inputs(3, n_res, 4, C, seed=n_res)
  compare(triangle_module(outgoing), _one_device_triangle(chunk_size),
          _on_shard_triangle(chunk_size), arrays, "triangle multiplication")


# ------------------------------------------------------------------ attention, outer product mean


def randomized(module, seed: int):
  ref.randomize_params(module, seed)
  return module


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunked"])
def test_msa_row_attention_matches_one_device(chunk_size):
  module = randomized(MSARowAttentionWithPairBias(C_M, C, num_heads=2, head_dim=4,
                                                  rngs=nnx.Rngs(0)), 1)

  def one_device(module, m, z, msa_mask, pair_mask):
    del pair_mask
    return module(m, z, msa_mask, chunk_size=chunk_size), z

  def on_shard(module, m, z, masks, ax):
    return msa_row_attention(module, m, z, masks.msa_rows, ax, chunk_size=chunk_size), z

  compare(module, one_device, on_shard, inputs(5, 10, C_M, C, seed=1), "MSA row attention")


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunked"])
def test_outer_product_mean_matches_one_device(chunk_size):
  module = randomized(OuterProductMean(C_M, C, 3, rngs=nnx.Rngs(0)), 2)

  def one_device(module, m, z, msa_mask, pair_mask):
    del z, pair_mask
    return m, module(m, msa_mask, chunk_size=chunk_size)

  def on_shard(module, m, z, masks, ax):
    del z
    return m, outer_product_mean(module, ax.to_columns(m), masks.msa_cols, ax,
                                 chunk_size=chunk_size)

  compare(module, one_device, on_shard, inputs(5, 10, C_M, C, seed=2), "outer product mean")


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
def test_triangle_attention_matches_one_device(starting, chunk_size):
  module = randomized(TriangleAttention(C, starting=starting, num_heads=2, head_dim=4,
                                        rngs=nnx.Rngs(0)), 3)

  def one_device(module, m, z, msa_mask, pair_mask):
    del msa_mask
    return m, module(z, pair_mask, chunk_size=chunk_size)

  def on_shard(module, m, z, masks, ax):
    if starting:  # rows layout in and out
      return m, triangle_attention(module, z, masks.pair_rows, ax, chunk_size=chunk_size)
    update = triangle_attention(module, ax.to_columns(z), masks.pair_cols, ax,
                                chunk_size=chunk_size)
    return m, ax.to_rows(update)

  compare(module, one_device, on_shard, inputs(3, 10, C_M, C, seed=3), "triangle attention")


_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1}
_ARRAY = re.compile(r"\b(f64|f32|s32|u32|bf16|f16|s8|u8|pred)\[([0-9,]*)\]")


def array_bytes(hlo: str) -> list[tuple[tuple[int, ...], int]]:
  """(shape, bytes) of every array shape anywhere in (compiled, per-device) HLO text."""
  found = []
  for dtype, dims in _ARRAY.findall(hlo):
    shape = tuple(int(d) for d in dims.split(",") if d)
    found.append((shape, _BYTES[dtype] * math.prod(shape)))
  return found


def test_array_parser():
  found = array_bytes("%a = f32[2,8,8]{2,1,0} add(f32[2,8,8] %x, bf16[3,100] %y)\n"
                      "%b = pred[1000]{0} parameter(0)")
  assert found == [((2, 8, 8), 512), ((2, 8, 8), 512), ((3, 100), 600), ((1000,), 1000)]


def triangle_memory(outgoing: bool, n_res: int, c: int) -> dict[str, int]:
  """Per device, for the DAP triangle multiplication (c_z = c_hidden = c) on 4 devices, forward
  and forward + backward (gradients of z and the parameters): the largest array of the
  compiled program other than the module's own fused projections (a dimension of 5 c: the
  four gated projections and the output gate of one product, `[*B, N_res/n, N_res, 5 c]`),
  those projections' largest array, and XLA's temporary bytes."""
  module = triangle_module(outgoing, c)
  graphdef, params = nnx.split(module, nnx.Param)
  mesh = make_dap_mesh(DEVICES)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((n_res, n_res, c)), jnp.float32)
  mask = jnp.ones((n_res, n_res), bool)
  m = jnp.zeros((DEVICES, n_res, 1), jnp.float32)  # unused: run_sharded carries an MSA too

  def body(module, m, z, masks, replicated, ax, sizes):
    del replicated, sizes
    return m, triangle_multiplication(module, z, masks.pair_rows, ax, chunk_size=None)

  def forward(params, z):
    module = nnx.merge(graphdef, params)
    return run_sharded(body, module, m, z, None, mask, None, mesh=mesh, axis="dap",
                       write_back=False)[1]

  def loss(params, z):
    return jnp.sum(forward(params, z) ** 2)

  found = {}
  for name, fn in (("forward", forward), ("backward", jax.grad(loss, argnums=(0, 1)))):
    compiled = jax.jit(fn).lower(params, z).compile()
    arrays = array_bytes(compiled.as_text())
    found[f"{name} largest"] = max(b for shape, b in arrays if 5 * c not in shape)
    found[f"{name} projections"] = max(b for shape, b in arrays if 5 * c in shape)
    found[f"{name} temp"] = int(compiled.memory_analysis().temp_size_in_bytes)
  return found


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_triangle_multiplication_holds_no_pair_sized_tensor(outgoing):
  """Apart from its own projections, no device holds more than 1/n of the whole
  [N_res, N_res, c_hidden] in one array, forward or backward: one block per ring step.
  Gathering one projection whole, or forming partial sums for every output row before a
  reduce-scatter, would hold all of it."""
  n_res, c = 32, 16
  whole = n_res * n_res * c * 4
  found = triangle_memory(outgoing, n_res, c)
  print(f"{'outgoing' if outgoing else 'incoming'}: whole {whole} bytes, {found}")
  for name in ("forward", "backward"):
    assert found[f"{name} largest"] <= whole // DEVICES, (name, found)
    # What is left out is only this device's rows of the projections (5 c channels).
    assert found[f"{name} projections"] <= 5 * whole // DEVICES, (name, found)
