"""Inference plans that chunk only the sub-modules that need it (`plan_stack(...,
per_sub_module=True)`): what each of a block's sub-modules costs alone at a chunk size (XLA's
memory analysis of it compiled alone, and its time), and the choice of a chunk size per
sub-module under a memory limit.

The model: a block's forward runs its sub-modules one after another, so its peak is a fixed
part (the stack's parameters, m, z and the step's own buffers) plus the largest working memory
of any one sub-module, and its time the sum of theirs. The fixed part comes from the whole
unchunked stack's cost (`costs.inference_cost(spec, None)`) less the largest sub-module's
working memory unchunked. Each sub-module then takes the largest chunk (time grows as the chunk
shrinks) whose working memory fits beside the fixed part; the planner's check of the whole
step corrects what this model gets wrong.
"""

from __future__ import annotations

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


def sub_module_cost(spec: cst.StackSpec, name: str, chunk_size, *, measure: bool,
                    use_cache: bool = True) -> dict:
  """{"bytes": working memory, "ms": time} of the block's sub-module `name` alone in inference
  (eval mode) at `chunk_size`: XLA's temporary bytes plus its output's, and its time measured
  on the device (`measure`) or from XLA's cost analysis."""
  if name not in _CALLS:
    raise ValueError(f"name must be one of {', '.join(BLOCK_SUB_MODULES)}, got {name!r}")

  def compute():
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jevo.bench.implementations import host_normal
    from jevo.nn import EvoformerBlock, ExtraMSABlock

    kwargs = dict(dict(dtype=jnp.bfloat16), **spec.kwargs())
    c_m, c_z = kwargs.pop("c_m", 256), kwargs.pop("c_z", 128)
    cls = ExtraMSABlock if spec.extra_msa else EvoformerBlock

    def make():
      block = cls(c_m, c_z, rngs=nnx.Rngs(0), **kwargs)
      block.eval()
      return block

    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    m = jax.ShapeDtypeStruct((spec.n_seq, spec.n_res, c_m), jnp.bfloat16)
    z = jax.ShapeDtypeStruct((spec.n_res, spec.n_res, c_z), jnp.bfloat16)

    def fn(params, m, z):
      return _CALLS[name](nnx.merge(graphdef, params, rest), m, z, chunk_size)

    compiled = cst._compile(fn, (params, m, z), "none")
    analysis = compiled.memory_analysis()
    working = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    if not measure:
      return dict(bytes=working, ms=cst._estimated_ms(compiled))
    real_params = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1])()
    args = (real_params, host_normal(0, m.shape, m.dtype), host_normal(1, z.shape, z.dtype))
    return dict(bytes=working, ms=cst.median_ms(compiled, args, 5, warmup=1)["ms"])

  return cst.cached(spec, "sub-module", dict(name=name, chunk_size=chunk_size, measure=measure),
                    compute, use_cache)


def choose_chunks(costs_of, chunks, room: int):
  """{name: chunk size} for every sub-module: the first of `chunks` (largest first, None =
  whole) whose working memory `costs_of(name, chunk)["bytes"]` is at most `room`, or None
  where no chunk size fits."""
  sizes = {}
  for name in BLOCK_SUB_MODULES:
    for chunk in chunks:
      if costs_of(name, chunk)["bytes"] <= room:
        sizes[name] = chunk
        break
    else:
      return None
  return sizes


def mixed_chunks(spec: cst.StackSpec, blocks: int, chunks, whole: cst.Cost, limit: int, *,
                 measure: bool, use_cache: bool = True):
  """(chunk sizes by sub-module, predicted peak, predicted ms per block, reasons) of the plan
  that chunks each sub-module by the largest size that fits `limit` (bytes), given `whole`,
  the unchunked stack's Cost; None where no such plan exists by the model."""
  def costs_of(name, chunk):
    return sub_module_cost(spec, name, chunk, measure=measure, use_cache=use_cache)

  base = {name: costs_of(name, None) for name in BLOCK_SUB_MODULES}
  fixed = whole.peak(blocks) - max(c["bytes"] for c in base.values())
  sizes = choose_chunks(costs_of, chunks, limit - fixed)
  if sizes is None:
    return None
  chosen = {name: costs_of(name, chunk) for name, chunk in sizes.items()}
  ms = whole.ms + sum(chosen[name]["ms"] - base[name]["ms"] for name in BLOCK_SUB_MODULES)
  peak = fixed + max(c["bytes"] for c in chosen.values())
  reasons = [f"{name}: chunk_size={sizes[name]}, working memory "
             f"{chosen[name]['bytes'] / 2 ** 20:.1f} MiB, {chosen[name]['ms']:.3f} ms"
             for name in BLOCK_SUB_MODULES]
  return {k: v for k, v in sizes.items() if v is not None}, peak, ms, reasons
