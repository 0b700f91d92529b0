// Index and interpolation arithmetic shared by the CPU kernels (csrc/cpu) and
// the CUDA kernels (kernels/cuda). Everything here is __host__ __device__ so
// that the CPU tests cover the arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pymatting_ext {

// One axis of a bilinear resize: output coordinate `dst` reads input
// coordinates i0 and i1 with weights w0 and w1.
template <typename opmath_t>
struct LinearTap {
  int64_t i0;
  int64_t i1;
  opmath_t w0;
  opmath_t w1;
};

// The ratio PyTorch's upsample_bilinear2d uses when it is given an output
// size (not a scale factor) and align_corners=False.
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t linear_scale(int64_t in_size, int64_t out_size) {
  return static_cast<opmath_t>(in_size) / static_cast<opmath_t>(out_size);
}

// NB: this mirrors PyTorch's compute_source_index_and_lambda step by step
// (clamp of negative source coordinates to 0, floor, clamp of the lambda) so
// that a patch sampled here is the bit pattern F.interpolate would produce.
// The weights are rounded to `scalar_t` (the CPU kernels pass the tensor's
// dtype, as PyTorch's CPU upsample rounds them; see linear_tap_unrounded).
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline LinearTap<opmath_t> linear_tap(
    int64_t dst, int64_t in_size, int64_t out_size, opmath_t scale) {
  LinearTap<opmath_t> t;
  if (in_size == out_size) {
    t.i0 = dst;
    t.i1 = dst;
    t.w0 = opmath_t(1);
    t.w1 = opmath_t(0);
    return t;
  }
  opmath_t src = scale * (static_cast<opmath_t>(dst) + opmath_t(0.5)) - opmath_t(0.5);
  if (src < opmath_t(0)) {
    src = opmath_t(0);
  }
  int64_t i0 = static_cast<int64_t>(::floor(src));
  if (i0 > in_size - 1) {
    i0 = in_size - 1;
  }
  opmath_t lambda = src - static_cast<opmath_t>(i0);
  lambda = lambda < opmath_t(0) ? opmath_t(0) : (lambda > opmath_t(1) ? opmath_t(1) : lambda);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.w1 = static_cast<opmath_t>(static_cast<scalar_t>(lambda));
  t.w0 = static_cast<opmath_t>(static_cast<scalar_t>(opmath_t(1) - lambda));
  return t;
}

// The weights are rounded as PyTorch's upsample on the same device rounds
// them: on the CPU to the tensor's dtype (linear_tap<scalar_t, opmath_t>), on
// CUDA not at all (upsample_bilinear2d's CUDA kernel keeps its lambdas in the
// accumulate type). The CUDA kernels use this one; the two differ only for
// float16 and bfloat16.
template <typename opmath_t>
C10_HOST_DEVICE inline LinearTap<opmath_t> linear_tap_unrounded(
    int64_t dst, int64_t in_size, int64_t out_size, opmath_t scale) {
  return linear_tap<opmath_t, opmath_t>(dst, in_size, out_size, scale);
}

// Bilinear combination in PyTorch's order: the width pass inside, the height
// pass outside.
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t linear_mix(
    opmath_t v00, opmath_t v01, opmath_t v10, opmath_t v11,
    opmath_t wy0, opmath_t wy1, opmath_t wx0, opmath_t wx1) {
  return (v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1;
}

// Order-preserving unsigned keys for the top-k selection: a larger key is a
// larger value, NaN is the largest of all (as torch.topk), and -0.0 equals
// +0.0 (they compare equal, so they must tie).
C10_HOST_DEVICE inline uint32_t order_key(float v) {
  if (v != v) {
    return 0xFFFFFFFFu;
  }
  if (v == 0.0f) {
    v = 0.0f;
  }
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

C10_HOST_DEVICE inline uint64_t order_key(double v) {
  if (v != v) {
    return 0xFFFFFFFFFFFFFFFFull;
  }
  if (v == 0.0) {
    v = 0.0;
  }
  uint64_t u;
  memcpy(&u, &v, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Origin of patch number `cell` along one axis: cells are `stride` apart and
// each patch reaches `padding` beyond its cell.
C10_HOST_DEVICE inline int64_t patch_origin(int64_t cell, int64_t stride, int64_t padding) {
  return cell * stride - padding;
}

}  // namespace pymatting_ext
