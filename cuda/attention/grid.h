// One-dimensional grids over (b * n, head, tile) with the tile index fastest, so that the CTAs
// resident together work on the same (b, n, head) and share its K, V (or Q, dO) and bias tiles
// in L2 instead of each fetching them from memory at a different time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jevo {

struct TileCoord {
  int tile;       // query (or key) tile
  int64_t head;
  int64_t outer;  // b * N + n, or whatever the kernel iterates outermost
};

__device__ inline TileCoord decode_tile_coord(int64_t tiles, int64_t heads) {
  const int64_t id = blockIdx.x;
  const int64_t rest = id / tiles;
  return TileCoord{static_cast<int>(id - rest * tiles), rest % heads, rest / heads};
}

inline dim3 tile_grid(int64_t tiles, int64_t heads, int64_t outer) {
  return dim3(static_cast<unsigned>(tiles * heads * outer));
}

}  // namespace jevo
