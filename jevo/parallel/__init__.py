"""Dynamic Axial Parallelism (FastFold's DAP) for jevo's Evoformer blocks and stacks.

One call runs an existing `jevo.nn` module (same parameters, same results, same dropout masks
for the same key) spread over the devices of one mesh axis:

    >>> import jax, jevo.parallel
    >>> mesh = jevo.parallel.make_dap_mesh()          # all devices (of all processes), axis "dap"
    >>> @jax.jit
    ... def forward(m, z, msa_mask, pair_mask):
    ...   return jevo.parallel.dap_evoformer_stack(stack, m, z, msa_mask, pair_mask, mesh=mesh)

- `dap_evoformer_stack(stack, m, z, msa_mask, pair_mask, *, mesh, axis, rngs, chunk_size)`:
  an `EvoformerStack` or `ExtraMSAStack` (`dap_extra_msa_stack` insists on the latter);
- `dap_evoformer_block(block, ...)`: one `EvoformerBlock` or `ExtraMSABlock`;
- `make_dap_mesh(num_devices, axis=...)`: a 1-D mesh. `mesh=None` uses the mesh set with
  `jax.set_mesh`. Auto and Explicit mesh axes both work; other mesh axes are not used.

How: inside `jax.shard_map`, the MSA `m` is split along sequences for row-wise work (MSA row
attention) and along residues for column-wise work (column attention, transition, outer product
mean); the pair `z` along its rows (both triangle multiplications, starting-node attention) or its
columns (ending-node attention, transition). `all_to_all` switches layouts; `all_gather` brings
only what every device needs whole: attention biases `[H, N_res, N_res]` and the outer product
mean's low-channel right projection (with its MSA mask). The triangle multiplications pass
their projections around a ring of devices (`ppermute`) block by block instead: the outgoing
one brings every device's rows of its right projection in turn; the incoming one, which sums
over the pair rows, passes partial sums of each output block along until they reach the device
that holds those rows. Backward communication is JAX's transpose of these (all_to_all,
reduce-scatter, all_gather) and, for the rings, rings again. Each shard runs the modules' own
code: their `update` methods, given the gather, and the triangle multiplication's
`projections`, `combine` and `finish`; attention is `jevo.evoformer_attention` on its rows.

Per block and device, with n devices: two all_to_alls of the MSA shard, two of the pair shard,
all_gathers of 3 attention biases and the outer product mean's right projection, and two rings
of n - 1 sends of a `[N_res/n, N_res, c_hidden]` block each. Memory per device: 1/n of m and z
and of every activation, plus those gathered tensors and two blocks per ring.

Across hosts: call `jax.distributed.initialize()` on every process first; `make_dap_mesh()`
then spans the devices of all processes and the same call runs unchanged. Inputs are global
arrays (e.g. `jax.make_array_from_process_local_data`, or the same NumPy arrays on every
process).

N_seq or N_res not divisible by n: padded with masked positions, cut off afterwards. Where no
padding is needed the outputs stay split along N_seq / pair rows; otherwise cutting the padding
off may make the compiler gather them (on an Explicit mesh axis it does).
"""

from jevo.parallel.block import dap_evoformer_block
from jevo.parallel.mesh import make_dap_mesh
from jevo.parallel.stack import dap_evoformer_stack, dap_extra_msa_stack

__all__ = ["dap_evoformer_block", "dap_evoformer_stack", "dap_extra_msa_stack", "make_dap_mesh"]
