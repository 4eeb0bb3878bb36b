"""The CUDA backend under `jax.jit` with sharded inputs, on 4 devices: no gathers, same numbers.

Needs 4 devices. On CPU, `test_cuda_partitioning.py` runs this module in a subprocess with 4
host devices; run alone without them, it skips saying so. By hand:

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m pytest tests/test_cuda_partitioning_multidevice.py

Two kinds of check, both through `cuda_backend.attention`'s own path (custom VJP, vmap rules,
`jevo.ops.partitioning`):

- numbers: with the per-device kernel calls swapped for a CPU stand-in (the "xla" backend,
  `kernel_stand_in.py`), outputs and gradients of a sharded jit equal the unsharded ones;
- compiled HLO with the real FFI calls: compiled for the CPU, the program stops at code
  generation (the kernels have no CPU handler), but XLA's dump of the optimised, partitioned
  HLO is written before that: it shows the kernels' custom calls on per-device blocks and no
  all-gather of their inputs.
"""

from __future__ import annotations

import glob
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import jevo
from jevo.ops import cuda_backend, xla
from kernel_stand_in import STAND_IN
from partitioning_hlo import gathers_of, input_shapes, instructions, kernel_calls

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices; test_cuda_partitioning.py runs it with 4 CPU devices")

SCALE = 0.3
SHAPE = (4, 4, 8, 2, 8)  # [B, N, S, H, D]: every shardable axis divisible by 2 and 4
KINDS = ("Auto", "Explicit")


def make_mesh(kind: str):
  return jax.make_mesh((2, 2), ("x", "y"), axis_types=(getattr(AxisType, kind),) * 2)


def inputs(shape=SHAPE, seed=0, dtype=jnp.float32):
  b, n, s, h, d = shape
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
  mask = rng.random((b, n, s)) > 0.25
  mask[0, 1, :] = False  # one fully masked row
  bias = jnp.asarray(2.0 * rng.standard_normal((b, h, s, s)), dtype)
  weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return q, k, v, jnp.asarray(mask), bias, weights


def attend(q, k, v, mask, bias, kernels=STAND_IN):
  return cuda_backend.attention(q, k, v, mask, bias, scale=SCALE, deterministic=False,
                                kernels=kernels)


def loss(q, k, v, bias, mask, weights, kernels=STAND_IN):
  out = attend(q, k, v, mask, bias, kernels)
  return jnp.sum(out.astype(jnp.float32) * weights), out


# value, out and the gradients with respect to q, k, v and the bias.
step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: not finite"
  scale = float(np.abs(expected).max(initial=1.0))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def check_step(got, want):
  (value, out), grads = got
  (w_value, w_out), w_grads = want
  close(value, w_value, "loss")
  close(out, w_out, "out")
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, w_grads):
    assert np.abs(np.asarray(w)).max() > 0, name
    close(g, w, name)


def put(mesh, x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


# (name, spec of q, k and v, spec of the bias, spec of the mask, whether nothing is gathered)
SHARDINGS = [
    ("B", P("x"), P("x"), P("x"), True),
    ("N", P(None, "x"), P(), P(None, "x"), True),
    ("H", P(None, None, None, "x"), P(None, "x"), P(), True),
    ("BxN", P("x", "y"), P("x"), P("x", "y"), True),
    ("NxH", P(None, "x", None, "y"), P(None, "y"), P(None, "x"), True),
    ("B over both axes", P(("x", "y")), P(("x", "y")), P(("x", "y")), True),
    # S or D split: gathered along that axis (and only that one) before the kernels run.
    ("S split", P(None, None, "x"), P(None, None, "x"), P(None, None, "x"), False),
    ("D split", P("y", None, None, None, "x"), P("y"), P("y"), False),
]


@pytest.fixture(scope="module")
def unsharded():
  args = inputs()
  q, k, v, mask, bias, weights = args
  return args, step(q, k, v, bias, mask, weights)


def test_stand_in_matches_the_xla_backend(unsharded):
  (q, k, v, mask, bias, weights), (value_out, grads) = unsharded

  def reference(q, k, v, bias):
    out = xla.attention(q, k, v, mask, bias, scale=SCALE, deterministic=False)
    return jnp.sum(out * weights), out

  want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)
  check_step((value_out, grads), want)


# ------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,qkv,bias_spec,mask_spec,no_gather", SHARDINGS,
                         ids=[s[0] for s in SHARDINGS])
def test_sharded_step_matches_unsharded(unsharded, kind, name, qkv, bias_spec, mask_spec,
                                        no_gather):
  (q, k, v, mask, bias, weights), want = unsharded
  mesh = make_mesh(kind)
  args = (put(mesh, q, qkv), put(mesh, k, qkv), put(mesh, v, qkv), put(mesh, bias, bias_spec),
          put(mesh, mask, mask_spec), put(mesh, weights, qkv))
  lowered = step.lower(*args)
  if no_gather:
    # The partitioned path: custom-partitioned calls (auto axes) or shard_maps (explicit ones).
    assert ("@CustomSPMDPartitioning(" if kind == "Auto" else "sdy.manual_computation") in (
        lowered.as_text())
  compiled = lowered.compile()
  got = compiled(*args)
  check_step(got, want)
  out = got[0][1]
  hlo = compiled.as_text()
  gathered = gathers_of(hlo, input_shapes(SHAPE))
  if no_gather:
    assert not gathered, f"{name}: inputs gathered: {gathered}"
    # The output stays sharded like q.
    assert padded(out.sharding.spec, 5) == padded(qkv, 5), out.sharding
  else:
    assert gathered, f"{name}: expected the S or D split to be gathered"


@pytest.mark.parametrize("kind", KINDS)
def test_absent_mask_and_bias(kind):
  q, k, v, _, _, weights = inputs(seed=2)
  none = jnp.zeros((0,), jnp.bool_), jnp.zeros((0,), q.dtype)

  def f(q, k, v, weights):
    return jnp.sum(attend(q, k, v, *none) * weights)

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  want = grad(q, k, v, weights)
  mesh = make_mesh(kind)
  got = grad(*(put(mesh, x, P("x", "y")) for x in (q, k, v, weights)))
  for g, w, what in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("loss", "dq", "dk", "dv")):
    close(g, w, what)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_a_sharded_axis(kind):
  # [V, B, ...] with V split over x and N over y: the vmap rule folds V into B.
  q, k, v, mask, bias, weights = (x.reshape((2, 2) + x.shape[1:]) for x in inputs(seed=3))
  batched = jax.vmap(lambda q, k, v, bias, mask, w: loss(q, k, v, bias, mask, w)[0])

  def f(q, k, v, bias, mask, w):
    return jnp.sum(batched(q, k, v, bias, mask, w))

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
  want = grad(q, k, v, bias, mask, weights)
  mesh = make_mesh(kind)
  qs, bs, ms = P("x", None, "y"), P("x"), P("x", None, "y")
  args = (put(mesh, q, qs), put(mesh, k, qs), put(mesh, v, qs), put(mesh, bias, bs),
          put(mesh, mask, ms), put(mesh, weights, qs))
  compiled = grad.lower(*args).compile()
  for g, w in zip(jax.tree.leaves(compiled(*args)), jax.tree.leaves(want)):
    close(g, w, "vmap")
  assert not gathers_of(compiled.as_text(), input_shapes(q.shape[1:], batch=2))


def test_scan_checkpoint_and_eager_calls():
  q, k, v, mask, bias, weights = inputs(seed=4)

  def blocks(q, k, v, bias, mask, weights):
    # Two attention steps in a scan, each rematerialised in the backward.
    @jax.checkpoint
    def body(x, _):
      return attend(x, k, v, mask, bias) + x, None
    out, _ = jax.lax.scan(body, q, None, length=2)
    return jnp.sum(out * weights)

  grad = jax.jit(jax.value_and_grad(blocks, argnums=(0, 1, 2, 3)))
  want = grad(q, k, v, bias, mask, weights)
  mesh = make_mesh("Auto")
  args = (put(mesh, q, P("x", "y")), put(mesh, k, P("x", "y")), put(mesh, v, P("x", "y")),
          put(mesh, bias, P("x")), put(mesh, mask, P("x", "y")), put(mesh, weights, P("x", "y")))
  compiled = grad.lower(*args).compile()
  for g, w in zip(jax.tree.leaves(compiled(*args)), jax.tree.leaves(want)):
    close(g, w, "scan")
  assert not gathers_of(compiled.as_text(), input_shapes(SHAPE))

  # Eagerly, outside any jit: the same partitioned call, on the arrays' devices.
  eager = attend(*args[:3], args[4], args[3])
  close(eager, attend(q, k, v, mask, bias), "eager")
  assert padded(eager.sharding.spec, 5) == padded(P("x", "y"), 5)


def test_inside_a_shard_map_the_kernel_sees_the_blocks():
  # The DAP pattern: a shard_map manual over the whole mesh, q split over N, bias replicated.
  q, k, v, mask, bias, weights = inputs(seed=5)
  mesh = make_mesh("Explicit")

  def per_device(q, k, v, bias, mask, weights):
    from jevo.ops.varying import match_varying_axes
    q, k, v, mask, bias = match_varying_axes(q, k, v, mask, bias)
    return jax.lax.psum(jnp.sum(attend(q, k, v, mask, bias) * weights), ("x", "y"))

  spec = P(None, ("x", "y"))
  specs = (spec, spec, spec, P(), spec, spec)
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P())
  grad = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))
  got = grad(*(put(mesh, x, sp) for x, sp in zip((q, k, v, bias, mask, weights), specs)))
  want = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2, 3)))(
      q, k, v, bias, mask, weights)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    close(g, w, "shard_map")


# ---------------------------------------------------------- compiled HLO, real FFI calls

def optimized_hlo(jitted, *args) -> str:
  """The optimised, partitioned HLO that XLA compiles for `jitted(*args)` on the CPU, read from
  XLA's dump: compiling the real kernels' custom calls fails after it (no CPU handler)."""
  with tempfile.TemporaryDirectory() as dump:
    try:
      jitted.lower(*args).compile(
          compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
    except Exception as err:  # noqa: BLE001 - expected: the FFI targets run on CUDA only
      if "jevo_attention" not in str(err):
        raise
    files = [f for f in glob.glob(f"{dump}/*after_optimizations.txt")]
    if not files:
      pytest.skip("this XLA writes no after-optimisations dump before code generation")
    (path,) = files
    with open(path) as f:
      return f.read()


def bf16_inputs(shape=(4, 4, 16, 2, 16)):
  q, k, v, mask, bias, weights = inputs(shape, dtype=jnp.bfloat16)
  return q, k, v, bias, mask, weights


kernel_step = jax.jit(jax.grad(lambda *a: loss(*a, kernels=cuda_backend.FFI_KERNELS)[0],
                               argnums=(0, 1, 2, 3)))

# (name, spec of q, k and v, of the bias, of the mask, the per-device q block)
KERNEL_SHARDINGS = [
    ("B", P(("x", "y")), P(("x", "y")), P(("x", "y")), (1, 4, 16, 2, 16)),
    ("N", P(None, ("x", "y")), P(), P(None, ("x", "y")), (4, 1, 16, 2, 16)),
    ("H", P(None, None, None, "x"), P(None, "x"), P(), (4, 4, 16, 1, 16)),
    ("BxN", P("x", "y"), P("x"), P("x", "y"), (2, 2, 16, 2, 16)),
]


def _check_kernel_hlo(hlo, name, block):
  gathered = gathers_of(hlo, input_shapes((4, 4, 16, 2, 16)))
  assert not gathered, f"{name}: inputs gathered: {gathered}"
  calls = kernel_calls(hlo)
  assert calls.get("jevo_attention_fwd") and calls.get("jevo_attention_bwd"), calls
  for target, shapes in calls.items():
    assert all(s == block for s in shapes), (name, target, shapes, block)
  # The bias gradient: summed over N's devices exactly when N is split.
  b, n, s, h, _ = block
  sums = [line for op, result, line in instructions(hlo)
          if op in ("all-reduce", "all-reduce-start") and (b, h, s, s) in result]
  assert bool(sums) == (n < 4), (name, sums)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,qkv,bias_spec,mask_spec,block", KERNEL_SHARDINGS,
                         ids=[s[0] for s in KERNEL_SHARDINGS])
def test_kernels_run_on_blocks_without_gathers(kind, name, qkv, bias_spec, mask_spec, block):
  mesh = make_mesh(kind)
  q, k, v, bias, mask, weights = bf16_inputs()
  args = (put(mesh, q, qkv), put(mesh, k, qkv), put(mesh, v, qkv), put(mesh, bias, bias_spec),
          put(mesh, mask, mask_spec), put(mesh, weights, qkv))
  _check_kernel_hlo(optimized_hlo(kernel_step, *args), name, block)


def test_kernels_partition_under_gspmd_too():
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    name, qkv, bias_spec, mask_spec, block = KERNEL_SHARDINGS[3]
    mesh = make_mesh("Auto")
    q, k, v, bias, mask, weights = bf16_inputs()
    args = (put(mesh, q, qkv), put(mesh, k, qkv), put(mesh, v, qkv),
            put(mesh, bias, bias_spec), put(mesh, mask, mask_spec), put(mesh, weights, qkv))
    _check_kernel_hlo(optimized_hlo(kernel_step, *args), name, block)
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


def test_an_unpartitioned_custom_call_is_seen_gathering():
  # The check's control: the bare FFI call, with no sharding rule, gathers its inputs.
  mesh = make_mesh("Auto")
  q, k, v, bias, mask, _ = bf16_inputs()
  bare = jax.jit(lambda q, k, v, mask, bias: cuda_backend._ffi_forward(SCALE, 0, False)(
      q, k, v, mask, bias))
  spec = P(("x", "y"))
  hlo = optimized_hlo(bare, *(put(mesh, x, spec) for x in (q, k, v, mask, bias)))
  assert gathers_of(hlo, input_shapes((4, 4, 16, 2, 16)))
  assert kernel_calls(hlo)["jevo_attention_fwd"] == [(4, 4, 16, 2, 16)]


# ----------------------------------------------------------------- lowering and export


def _specs(mesh, shape=(4, 4, 16, 2, 16), qkv=P("x", "y"), bias=P("x"), mask=P("x", "y")):
  b, n, s, h, _ = shape
  struct = lambda shp, dtype, spec: jax.ShapeDtypeStruct(shp, dtype,
                                                         sharding=NamedSharding(mesh, spec))
  return (struct(shape, jnp.bfloat16, qkv),) * 3 + (
      struct((b, h, s, s), jnp.bfloat16, bias), struct((b, n, s), jnp.bool_, mask),
      struct(shape, jnp.float32, qkv))


def test_lowered_for_cuda_the_calls_carry_their_sharding_rule():
  # Lowered for CUDA on this machine (auto axes): the partitioning happens when XLA compiles,
  # so the module holds the custom-partitioned calls with their Shardy rule, and no gather.
  lowered = kernel_step.trace(*_specs(make_mesh("Auto"))).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  calls = [line for line in text.splitlines() if "@CustomSPMDPartitioning(" in line]
  assert len(calls) == 2, text[:2000]  # the forward and the backward
  for line in calls:
    assert "sdy.sharding_rule = #sdy.op_sharding_rule<" in line and "need_replication" in line
  assert "all_gather" not in text and "all-gather" not in text


def test_lowered_for_cuda_with_explicit_axes_the_calls_see_blocks():
  # Explicit axes: a shard_map at trace time, so the lowered module already has the kernels'
  # calls on per-device blocks (here [2, 2, 16, 2, 16]) and the bias gradient's psum.
  lowered = kernel_step.trace(*_specs(make_mesh("Explicit"))).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  calls = re.findall(
      r"stablehlo\.custom_call @(jevo_attention_\w+)\(([^)]*)\)[^\n]*?:\s*\(([^)]*)\)", text)
  assert {c[0] for c in calls} == {"jevo_attention_fwd", "jevo_attention_bwd"}, text[:3000]
  for _, _, operand_types in calls:
    assert operand_types.split(",")[0].strip() == "tensor<2x2x16x2x16xbf16>", operand_types
  assert "all_gather" not in text
  assert "all_reduce" in text  # dbias summed over N's axis


def test_export_of_a_sharded_program_holds_the_plain_kernel_calls():
  # jax.export lowers the kernels' calls themselves: serialisable, partitioned when compiled.
  f = jax.jit(lambda *a: loss(*a, kernels=cuda_backend.FFI_KERNELS)[0])
  exported = jax.export.export(f, platforms=["cuda"],
                               disabled_checks=jevo.export_disabled_checks())(
      *_specs(make_mesh("Auto")))
  restored = jax.export.deserialize(exported.serialize())
  assert restored.nr_devices == 4
  module = restored.mlir_module()
  assert "CustomSPMDPartitioning" not in module and cuda_backend.FORWARD_TARGET in module


def test_export_over_explicit_axes_with_its_vjp():
  # Explicit axes: the calls are shard_maps, which need no devices; the VJP exports too.
  mesh = AbstractMesh((2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  f = jax.jit(lambda *a: loss(*a, kernels=cuda_backend.FFI_KERNELS)[0])
  exported = jax.export.export(f, platforms=["cuda"],
                               disabled_checks=jevo.export_disabled_checks())(*_specs(mesh))
  restored = jax.export.deserialize(exported.serialize(vjp_order=1))
  forward, backward = restored.mlir_module(), restored.vjp().mlir_module()
  assert "tensor<2x2x16x2x16xbf16>" in forward and cuda_backend.FORWARD_TARGET in forward
  assert cuda_backend.BACKWARD_TARGET in backward and "all_gather" not in backward


@pytest.mark.parametrize("what", ["abstract mesh", "vjp"])
def test_export_without_devices_over_auto_axes_is_refused(what):
  # The documented limit of custom-partitioned calls: lowering them needs concrete devices,
  # which an export over an AbstractMesh with Auto axes, or its VJP (exported over the
  # abstract shardings it recorded), does not have.
  f = jax.jit(lambda *a: loss(*a, kernels=cuda_backend.FFI_KERNELS)[0])
  export = jax.export.export(f, platforms=["cuda"], disabled_checks=jevo.export_disabled_checks())
  with pytest.raises(ValueError, match="AbstractMesh"):
    if what == "vjp":
      export(*_specs(make_mesh("Auto"))).serialize(vjp_order=1)
    else:
      export(*_specs(AbstractMesh((2, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)))


def padded(spec, ndim):
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))
