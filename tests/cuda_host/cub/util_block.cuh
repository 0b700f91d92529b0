// What the harness's cub subset shares: the block-shape check cub leaves to
// its caller (a 1-D block of exactly BLOCK_DIM_X threads).
#pragma once

#include "cuda_host.h"

namespace cub {
namespace detail {

inline void check_block(int threads) {
  const dim3 b = blockDim;
  if (b.x != static_cast<unsigned>(threads) || b.y != 1 || b.z != 1) {
    ::pmx_host::device_assert("a cub block collective run by a block other than BLOCK_DIM_X x 1 x 1 threads",
                              __FILE__, __LINE__);
  }
}

}  // namespace detail
}  // namespace cub
