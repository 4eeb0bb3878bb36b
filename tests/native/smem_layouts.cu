// Host check of the shared-memory address arithmetic the sm90 kernels do by hand against the
// CuTe layouts that the wgmma descriptors read: the swizzled offsets of Swizzle128PairStores
// (sm90/bwd_kernel.h) against SmemLayoutP and its transposed view SmemLayoutPt. Prints the
// number of mismatches and exits non-zero if there is one. Built and run by
// tests/test_kernel_host_checks.py.
#include <cstdint>
#include <cstdio>

#include "attention/sm90/bwd_kernel.h"

using namespace cute;

template <typename Element>
int check_p_tile() {
  using Traits = jevo::sm90::BwdTraits<Element, 32>;
  alignas(1024) static Element tile[64 * 64];
  Tensor sP = make_tensor(make_smem_ptr(tile), typename Traits::SmemLayoutP{});    // (m, n)
  Tensor sPt = make_tensor(make_smem_ptr(tile), typename Traits::SmemLayoutPt{});  // (n, m)
  auto offset = [&](auto& elem) { return uint32_t(reinterpret_cast<char*>(&elem) - reinterpret_cast<char*>(tile)); };
  int bad = 0;
  for (int row = 0; row < 64; ++row) {
    for (int col0 = 0; col0 < 8; col0 += 2) {
      for (int j = 0; j < 8; ++j) {
        const int col = 8 * j + col0;
        const uint32_t mine = jevo::sm90::swizzle128_pair_offset(row, col0, j);
        // The pair is two neighbouring elements; both views must put them at mine, mine + 2.
        for (int e = 0; e < 2; ++e) {
          if (offset(sP(row, col + e)) != mine + 2 * e || offset(sPt(col + e, row)) != mine + 2 * e) {
            if (bad++ < 5) std::printf("row %d col %d: CuTe %u / %u, by hand %u\n", row, col + e,
                                       offset(sP(row, col + e)), offset(sPt(col + e, row)), mine + 2 * e);
          }
        }
      }
    }
  }
  return bad;
}

int main() {
  const int bad = check_p_tile<cutlass::bfloat16_t>() + check_p_tile<cutlass::half_t>();
  std::printf("mismatches: %d\n", bad);
  return bad != 0;
}
