"""What one candidate costs, from XLA itself: the compiled training step's memory analysis for
stacks of two and three blocks (the difference is what one more block keeps for the backward
pass; the rest is the working memory of one block and the step's fixed buffers), and a time per
block, measured on the device or, where no device time is wanted, from XLA's cost analysis.
`whole_step_bytes` is the same analysis of a whole planned stack, the planner's check of its
extrapolation. Figures are cached on disk by device, sizes, jevo and jax version."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time

from jevo.bench.block_case import sum_of_squares
from jevo.bench.measure import median_ms, xla_analysis

# Stack depths compiled to separate the per-block memory from the fixed part.
DEPTHS = (2, 3)


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """The stack being planned: its block sizes (EvoformerStack's keyword arguments), the input
  sizes, and whether it is the extra-MSA stack."""

  n_seq: int
  n_res: int
  block_kwargs: tuple = ()  # sorted (name, value) pairs
  extra_msa: bool = False

  def kwargs(self) -> dict:
    return dict(self.block_kwargs)


@dataclasses.dataclass(frozen=True)
class Cost:
  """Per block: bytes kept on the device for the backward pass (`kept`) and ms of training
  time (`ms`); per step: the working memory of one block plus the step's own buffers
  (`fixed`, XLA's temp bytes minus what the blocks keep) and the step's arguments and outputs
  (`io_per_block`, `io_fixed`: parameters, their gradients, inputs). All from XLA."""

  kept: int
  fixed: int
  io_per_block: int
  io_fixed: int
  ms: float
  time_source: str

  def peak(self, blocks: int) -> int:
    return self.fixed + self.io_fixed + blocks * (self.kept + self.io_per_block)


def cache_dir() -> pathlib.Path:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "jevo" / "plan"


def _cache_key(spec: StackSpec, what: str, extra: dict) -> str:
  import jax
  import jevo
  device = jax.devices()[0]
  text = json.dumps(dict(spec=dataclasses.asdict(spec), what=what, extra=extra,
                         device=device.device_kind, platform=device.platform,
                         jax=jax.__version__, jevo=jevo.__version__), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_path(spec: StackSpec, what: str, extra: dict) -> pathlib.Path:
  return cache_dir() / f"{_cache_key(spec, what, extra)}.json"


def is_cached(spec: StackSpec, what: str, extra: dict) -> bool:
  return _cache_path(spec, what, extra).exists()


def cached(spec: StackSpec, what: str, extra: dict, compute, use_cache: bool = True,
           keep=lambda value: True):
  """compute() once per key: its JSON-serialisable result, kept in `cache_dir()` where
  `keep(result)`."""
  path = _cache_path(spec, what, extra)
  if use_cache and path.exists():
    return json.loads(path.read_text())
  value = compute()
  if use_cache and keep(value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
  return value


def stack_step(spec: StackSpec, blocks: int, remat, chunk_size=None, training=True):
  """(jitted step, abstract arguments) of a stack of `blocks` blocks: the training step
  (gradients of a sum-of-squares loss with respect to the parameters and both inputs, dropout
  on) or the inference forward (eval mode, chunked by `chunk_size`)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jevo.nn import EvoformerStack, ExtraMSAStack

  cls = ExtraMSAStack if spec.extra_msa else EvoformerStack
  kwargs = dict(dict(dtype=jnp.bfloat16), **spec.kwargs())
  if spec.extra_msa:
    kwargs["c_e"] = kwargs.pop("c_m", 64)
  make = lambda: cls(blocks, remat=remat, rngs=nnx.Rngs(0), **kwargs)  # noqa: E731
  abstract = nnx.eval_shape(make)
  if not training:
    abstract.eval()
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  c_m, c_z = abstract.c_m, abstract.c_z
  m = jax.ShapeDtypeStruct((spec.n_seq, spec.n_res, c_m), jnp.bfloat16)
  z = jax.ShapeDtypeStruct((spec.n_res, spec.n_res, c_z), jnp.bfloat16)

  def built():
    stack = make()
    if not training:
      stack.eval()
    return nnx.split(stack, nnx.Param, ...)[1:]

  def concrete(for_timing: bool = False, for_peak: bool = False):
    """Real arguments: the stack built for real, inputs random (never zeros), made on the host
    so that a measured peak holds no generator's temporaries, or on the device `for_timing`
    (seconds faster for large inputs). The stack is built in one compiled program: built
    eagerly, each of its initialisers would be compiled on its own, for every block count
    anew (most of the planner's time on a CPU).

    `for_peak`, where only memory is measured: the parameters and inputs are a fixed pattern
    written on the device (no temporaries, no initialisers: compiling a 48-block stack's took
    most of the allocator check's time), the rest of the state (random keys) built for real."""
    from jevo.bench.implementations import device_normal, device_pattern, host_normal
    if for_peak:
      real_rest = jax.jit(lambda: built()[1])()
      real_params = jax.jit(lambda: jax.tree_util.tree_map(
          lambda a: 0.02 * device_pattern(0, a.shape, a.dtype), params))()
      return (real_params, real_rest, device_pattern(0, m.shape, m.dtype),
              device_pattern(1, z.shape, z.dtype))
    normal = device_normal if for_timing else host_normal
    real_params, real_rest = jax.jit(built)()
    return real_params, real_rest, normal(0, m.shape, m.dtype), normal(1, z.shape, z.dtype)

  if not training:
    def forward(params, rest, m, z):
      return nnx.merge(graphdef, params, rest)(m, z, chunk_size=chunk_size)
    return forward, (params, rest, m, z), concrete

  def step(params, rest, m, z):
    def loss(params, m, z):
      return sum_of_squares(*nnx.merge(graphdef, params, rest)(
          m, z, rngs=jax.random.key(0), chunk_size=chunk_size))
    return jax.grad(loss, argnums=(0, 1, 2))(params, m, z)

  return step, (params, rest, m, z), concrete


def abstract_block(spec: StackSpec, training: bool = True):
  """(make, graphdef, abstract params, rest, m, z) of one block of `spec` in bf16: `make()`
  builds a real block (in eval mode unless `training`), the rest are its split abstract
  state and the abstract block inputs, for compiling without allocating anything."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jevo.nn import EvoformerBlock, ExtraMSABlock

  kwargs = dict(dict(dtype=jnp.bfloat16), **spec.kwargs())
  c_m, c_z = kwargs.pop("c_m", 256), kwargs.pop("c_z", 128)
  cls = ExtraMSABlock if spec.extra_msa else EvoformerBlock

  def make():
    block = cls(c_m, c_z, rngs=nnx.Rngs(0), **kwargs)
    if not training:
      block.eval()
    return block

  graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  m = jax.ShapeDtypeStruct((spec.n_seq, spec.n_res, c_m), jnp.bfloat16)
  z = jax.ShapeDtypeStruct((spec.n_res, spec.n_res, c_z), jnp.bfloat16)
  return make, graphdef, params, rest, m, z


def _block_step(spec: StackSpec, remat, chunk_size=None, training=True):
  """(fn, abstract args) of ONE block outside a scan, wrapped as the stack wraps each block:
  XLA's cost analysis counts a loop's body once whatever its trip count, so per-block time
  estimates come from this."""
  import jax
  from flax import nnx
  from jevo.nn.stack import checkpointed_block

  _, graphdef, params, rest, m, z = abstract_block(spec, training)

  def one_block(m, z, params):
    return nnx.merge(graphdef, params, rest)(m, z, rngs=jax.random.key(0) if training else None,
                                             chunk_size=chunk_size)

  if not training:
    return lambda params, m, z: one_block(m, z, params), (params, m, z)
  # "offload" keeps the inputs on the host through the same policy under DAP.
  wrapped = checkpointed_block(one_block, "block" if remat == "offload" else remat)

  def step(params, m, z):
    def loss(params, m, z):
      return sum_of_squares(*wrapped(m, z, params))
    return jax.grad(loss, argnums=(0, 1, 2))(params, m, z)

  return step, (params, m, z)


# Where nothing is measured, an offloaded block pays for its inputs' copies to the host and
# back over a PCIe link at this rate, assumed not to overlap the block's work.
HOST_LINK_BYTES_PER_S = 25e9


def _estimated_block_ms(spec: StackSpec, candidate=None, chunk_size=None) -> float:
  training = candidate is not None
  fn, args = _block_step(spec, candidate.stack_remat() if training else "none", chunk_size,
                         training)
  ms = estimated_ms(compile_fn(fn, args, "none"))
  if training and candidate.remat == "offload":
    ms += 1e3 * 2 * _abstract_bytes(args[1:]) / HOST_LINK_BYTES_PER_S
  return ms


# XLA's options that keep its GPU autotuning results on disk, by fusion. XLA also keeps them in
# memory, per process, but the planner compiles the same block's matrix products many times over
# (stacks of two and three blocks, each sub-module, the whole step) and the allocator check
# compiles the whole step again in a fresh process, which without these redoes all of it.
AUTOTUNE_CACHE_OPTIONS = ("xla_gpu_per_fusion_autotune_cache_dir",
                          "xla_gpu_experimental_autotuner_cache_dir")


@functools.lru_cache(maxsize=None)
def known_compile_options(names: tuple) -> tuple:
  """Those of `names` that this jaxlib's XLA accepts as compiler options (one tiny compile
  each): an XLA that renamed or dropped one rejects every compile that names it."""
  import jax
  known = []
  for name in names:
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: ""}).lower(1.0).compile()
    except Exception:  # "No such compile option": INVALID_ARGUMENT
      continue
    known.append(name)
  return tuple(known)


def autotune_cache_options() -> dict:
  """The compiler options under which planning compiles: XLA's autotuning results kept in
  `cache_dir()/autotune` on a GPU (shared by the planner's processes and later plans); none
  elsewhere."""
  import jax
  if jax.devices()[0].platform != "gpu":
    return {}
  directory = cache_dir() / "autotune"
  directory.mkdir(parents=True, exist_ok=True)
  return {name: str(directory) for name in known_compile_options(AUTOTUNE_CACHE_OPTIONS)}


def compiler_options(remat) -> dict | None:
  """What every planned or measured step compiles with: the offload options where it offloads
  (`remat == "offload"`), and the autotuning cache on a GPU; None where there are none."""
  from jevo.nn import OFFLOAD_COMPILER_OPTIONS
  options = dict(OFFLOAD_COMPILER_OPTIONS if remat == "offload" else {}, **autotune_cache_options())
  return options or None


def _lower(fn, args, remat):
  import jax
  return jax.jit(fn, compiler_options=compiler_options(remat)).lower(*args)


def compile_fn(fn, args, remat):
  return _lower(fn, args, remat).compile()


def _device_bytes(compiled) -> tuple[int, int]:
  """(temp, arguments + outputs) in device memory, from XLA's memory analysis; buffers XLA
  places in host memory (the offloaded block inputs) are not counted."""
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes - getattr(mem, "host_temp_size_in_bytes", 0)
  io = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        - getattr(mem, "host_argument_size_in_bytes", 0)
        - getattr(mem, "host_output_size_in_bytes", 0))
  return int(temp), int(io)


def estimated_ms(compiled) -> float:
  """A time from XLA's cost analysis at an H200's rates (790 TFLOP/s, 4.8 TB/s), for ranking
  candidates where nothing is measured."""
  cost = xla_analysis(compiled)
  return 1e3 * (cost.get("flops", 0.0) / 790e12 + cost.get("bytes_accessed", 0.0) / 4.8e12)


# The time of a step that cannot run on the device (too large for its memory): never chosen
# where anything measured fits, and kept as such in the cache (JSON's Infinity).
UNMEASURABLE_MS = float("inf")


def device_bytes_limit() -> int | None:
  """The memory the first device's allocator may hold, or None where it does not say (a CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def ran_out_of_memory(error_text: str) -> bool:
  """Whether an error's text says the device ran out of memory (XLA's RESOURCE_EXHAUSTED)."""
  return "RESOURCE_EXHAUSTED" in error_text or "out of memory" in error_text.lower()


def measured_ms(compiled, concrete, repeats: int = 5) -> tuple[float, str]:
  """(median ms of the compiled step on `concrete()`'s real arguments after a warm-up call,
  ""), or (UNMEASURABLE_MS, why) where it cannot run on the device: TOO_LARGE where XLA's
  analysis of it exceeds the device's memory, OUT_OF_MEMORY where running it ran out (which
  a less fragmented allocator might not, so that figure is not cached)."""
  limit = device_bytes_limit()
  if limit is not None and sum(_device_bytes(compiled)) > limit:
    return UNMEASURABLE_MS, TOO_LARGE
  try:
    return median_ms(compiled, concrete(), repeats, warmup=1)["ms"], ""
  except Exception as err:  # jax.errors.JaxRuntimeError, whose module varies by version
    if not ran_out_of_memory(str(err)):
      raise
    return UNMEASURABLE_MS, OUT_OF_MEMORY


TOO_LARGE = "too large for the device"
OUT_OF_MEMORY = "ran out of the device's memory"
OVER_BUDGET = "over the budget, so never run whole"


def _kept_in_cache(value: dict) -> bool:
  """Whether a cost is kept on disk: not one whose timing ran out of memory, nor one left
  untimed for a budget (a larger one would time it)."""
  source = value.get("time_source", "")
  return OUT_OF_MEMORY not in source and OVER_BUDGET not in source


def _fit(step_of_depth, remat, measure: bool, estimate, record=None, ready=None) -> dict:
  """Cost fields from the compiled steps of stacks of DEPTHS[0] and DEPTHS[1] blocks
  (`step_of_depth(depth)` -> stack_step's triple): the difference is what one block adds, the
  rest is fixed; time per block measured as the same difference, or `estimate()`.
  `record(depth, value)` receives each step's `whole_step_bytes` figure. `ready` maps a depth
  to its (compiled step, compile seconds) where that compile has already run."""
  points, times = [], []
  for depth in DEPTHS:
    fn, args, concrete = step_of_depth(depth)
    if ready and depth in ready:
      compiled, compile_s = ready[depth]
    else:
      start = time.perf_counter()
      compiled = compile_fn(fn, args, remat)
      compile_s = time.perf_counter() - start
    points.append(_device_bytes(compiled))
    if record is not None:
      record(depth, dict(bytes=sum(points[-1]), compile_s=compile_s))
    if measure:
      times.append(measured_ms(compiled, lambda: concrete(for_timing=True)))
  (t2, io2), (t3, io3) = points
  kept, io_per_block = t3 - t2, io3 - io2
  unmeasured = [why for _, why in times if why]
  if unmeasured:
    ms = UNMEASURABLE_MS
  elif measure:  # a difference lost in the noise: the deeper step's time per block instead
    (ms2, _), (ms3, _) = times
    ms = ms3 - ms2 if ms3 > ms2 else ms3 / DEPTHS[1]
  return dict(kept=kept, fixed=t2 - DEPTHS[0] * kept, io_per_block=io_per_block,
              io_fixed=io2 - DEPTHS[0] * io_per_block,
              ms=ms if measure else estimate(),
              time_source=_time_source(measure, unmeasured[-1] if unmeasured else ""))


def _time_source(measure: bool, why_unmeasured: str) -> str:
  if not measure:
    return "XLA cost analysis"
  return f"not measured: {why_unmeasured}" if why_unmeasured else "measured"


def _fit_inference(step_of_depth, measure: bool, estimate, record, time_within=None) -> dict:
  """`_fit`'s fields for the inference forward from the stack of DEPTHS[0] blocks alone: a
  forward block keeps nothing for a backward pass (the scan carries m and z from block to
  block, in the fixed part), so what one more block adds is its parameters' bytes, read off the
  abstract arguments of the next depth without compiling it; its time is the measured step's
  per block, the fixed part's (tiny) time included. Compiling the deeper stack took the most of
  planning's compile time at 128 x 4096 on an H200 (50 of 63 s). A step of more than
  `time_within` bytes is not timed (OVER_BUDGET)."""
  depth = DEPTHS[0]
  fn, args, concrete = step_of_depth(depth)
  start = time.perf_counter()
  compiled = compile_fn(fn, args, "none")
  compile_s = time.perf_counter() - start
  temp, io = _device_bytes(compiled)
  record(depth, dict(bytes=temp + io, compile_s=compile_s))
  io_per_block = _abstract_bytes(step_of_depth(depth + 1)[1]) - _abstract_bytes(args)
  if measure and time_within is not None and temp + io > time_within:
    ms, why = UNMEASURABLE_MS, OVER_BUDGET
  else:
    ms, why = (measured_ms(compiled, lambda: concrete(for_timing=True)) if measure
               else (estimate(), ""))
  if why:
    ms = UNMEASURABLE_MS
  elif measure:
    ms /= depth
  return dict(kept=0, fixed=temp, io_per_block=io_per_block,
              io_fixed=io - depth * io_per_block, ms=ms, time_source=_time_source(measure, why))


def _abstract_bytes(args) -> int:
  """Bytes of a pytree of abstract arrays."""
  import jax
  import numpy as np
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(args) if hasattr(x, "shape"))


def compile_side_by_side(jobs: dict, workers: int) -> dict:
  """{key: (fn, args, remat)} -> {key: (compiled, compile seconds)}: each step lowered in turn
  (tracing holds Python's lock), the first compiled alone, then the others up to `workers` at a
  time in threads (a compile releases the lock). Seconds are each compile's own wall time,
  overlapped with others'.

  The first goes alone because XLA's GPU autotuning results are kept per process, by fusion,
  but compiles running at the same time each autotune the fusions none has finished: the
  candidates' steps are made of the same block's matrix products, so after one compile the
  others find most of them tuned."""
  import concurrent.futures
  lowered = {key: _lower(fn, args, remat) for key, (fn, args, remat) in jobs.items()}

  def compile_one(key):
    start = time.perf_counter()
    return key, (lowered[key].compile(), time.perf_counter() - start)

  keys = list(lowered)
  done = dict([compile_one(keys[0])]) if keys else {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    done.update(pool.map(compile_one, keys[1:]))
  return done


def _training_key(candidate, measure: bool, chunk_size=None) -> dict:
  key = dict(candidate=candidate.name, measure=measure)
  if chunk_size is not None:  # unchunked keys as they were before chunked training
    key["chunk_size"] = chunk_size
  return key


def precompile_training(spec: StackSpec, candidates, *, measure: bool, workers: int,
                        use_cache: bool = True, chunk_size=None) -> dict:
  """The compiles `training_cost` would run for `candidates` whose costs are not cached, run
  `workers` at a time: {candidate name: {depth: (compiled, seconds)}}, for training_cost's
  `ready`. With one worker, or one candidate to compile, nothing is compiled ahead."""
  todo = [c for c in candidates
          if not (use_cache and is_cached(spec, "training",
                                          _training_key(c, measure, chunk_size)))]
  if workers <= 1 or len(todo) <= 1:
    return {}
  jobs = {}
  for c in todo:
    for depth in DEPTHS:
      fn, args, _ = stack_step(spec, depth, c.stack_remat(), chunk_size)
      jobs[(c.name, depth)] = (fn, args, c.remat)
  done = compile_side_by_side(jobs, workers)
  ready = {}
  for (name, depth), value in done.items():
    ready.setdefault(name, {})[depth] = value
  return ready


def _as_cost(value: dict) -> Cost:
  """A Cost from `_fit`'s fields, none of them below zero. XLA's buffer assignment can give the
  deeper stack less memory than the shallower (on an H200 the offloaded 3-block step came out
  132 MiB below the 2-block one), which would make a block keep negative bytes: such a block
  counts as keeping nothing, and the shallower step's larger figure is the fixed part, so that
  no predicted peak falls below what XLA reported for either depth."""
  value = dict(value)
  for per_block, fixed in (("kept", "fixed"), ("io_per_block", "io_fixed")):
    if value[per_block] < 0:
      value[fixed] += DEPTHS[0] * value[per_block]
      value[per_block] = 0
  value["ms"] = max(value["ms"], 0.0)
  return Cost(**value)


def training_cost(spec: StackSpec, candidate, *, measure: bool, use_cache: bool = True,
                  ready=None, chunk_size=None) -> Cost:
  """The Cost of running every block of `spec`'s stack as `candidate` in a training step,
  chunked by `chunk_size` (None: not chunked; `ready`: its steps compiled ahead by depth, from
  `precompile_training`)."""
  def record(depth, value):  # the uniform plan of this depth needs no compile to check
    _store_whole_step(spec, depth, ((depth, candidate.name),), chunk_size, True, value,
                      use_cache)

  def compute():
    return _fit(lambda depth: stack_step(spec, depth, candidate.stack_remat(), chunk_size),
                candidate.remat, measure,
                lambda: _estimated_block_ms(spec, candidate, chunk_size), record, ready)
  value = cached(spec, "training", _training_key(candidate, measure, chunk_size), compute,
                 use_cache, keep=_kept_in_cache)
  return _as_cost(value)


def inference_cost(spec: StackSpec, chunk_size, *, measure: bool, use_cache: bool = True,
                   time_within: int | None = None) -> Cost:
  """The Cost of the inference forward with `chunk_size` (None: no chunking), from one compiled
  depth (`_fit_inference`). With `time_within` (bytes), a stack of that depth compiled larger
  is not timed: a plan for that budget never runs it, and timing the unchunked stack of 2
  blocks at 128 x 4096 on an H200 took 19 s only to run out of memory."""
  def record(depth, value):
    _store_whole_step(spec, depth, (), chunk_size, False, value, use_cache)

  def compute():
    return _fit_inference(
        lambda depth: stack_step(spec, depth, "none", chunk_size, training=False), measure,
        lambda: _estimated_block_ms(spec, None, chunk_size), record, time_within)
  return _as_cost(cached(spec, "inference", dict(chunk_size=chunk_size, measure=measure),
                         compute, use_cache, keep=_kept_in_cache))


def _whole_step_extra(blocks, runs, chunk_size, training) -> dict:
  return dict(blocks=blocks, runs=[[int(n), str(name)] for n, name in runs],
              chunk_size=chunk_size, training=training)


def _store_whole_step(spec, blocks, runs, chunk_size, training, value, use_cache):
  if use_cache:
    cached(spec, "whole step", _whole_step_extra(blocks, runs, chunk_size, training),
           lambda: value)


def planned_step(spec: StackSpec, blocks: int, runs, chunk_size=None, training=True):
  """(step, abstract arguments, concrete(), compile remat) of a planned stack: the training
  step of `blocks` blocks in `runs` ((blocks, candidate name) pairs in block order, what a
  Plan's runs say), or the inference forward chunked by `chunk_size` (`runs` empty). The
  compile remat is "offload" where a run offloads (its compiler options), else "none"."""
  from jevo.plan.candidates import by_name
  if not training:
    remat = "none"
  elif len(runs) == 1:
    remat = by_name(runs[0][1]).stack_remat()
  else:
    remat = tuple((n, by_name(name).stack_remat()) for n, name in runs)
  offload = training and any(by_name(name).remat == "offload" for _, name in runs)
  fn, args, concrete = stack_step(spec, blocks, remat, chunk_size, training)
  return fn, args, concrete, "offload" if offload else "none"


def whole_step_bytes(spec: StackSpec, blocks: int, runs, chunk_size=None, training=True, *,
                     use_cache: bool = True) -> dict:
  """XLA's memory analysis of the whole planned step (`planned_step`'s). Returns `bytes`
  (device memory: temporaries, arguments and outputs, as `_fit` counts them) and `compile_s`
  (how long the compile took when it ran; a cached figure takes no compile)."""
  def compute():
    fn, args, _, remat = planned_step(spec, blocks, runs, chunk_size, training)
    start = time.perf_counter()
    temp, io = _device_bytes(compile_fn(fn, args, remat))
    return dict(bytes=temp + io, compile_s=time.perf_counter() - start)

  return cached(spec, "whole step", _whole_step_extra(blocks, runs, chunk_size, training),
                compute, use_cache)


def whole_step_cached(spec: StackSpec, blocks: int, runs, chunk_size=None, training=True) -> bool:
  """Whether `whole_step_bytes` of this step would read the cache rather than compile."""
  return is_cached(spec, "whole step", _whole_step_extra(blocks, runs, chunk_size, training))


def store_whole_step_bytes(spec: StackSpec, blocks: int, runs, chunk_size, training, nbytes: int,
                           compile_s: float, use_cache: bool = True) -> dict:
  """Keeps XLA's analysis of the whole step found elsewhere (the device check's child compiled
  it) as `whole_step_bytes`' own; returns it in that form."""
  value = dict(bytes=int(nbytes), compile_s=float(compile_s))
  _store_whole_step(spec, blocks, runs, chunk_size, training, value, use_cache)
  return value


def device_peak_cached(spec: StackSpec, blocks: int, runs, chunk_size=None,
                       training=True) -> bool:
  """Whether `device_peak` of this step would read the cache rather than run it."""
  return is_cached(spec, "device peak", _whole_step_extra(blocks, runs, chunk_size, training))


def device_peak(spec: StackSpec, blocks: int, runs, chunk_size=None, training=True, *,
                use_cache: bool = True) -> dict:
  """The allocator's peak for the whole planned step, measured in a fresh process
  (`jevo.plan.device_peak`): `bytes` (everything the process held at its peak: parameters,
  inputs, the step's buffers, and whatever compiling and autotuning the step took, since a
  user's process pays those too) and `seconds`; or `error` where it could not be measured.
  Failures are not cached."""
  from jevo.plan import device_peak as child
  return cached(spec, "device peak", _whole_step_extra(blocks, runs, chunk_size, training),
                lambda: child.measure_in_fresh_process(spec, blocks, runs, chunk_size, training),
                use_cache, keep=lambda value: "error" not in value)
