// Which thread issues a tile's TMA loads in the sm90 kernels. A CTA of one warpgroup runs warp w
// on the SM's scheduler w, and every CTA on the SM alike, so loads issued by one thread of warp 0
// add all their instructions to scheduler 0, the one every other waits for at the next barrier.
// The kernels give each of a tile's (up to three) loads to its own warp, 1 to 3, and one elected
// lane of it; each issuing lane declares its own bytes on the stage's mbarrier before its copies,
// so that barrier counts one arrival per load.
#pragma once

#include <cute/arch/cluster_sm90.hpp>
#include <cute/config.hpp>

namespace jevo {
namespace sm90 {

// The load this thread's warp issues (0, 1 or 2; -1 for warp 0), the same in every lane. Use
// it as `if (load == 0) { if (cute::elect_one_sync()) ... } else if (load == 1) ...`: with one
// branch per load, chosen by a warp-uniform value, ptxas emits each copy once, without the
// loop it wraps around a copy that a divergent branch reaches.
CUTE_DEVICE int load_of_warp() { return int(threadIdx.x / 32) - 1; }

}  // namespace sm90
}  // namespace jevo
