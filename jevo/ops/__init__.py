"""Evoformer attention: the public op, its backends and the DeepSpeed-compatible entry point."""

from jevo.ops.attention import evoformer_attention, resolve_implementation
from jevo.ops.ds4sci import DS4Sci_EvoformerAttention

__all__ = ["DS4Sci_EvoformerAttention", "evoformer_attention", "resolve_implementation"]
