// The tile sizes of each kernel family that code outside the kernels needs: the handler's grid
// limits, and Python's choice of how many chunks the bias gradient is reduced over (reported by
// the library as `_jevo_cuda.families()`). Plain constants, so that host-only code can include
// them without CuTe.
#pragma once

namespace jevo {

// The GPU architecture families of kernels. A family runs on devices of its compute capability
// and newer ones it lists; the handler picks one per call (see handlers/attention.cu).
enum class Arch : int { kSm80 = 80, kSm90 = 90 };

namespace sm80 {
constexpr int kBlockM = 64;  // query rows per tile (forward, dQ kernel)
constexpr int kBlockN = 64;  // key rows per tile (forward), the key mask's 64-bit word
}  // namespace sm80

namespace sm90 {
constexpr int kBlockM = 64;  // query rows per CTA: one warpgroup's wgmma M
constexpr int kBlockN = 64;  // key rows per tile, the key mask's 64-bit word
}  // namespace sm90

}  // namespace jevo
