"""Evoformer attention: the public op, its backends and the DeepSpeed-compatible entry point."""

from jevo.ops.attention import evoformer_attention, resolve_implementation
from jevo.ops.ds4sci import DS4Sci_EvoformerAttention
from jevo.ops.export import export_disabled_checks

__all__ = ["DS4Sci_EvoformerAttention", "evoformer_attention", "export_disabled_checks",
           "resolve_implementation"]
