// The subset of cub::BlockReduce that kernels/cuda uses (Sum of one item a
// thread), for the host execution harness: shared memory and barriers only.
// As in cub, the result is the block's sum in thread 0 only; the other
// threads get their own input back.
#pragma once

#include "../util_block.cuh"

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockReduce {
 public:
  struct TempStorage {
    T item[BLOCK_DIM_X];
  };

  explicit BlockReduce(TempStorage& storage) : s_(storage) { detail::check_block(BLOCK_DIM_X); }

  T Sum(T input) {
    const unsigned t = threadIdx.x;
    s_.item[t] = input;
    __syncthreads();
    if (t != 0) {
      return input;
    }
    T sum = T(0);
    for (int i = 0; i < BLOCK_DIM_X; ++i) {
      sum = sum + s_.item[i];
    }
    return sum;
  }

 private:
  TempStorage& s_;
};

}  // namespace cub
