// Helpers shared by the CUDA kernels of pymatting_ext (kernels/cuda/*.cu):
// the launch helper and the few device calls of the host wrappers, launch
// sizes, the on-device range check of idx rows, a fast divider, and the
// declarations of the cell map of replace/compose (cell_map.cu). All but
// those declarations are internal to each translation unit (anonymous
// namespace), so several .cu files may include this.
//
// The same sources also compile as C++ for the host execution harness of the
// tests (tests/cuda_host, PYMATTING_EXT_CUDA_HOST defined), which runs the
// kernels on CPU tensors, one fiber per GPU thread. Only the lines below that
// test PYMATTING_EXT_CUDA_HOST differ between the two builds.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#ifdef PYMATTING_EXT_CUDA_HOST
#include "cuda_host.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>
#include <cstring>

#include "checks.h"
#include "index_math.h"

namespace pymatting_ext {
namespace cuda {

// The (B * HC * WC,) int32 cell map of replace and compose: the last valid
// patch naming each cell, or -1. Built on the current stream without
// synchronising; idx_c must be contiguous.
at::Tensor cell_map(const char* op, const at::Tensor& idx_c, const c10::optional<at::Tensor>& valid,
                    int64_t B, int64_t HC, int64_t WC);

// With idx rows but an empty B x HC x WC grid (B = 0) every row is out of
// range, as the host can tell: raises the CPU kernels' message for the first
// row (copying that row to the host, a synchronisation on this error path
// only). Every other bad row is caught on the device (idx_row_ok).
void check_idx_grid(const char* op, const at::Tensor& idx_c, int64_t B, int64_t HC, int64_t WC);

namespace {

// The device calls of the host wrappers: the only ones that differ in the
// harness (CPU tensors, no streams, a pretend device of a few SMs).
#ifdef PYMATTING_EXT_CUDA_HOST
constexpr at::DeviceType kKernelDevice = at::kCPU;
using DeviceGuard = ::pmx_host::DeviceGuard;
inline cudaStream_t current_stream() { return nullptr; }
inline int64_t sm_count() { return ::pmx_host::sm_count(); }
#define PYMATTING_EXT_KERNEL_KEY CPU
#else
constexpr at::DeviceType kKernelDevice = at::kCUDA;
using DeviceGuard = at::cuda::OptionalCUDAGuard;
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// The dispatch key the kernels register for (CPU in the harness, whose ops
// live in a namespace of their own).
#define PYMATTING_EXT_KERNEL_KEY CUDA
#endif

// Every kernel launch: Kernel<<<grid, block, smem, stream>>>(args...) under
// nvcc, then the launch check; the harness's strict launch otherwise.
template <auto Kernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          const Args&... args) {
#ifdef PYMATTING_EXT_CUDA_HOST
  (void)stream;
  ::pmx_host::launch<Kernel>(grid, block, smem, args...);
#else
  Kernel<<<grid, block, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The block's dynamic shared memory (16-byte aligned).
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef PYMATTING_EXT_CUDA_HOST
  return reinterpret_cast<T*>(::pmx_host::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char dynamic_shared_raw[];
  return reinterpret_cast<T*>(dynamic_shared_raw);
#endif
}

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items (n > 0): enough to fill the
// device several times over, never more than the items need.
inline int64_t blocks_for(int64_t n, int threads = kThreads) {
  const int64_t need = (n + threads - 1) / threads;
  const int64_t sms = sm_count();
  const int64_t cap = sms * 32;
  return need < cap ? need : cap;
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

template <int kBytes>
struct RawBits;
template <>
struct RawBits<2> {
  using type = unsigned short;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};
template <>
struct RawBits<8> {
  using type = uint2;
};
template <>
struct RawBits<16> {
  using type = uint4;
};

// *p = bits: one store of 16 or 8 bytes to global memory (p aligned).
// NB: nvcc splits a plain store of a 16-byte struct into scalar stores once
// it has broken the struct into registers; this is one st.global.v4 (v2)
// whatever the optimiser did before. (__stwb would do too, but becomes a
// "strong" store.)
// (The harness stores the vector type whole: its alignment is checked.)
__device__ __forceinline__ void store_bits(void* p, const uint4& b) {
#ifdef PYMATTING_EXT_CUDA_HOST
  *reinterpret_cast<uint4*>(p) = b;
#else
  asm("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w)
      : "memory");
#endif
}
__device__ __forceinline__ void store_bits(void* p, const uint2& b) {
#ifdef PYMATTING_EXT_CUDA_HOST
  *reinterpret_cast<uint2*>(p) = b;
#else
  asm("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(b.x), "r"(b.y) : "memory");
#endif
}
__device__ __forceinline__ void store_bits(void* p, const unsigned int& b) {
  *reinterpret_cast<unsigned int*>(p) = b;
}
__device__ __forceinline__ void store_bits(void* p, const unsigned short& b) {
  *reinterpret_cast<unsigned short*>(p) = b;
}

// *p = v as one store of sizeof(v) bytes (p in global memory, aligned).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const VecN<T, N>& v) {
  if constexpr (N == 1) {
    *p = v.v[0];
  } else {
    using R = typename RawBits<sizeof(T) * N>::type;
    R r;
    memcpy(&r, &v, sizeof(R));
    store_bits(p, r);
  }
}

// n / d for n >= 0 and d >= 1, by a multiply-high, an add and a shift where
// n, d < 2^31 (Granlund and Montgomery's round-up method, the 33rd bit of
// the magic number folded into the add), else by a 64-bit division. The
// magic number is computed once on the host; a runtime 32-bit division costs
// ~20 instructions, a 64-bit one several times that.
struct FastDiv {
  int64_t d = 1;
  int64_t fast_below = 0;  // n below this take the multiply-high
  uint32_t magic = 0, shift = 0;

  FastDiv() = default;
  explicit FastDiv(int64_t divisor) : d(divisor) {
    TORCH_INTERNAL_ASSERT(divisor >= 1);
    if (divisor >= (int64_t(1) << 31)) {
      return;
    }
    fast_below = int64_t(1) << 31;
    while ((int64_t(1) << shift) < divisor) {
      ++shift;
    }
    // d <= 2^shift < 2d, so the quotient below is < 2^32 - 1.
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - uint64_t(d))) /
                                      uint64_t(d) +
                                  1);
  }

  // Needs n < fast_below.
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(n) * magic) >> 32);
#endif
    // t <= n < 2^31: the sum does not overflow.
    return (t + n) >> shift;
  }

  __host__ __device__ __forceinline__ int64_t div64(int64_t n) const {
    return n < fast_below ? int64_t(div(static_cast<uint32_t>(n))) : n / d;
  }
};

}  // namespace
}  // namespace cuda
}  // namespace pymatting_ext
