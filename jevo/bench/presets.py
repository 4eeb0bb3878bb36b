"""What the profile benchmark runs: presets named after AlphaFold 2's training and inference
stages, each a set of attention cases (the four Evoformer variants at the preset's sizes) and
one whole block."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class AttentionCase:
  """One call of the Evoformer attention op: q, k, v `[B, N, S, H, D]`, a random key mask with
  10% of keys masked, and a pair bias `[B, 1, H, S, S]` when `bias` is set."""

  name: str          # e.g. "msa_row"
  variant: str       # which of the four Evoformer attentions this is
  shape: tuple[int, int, int, int, int]
  bias: bool
  forward_only: bool = False

  @property
  def flops_forward(self) -> int:
    b, n, s, h, d = self.shape
    return 4 * b * n * h * s * s * d  # two matrix products of 2*S*S*D each

  @property
  def logits(self) -> int:
    b, n, s, h, _ = self.shape
    return b * n * h * s * s


@dataclasses.dataclass(frozen=True)
class BlockCase:
  """One Evoformer (or extra-MSA) block in bf16 with fp32 parameters: the forward in eval mode
  (inference, chunked when `chunk_size` is set) and a training step (dropout on, the forward
  recomputed under remat as the 48-block stack runs it, gradients of parameters and inputs)."""

  name: str
  n_seq: int
  n_res: int
  extra_msa: bool = False
  block_kwargs: dict = dataclasses.field(default_factory=dict)
  chunk_size: int | None = None
  forward_only: bool = False


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  description: str
  attention: tuple[AttentionCase, ...]
  block: BlockCase | None
  notes: tuple[str, ...] = ()

  def attention_case(self, name: str) -> AttentionCase:
    for case in self.attention:
      if case.name == name:
        return case
    raise ValueError(f"case must be one of {[c.name for c in self.attention]} for preset "
                     f"{self.name!r}, got {name!r}")


def _evoformer_attention_cases(n_seq, n_res, *, msa_heads=8, msa_head_dim=32, pair_heads=4,
                               pair_head_dim=32, forward_only=False, column=True):
  cases = [AttentionCase("msa_row", "MSA row attention with pair bias",
                         (1, n_seq, n_res, msa_heads, msa_head_dim), True, forward_only)]
  if column:
    cases.append(AttentionCase("msa_col", "MSA column attention (mask only)",
                               (1, n_res, n_seq, msa_heads, msa_head_dim), False, forward_only))
  # The two triangle attentions are the same op on the pair and on the transposed pair.
  cases += [AttentionCase("tri_start", "triangle attention, starting node",
                          (1, n_res, n_res, pair_heads, pair_head_dim), True, forward_only),
            AttentionCase("tri_end", "triangle attention, ending node (transposed pair)",
                          (1, n_res, n_res, pair_heads, pair_head_dim), True, forward_only)]
  return tuple(cases)


def evoformer_preset(name: str, n_seq: int, n_res: int, description: str = "") -> Preset:
  """AlphaFold 2's Evoformer sizes (c_m 256, c_z 128, 8 x 32 MSA heads, 4 x 32 pair heads)."""
  return Preset(name, description or f"Evoformer at N_seq {n_seq} x N_res {n_res}",
                _evoformer_attention_cases(n_seq, n_res),
                BlockCase("evoformer_block", n_seq, n_res))


# Channels small enough that the whole preset, compiles included, runs in about a minute on two
# CPU cores; the code paths are those of the GPU presets.
_CPU_SMALL_BLOCK = dict(c_m=64, c_z=32, num_heads_msa=4, c_hidden_msa_att=16, num_heads_pair=2,
                        c_hidden_pair_att=16, c_hidden_opm=16, c_hidden_mul=32)

PRESETS = {
    "cpu-small": Preset(
        "cpu-small", "small sizes and channels for a CPU (the default without a GPU)",
        _evoformer_attention_cases(16, 32, msa_heads=4, msa_head_dim=16, pair_heads=2,
                                   pair_head_dim=16),
        BlockCase("evoformer_block", 16, 32, block_kwargs=_CPU_SMALL_BLOCK)),
    "af2-initial": evoformer_preset("af2-initial", 128, 256,
                                    "AlphaFold 2 initial training (N_seq 128, N_res 256)"),
    "af2-finetune": evoformer_preset("af2-finetune", 512, 384,
                                     "AlphaFold 2 fine-tuning (N_seq 512, N_res 384)"),
    "extra-msa": Preset(
        "extra-msa", "the extra-MSA stack (N_extra 5120, N_res 384, c_e 64, 8 x 8 heads)",
        _evoformer_attention_cases(5120, 384, msa_head_dim=8, column=False),
        BlockCase("extra_msa_block", 5120, 384, extra_msa=True),
        notes=("The extra-MSA block's column attention is global attention "
               "(MSAColumnGlobalAttention), not this op, so it is timed only inside the block.",)),
    "long-inference": Preset(
        "long-inference", "inference on a long sequence (N_seq 128, N_res 2048), forward only, "
        "the block chunked (chunk_size 128)",
        _evoformer_attention_cases(128, 2048, forward_only=True),
        BlockCase("evoformer_block", 128, 2048, chunk_size=128, forward_only=True)),
}
# The attention kernels' reference cases (AlphaFold 2's shapes, one process each), without a
# block: what a change to the kernels is measured with.
PRESETS["kernels"] = Preset(
    "kernels", "the attention kernels' reference cases: MSA row / column at 512 x 384, triangle "
    "attention at 384, 768 and 2048 (forward only), extra-MSA row attention; no block",
    (AttentionCase("msa_row", "MSA row attention with pair bias", (1, 512, 384, 8, 32), True),
     AttentionCase("msa_col", "MSA column attention (mask only)", (1, 384, 512, 8, 32), False),
     AttentionCase("tri_384", "triangle attention", (1, 384, 384, 4, 32), True),
     AttentionCase("tri_768", "triangle attention", (1, 768, 768, 4, 32), True),
     AttentionCase("extra_msa_row", "extra-MSA row attention with pair bias",
                   (1, 5120, 384, 8, 8), True),
     AttentionCase("tri_2048", "triangle attention", (1, 2048, 2048, 4, 32), True, True)),
    None)
GPU_DEFAULT = "af2-finetune"
CPU_DEFAULT = "cpu-small"


def parse_shape(text: str) -> tuple[int, int]:
  """'256x512' -> (256, 512), N_seq x N_res; ValueError with the expected form otherwise."""
  match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if not match or min(int(g) for g in match.groups()) <= 0:
    raise ValueError(f"a shape is N_SEQxN_RES with positive sizes, e.g. 512x384, got {text!r}")
  return int(match.group(1)), int(match.group(2))


def preset_for_shape(text: str) -> Preset:
  n_seq, n_res = parse_shape(text)
  return evoformer_preset(f"shape-{n_seq}x{n_res}", n_seq, n_res)


def get_preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
  return PRESETS[name]


def resolve(name: str) -> Preset:
  """A preset by name, or the Evoformer preset of a `shape-NxR` name (what `--shape` makes)."""
  if name.startswith("shape-"):
    return preset_for_shape(name.removeprefix("shape-"))
  return get_preset(name)
