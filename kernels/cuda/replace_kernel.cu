// CUDA kernel of replace: a copy of x with patches written into their cells.
//
// Two launches (after the map's fill): the cell map (cuda_common.cuh: the
// last valid patch per cell, by an integer atomicMax), then one pass over the
// output writing every element exactly once, the patch value where the map
// names a patch, else x's. Thread i handles output element i in the output's
// memory order (NCHW or channels-last), so stores are coalesced.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    replace_kernel(const scalar_t* __restrict__ x, const Strides4 xs,
                   const scalar_t* __restrict__ pat, const Strides4 ps,
                   const int32_t* __restrict__ map, scalar_t* __restrict__ out, const Strides4 os,
                   index_t n, index_t C, index_t H, index_t W, index_t s, int64_t HC, int64_t WC) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    index_t b, c, y, xx;
    if (kChannelsLast) {
      c = i % C;
      index_t r = i / C;
      xx = r % W;
      r /= W;
      y = r % H;
      b = r / H;
    } else {
      xx = i % W;
      index_t r = i / W;
      y = r % H;
      r /= H;
      c = r % C;
      b = r / C;
    }
    const int32_t p = map[(int64_t(b) * HC + y / s) * WC + xx / s];
    scalar_t v;
    if (p >= 0) {
      v = pat[p * ps.s0 + c * ps.s1 + (y % s) * ps.s2 + (xx % s) * ps.s3];
    } else {
      v = x[b * xs.s0 + c * xs.s1 + y * xs.s2 + xx * xs.s3];
    }
    out[b * os.s0 + c * os.s1 + y * os.s2 + xx * os.s3] = v;
  }
}

at::Tensor replace_cuda(const at::Tensor& x, const at::Tensor& patches, const at::Tensor& idx,
                        const c10::optional<at::Tensor>& valid) {
  const char* op = "replace";
  check_replace_args(op, x, patches, idx, valid, at::kCUDA);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t s = patches.size(3);
  const at::cuda::OptionalCUDAGuard guard(x.device());

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HC = H / s, WC = W / s;
  const at::Tensor map = cell_map(op, idx_c, valid, B, HC, WC);
  // The layout clone() would give: x's strides when x is dense, else
  // contiguous (or channels-last when x suggests it).
  at::Tensor out = at::empty_like(x);
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const bool channels_last =
      !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "replace_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* pp = patches.data_ptr<scalar_t>();
    const int32_t* mp = map.data_ptr<int32_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const Strides4 xs = strides4(x), ps = strides4(patches), os = strides4(out);
    auto launch = [&](auto index_tag, auto layout_tag) {
      using index_t = decltype(index_tag);
      constexpr bool kChannelsLast = decltype(layout_tag)::value;
      replace_kernel<scalar_t, index_t, kChannelsLast><<<blocks, kThreads, 0, stream>>>(
          xp, xs, pp, ps, mp, op_, os, static_cast<index_t>(n), static_cast<index_t>(C),
          static_cast<index_t>(H), static_cast<index_t>(W), static_cast<index_t>(s), HC, WC);
    };
    launch_variant(fits_int32(n), channels_last, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CUDA, m) {
  m.impl("replace", &replace_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
