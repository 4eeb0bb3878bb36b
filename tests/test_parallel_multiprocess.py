"""DAP across processes: two processes joined by `jax.distributed` give one device's numbers.

Each process has two CPU devices; the mesh of `make_dap_mesh()` spans all four, so the
collectives cross the process boundary (CPU collectives over gloo). The processes run this
file as a script; the test compares what process 0 writes with a single-device run here.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nn_reference as ref
from nn_reference import full_precision_matmuls  # noqa: F401  (autouse fixture)
from jevo.nn import EvoformerStack
from jevo.parallel import dap_evoformer_stack, make_dap_mesh

S = ref.TINY
N_SEQ, N_RES = 5, 6  # padded to (8, 8) on 4 devices
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2


def training_step(mesh) -> dict[str, np.ndarray]:
  """Loss, outputs and gradients of a 1-block stack (dropout on); `mesh=None`: no DAP."""
  stack = EvoformerStack(1, S.c_m, S.c_z, **S.block_kwargs(), msa_dropout=0.3,
                         pair_dropout=0.4, rngs=nnx.Rngs(0))
  ref.randomize_params(stack, 1)
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  rng = np.random.default_rng(2)
  m, z, msa_mask, pair_mask = ref.random_inputs(rng, N_SEQ, N_RES, S.c_m, S.c_z)
  w_m, w_z = (rng.standard_normal(x.shape).astype(np.float32) for x in (m, z))

  def loss(params, m, z, key):
    module = nnx.merge(graphdef, params, rest)
    if mesh is None:
      out = module(m, z, msa_mask, pair_mask, rngs=key)
    else:
      out = dap_evoformer_stack(module, m, z, msa_mask, pair_mask, mesh=mesh, rngs=key)
    return jnp.sum(out[0] * w_m) + jnp.sum(out[1] * w_z), out

  step = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  if mesh is None:
    step = jax.jit(step)
  else:  # results replicated, so that every process can read them whole
    step = jax.jit(step, out_shardings=jax.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  (value, (out_m, out_z)), (d_params, d_m, d_z) = step(params, m, z, jax.random.key(3))
  results = dict(loss=value, m=out_m, z=out_z, d_m=d_m, d_z=d_z)
  for path, leaf in jax.tree_util.tree_flatten_with_path(d_params)[0]:
    results["d_params" + jax.tree_util.keystr(path)] = leaf
  return {k: np.asarray(v.addressable_data(0) if mesh is not None else v)
          for k, v in results.items()}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
  port, out = _free_port(), tmp_path / "dap.npz"
  # LLVM optimisation off: this tiny program compiles in half the time.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  procs = [subprocess.Popen([sys.executable, __file__, "--process-id", str(i), "--port",
                             str(port), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  try:
    expected = training_step(None)
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  with np.load(out) as saved:
    actual = dict(saved)
  assert actual.keys() == expected.keys()
  for name, value in expected.items():
    scale = np.abs(value).max(initial=1.0)
    np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def _worker(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  try:  # gloo: CPU collectives across processes (the default where this option is gone)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass
  jax.distributed.initialize(f"localhost:{args.port}", num_processes=NUM_PROCESSES,
                             process_id=args.process_id)
  mesh = make_dap_mesh()
  processes = {d.process_index for d in mesh.devices.flat}
  if processes != set(range(NUM_PROCESSES)) or mesh.size != NUM_PROCESSES * DEVICES_PER_PROCESS:
    raise SystemExit(f"the mesh does not span both processes: {mesh.devices}")
  with jax.default_matmul_precision("highest"):
    results = training_step(mesh)
  if args.process_id == 0:
    np.savez(args.out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker()
