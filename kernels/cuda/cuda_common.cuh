// Helpers shared by the CUDA kernels of pymatting_ext (kernels/cuda/*.cu):
// device checks, launch sizes, the on-device range check of idx rows and the
// cell map of replace/compose. Everything here is internal to one
// translation unit (anonymous namespace), so several .cu files may include it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "index_math.h"

namespace pymatting_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items (n > 0): enough to fill the
// device several times over, never more than the items need.
inline int64_t blocks_for(int64_t n, int threads = kThreads) {
  const int64_t need = (n + threads - 1) / threads;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = sms * 32;
  return need < cap ? need : cap;
}

// True when every index below n fits int32 arithmetic (with room for the
// grid-stride step).
inline bool fits_int32(int64_t n) {
  return n < (int64_t(1) << 30);
}

// Calls launch(index_tag, flag_tag) for the kernel variant a launch needs:
// index_tag int32_t{} when every index fits int32 (small), else int64_t{};
// flag_tag std::true_type{} or std::false_type{}.
template <typename Launch>
inline void launch_variant(bool small, bool flag, Launch&& launch) {
  if (small) {
    if (flag) {
      launch(int32_t{}, std::true_type{});
    } else {
      launch(int32_t{}, std::false_type{});
    }
  } else {
    if (flag) {
      launch(int64_t{}, std::true_type{});
    } else {
      launch(int64_t{}, std::false_type{});
    }
  }
}

// An idx row (b, y, x) inside a grid of B x HC x WC cells. Out-of-range rows
// stop the kernel with a device-side assertion (as PyTorch's index kernels
// do); the callers never read or write through a row that fails this, even
// where assertions are compiled out.
__device__ __forceinline__ bool idx_row_ok(int64_t b, int64_t y, int64_t x, int64_t B, int64_t HC,
                                           int64_t WC) {
  const bool ok = b >= 0 && b < B && y >= 0 && y < HC && x >= 0 && x < WC;
  CUDA_KERNEL_ASSERT_MSG(ok, "pymatting_ext: an idx row (b, y, x) is out of range for the cell grid");
  return ok;
}

// map[(b * HC + y) * WC + x] = the largest valid p naming the cell: the last
// valid patch, as a sequential scatter would leave it. Integer atomicMax is
// order-independent, so the map is deterministic.
__global__ void cell_map_kernel(int32_t* __restrict__ map, const int64_t* __restrict__ idx,
                                const bool* __restrict__ valid, int64_t P, int64_t B, int64_t HC,
                                int64_t WC) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P;
       p += int64_t(gridDim.x) * blockDim.x) {
    // NB: every row is range-checked, valid or not, as on the CPU.
    const int64_t b = idx[3 * p], y = idx[3 * p + 1], x = idx[3 * p + 2];
    if (!idx_row_ok(b, y, x, B, HC, WC) || (valid != nullptr && !valid[p])) {
      continue;
    }
    atomicMax(map + (b * HC + y) * WC + x, static_cast<int32_t>(p));
  }
}

// The (B * HC * WC,) int32 cell map of replace and compose, built on the
// current stream without synchronising. idx_c must be contiguous.
inline at::Tensor cell_map(const char* op, const at::Tensor& idx_c,
                           const c10::optional<at::Tensor>& valid, int64_t B, int64_t HC,
                           int64_t WC) {
  const int64_t P = idx_c.size(0);
  TORCH_CHECK(P < INT32_MAX, op, ": at most 2^31 - 1 patches are supported, got ", P);
  const int64_t cells = B * HC * WC;
  // NB: with no cells at all every row is out of range; that much is known
  // on the host.
  TORCH_CHECK(P == 0 || cells > 0, op, ": idx has ", P, " rows but the grid of B=", B, ", H=", HC,
              ", W=", WC, " cells is empty");
  at::Tensor map = at::full({cells}, -1, idx_c.options().dtype(at::kInt));
  if (P == 0) {
    return map;
  }
  at::Tensor valid_c;
  const bool* v = nullptr;
  if (valid.has_value()) {
    valid_c = valid->contiguous();
    v = valid_c.data_ptr<bool>();
  }
  cell_map_kernel<<<blocks_for(P), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      map.data_ptr<int32_t>(), idx_c.data_ptr<int64_t>(), v, P, B, HC, WC);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return map;
}

// Four strides of a 4-D tensor, passed to kernels by value.
struct Strides4 {
  int64_t s0, s1, s2, s3;
};

inline Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Clamp to [0, 1] written so that NaN passes through, as torch.clamp does.
template <typename T>
__device__ __forceinline__ T clamp01(T v) {
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

}  // namespace
}  // namespace cuda
}  // namespace pymatting_ext
