"""The attention implementations the benchmark puts side by side: jevo's own backends and the
other libraries a user would pick for the same job. Each builds its inputs in its own native
layout (outside the timed region) and a function of them; one that cannot run a case says why.

Peers are optional: a library that is not installed shows as such, with the install line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable

# Mask bias for libraries that take an additive one: finite, so that no inf * 0 appears.
_MASKED = -1e9


@dataclasses.dataclass
class Setup:
  """What the worker times: `forward(*args)` returns the attention output; forward+backward is
  the vjp of `forward` with respect to `args[i]` for i in `diff_argnums`."""

  forward: Callable
  args: tuple
  diff_argnums: tuple[int, ...]


class Implementation:
  name: str = ""
  label: str = ""
  jevo: bool = False      # one of jevo's own backends
  needs_gpu: bool = True
  module: str | None = None  # the import that says whether the library is installed
  install: str = ""

  def unavailable_reason(self, case, platform: str) -> str | None:
    """Why this implementation cannot run `case` here (None when it can), without running it."""
    if self.module is not None and importlib.util.find_spec(self.module) is None:
      return f"not installed ({self.install})"
    if self.needs_gpu and platform != "gpu":
      return f"needs a CUDA GPU (this run is on {platform})"
    return None

  def setup(self, case, key) -> Setup:
    raise NotImplementedError


def host_normal(seed: int, shape, dtype):
  """Standard-normal values made on the host and copied to the default device: generating them
  there would leave the random generator's temporaries in the allocator's running peak, which
  would then be charged to the measured call."""
  import jax
  import numpy as np
  values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  return jax.device_put(values.astype(dtype))


def device_normal(seed: int, shape, dtype):
  """Standard-normal values made on the default device in one compiled program: seconds
  faster than `host_normal` for the planner's gigabyte inputs, for timings only, since the
  generator's temporaries stay in the allocator's running peak."""
  import numpy as np
  return _device_normal_fn(tuple(shape), np.dtype(dtype).name)(seed)


@functools.lru_cache(maxsize=16)
def _device_normal_fn(shape: tuple, dtype: str):
  import jax
  return jax.jit(lambda seed: jax.random.normal(jax.random.key(seed), shape, dtype))


def device_pattern(seed: int, shape, dtype):
  """Values in [-1, 1] of a fixed pattern (never all zeros) written on the default device in
  one fused kernel, with no temporaries beside the output: inputs for a measurement of memory
  alone, where the values do not matter. Callable inside a traced function too."""
  import numpy as np
  return _pattern_fn(tuple(shape), np.dtype(dtype).name)(seed)


@functools.lru_cache(maxsize=64)
def _pattern_fn(shape: tuple, dtype: str):
  import jax
  import jax.numpy as jnp
  import numpy as np
  size = int(np.prod(shape))

  @jax.jit
  def fn(seed):
    x = jax.lax.iota(jnp.int32, size).astype(jnp.float32)
    return jnp.sin(x * 0.6180339 + seed).astype(dtype).reshape(shape)
  return fn


def random_inputs(case, key, dtype):
  """q, k, v `[B, N, S, H, D]`, a key mask `[B, N, 1, 1, S]` with 10% masked, and the pair bias
  `[B, 1, H, S, S]` (None for a case without one); normal random values, never zeros, made on
  the host (`host_normal`). `key` is an integer seed."""
  import jax
  import numpy as np
  b, n, s, h, d = case.shape
  q, k, v = (host_normal(key + i, case.shape, dtype) for i in range(3))
  mask = jax.device_put(np.random.default_rng(key + 3).uniform(size=(b, n, 1, 1, s)) >= 0.1)
  bias = host_normal(key + 4, (b, 1, h, s, s), dtype) if case.bias else None
  return q, k, v, mask, bias


def transition_inputs(shape, c, factor, dtype, seed=0):
  """x `[*shape, c]` with a non-zero mean and spread, the transition's parameters (LayerNorm
  scale and offset, w1 `[c, factor c]`, b1, w2, b2) of the size AlphaFold's initialisers give
  (never zeros, float32), and an output cotangent like x; x and the cotangent in `dtype`."""
  import jax
  import jax.numpy as jnp
  hidden = factor * c
  k = jax.random.split(jax.random.key(seed), 8)
  x = 0.5 + 2.0 * jax.random.normal(k[0], tuple(shape) + (c,), jnp.float32)
  params = (1.0 + 0.2 * jax.random.normal(k[1], (c,)),
            0.2 * jax.random.normal(k[2], (c,)),
            jax.random.normal(k[3], (c, hidden)) * (2.0 / c) ** 0.5,
            0.2 * jax.random.normal(k[4], (hidden,)),
            jax.random.normal(k[5], (hidden, c)) * hidden ** -0.5,
            0.2 * jax.random.normal(k[6], (c,)))
  g = jax.random.normal(k[7], x.shape, jnp.float32)
  return x.astype(dtype), tuple(p.astype(jnp.float32) for p in params), g.astype(dtype)


def _diff(case):
  return (0, 1, 2, 4) if case.bias else (0, 1, 2)


class Jevo(Implementation):
  jevo = True
  needs_gpu = False

  def __init__(self, backend: str):
    self.backend = backend
    self.name = backend
    self.label = f"jevo {backend}"

  def unavailable_reason(self, case, platform):
    if self.backend.startswith("cuda"):
      import jevo
      status = jevo.cuda_status()
      if not status.available:
        return status.reason
    if self.backend.startswith("cuda_"):  # one kernel family: cuda_sm80, cuda_sm90
      from jevo.ops import cuda_backend
      return cuda_backend.family_unsupported_reason(self.backend.removeprefix("cuda_"))
    return None

  def setup(self, case, key):
    import jax.numpy as jnp
    import jevo
    q, k, v, mask, bias = random_inputs(case, key, jnp.bfloat16)
    backend = self.backend

    def forward(q, k, v, mask, bias):
      return jevo.evoformer_attention(q, k, v, mask=mask, bias=bias, implementation=backend)

    return Setup(forward, (q, k, v, mask, bias), _diff(case))


class CuDNN(Implementation):
  name = "cudnn"
  label = "cuDNN (jax.nn.dot_product_attention)"

  def setup(self, case, key):
    import jax
    import jax.numpy as jnp
    b, n, s, h, d = case.shape
    q, k, v, mask, bias = random_inputs(case, key, jnp.bfloat16)
    # The rows of N become batch entries: [B*N, S, H, D]. cuDNN takes the key mask as
    # [B*N, 1, 1, S] beside a bias [B, H, S, S] broadcast over N; without a bias it wants the
    # mask with its query axis ([B*N, 1, S, S]).
    fold = lambda x: x.reshape(b * n, s, h, d)  # noqa: E731
    q, k, v = fold(q), fold(k), fold(v)
    mask = mask.reshape(b * n, 1, 1, s)
    if bias is None:
      mask = jnp.broadcast_to(mask, (b * n, 1, s, s))
    else:
      bias = bias.reshape(b, h, s, s)
      if b > 1:
        bias = jnp.repeat(bias, n, axis=0)

    def forward(q, k, v, mask, bias):
      return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")

    return Setup(forward, (q, k, v, mask, bias), _diff(case))


class CuEquivariance(Implementation):
  name = "cuequivariance"
  label = "cuEquivariance triangle_attention"
  module = "cuequivariance_jax"
  install = "pip install cuequivariance-jax cuequivariance-ops-jax-cu13"

  def setup(self, case, key):
    import jax.numpy as jnp
    import cuequivariance_jax as cuex
    b, n, s, h, d = case.shape
    q, k, v, mask, bias = random_inputs(case, key, jnp.bfloat16)
    # Its native layout is [B, N, H, S, D]; it always takes a bias (zeros when the case has none).
    q, k, v = (x.swapaxes(-3, -2) for x in (q, k, v))
    if bias is None:
      bias = jnp.zeros((b, 1, h, s, s), jnp.bfloat16)
    scale = d ** -0.5

    def forward(q, k, v, mask, bias):
      out = cuex.triangle_attention(q, k, v, bias, mask, scale)
      return out[0] if isinstance(out, (tuple, list)) else out

    return Setup(forward, (q, k, v, mask, bias), _diff(case))


class ColabFold(Implementation):
  name = "colabfold"
  label = "colabfold-kernels attention (Pallas)"
  module = "colabfold_kernels"
  install = "pip install colabfold-kernels"

  def unavailable_reason(self, case, platform):
    reason = super().unavailable_reason(case, platform)
    if reason is not None:
      return reason
    if case.shape[0] != 1 and case.bias:
      return "takes a bias shared over the whole batch only (B = 1)"
    if self._kernel(case) is None:
      return "colabfold_kernels.attention returned None for this dtype and head dim"
    return None

  def _kernel(self, case):
    import jax.numpy as jnp
    import colabfold_kernels as cfk
    d = case.shape[-1]
    return cfk.attention(cfk.dispatch(), jnp.bfloat16, key_dim=d, value_dim=d, layout="seq")

  def setup(self, case, key):
    import jax.numpy as jnp
    b, n, s, h, d = case.shape
    q, k, v, mask, bias = random_inputs(case, key, jnp.bfloat16)
    kernel = self._kernel(case)
    # Sequence-major rows [B*N, S, H, D], an additive key-mask bias [B*N, 1, 1, S] and the pair
    # bias as [H, S, S], shared by every row.
    q, k, v = (x.reshape(b * n, s, h, d) for x in (q, k, v))
    mask_bias = jnp.where(mask.reshape(b * n, 1, 1, s), 0.0, _MASKED).astype(jnp.bfloat16)
    bias = None if bias is None else bias.reshape(h, s, s)
    scale = d ** -0.5

    def forward(q, k, v, mask_bias, bias):
      return kernel(q, k, v, mask_bias, bias, scale)

    return Setup(forward, (q, k, v, mask_bias, bias), _diff(case))


ATTENTION_IMPLEMENTATIONS = {impl.name: impl for impl in (
    Jevo("cuda"), Jevo("xla_chunked"), Jevo("xla"), CuDNN(), CuEquivariance(), ColabFold(),
    Jevo("cuda_sm80"), Jevo("cuda_sm90"))}
# What runs without --backends: everything but the single kernel families (cuda_sm80, cuda_sm90),
# which "cuda" already is on its device and which are there to compare the families.
DEFAULT_BACKENDS = tuple(name for name in ATTENTION_IMPLEMENTATIONS
                         if name not in ("cuda_sm80", "cuda_sm90"))

# The whole block runs jevo's modules with one of jevo's attention backends.
BLOCK_BACKENDS = ("cuda", "xla_chunked", "xla")


def get(name: str) -> Implementation:
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"backend must be one of {sorted(ATTENTION_IMPLEMENTATIONS)}, got {name!r}")
  return ATTENTION_IMPLEMENTATIONS[name]
