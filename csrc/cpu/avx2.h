// AVX2 building blocks of the CPU kernels' vector paths, compiled with
// per-function target attributes so that the extension itself still builds
// for baseline x86-64 (and for other architectures, where none of this
// exists and the portable loops run).
//
// NB: the vector paths use mul and add, never FMA, in the portable loops'
// order of operations, so that both paths give the same bits.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define PYMATTING_EXT_AVX2 1
#include <immintrin.h>
#define PYMATTING_EXT_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define PYMATTING_EXT_AVX2 0
#endif

namespace pymatting_ext {
namespace cpu {

// Whether the vector paths run: the CPU (and the OS) support AVX2, and
// PYMATTING_EXT_CPU_CAPABILITY is not "default" (read once, as ATen reads
// ATEN_CPU_CAPABILITY; the tests use it to compare both paths).
inline bool avx2_enabled() {
#if PYMATTING_EXT_AVX2
  static const bool enabled = [] {
    const char* env = std::getenv("PYMATTING_EXT_CPU_CAPABILITY");
    if (env != nullptr && std::strcmp(env, "default") == 0) {
      return false;
    }
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return enabled;
#else
  return false;
#endif
}

#if PYMATTING_EXT_AVX2

// In place: v[c] holds 8 pixels of channel c; afterwards v[k] holds the 8
// channels of pixel k.
PYMATTING_EXT_TARGET_AVX2 inline void transpose8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Stores the first n (1..8) lanes of v at p, touching nothing after them.
PYMATTING_EXT_TARGET_AVX2 inline void store_first(float* p, __m256 v, int64_t n) {
  if (n == 8) {
    _mm256_storeu_ps(p, v);
    return;
  }
  __m128 part = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(p, part);
    p += 4;
    n -= 4;
    part = _mm256_extractf128_ps(v, 1);
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
    p += 2;
    n -= 2;
    part = _mm_movehl_ps(part, part);
  }
  if (n == 1) {
    _mm_store_ss(p, part);
  }
}

// 8 floats from p[0], ..., p[n - 1] (n >= 1), zeros after: never reads
// beyond p[n - 1].
PYMATTING_EXT_TARGET_AVX2 inline __m256 load_first(const float* p, int64_t n) {
  if (n >= 8) {
    return _mm256_loadu_ps(p);
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
  return _mm256_maskload_ps(p, mask);
}

// Lane k of the 16 floats (lo, hi) at index[k] (0..15): hi_lanes marks the
// lanes whose index is 8 or more.
PYMATTING_EXT_TARGET_AVX2 inline __m256 pick16(__m256 lo, __m256 hi, __m256i index,
                                               __m256 hi_lanes) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, index), _mm256_permutevar8x32_ps(hi, index),
                          hi_lanes);
}

#endif  // PYMATTING_EXT_AVX2

// Outputs from this size on are written with non-temporal stores where a
// kernel can (the vector paths): beyond the cores' L2 caches (1 MiB each on
// the 2-core AMD EPYC measured) an ordinary store first reads the line it
// writes (read for ownership), half the traffic of such an output.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// dst[0, n) = src[0, n); with AVX2, the aligned 32-byte blocks of dst with
// non-temporal stores (written to memory without first being read into the
// cache), the unaligned ends with ordinary ones.
template <typename T>
inline void stream_store(T* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

#if PYMATTING_EXT_AVX2
PYMATTING_EXT_TARGET_AVX2 inline void stream_store(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 32 != 0; ++i) {
    dst[i] = src[i];
  }
  for (; i + 8 <= n; i += 8) {
    _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  }
  for (; i < n; ++i) {
    dst[i] = src[i];
  }
}
#endif

// Orders earlier non-temporal stores before the stores that follow (they are
// weakly ordered otherwise); every thread that streamed calls it when done.
inline void stream_fence() {
#if PYMATTING_EXT_AVX2
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace pymatting_ext
