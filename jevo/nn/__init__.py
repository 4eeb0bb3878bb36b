"""Flax NNX modules of the Evoformer (AlphaFold 2 supplement, Alg. 6-19) on jevo's attention op.

Example:
  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> from jevo.nn import EvoformerStack
  >>> stack = EvoformerStack(2, 32, 16, num_heads_msa=2, c_hidden_msa_att=8, num_heads_pair=2,
  ...                        c_hidden_pair_att=8, c_hidden_opm=4, c_hidden_mul=8,
  ...                        rngs=nnx.Rngs(0))
  >>> m, z = stack(jnp.ones((3, 5, 32)), jnp.ones((5, 5, 16)))

The fused ops the modules use (dense, layer norm, relu) are in `jevo.ops` and need no flax;
`jevo.nn.policies` names the `jax.checkpoint` policies a stack's `remat` can take.
"""

from jevo.nn import policies
from jevo.nn._common import BLOCK_SUB_MODULES
from jevo.nn.attention import GatedAttention, MSAColumnAttention, MSARowAttentionWithPairBias
from jevo.nn.block import EvoformerBlock, ExtraMSABlock
from jevo.nn.global_attention import MSAColumnGlobalAttention
from jevo.nn.outer_product_mean import OuterProductMean
from jevo.nn.policies import LINEAR_OUTPUT_NAME
from jevo.nn.stack import OFFLOAD_COMPILER_OPTIONS, EvoformerStack, ExtraMSAStack
from jevo.nn.transition import Transition
from jevo.nn.triangle_attention import TriangleAttention
from jevo.nn.triangle_multiplication import TriangleMultiplication

__all__ = [
    "BLOCK_SUB_MODULES",
    "EvoformerBlock",
    "EvoformerStack",
    "ExtraMSABlock",
    "ExtraMSAStack",
    "GatedAttention",
    "LINEAR_OUTPUT_NAME",
    "MSAColumnAttention",
    "MSAColumnGlobalAttention",
    "MSARowAttentionWithPairBias",
    "OFFLOAD_COMPILER_OPTIONS",
    "OuterProductMean",
    "Transition",
    "TriangleAttention",
    "TriangleMultiplication",
    "policies",
]
