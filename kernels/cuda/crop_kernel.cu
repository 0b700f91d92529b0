// CUDA kernel of crop: patches from several inputs, each optionally sampled
// from a bilinear resize, without materialising the resized images.
//
// One launch per group of up to kMaxInputs inputs (one launch in practice).
// Thread i writes output element i of the group in the channels-last memory
// order (p, py, px, c), channel fastest, so consecutive threads store to
// consecutive addresses; every output element is written exactly once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

constexpr int kMaxInputs = 8;

template <typename scalar_t>
struct CropInput {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* data;
  int64_t sb, sc, sh, sw;  // strides
  int64_t height, width;
  int64_t c_begin, c_end;  // its channels within the launch's group
  opmath_t scale_h, scale_w;
  bool resample;
};

template <typename scalar_t>
struct CropArgs {
  CropInput<scalar_t> in[kMaxInputs];
  int n;
};

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t crop_sample(const CropInput<scalar_t>& s, int64_t b, int64_t c,
                                                int64_t y, int64_t x, int64_t H, int64_t W) {
  const scalar_t* plane = s.data + b * s.sb + c * s.sc;
  if (!s.resample) {
    return plane[y * s.sh + x * s.sw];
  }
  const LinearTap<opmath_t> ty = linear_tap<scalar_t, opmath_t>(y, s.height, H, s.scale_h);
  const LinearTap<opmath_t> tx = linear_tap<scalar_t, opmath_t>(x, s.width, W, s.scale_w);
  const scalar_t* r0 = plane + ty.i0 * s.sh;
  const scalar_t* r1 = plane + ty.i1 * s.sh;
  return static_cast<scalar_t>(linear_mix<opmath_t>(
      static_cast<opmath_t>(r0[tx.i0 * s.sw]), static_cast<opmath_t>(r0[tx.i1 * s.sw]),
      static_cast<opmath_t>(r1[tx.i0 * s.sw]), static_cast<opmath_t>(r1[tx.i1 * s.sw]), ty.w0, ty.w1,
      tx.w0, tx.w1));
}

// n = P * PH * PW * CG elements, CG the group's channels, written at channel
// offset c_offset of the C output channels.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    crop_kernel(const CropArgs<scalar_t> args, const int64_t* __restrict__ idx,
                scalar_t* __restrict__ out, index_t n, index_t CG, index_t PH, index_t PW,
                int64_t C, int64_t c_offset, int64_t stride, int64_t padding, int64_t H, int64_t W,
                int64_t B, int64_t HC, int64_t WC) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t cg = i % CG;
    index_t r = i / CG;
    const index_t px = r % PW;
    r /= PW;
    const index_t py = r % PH;
    const index_t p = r / PH;
    const int64_t b = idx[3 * int64_t(p)];
    const int64_t cy = idx[3 * int64_t(p) + 1];
    const int64_t cx = idx[3 * int64_t(p) + 2];
    scalar_t v = scalar_t(0);
    if (idx_row_ok(b, cy, cx, B, HC, WC)) {
      const int64_t y = patch_origin(cy, stride, padding) + py;
      const int64_t x = patch_origin(cx, stride, padding) + px;
      if (y >= 0 && y < H && x >= 0 && x < W) {
        // NB: unrolled with constant indices so that the inputs are read
        // from the kernel's parameter space, never copied to local memory.
#pragma unroll
        for (int j = 0; j < kMaxInputs; ++j) {
          if (j < args.n && cg >= args.in[j].c_begin && cg < args.in[j].c_end) {
            v = crop_sample<scalar_t, opmath_t>(args.in[j], b, cg - args.in[j].c_begin, y, x, H, W);
          }
        }
      }
    }
    out[((int64_t(p) * PH + py) * PW + px) * C + c_offset + cg] = v;
  }
}

at::Tensor crop_cuda(at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                     int64_t padding, at::IntArrayRef image_size, at::IntArrayRef patch_size) {
  const char* op = "crop";
  check_crop_args(op, inputs, idx, stride, padding, image_size, patch_size, at::kCUDA);
  const at::Tensor& first = inputs[0];
  const at::cuda::OptionalCUDAGuard guard(first.device());

  const int64_t B = first.size(0), H = image_size[0], W = image_size[1];
  const int64_t PH = patch_size[0], PW = patch_size[1];
  // A patch is anchored at a cell of the stride grid over the image; rows
  // outside it are caught on the device (idx_row_ok).
  const int64_t HC = (H + stride - 1) / stride, WC = (W + stride - 1) / stride;
  const at::Tensor idx_c = idx.contiguous();
  const int64_t P = idx_c.size(0);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  // NB: channels-last, the layout the refiner's convolutions run fastest in.
  at::Tensor out = at::empty({P, C, PH, PW}, first.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (P == 0 || C == 0) {
    return out;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "crop_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const int64_t* idx_p = idx_c.data_ptr<int64_t>();
    const bool small = fits_int32(out.numel());
    auto launch = [&](const CropArgs<scalar_t>& args, int64_t c_offset, int64_t CG) {
      const int64_t n = P * PH * PW * CG;
      const int64_t blocks = blocks_for(n);
      if (small) {
        crop_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(
            args, idx_p, out_p, static_cast<int32_t>(n), static_cast<int32_t>(CG),
            static_cast<int32_t>(PH), static_cast<int32_t>(PW), C, c_offset, stride, padding, H, W, B,
            HC, WC);
      } else {
        crop_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
            args, idx_p, out_p, n, CG, PH, PW, C, c_offset, stride, padding, H, W, B, HC, WC);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    CropArgs<scalar_t> args{};
    args.n = 0;
    int64_t group_begin = 0;  // first output channel of the current group
    int64_t c_next = 0;       // first output channel of the next input
    for (const auto& t : inputs) {
      const int64_t tc = t.size(1);
      if (tc == 0) {
        continue;
      }
      if (args.n == kMaxInputs) {
        launch(args, group_begin, c_next - group_begin);
        args = CropArgs<scalar_t>{};
        args.n = 0;
        group_begin = c_next;
      }
      CropInput<scalar_t>& s = args.in[args.n++];
      s.data = t.data_ptr<scalar_t>();
      s.sb = t.stride(0);
      s.sc = t.stride(1);
      s.sh = t.stride(2);
      s.sw = t.stride(3);
      s.height = t.size(2);
      s.width = t.size(3);
      s.c_begin = c_next - group_begin;
      s.c_end = s.c_begin + tc;
      s.resample = s.height != H || s.width != W;
      s.scale_h = linear_scale<opmath_t>(s.height, H);
      s.scale_w = linear_scale<opmath_t>(s.width, W);
      c_next += tc;
    }
    if (args.n > 0) {
      launch(args, group_begin, c_next - group_begin);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CUDA, m) {
  m.impl("crop", &crop_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
