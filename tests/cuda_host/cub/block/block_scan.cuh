// The subset of cub::BlockScan that kernels/cuda uses (ExclusiveSum over one
// item or an array of items a thread, blocked arrangement), for the host
// execution harness: shared memory and barriers only, so that the harness's
// race check sees a TempStorage reused with no barrier in between.
#pragma once

#include "../util_block.cuh"

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    T item[BLOCK_DIM_X];
    T total;
  };

  explicit BlockScan(TempStorage& storage) : s_(storage) { detail::check_block(BLOCK_DIM_X); }

  void ExclusiveSum(T input, T& output) {
    T aggregate;
    ExclusiveSum(input, output, aggregate);
  }

  // aggregate: the sum over the block, in every thread.
  void ExclusiveSum(T input, T& output, T& aggregate) {
    const unsigned t = threadIdx.x;
    s_.item[t] = input;
    __syncthreads();
    if (t == 0) {
      T run = T(0);
      for (int i = 0; i < BLOCK_DIM_X; ++i) {
        const T v = s_.item[i];
        s_.item[i] = run;
        run = run + v;
      }
      s_.total = run;
    }
    __syncthreads();
    output = s_.item[t];
    aggregate = s_.total;
  }

  template <int ITEMS>
  void ExclusiveSum(T (&input)[ITEMS], T (&output)[ITEMS], T& aggregate) {
    T sum = T(0);
    for (int j = 0; j < ITEMS; ++j) {
      sum = sum + input[j];
    }
    T run;
    ExclusiveSum(sum, run, aggregate);
    for (int j = 0; j < ITEMS; ++j) {
      const T v = input[j];  // input and output may be one array
      output[j] = run;
      run = run + v;
    }
  }

 private:
  TempStorage& s_;
};

}  // namespace cub
