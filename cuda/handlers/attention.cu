// XLA FFI handlers of the fused Evoformer attention: shape and dtype checks, dispatch on element
// type and head dim, launch on XLA's stream, scratch from XLA's allocator.
//
// Layouts (the Python side flattens leading batch dims and broadcasts mask and bias):
//   q, k, v, o, dout, dq, dk, dv: [B, N, S, H, D], bf16 or f16
//   mask: [B, N, S] bool (True = attend), or an empty array when there is no mask
//   bias, dbias: [B, H, S, S] in the element type, or empty arrays when there is no bias
//   lse, delta: [B, N, H, S] f32
//   o_residual: an optional third result of the forward, [B, N, S, H, D] bf16 (the fp32 output
//     minus o), which the custom_vjp's forward asks for and the inference forward does not
// Attribute `family`: 0 picks the kernel family from the device's compute capability at run
// time (so one exported program runs on A100 and H100 alike); 80 or 90 asks for that family,
// which is an error where it was not built or cannot run. A family that does not implement a
// direction falls back to sm80 for it (today both families implement both).
#include <algorithm>
#include <cstdint>
#include <string>

#include <cutlass/numeric_types.h>

#include "attention/launch.h"
#include "ffi_helpers.h"
#include "handlers/registry.h"
#include "kernels/families.h"


namespace jevo {
namespace {

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

ffi::Error ReadShape(const ffi::AnyBuffer& q, AttentionShape* shape) {
  JEVO_RETURN_IF_ERROR(CheckRank(q, 5, "q"));
  auto d = q.dimensions();
  *shape = AttentionShape{d[0], d[1], d[2], d[3], d[4]};
  if (shape->head_dim % 8 != 0 || shape->head_dim > 128) {
    return ffi::Error::InvalidArgument("jevo attention: head dim must be a multiple of 8 and at "
                                       "most 128, got " + std::to_string(shape->head_dim));
  }
  // The kernels' one-dimensional grids have a CTA per (b * n, head, query tile).
  static_assert(sm80::kBlockM == sm90::kBlockM, "both families tile the queries alike");
  const int64_t tiles = (shape->seq + sm80::kBlockM - 1) / sm80::kBlockM;
  if (!FitsInt(shape->seq) || shape->batch * shape->n * shape->heads * tiles >
                                  std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("jevo attention: q shape " + DimsToString(d) +
                                       " exceeds the kernel's grid limits");
  }
  return ffi::Error::Success();
}

// Checks q, k, v (and the other [B, N, S, H, D] tensors) agree in type and shape.
ffi::Error CheckLike(const ffi::AnyBuffer& ref, const ffi::AnyBuffer& other, const char* name) {
  if (other.element_type() != ref.element_type()) {
    return ffi::Error::InvalidArgument(std::string("jevo attention: ") + name +
                                       " must have the element type of q");
  }
  auto a = ref.dimensions();
  auto b = other.dimensions();
  if (a.size() != b.size() || !std::equal(a.begin(), a.end(), b.begin())) {
    return ffi::Error::InvalidArgument(std::string("jevo attention: ") + name + " must have q's shape " +
                                       DimsToString(a) + ", got " + DimsToString(b));
  }
  if (!Aligned16(other.untyped_data())) {
    return ffi::Error::InvalidArgument(std::string("jevo attention: ") + name + " is not 16-byte aligned");
  }
  return ffi::Error::Success();
}

ffi::Error CheckMaskBias(const AttentionShape& sh, const ffi::AnyBuffer& q, const ffi::AnyBuffer& mask,
                         const ffi::AnyBuffer& bias, bool* has_mask, bool* has_bias) {
  *has_mask = mask.element_count() > 0;
  *has_bias = bias.element_count() > 0;
  if (*has_mask) {
    if (mask.element_type() != ffi::DataType::PRED) {
      return ffi::Error::InvalidArgument("jevo attention: mask must be bool");
    }
    JEVO_RETURN_IF_ERROR(CheckDims(mask, {sh.batch, sh.n, sh.seq}, "mask"));
  }
  if (*has_bias) {
    if (bias.element_type() != q.element_type()) {
      return ffi::Error::InvalidArgument("jevo attention: bias must have the element type of q");
    }
    JEVO_RETURN_IF_ERROR(CheckDims(bias, {sh.batch, sh.heads, sh.seq, sh.seq}, "bias"));
  }
  return ffi::Error::Success();
}

// The smallest padded head dim >= d among kDims; run(Int) launches that instantiation.
template <int... kDims, typename Run>
cudaError_t ByHeadDim(int64_t d, std::integer_sequence<int, kDims...>, Run&& run) {
  cudaError_t err = cudaErrorInvalidValue;
  bool done = false;
  ((done = done || (d <= kDims && ((err = run(std::integral_constant<int, kDims>{})), true))), ...);
  return err;
}

// Whether the sm90 forward runs these inputs: its TMA descriptor of the bias needs 16-byte row
// strides, S % 8 == 0 (sm90::fwd_supports); the sm80 kernel runs the rest.
bool Sm90FwdSupports(const FwdParams& p) { return p.bias == nullptr || p.shape.seq % 8 == 0; }

template <typename Element>
cudaError_t DispatchFwd(Arch arch, const FwdParams& p, cudaStream_t stream) {
  if (arch == Arch::kSm90 && !Sm90FwdSupports(p)) arch = Arch::kSm80;
  return ByHeadDim(p.shape.head_dim, HeadDims{}, [&](auto dim) {
#if JEVO_BUILD_SM90
    if (arch == Arch::kSm90) return run_attention_fwd<Arch::kSm90, Element, decltype(dim)::value>(p, stream);
#endif
    return run_attention_fwd<Arch::kSm80, Element, decltype(dim)::value>(p, stream);
  });
}

// Whether the sm90 backward runs these inputs: its dK/dV kernel loads the bias by TMA, as the
// forward does (S % 8 == 0 with a bias); the sm80 backward runs the rest.
bool Sm90BwdSupports(const BwdParams& p) { return p.bias == nullptr || p.shape.seq % 8 == 0; }

template <typename Element>
cudaError_t DispatchBwd(Arch arch, const BwdParams& p, cudaStream_t stream) {
  if (arch == Arch::kSm90 && !Sm90BwdSupports(p)) arch = Arch::kSm80;
  return ByHeadDim(p.shape.head_dim, HeadDims{}, [&](auto dim) {
#if JEVO_BUILD_SM90
    if (arch == Arch::kSm90) return run_attention_bwd<Arch::kSm90, Element, decltype(dim)::value>(p, stream);
#endif
    return run_attention_bwd<Arch::kSm80, Element, decltype(dim)::value>(p, stream);
  });
}

// The compute capability (major) of the current device, asked once per device.
ffi::Error DeviceMajor(int* major) {
  static int cached[64] = {};
  int device = 0;
  JEVO_RETURN_IF_ERROR(CudaError(cudaGetDevice(&device), "cudaGetDevice"));
  if (device >= 0 && device < 64 && cached[device] > 0) {
    *major = cached[device];
    return ffi::Error::Success();
  }
  JEVO_RETURN_IF_ERROR(CudaError(
      cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device), "compute capability"));
  if (device >= 0 && device < 64) cached[device] = *major;
  return ffi::Error::Success();
}

// The family that runs `direction` (forward or backward) for the `family` attribute.
ffi::Error ChooseFamily(int64_t family, bool forward, Arch* arch) {
  int major = 0;
  JEVO_RETURN_IF_ERROR(DeviceMajor(&major));
  const FamilyInfo* chosen = nullptr;
  if (family == 0) {
    for (const FamilyInfo& f : kFamilies) {  // the newest built family the device runs
      if (f.built && major >= f.min_major && major <= f.max_major) chosen = &f;
    }
  } else {
    for (const FamilyInfo& f : kFamilies) {
      if (static_cast<int64_t>(f.arch) == family) chosen = &f;
    }
    if (chosen == nullptr) {
      return ffi::Error::InvalidArgument("jevo attention: family must be 0 (by device), 80 or 90, "
                                         "got " + std::to_string(family));
    }
    if (!chosen->built) {
      return ffi::Error::InvalidArgument(std::string("jevo attention: the ") + chosen->name +
                                         " kernels were not built into this library (sm_" +
                                         chosen->cuda_arch + " was not among its architectures)");
    }
    if (major < chosen->min_major || major > chosen->max_major) {
      return ffi::Error::InvalidArgument(std::string("jevo attention: the ") + chosen->name +
                                         " kernels cannot run on this device (compute capability " +
                                         std::to_string(major) + ".x)");
    }
  }
  if (chosen == nullptr || !(forward ? chosen->fwd : chosen->bwd)) {
    *arch = Arch::kSm80;  // what every device from sm_80 on runs
  } else {
    *arch = chosen->arch;
  }
  return ffi::Error::Success();
}

// The forward's optional residual result (none, or one bf16 buffer of q's shape); *residual stays
// nullptr when there is none.
ffi::Error ReadResidual(const ffi::AnyBuffer& q, const ffi::RemainingRets& extra, void** residual) {
  *residual = nullptr;
  if (extra.size() == 0) return ffi::Error::Success();
  if (extra.size() > 1) {
    return ffi::Error::InvalidArgument("jevo attention: the forward takes o, lse and at most one "
                                       "more result (o_residual), got " +
                                       std::to_string(2 + extra.size()) + " results");
  }
  ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> res = extra.get<ffi::AnyBuffer>(0);
  if (res.has_error()) return res.error();
  ffi::AnyBuffer& buffer = **res;
  if (buffer.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("jevo attention: o_residual must be bfloat16");
  }
  auto a = q.dimensions();
  auto b = buffer.dimensions();
  if (a.size() != b.size() || !std::equal(a.begin(), a.end(), b.begin())) {
    return ffi::Error::InvalidArgument("jevo attention: o_residual must have q's shape " +
                                       DimsToString(a) + ", got " + DimsToString(b));
  }
  if (!Aligned16(buffer.untyped_data())) {
    return ffi::Error::InvalidArgument("jevo attention: o_residual is not 16-byte aligned");
  }
  *residual = buffer.untyped_data();
  return ffi::Error::Success();
}

ffi::Error AttentionFwdImpl(cudaStream_t stream, float scale, int64_t family, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::AnyBuffer mask, ffi::AnyBuffer bias,
                            ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                            ffi::RemainingRets extra) {
  AttentionShape sh;
  JEVO_RETURN_IF_ERROR(ReadShape(q, &sh));
  JEVO_RETURN_IF_ERROR(CheckLike(q, q, "q"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, k, "k"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, v, "v"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, *o, "o"));
  bool has_mask, has_bias;
  JEVO_RETURN_IF_ERROR(CheckMaskBias(sh, q, mask, bias, &has_mask, &has_bias));
  JEVO_RETURN_IF_ERROR(CheckDims(*lse, {sh.batch, sh.n, sh.heads, sh.seq}, "lse"));
  void* residual;
  JEVO_RETURN_IF_ERROR(ReadResidual(q, extra, &residual));
  if (sh.batch * sh.n * sh.seq * sh.heads == 0) return ffi::Error::Success();
  Arch arch;
  JEVO_RETURN_IF_ERROR(ChooseFamily(family, /*forward=*/true, &arch));

  FwdParams p{sh,
              q.untyped_data(),
              k.untyped_data(),
              v.untyped_data(),
              has_mask ? static_cast<const uint8_t*>(mask.untyped_data()) : nullptr,
              has_bias ? bias.untyped_data() : nullptr,
              o->untyped_data(),
              lse->typed_data(),
              scale,
              residual};
  cudaError_t err;
  switch (q.element_type()) {
    case ffi::DataType::BF16: err = DispatchFwd<cutlass::bfloat16_t>(arch, p, stream); break;
    case ffi::DataType::F16: err = DispatchFwd<cutlass::half_t>(arch, p, stream); break;
    default: return ffi::Error::InvalidArgument("jevo attention: q must be bfloat16 or float16");
  }
  return CudaError(err, "attention forward launch");
}

ffi::Error AttentionBwdImpl(cudaStream_t stream, float scale, int64_t family, int64_t n_chunks,
                            ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer mask,
                            ffi::AnyBuffer bias, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                            ffi::Buffer<ffi::F32> delta, ffi::Result<ffi::AnyBuffer> dq,
                            ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                            ffi::Result<ffi::AnyBuffer> dbias,
                            ffi::Result<ffi::Buffer<ffi::F32>> workspace) {
  AttentionShape sh;
  JEVO_RETURN_IF_ERROR(ReadShape(q, &sh));
  JEVO_RETURN_IF_ERROR(CheckLike(q, q, "q"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, k, "k"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, v, "v"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, dout, "dout"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, *dq, "dq"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, *dk, "dk"));
  JEVO_RETURN_IF_ERROR(CheckLike(q, *dv, "dv"));
  bool has_mask, has_bias;
  JEVO_RETURN_IF_ERROR(CheckMaskBias(sh, q, mask, bias, &has_mask, &has_bias));
  JEVO_RETURN_IF_ERROR(CheckDims(lse, {sh.batch, sh.n, sh.heads, sh.seq}, "lse"));
  JEVO_RETURN_IF_ERROR(CheckDims(delta, {sh.batch, sh.n, sh.heads, sh.seq}, "delta"));
  if (has_bias) JEVO_RETURN_IF_ERROR(CheckDims(*dbias, {sh.batch, sh.heads, sh.seq, sh.seq}, "dbias"));
  if (sh.batch * sh.n * sh.seq * sh.heads == 0) return ffi::Error::Success();
  Arch arch;
  JEVO_RETURN_IF_ERROR(ChooseFamily(family, /*forward=*/false, &arch));

  // The bias gradient is reduced over N in n_chunks fp32 partials held in `workspace`
  // ([n_chunks, B, H, S, S], allocated by XLA); without a bias every n is its own chunk.
  float* partial = nullptr;
  if (has_bias) {
    if (n_chunks < 1 || n_chunks > sh.n) {
      return ffi::Error::InvalidArgument("jevo attention backward: n_chunks must be in [1, N=" +
                                         std::to_string(sh.n) + "], got " + std::to_string(n_chunks));
    }
    JEVO_RETURN_IF_ERROR(
        CheckDims(*workspace, {n_chunks, sh.batch, sh.heads, sh.seq, sh.seq}, "workspace"));
    partial = workspace->typed_data();
  } else {
    n_chunks = sh.n;
  }
  BwdParams p{sh,
              q.untyped_data(),
              k.untyped_data(),
              v.untyped_data(),
              has_mask ? static_cast<const uint8_t*>(mask.untyped_data()) : nullptr,
              has_bias ? bias.untyped_data() : nullptr,
              dout.untyped_data(),
              lse.typed_data(),
              delta.typed_data(),
              dq->untyped_data(),
              dk->untyped_data(),
              dv->untyped_data(),
              has_bias ? dbias->untyped_data() : nullptr,
              partial,
              n_chunks,
              scale};
  cudaError_t err;
  switch (q.element_type()) {
    case ffi::DataType::BF16: err = DispatchBwd<cutlass::bfloat16_t>(arch, p, stream); break;
    case ffi::DataType::F16: err = DispatchBwd<cutlass::half_t>(arch, p, stream); break;
    default: return ffi::Error::InvalidArgument("jevo attention: q must be bfloat16 or float16");
  }
  return CudaError(err, "attention backward launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JevoAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("family")
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .RemainingRets(),  // o_residual, optional
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JevoAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("family")
                                  .Attr<int64_t>("n_chunks")
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>(),  // workspace
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jevo
