"""Inference plans that chunk only the sub-modules that need it (`plan_stack`'s default for
inference, `per_sub_module=True`): what each of a block's sub-modules costs alone at a chunk
size (XLA's memory analysis of it compiled alone, and its time), and the choice of a chunk size
per sub-module under a memory limit.

The model: a block's forward runs its sub-modules one after another, so its peak is a fixed
part (the stack's parameters, m, z and the step's own buffers) plus the largest working memory
of any one sub-module, and its time the sum of theirs. The fixed part comes from the whole
unchunked stack's peak (checked, or `costs.inference_cost(spec, None)`'s prediction) less the
largest sub-module's working memory unchunked. Each sub-module then takes the largest chunk
(time grows as the chunk shrinks) whose working memory fits beside the fixed part; the
planner's check of the whole step corrects what this model gets wrong.

What it costs: one compile of each sub-module whole (its memory only), and for the few that do
not fit whole, one per chunk size tried and one timing whole and chunked (where the unchunked
stack could not be timed, every sub-module is timed as planned instead); a chunk size at or
above a sub-module's chunked axis is the whole sub-module and is not tried.
"""

from __future__ import annotations

import functools
import math

from jevo.nn._common import BLOCK_SUB_MODULES
from jevo.plan import costs as cst

# How each sub-module is called on the block's (m, z), without masks, chunked by cs.
_CALLS = {
    "msa_row_attention": lambda b, m, z, cs: b.msa_row_attention(m, z, None, chunk_size=cs),
    "msa_column_attention": lambda b, m, z, cs: b.msa_column_attention(m, None, chunk_size=cs),
    "msa_transition": lambda b, m, z, cs: b.msa_transition(m, None, chunk_size=cs),
    "outer_product_mean": lambda b, m, z, cs: b.outer_product_mean(m, None, chunk_size=cs),
    "triangle_multiplication_outgoing":
        lambda b, m, z, cs: b.triangle_multiplication_outgoing(z, None, chunk_size=cs),
    "triangle_multiplication_incoming":
        lambda b, m, z, cs: b.triangle_multiplication_incoming(z, None, chunk_size=cs),
    "triangle_attention_starting_node":
        lambda b, m, z, cs: b.triangle_attention_starting_node(z, None, chunk_size=cs),
    "triangle_attention_ending_node":
        lambda b, m, z, cs: b.triangle_attention_ending_node(z, None, chunk_size=cs),
    "pair_transition": lambda b, m, z, cs: b.pair_transition(z, None, chunk_size=cs),
}
assert tuple(_CALLS) == BLOCK_SUB_MODULES


# The axis each sub-module is chunked along: MSA rows for the row attention, residues otherwise.
_CHUNKED_AXIS = dict.fromkeys(BLOCK_SUB_MODULES, "n_res")
_CHUNKED_AXIS["msa_row_attention"] = "n_seq"


def chunked_axis_length(spec: cst.StackSpec, name: str) -> int:
  """The length of the axis `name` is chunked along: a chunk this large or larger is whole."""
  return getattr(spec, _CHUNKED_AXIS[name])


@functools.lru_cache(maxsize=32)
def _compiled(spec: cst.StackSpec, name: str, chunk_size):
  """The compiled forward of the sub-module alone, kept for this process so that timing a
  sub-module after reading its memory does not compile it again."""
  from flax import nnx
  _, graphdef, params, rest, m, z = cst.abstract_block(spec, training=False)

  def fn(params, m, z):
    return _CALLS[name](nnx.merge(graphdef, params, rest), m, z, chunk_size)

  return cst.compile_fn(fn, (params, m, z), "none")


# The one stack's inputs `measurement_inputs` keeps: {spec: (params, m, z)}.
_inputs: dict = {}


def measurement_inputs(spec: cst.StackSpec):
  """(real block parameters, m, z) on the device, made once for every sub-module timed: made
  anew for each, the block's initialisers' compile and the inputs (z alone is 4 GiB at 4096
  residues) took most of each timing. Kept until `release_measurement_inputs()`."""
  if spec not in _inputs:
    _inputs.clear()
    _inputs[spec] = make_measurement_inputs(spec)
  return _inputs[spec]


def make_measurement_inputs(spec: cst.StackSpec):
  import jax
  from flax import nnx
  from jevo.bench.implementations import device_normal
  make, _, _, _, m, z = cst.abstract_block(spec, training=False)
  params = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1])()
  return params, device_normal(0, m.shape, m.dtype), device_normal(1, z.shape, z.dtype)


def release_measurement_inputs():
  """Frees `measurement_inputs`' device buffers (once the sub-modules are timed)."""
  _inputs.clear()


def sub_module_cost(spec: cst.StackSpec, name: str, chunk_size, *, measure: bool,
                    use_cache: bool = True) -> dict:
  """{"bytes": working memory, "ms": time} of the block's sub-module `name` alone in inference
  (eval mode) at `chunk_size`: XLA's temporary bytes plus its output's, and its time measured
  on the device (`measure`; `costs.UNMEASURABLE_MS` where it is too large for the device) or
  from XLA's cost analysis."""
  if name not in _CALLS:
    raise ValueError(f"name must be one of {', '.join(BLOCK_SUB_MODULES)}, got {name!r}")

  def compute():
    compiled = _compiled(spec, name, chunk_size)
    analysis = compiled.memory_analysis()
    working = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    if not measure:
      return dict(bytes=working, ms=cst.estimated_ms(compiled))
    ms, why = cst.measured_ms(compiled, lambda: measurement_inputs(spec))
    return dict(bytes=working, ms=ms, **({"not_measured": why} if why else {}))

  return cst.cached(spec, "sub-module", dict(name=name, chunk_size=chunk_size, measure=measure),
                    compute, use_cache,
                    keep=lambda value: value.get("not_measured") != cst.OUT_OF_MEMORY)


def choose_chunks(bytes_of, chunks, room: int, lengths=None):
  """{name: chunk size} for every sub-module: the first of `chunks` (largest first, None =
  whole) whose working memory `bytes_of(name, chunk)` is at most `room`, or None where some
  sub-module fits at no chunk size. Chunk sizes at or above `lengths[name]` (the sub-module's
  chunked axis) are the whole sub-module again and are skipped."""
  sizes = {}
  for name in BLOCK_SUB_MODULES:
    for chunk in chunks:
      if chunk is not None and lengths is not None and chunk >= lengths[name]:
        continue
      if bytes_of(name, chunk) <= room:
        sizes[name] = chunk
        break
    else:
      return None
  return sizes


def mixed_chunks(spec: cst.StackSpec, chunks, whole_peak: int, whole_ms: float, limit: int, *,
                 measure: bool, use_cache: bool = True, whole_time_source: str = ""):
  """(chunk sizes by sub-module, predicted peak, predicted ms per block, reasons) of the plan
  that chunks each sub-module by the largest size that fits `limit` (bytes), given the whole
  unchunked stack's peak `whole_peak` and its ms per block `whole_ms`; or a string saying why
  there is none by the model (some sub-module fits at no size, or nothing needs chunking,
  which contradicts a whole step found over the limit). The block's time is `whole_ms` plus
  what chunking adds to each chunked sub-module; where the whole stack was not timed
  (`costs.UNMEASURABLE_MS`: too large for the device, or over the budget, as
  `whole_time_source` says), the sum of every sub-module's time
  alone as planned, which leaves out the block's residual additions; UNMEASURABLE_MS where
  a time it needs could not be measured."""
  def bytes_of(name, chunk):  # memory only: a compile, no timing
    return sub_module_cost(spec, name, chunk, measure=False, use_cache=use_cache)["bytes"]

  def ms_of(name, chunk):
    return sub_module_cost(spec, name, chunk, measure=measure, use_cache=use_cache)["ms"]

  try:
    return _mixed_chunks(spec, chunks, whole_peak, whole_ms, limit, bytes_of, ms_of,
                         whole_time_source.removeprefix("not measured: ") or "not measured")
  finally:
    release_measurement_inputs()


def _mixed_chunks(spec, chunks, whole_peak, whole_ms, limit, bytes_of, ms_of, why_untimed):
  base = {name: bytes_of(name, None) for name in BLOCK_SUB_MODULES}
  fixed = whole_peak - max(base.values())
  lengths = {name: chunked_axis_length(spec, name) for name in BLOCK_SUB_MODULES}
  sizes = choose_chunks(bytes_of, chunks, limit - fixed, lengths)
  if sizes is None:
    return "some sub-module fits at no chunk size by the model"
  if all(chunk is None for chunk in sizes.values()):
    return ("by the model nothing needs chunking, yet the whole step was over the limit in "
            "its check")
  chunked = {name: chunk for name, chunk in sizes.items() if chunk is not None}
  timed_whole = whole_ms != cst.UNMEASURABLE_MS
  if timed_whole:
    added = {name: ms_of(name, chunk) - ms_of(name, None) for name, chunk in chunked.items()}
    ms = whole_ms + sum(added.values())
  else:
    added = {name: ms_of(name, chunk) for name, chunk in chunked.items()}
    ms = sum(ms_of(name, chunk) for name, chunk in sizes.items())
  if not math.isfinite(ms):  # an unmeasurable time: inf, or NaN and -inf from inf - inf
    ms = cst.UNMEASURABLE_MS
  peak = fixed + max(bytes_of(name, chunk) for name, chunk in sizes.items())
  reasons = [f"{name}: chunk_size={chunk}, working memory "
             f"{bytes_of(name, chunk) / 2 ** 20:.1f} MiB"
             + (f" (whole {base[name] / 2 ** 20:.1f} MiB), "
                + (f"{added[name]:+.3f} ms" if timed_whole else f"{added[name]:.3f} ms")
                if chunk is not None else "")
             for name, chunk in sizes.items()]
  if not timed_whole:
    reasons.insert(0, f"the unchunked block is not timed ({why_untimed}): its time is the "
                   "sum of its sub-modules' alone, as planned")
  return chunked, peak, ms, reasons
