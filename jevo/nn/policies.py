"""Names that jevo's modules give to values, and `jax.checkpoint` policies over them.

Any policy here (or any `jax.checkpoint` policy) can be a stack's `remat`:

    stack = jevo.nn.EvoformerStack(48, remat=jevo.nn.policies.save_linear_outputs, rngs=...)

Each block of the stack is then recomputed in the backward pass from what the policy keeps.
Inputs of a block are always kept, whatever the policy.

- `save_block_inputs`: only each block's inputs; the same as `remat="block"`.
- `offload_block_inputs`: each block's inputs in pinned host memory, nothing on the device; how
  `remat="offload"` runs under DAP (`jevo.parallel`). A one-device stack with `remat="offload"`
  uses its own scan, which fetches the inputs one block ahead instead.
- `save_linear_outputs`: every linear layer's output (`LINEAR_OUTPUT_NAME`). The linear layers
  compute their products in a custom VJP (`jevo.ops.dense.dense`), which
  `jax.checkpoint_policies.dots_saveable` does not see as a product.
- `save_all_products`: `dots_saveable` (the triangle multiplications', the outer product
  mean's and the global attention's contractions) and every linear layer's output: all matrix
  products, so that the backward pass recomputes only elementwise work and attention.
"""

from __future__ import annotations

import jax

# The name of every linear layer's output (`jax.ad_checkpoint.checkpoint_name`).
from jevo.ops.dense import LINEAR_OUTPUT_NAME

# The names of each block's inputs (m, z) inside a stack's scanned body.
BLOCK_INPUT_NAMES = ("jevo_block_input_m", "jevo_block_input_z")

save_block_inputs = jax.checkpoint_policies.save_only_these_names(*BLOCK_INPUT_NAMES)

offload_block_inputs = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=list(BLOCK_INPUT_NAMES),
    offload_src="device", offload_dst="pinned_host")

save_linear_outputs = jax.checkpoint_policies.save_only_these_names(LINEAR_OUTPUT_NAME)

save_all_products = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable, save_linear_outputs)

__all__ = ["BLOCK_INPUT_NAMES", "LINEAR_OUTPUT_NAME", "offload_block_inputs",
           "save_all_products", "save_block_inputs", "save_linear_outputs"]
