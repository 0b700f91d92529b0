// Small kernels with planted defects, one for each check of the harness, run
// by test_cuda_host.py through pymatting_ext_cuda_host::check_case: each
// defect must make its launch raise with the check's message, and the clean
// variants must run. (The same defects planted in the real kernels:
// mutations.py.) Compiled like the kernel units (see build.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <string>

#include "cuda_host.h"

namespace {

constexpr int kT = 64;

// Some threads leave before the block's barrier.
__global__ void divergent_barrier(float* p) {
  if (threadIdx.x == 3) {
    return;
  }
  __syncthreads();
  p[threadIdx.x] = 1.f;
}

// Every lane passes a mask without lane 0.
__global__ void mask_without_caller(float* p) {
  const unsigned peers = __match_any_sync(0xFFFFFFFEu, 1u);
  p[threadIdx.x] = float(peers);
}

// Lane 5 has exited when the others name it.
__global__ void mask_names_exited_lane(float* p) {
  if (threadIdx.x == 5) {
    return;
  }
  p[threadIdx.x] = float(__match_any_sync(0xFFFFFFFFu, 1u));
}

// A warp collective orders the lanes of one warp (clean), not two warps
// (a race: thread t + 32, of the next warp, reads what thread t wrote).
template <bool kAcrossWarps>
__global__ void warp_ordered(float* p) {
  __shared__ int s[kT];
  const unsigned t = threadIdx.x;
  s[t] = int(t);
  __match_any_sync(0xFFFFFFFFu, 0u);
  if (kAcrossWarps) {
    p[t] = t >= 32 ? float(s[t - 32]) : 0.f;
  } else {
    p[t] = float(s[t ^ 1u]);
  }
}

// Thread t reads byte (t + 1)'s word, which thread t + 1 then overwrites in
// the same barrier interval.
__global__ void write_after_read(float* p) {
  __shared__ int s[kT];
  const unsigned t = threadIdx.x;
  s[t] = int(t);
  __syncthreads();
  p[t] = float(s[(t + 1) % kT]);
  s[t] = 2 * int(t);
}

// A cub TempStorage reused with no barrier in between (clean with one).
template <bool kBarrier>
__global__ void temp_storage_reuse(float* p) {
  using Reduce = cub::BlockReduce<int, kT>;
  __shared__ typename Reduce::TempStorage tmp;
  const int a = Reduce(tmp).Sum(int(threadIdx.x));
  if (kBarrier) {
    __syncthreads();
  }
  const int b = Reduce(tmp).Sum(1);
  if (threadIdx.x == 0) {
    p[0] = float(a + b);
  }
}

// Shared memory read before any thread of the block wrote it (written
// after, so that the compiler cannot take it for constant zeros).
__global__ void uninitialized_shared(float* p) {
  __shared__ float s[kT];
  p[threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = 1.f;
}

// One element past the end of p (n elements).
__global__ void global_off_by_one(float* p, int64_t n) {
  for (int64_t i = threadIdx.x; i <= n; i += blockDim.x) {
    p[i] = 0.f;
  }
}

// One float past the launch's dynamic shared memory (kT floats).
__global__ void dynamic_shared_off_by_one(float* p) {
  float* s = reinterpret_cast<float*>(::pmx_host::dynamic_shared());
  s[threadIdx.x + 1] = 1.f;
  __syncthreads();
  p[threadIdx.x] = s[threadIdx.x];
}

// A 16-byte store 4 bytes past a 16-byte boundary.
__global__ void misaligned_vector_store(float* p) {
  if (threadIdx.x == 0) {
    *reinterpret_cast<uint4*>(p + 1) = uint4{0, 0, 0, 0};
  }
}

void check_case(const std::string& name, const at::Tensor& buf) {
  TORCH_CHECK(buf.is_cpu() && buf.is_contiguous() && buf.scalar_type() == at::kFloat && buf.numel() >= 2 * kT,
              "check_case: buf must be a contiguous float32 CPU tensor of at least ", 2 * kT, " elements");
  float* p = buf.data_ptr<float>();
  using pmx_host::launch;
  if (name == "divergent_barrier") {
    launch<divergent_barrier>(1, kT, 0, p);
  } else if (name == "mask_without_caller") {
    launch<mask_without_caller>(1, 32, 0, p);
  } else if (name == "mask_names_exited_lane") {
    launch<mask_names_exited_lane>(1, 32, 0, p);
  } else if (name == "warp_ordered") {
    launch<warp_ordered<false>>(1, kT, 0, p);
  } else if (name == "across_warps") {
    launch<warp_ordered<true>>(1, kT, 0, p);
  } else if (name == "write_after_read") {
    launch<write_after_read>(2, kT, 0, p);
  } else if (name == "temp_storage_reuse") {
    launch<temp_storage_reuse<false>>(1, kT, 0, p);
  } else if (name == "temp_storage_barrier") {
    launch<temp_storage_reuse<true>>(3, kT, 0, p);
  } else if (name == "uninitialized_shared") {
    launch<uninitialized_shared>(1, kT, 0, p);
  } else if (name == "global_off_by_one") {
    launch<global_off_by_one>(1, kT, 0, p, buf.numel());
  } else if (name == "dynamic_shared_off_by_one") {
    launch<dynamic_shared_off_by_one>(1, kT, kT * sizeof(float), p);
  } else if (name == "misaligned_vector_store") {
    launch<misaligned_vector_store>(1, kT, 0, p);
  } else if (name == "block_too_large") {
    launch<divergent_barrier>(1, 1025, 0, p);
  } else if (name == "grid_y_too_large") {
    launch<divergent_barrier>(dim3(1, 65536), 1, 0, p);
  } else if (name == "shared_too_large") {
    launch<dynamic_shared_off_by_one>(1, kT, 48 * 1024 + 4, p);
  } else {
    TORCH_CHECK(false, "check_case: unknown case ", name);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymatting_ext_cuda_host, m) {
  m.def("check_case(str name, Tensor buf) -> ()", &check_case);
}
