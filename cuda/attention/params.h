// Parameters of one attention call, with explicit strides so that the kernels never assume a
// layout the caller did not give. All offsets are 64-bit: triangle attention at N_res = 4096 has
// tensors of more than 2^31 elements.
#pragma once

#include <cstdint>

namespace jevo {

// Layout of q, k, v, o, dq, dk, dv, do: [B * N, S, H, D] contiguous (the [*B, N, S, H, D] of the
// op with leading dims flattened), so a token row is H * D elements apart.
struct AttentionShape {
  int64_t batch;      // B (flattened leading dims)
  int64_t n;          // N, the axis attention runs independently over
  int64_t seq;        // S, the attended axis (queries = keys)
  int64_t heads;      // H
  int64_t head_dim;   // D (the kernel may run a padded head dim >= D)
};

struct FwdParams {
  AttentionShape shape;
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;  // [B, N, S] key mask (nonzero = attend) or nullptr
  const void* bias;     // [B, H, S, S] in the element type, or nullptr
  void* o;
  float* lse;           // [B, N, H, S] natural-log sum of exp of the scaled, biased logits
  float scale;
  // [B, N, S, H, D] bfloat16, or nullptr: the fp32 output minus o (its rounding to the element
  // type). Written under differentiation only, so that the backward's delta = rowsum(dO * O) sees
  // O with 8 more significant bits than the element type holds.
  void* o_residual;
};

struct BwdParams {
  AttentionShape shape;
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;
  const void* bias;
  const void* dout;
  const float* lse;     // from the forward
  const float* delta;   // [B, N, H, S]: rowsum(dO * O)
  void* dq;
  void* dk;
  void* dv;
  void* dbias;          // [B, H, S, S] in the element type, or nullptr when there is no bias
  float* dbias_partial; // [chunks, B, H, S, S] fp32 scratch; chunks = n_chunks
  int64_t n_chunks;     // N is split into this many chunks for the bias-gradient reduction
  float scale;
};

}  // namespace jevo
