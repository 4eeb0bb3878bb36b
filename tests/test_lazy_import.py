"""`import jevo` loads the op only: jevo.nn and jevo.parallel (and flax, optax) on first use,
and the op and the fused ops the modules use run where flax is not installed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

# Makes `import flax` fail as it does where flax is not installed.
_WITHOUT_FLAX = """
import sys

class _NoFlax:
  def find_spec(self, name, path=None, target=None):
    if name == "flax" or name.startswith("flax."):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None

sys.meta_path.insert(0, _NoFlax())
"""


def _run(code: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_import_jevo_loads_neither_the_modules_nor_flax():
  out = _run("""
      import sys
      import jevo
      heavy = ("flax", "optax", "jevo.nn", "jevo.parallel")
      print(sorted(name for name in heavy if name in sys.modules))
      jevo.nn.EvoformerStack, jevo.parallel.dap_evoformer_stack
      print(sorted(name for name in heavy if name in sys.modules))
      print("nn" in dir(jevo), jevo.nn is sys.modules["jevo.nn"])
  """)
  before, after, listed = out.splitlines()
  assert before == "[]"
  assert {"flax", "jevo.nn", "jevo.parallel"} <= set(ast.literal_eval(after))  # flax brings optax
  assert listed == "True True"


def test_unknown_attribute_is_an_attribute_error():
  out = _run("""
      import jevo
      try:
        jevo.no_such_thing
      except AttributeError as err:
        print(err)
  """)
  assert "module 'jevo' has no attribute 'no_such_thing'" in out


def test_the_ops_run_without_flax():
  out = _run(_WITHOUT_FLAX + """
import jax, jax.numpy as jnp, numpy as np
import jevo
from jevo.ops.activation import relu
from jevo.ops.dense import dense
from jevo.ops.layer_norm import layer_norm

x = jax.random.normal(jax.random.key(0), (2, 3, 8, 2, 4))
mask = jnp.ones((2, 3, 1, 1, 8), bool)
out, grad = jax.value_and_grad(lambda q: jevo.evoformer_attention(q, x, x, mask=mask).sum())(x)
print(out.shape == (), grad.shape == x.shape, bool(jnp.isfinite(grad).all()))
def layer(a):
  normed = layer_norm(a, jnp.ones(4), jnp.zeros(4), 1e-5, a.dtype)
  return relu(dense(normed, jnp.ones((4, 3)), jnp.zeros(3))).sum()
print(jax.grad(layer)(jnp.arange(8.0).reshape(2, 4)).shape)
out = jevo.DS4Sci_EvoformerAttention(x, x, x, [1e9 * (mask - 1.0)])
print(out.shape)
try:
  jevo.nn
except ImportError as err:
  print("nn needs flax:", "flax" in str(err))
""")
  assert out.splitlines() == ["True True True", "(2, 4)", "(2, 3, 8, 2, 4)", "nn needs flax: True"]
