// CUDA kernel of replace: a copy of x with patches written into their cells.
//
// Two launches (after the map's fill): the cell map (cell_map.cu: the last
// valid patch per cell, by an integer atomicMax), then one pass over the
// output writing every element exactly once, the patch value where the map
// names a patch, else x's. A 3-D grid (row elements, rows, images): a thread
// owns one element position of a row in the output's memory order (a column
// of an NCHW output, all its channels in turn; a (column, channel) pair of a
// channels-last one) and walks kRows rows (more where the grid is capped)
// of each image, so its divisions happen once per thread, never per
// element, and a warp's stores are consecutive.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

constexpr int kBX = 32;  // threads along a row: one warp
constexpr int kBY = 8;   // rows per block
constexpr int64_t kRows = 4;  // rows per thread, where the grid allows
constexpr int64_t kMaxGridYZ = 65535;

// L: elements per row in the output's order (W, or W * C channels-last);
// cdiv divides by C, sdiv by the patch size s.
template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kBX * kBY)
    replace_kernel(const scalar_t* __restrict__ x, const Strides4 xs,
                   const scalar_t* __restrict__ pat, const Strides4 ps,
                   const int32_t* __restrict__ map, scalar_t* __restrict__ out, const Strides4 os,
                   const int64_t B, const int64_t C, const int64_t H, const int64_t L,
                   const FastDiv cdiv, const FastDiv sdiv, const int64_t HC, const int64_t WC) {
  const int64_t e = int64_t(blockIdx.x) * kBX + threadIdx.x;
  if (e >= L) {
    return;  // no block-wide synchronisation below
  }
  const int64_t s = sdiv.d;
  int64_t xx, c_begin, c_end;
  if (kChannelsLast) {
    xx = cdiv.div64(e);
    c_begin = e - xx * C;
    c_end = c_begin + 1;
  } else {
    xx = e;
    c_begin = 0;
    c_end = C;
  }
  const int64_t cx = sdiv.div64(xx);
  const int64_t px = xx - cx * s;
  // The thread's rows: y0, y0 + dy, ...; y / s and y % s are carried from
  // row to row instead of divided.
  const int64_t y0 = int64_t(blockIdx.y) * kBY + threadIdx.y;
  const int64_t dy = int64_t(gridDim.y) * kBY;
  const int64_t dcy = sdiv.div64(dy), dpy = dy - dcy * s;
  const int64_t cy0 = sdiv.div64(y0), py0 = y0 - cy0 * s;
  // NB: loops not unrolled: unrolling multiplies the registers, not the
  // memory parallelism, which comes from the warps.
#pragma unroll 1
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    int64_t cy = cy0, py = py0;
#pragma unroll 1
    for (int64_t y = y0; y < H; y += dy) {
      const int32_t p = map[(b * HC + cy) * WC + cx];
#pragma unroll 1
      for (int64_t c = c_begin; c < c_end; ++c) {
        const scalar_t v = p >= 0 ? pat[p * ps.s0 + c * ps.s1 + py * ps.s2 + px * ps.s3]
                                  : x[b * xs.s0 + c * xs.s1 + y * xs.s2 + xx * xs.s3];
        out[b * os.s0 + c * os.s1 + y * os.s2 + xx * os.s3] = v;
      }
      cy += dcy;
      py += dpy;
      if (py >= s) {
        py -= s;
        ++cy;
      }
    }
  }
}

at::Tensor replace_cuda(const at::Tensor& x, const at::Tensor& patches, const at::Tensor& idx,
                        const c10::optional<at::Tensor>& valid) {
  const char* op = "replace";
  check_replace_args(op, x, patches, idx, valid, kKernelDevice);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t s = patches.size(3);
  const DeviceGuard guard(x.device());

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HC = H / s, WC = W / s;
  const at::Tensor map = cell_map(op, idx_c, valid, B, HC, WC);
  // The layout clone() would give: x's strides when x is dense, else
  // contiguous (or channels-last when x suggests it).
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) {
    return out;
  }
  const bool channels_last =
      !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t L = channels_last ? W * C : W;
  const cudaStream_t stream = current_stream();
  const dim3 block(kBX, kBY);
  const dim3 grid(static_cast<unsigned>((L + kBX - 1) / kBX),
                  static_cast<unsigned>(std::min((H + kBY * kRows - 1) / (kBY * kRows), kMaxGridYZ)),
                  static_cast<unsigned>(std::min(B, kMaxGridYZ)));
  const FastDiv cdiv(channels_last ? C : 1), sdiv(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "replace_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* pp = patches.data_ptr<scalar_t>();
    const int32_t* mp = map.data_ptr<int32_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const Strides4 xs = strides4(x), ps = strides4(patches), os = strides4(out);
    if (channels_last) {
      launch_kernel<replace_kernel<scalar_t, true>>(grid, block, 0, stream, xp, xs, pp, ps, mp, op_, os,
                                                    B, C, H, L, cdiv, sdiv, HC, WC);
    } else {
      launch_kernel<replace_kernel<scalar_t, false>>(grid, block, 0, stream, xp, xs, pp, ps, mp, op_, os,
                                                     B, C, H, L, cdiv, sdiv, HC, WC);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, PYMATTING_EXT_KERNEL_KEY, m) {
  m.impl("replace", &replace_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
