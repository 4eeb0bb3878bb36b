"""An independent NumPy (float64) Evoformer block, written from the AlphaFold 2 supplement.

The test oracle for jevo.nn. Parameters are one block in AlphaFold's haiku layout and names
(`"<scope>//<param>"`, e.g. `"msa_row_attention_with_pair_bias/attention//query_w"` of shape
`[c_m, H, D]`), so the same arrays go through jevo's AlphaFold converter into jevo's modules.
Masking follows jevo's conventions: masked keys get no weight, a fully masked attention row
gives 0, and transitions leave padded positions unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

EVOFORMER_PREFIX = "alphafold/alphafold_iteration/evoformer/evoformer_iteration"
EXTRA_MSA_PREFIX = "alphafold/alphafold_iteration/evoformer/extra_msa_stack"


@dataclass(frozen=True)
class Sizes:
  """A block's sizes, named as in the supplement (AlphaFold's values as defaults)."""

  c_m: int = 256
  c_z: int = 128
  heads_msa: int = 8
  dim_msa: int = 32
  heads_pair: int = 4
  dim_pair: int = 32
  c_opm: int = 32
  c_mul: int = 128
  n_transition: int = 4

  def block_kwargs(self) -> dict:
    """The same sizes as keyword arguments of jevo's EvoformerBlock / ExtraMSABlock."""
    return dict(num_heads_msa=self.heads_msa, c_hidden_msa_att=self.dim_msa,
                num_heads_pair=self.heads_pair, c_hidden_pair_att=self.dim_pair,
                c_hidden_opm=self.c_opm, c_hidden_mul=self.c_mul, transition_n=self.n_transition)


# Small, mutually distinct sizes, so that a mixed-up axis shows up as a shape error.
TINY = Sizes(c_m=16, c_z=12, heads_msa=2, dim_msa=8, heads_pair=3, dim_pair=4, c_opm=5, c_mul=6,
             n_transition=2)


# ------------------------------------------------------------------ parameter names and shapes


def block_param_shapes(s: Sizes, *, extra: bool) -> dict[str, tuple[int, ...]]:
  """AlphaFold's names and per-block shapes of one Evoformer (or extra-MSA) block."""
  shapes: dict[str, tuple[int, ...]] = {}

  def ln(scope, n):
    shapes[f"{scope}//scale"] = (n,)
    shapes[f"{scope}//offset"] = (n,)

  def lin(scope, n_in, n_out):
    shapes[f"{scope}//weights"] = (n_in, n_out)
    shapes[f"{scope}//bias"] = (n_out,)

  def att(scope, c, h, d, *, global_kv=False):
    kv = (c, d) if global_kv else (c, h, d)
    shapes.update({f"{scope}//query_w": (c, h, d), f"{scope}//key_w": kv,
                   f"{scope}//value_w": kv, f"{scope}//gating_w": (c, h, d),
                   f"{scope}//gating_b": (h, d), f"{scope}//output_w": (h, d, c),
                   f"{scope}//output_b": (c,)})

  row = "msa_row_attention_with_pair_bias"
  ln(f"{row}/query_norm", s.c_m)
  ln(f"{row}/feat_2d_norm", s.c_z)
  shapes[f"{row}//feat_2d_weights"] = (s.c_z, s.heads_msa)
  att(f"{row}/attention", s.c_m, s.heads_msa, s.dim_msa)
  col = "msa_column_global_attention" if extra else "msa_column_attention"
  ln(f"{col}/query_norm", s.c_m)
  att(f"{col}/attention", s.c_m, s.heads_msa, s.dim_msa, global_kv=extra)
  for scope, c in (("msa_transition", s.c_m), ("pair_transition", s.c_z)):
    ln(f"{scope}/input_layer_norm", c)
    lin(f"{scope}/transition1", c, s.n_transition * c)
    lin(f"{scope}/transition2", s.n_transition * c, c)
  ln("outer_product_mean/layer_norm_input", s.c_m)
  lin("outer_product_mean/left_projection", s.c_m, s.c_opm)
  lin("outer_product_mean/right_projection", s.c_m, s.c_opm)
  shapes["outer_product_mean//output_w"] = (s.c_opm, s.c_opm, s.c_z)
  shapes["outer_product_mean//output_b"] = (s.c_z,)
  for scope in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming"):
    ln(f"{scope}/layer_norm_input", s.c_z)
    for name in ("left_projection", "right_projection", "left_gate", "right_gate"):
      lin(f"{scope}/{name}", s.c_z, s.c_mul)
    ln(f"{scope}/center_layer_norm", s.c_mul)
    lin(f"{scope}/output_projection", s.c_mul, s.c_z)
    lin(f"{scope}/gating_linear", s.c_z, s.c_z)
  for scope in ("triangle_attention_starting_node", "triangle_attention_ending_node"):
    ln(f"{scope}/query_norm", s.c_z)
    shapes[f"{scope}//feat_2d_weights"] = (s.c_z, s.heads_pair)
    att(f"{scope}/attention", s.c_z, s.heads_pair, s.dim_pair)
  return shapes


def _random_array(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
  # Every array random (jevo zero-initialises output projections and gates, which would hide
  # errors), scaled so that activations stay of order one.
  if name.endswith("//scale"):
    return 1.0 + 0.2 * rng.standard_normal(shape)
  if name.endswith(("//offset", "//bias", "//output_b", "//gating_b")):
    return 0.2 * rng.standard_normal(shape)
  fan_in = int(np.prod(shape[:2])) if name.endswith(("//output_w",)) else shape[0]
  return rng.standard_normal(shape) / np.sqrt(fan_in)


def random_block_params(rng: np.random.Generator, s: Sizes, *, extra: bool) -> dict:
  """One block's parameters in AlphaFold's layout, all random (float64)."""
  return {name: _random_array(rng, name, shape)
          for name, shape in block_param_shapes(s, extra=extra).items()}


def random_stack_npz_dict(rng: np.random.Generator, s: Sizes, num_blocks: int, *,
                          extra: bool) -> dict[str, np.ndarray]:
  """A stack in `params_model_*.npz` layout: full names, blocks on the leading axis, float32."""
  prefix = EXTRA_MSA_PREFIX if extra else EVOFORMER_PREFIX
  blocks = [random_block_params(rng, s, extra=extra) for _ in range(num_blocks)]
  return {f"{prefix}/{name}": np.stack([b[name] for b in blocks]).astype(np.float32)
          for name in blocks[0]}


def block_from_npz_dict(arrays: dict[str, np.ndarray], index: int, *, extra: bool) -> dict:
  """Block `index` of a stacked npz dict, with names relative to the stack (float64)."""
  prefix = (EXTRA_MSA_PREFIX if extra else EVOFORMER_PREFIX) + "/"
  return {k[len(prefix):]: np.asarray(v[index], np.float64) for k, v in arrays.items()
          if k.startswith(prefix)}


# ------------------------------------------------------------------ building blocks


def layer_norm(p, scope, x, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p[f"{scope}//scale"] + p[f"{scope}//offset"]


def linear(p, scope, x):
  return x @ p[f"{scope}//weights"] + p[f"{scope}//bias"]


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def masked_softmax(logits, valid):
  """Softmax over the last axis restricted to `valid`; all-invalid rows give zeros."""
  logits = np.where(valid, logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  w = np.where(valid, np.exp(logits - top), 0.0)
  total = w.sum(-1, keepdims=True)
  return w / np.where(total > 0, total, 1.0)


def gated_self_attention(p, scope, x, mask, bias=None):
  """Alg. 7/8/13 lines 2-7 on x [rows r, positions i, c]: each row attends along i.

  mask [r, j] over keys; bias [h, i, j] shared by all rows.
  """
  q = np.einsum("ric,chd->rihd", x, p[f"{scope}//query_w"])
  k = np.einsum("rjc,chd->rjhd", x, p[f"{scope}//key_w"])
  v = np.einsum("rjc,chd->rjhd", x, p[f"{scope}//value_w"])
  g = sigmoid(np.einsum("ric,chd->rihd", x, p[f"{scope}//gating_w"]) + p[f"{scope}//gating_b"])
  logits = np.einsum("rihd,rjhd->rhij", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias[None]
  a = masked_softmax(logits, mask[:, None, None, :])
  o = g * np.einsum("rhij,rjhd->rihd", a, v)
  return np.einsum("rihd,hdc->ric", o, p[f"{scope}//output_w"]) + p[f"{scope}//output_b"]


# ------------------------------------------------------------------ Algorithms 7-19


def msa_row_attention_with_pair_bias(p, m, z, msa_mask):
  """Alg. 7: m [s, i, c_m], z [i, j, c_z], msa_mask [s, i]."""
  scope = "msa_row_attention_with_pair_bias"
  x = layer_norm(p, f"{scope}/query_norm", m)
  b = np.einsum("ijc,ch->hij", layer_norm(p, f"{scope}/feat_2d_norm", z),
                p[f"{scope}//feat_2d_weights"])
  return gated_self_attention(p, f"{scope}/attention", x, msa_mask, b)


def msa_column_attention(p, m, msa_mask):
  """Alg. 8: attention over sequences s within every column i."""
  scope = "msa_column_attention"
  x = layer_norm(p, f"{scope}/query_norm", m).transpose(1, 0, 2)
  out = gated_self_attention(p, f"{scope}/attention", x, msa_mask.T)
  return out.transpose(1, 0, 2)


def msa_column_global_attention(p, m, msa_mask):
  """Alg. 19: one mean query per column i attends over sequences t (one shared k/v head)."""
  scope = "msa_column_global_attention"
  a = f"{scope}/attention"
  x = layer_norm(p, f"{scope}/query_norm", m)                        # [s, i, c]
  w = msa_mask[..., None].astype(np.float64)
  q_mean = (w * x).sum(0) / (w.sum(0) + 1e-10)                       # [i, c]
  q = np.einsum("ic,chd->ihd", q_mean, p[f"{a}//query_w"])
  k = np.einsum("tic,cd->tid", x, p[f"{a}//key_w"])
  v = np.einsum("tic,cd->tid", x, p[f"{a}//value_w"])
  logits = np.einsum("ihd,tid->iht", q, k) / np.sqrt(q.shape[-1])
  att = masked_softmax(logits, msa_mask.T[:, None, :])
  avg = np.einsum("iht,tid->ihd", att, v)
  g = sigmoid(np.einsum("sic,chd->sihd", x, p[f"{a}//gating_w"]) + p[f"{a}//gating_b"])
  return np.einsum("sihd,hdc->sic", g * avg[None], p[f"{a}//output_w"]) + p[f"{a}//output_b"]


def transition(p, scope, x, mask):
  """Alg. 9 / 15: LayerNorm, Linear(n c), relu, Linear(c); zero update at padding."""
  h = np.maximum(linear(p, f"{scope}/transition1", layer_norm(p, f"{scope}/input_layer_norm", x)),
                 0.0)
  return linear(p, f"{scope}/transition2", h) * mask[..., None]


def outer_product_mean(p, m, msa_mask):
  """Alg. 10, normalised by the number of valid sequence pairs + 1e-3 (as AlphaFold does)."""
  scope = "outer_product_mean"
  w = msa_mask[..., None].astype(np.float64)
  x = layer_norm(p, f"{scope}/layer_norm_input", m)
  a = w * linear(p, f"{scope}/left_projection", x)
  b = w * linear(p, f"{scope}/right_projection", x)
  outer = np.einsum("sic,sje->ijce", a, b)
  o = np.einsum("ijce,cez->ijz", outer, p[f"{scope}//output_w"]) + p[f"{scope}//output_b"]
  return o / (1e-3 + np.einsum("sic,sjc->ijc", w, w))


def triangle_multiplication(p, z, pair_mask, *, outgoing):
  """Alg. 11 (outgoing: sum_k a_ik b_jk) and Alg. 12 (incoming: sum_k a_ki b_kj).

  AlphaFold stores the incoming update's `a` under `right_*` and its `b` under `left_*`.
  """
  scope = f"triangle_multiplication_{'outgoing' if outgoing else 'incoming'}"
  x = layer_norm(p, f"{scope}/layer_norm_input", z)
  w = pair_mask[..., None].astype(np.float64)
  left = w * sigmoid(linear(p, f"{scope}/left_gate", x)) * linear(p, f"{scope}/left_projection", x)
  right = w * sigmoid(linear(p, f"{scope}/right_gate", x)) * linear(p, f"{scope}/right_projection",
                                                                    x)
  if outgoing:
    a, b = left, right
    t = np.einsum("ikc,jkc->ijc", a, b)
  else:
    a, b = right, left
    t = np.einsum("kic,kjc->ijc", a, b)
  g = sigmoid(linear(p, f"{scope}/gating_linear", x))
  return g * linear(p, f"{scope}/output_projection",
                    layer_norm(p, f"{scope}/center_layer_norm", t))


def triangle_attention(p, z, pair_mask, *, starting):
  """Alg. 13 (row i: z_ij attends z_ik, bias b_jk) and Alg. 14 (column j: z_ij attends z_kj,
  bias b_ki), each with the pair mask over keys."""
  scope = f"triangle_attention_{'starting' if starting else 'ending'}_node"
  if not starting:
    z, pair_mask = z.transpose(1, 0, 2), pair_mask.T
  x = layer_norm(p, f"{scope}/query_norm", z)
  b = np.einsum("jkc,ch->hjk", x, p[f"{scope}//feat_2d_weights"])
  out = gated_self_attention(p, f"{scope}/attention", x, pair_mask, b)
  return out if starting else out.transpose(1, 0, 2)


def evoformer_block(p, m, z, msa_mask, pair_mask, *, extra=False):
  """Alg. 6 lines 2-10 (Alg. 18 with global column attention when `extra`), no dropout."""
  msa_mask = np.asarray(msa_mask, bool)
  pair_mask = np.asarray(pair_mask, bool)
  m = m + msa_row_attention_with_pair_bias(p, m, z, msa_mask)
  if extra:
    m = m + msa_column_global_attention(p, m, msa_mask)
  else:
    m = m + msa_column_attention(p, m, msa_mask)
  m = m + transition(p, "msa_transition", m, msa_mask)
  z = z + outer_product_mean(p, m, msa_mask)
  z = z + triangle_multiplication(p, z, pair_mask, outgoing=True)
  z = z + triangle_multiplication(p, z, pair_mask, outgoing=False)
  z = z + triangle_attention(p, z, pair_mask, starting=True)
  z = z + triangle_attention(p, z, pair_mask, starting=False)
  z = z + transition(p, "pair_transition", z, pair_mask)
  return m, z


# ------------------------------------------------------------------ test inputs


def random_inputs(rng: np.random.Generator, n_seq: int, n_res: int, c_m: int, c_z: int,
                  batch: tuple[int, ...] = ()):
  """Random m, z (float32) and masks with realistic padding.

  The last two residues and the last sequence are padding, other MSA entries are missing at
  random, the first sequence (the query) is complete.
  """
  m = rng.standard_normal(batch + (n_seq, n_res, c_m)).astype(np.float32)
  z = rng.standard_normal(batch + (n_res, n_res, c_z)).astype(np.float32)
  residues = np.ones(batch + (n_res,), bool)
  residues[..., -2:] = False
  msa_mask = (rng.random(batch + (n_seq, n_res)) > 0.25) & residues[..., None, :]
  msa_mask[..., 0, :] = residues
  msa_mask[..., -1, :] = False
  pair_mask = residues[..., :, None] & residues[..., None, :]
  return m, z, msa_mask, pair_mask


def randomize_params(module, seed: int) -> None:
  """Overwrites every parameter of a jevo module with random values of order one / sqrt(fan_in)."""
  import jax.numpy as jnp  # the reference itself needs only NumPy
  from flax import nnx

  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      shape = var.shape
      if path[-1] == "scale":
        value = 1.0 + 0.2 * rng.standard_normal(shape)
      elif path[-1] == "bias":
        value = 0.2 * rng.standard_normal(shape)
      else:
        value = rng.standard_normal(shape) / np.sqrt(shape[-2])
      var[...] = jnp.asarray(value, var.dtype)


@pytest.fixture(autouse=True)
def full_precision_matmuls():
  """Float32 matrix products in full precision (GPUs default to TF32) while a test runs.

  Autouse in every test module that imports it.
  """
  import jax

  with jax.default_matmul_precision("highest"):
    yield


def assert_close(actual, expected, what: str, tol: float) -> None:
  """Agreement to `tol` relative to each value and to the largest: |a - e| <= tol * (|e| +
  max |e|), elementwise, with equal shapes and finite values."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: not finite"
  scale = np.abs(expected).max(initial=1.0)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)
