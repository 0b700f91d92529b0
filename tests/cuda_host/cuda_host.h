// CUDA's execution model on the CPU, for the tests: the declarations that let
// the kernels of kernels/cuda compile as C++ (g++) unchanged, and run on CPU
// tensors through the host execution harness (runtime.cpp: one fiber per GPU
// thread, blocks one after another, strict about barriers, warp masks,
// alignment, bounds and shared-memory races). Included by
// kernels/cuda/cuda_common.cuh when PYMATTING_EXT_CUDA_HOST is defined;
// tests/cuda_host/build.py compiles it.
#pragma once

#include <c10/core/Device.h>
#include <c10/macros/Macros.h>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// NB: g++ keeps no readable trace of the bound; the tests hold the block
// sizes the harness logs (PYMATTING_EXT_CUDA_HOST_LAUNCHES) against the
// bounds in the sources.
#define __launch_bounds__(...)
// Every fiber of a block runs on one OS thread, and blocks run one at a time
// on it: thread-local statics are the block's shared memory. The harness
// tracks accesses to this module's whole TLS block as shared memory.
#define __shared__ static thread_local
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
// CUDA's vector types: aligned to their size, so that an access through a
// misaligned one is reported (as the GPU faults on it).
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;

namespace pmx_host {

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void syncthreads();
unsigned match_any(unsigned mask, uint64_t value);
void* dynamic_shared();
int64_t sm_count();
[[noreturn]] void device_assert(const char* msg, const char* file, int line);
unsigned atomic_add(unsigned* p, unsigned v);
unsigned long long atomic_add(unsigned long long* p, unsigned long long v);
int atomic_max(int* p, int v);

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

using Entry = void (*)(void*);
// Runs entry(params) as the kernel `name` over the grid; raises (c10::Error)
// on a bad launch or on any error found while it runs.
void run(const char* name, dim3 grid, dim3 block, size_t smem, Entry entry, void* params,
         size_t params_bytes);

// __PRETTY_FUNCTION__ names the kernel with its template arguments.
template <auto Kernel>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;
}

template <typename F>
struct Params;
template <typename... P>
struct Params<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, const Args&... args) {
  using Tuple = typename Params<decltype(Kernel)>::type;
  // Converted to the kernel's parameter types once, as the launch does; the
  // harness lets every thread read it.
  Tuple params(args...);
  run(kernel_name<Kernel>(), grid, block, smem,
      [](void* p) { std::apply(Kernel, *static_cast<Tuple*>(p)); }, &params, sizeof(params));
}

}  // namespace pmx_host

#define threadIdx (::pmx_host::thread_idx())
#define blockIdx (::pmx_host::block_idx())
#define blockDim (::pmx_host::block_dim())
#define gridDim (::pmx_host::grid_dim())

// NB: the compiler barriers keep g++ from moving shared-memory accesses
// across a barrier or a collective: a function-local static whose address
// never escapes is otherwise assumed untouched by the runtime's calls.
#define PMX_COMPILER_BARRIER() asm volatile("" ::: "memory")

inline void __syncthreads() {
  PMX_COMPILER_BARRIER();
  ::pmx_host::syncthreads();
  PMX_COMPILER_BARRIER();
}

template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "__match_any_sync: 32- or 64-bit values");
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &value, sizeof(T));
  PMX_COMPILER_BARRIER();
  const unsigned peers = ::pmx_host::match_any(mask, bits);
  PMX_COMPILER_BARRIER();
  return peers;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::pmx_host::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return ::pmx_host::atomic_add(p, v);
}
inline int atomicMax(int* p, int v) { return ::pmx_host::atomic_max(p, v); }

// Cache-hinted loads and stores: plain accesses here (their alignment and
// bounds checked like any other).
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwb(T* p, T v) {
  *p = v;
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// A failed device assertion stops the launch with its message, kernel, block
// and thread (the GPU traps).
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)              \
  if (C10_UNLIKELY(!(cond))) {                         \
    ::pmx_host::device_assert(msg, __FILE__, __LINE__); \
  }
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT_MSG(cond, #cond)
