// CUDA kernel of compose: the full-resolution output in one pass. Each
// element is its patch's value where the cell map names a patch, else the
// bilinear upsample of the coarse map; then MattingRefine's epilogue (clamp
// alpha; foreground + src, then clamp) when src is given.
//
// Two launches (after the map's fill): the cell map (cuda_common.cuh), then
// the output pass. Thread i writes kVec consecutive elements of one output
// row (kVec = 4 when W % 4 == 0, as one vector store; else 1), consecutive
// threads consecutive groups, so stores are coalesced; every output element
// is written exactly once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    compose_kernel(const scalar_t* __restrict__ coarse, const Strides4 cs,
                   const scalar_t* __restrict__ pat, const Strides4 ps,
                   const scalar_t* __restrict__ src, const Strides4 ss,
                   const int32_t* __restrict__ map, scalar_t* __restrict__ out, index_t groups,
                   index_t C, index_t H, index_t W, index_t s, int64_t HCo, int64_t WCo,
                   int64_t HB, int64_t WB, at::opmath_type<scalar_t> scale_h,
                   at::opmath_type<scalar_t> scale_w) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t WG = W / kVec;
  for (index_t g = blockIdx.x * index_t(blockDim.x) + threadIdx.x; g < groups;
       g += index_t(gridDim.x) * blockDim.x) {
    const index_t xg = g % WG;
    index_t r = g / WG;
    const index_t y = r % H;
    r /= H;
    const index_t c = r % C;
    const index_t b = r / C;
    const LinearTap<opmath_t> ty = linear_tap<scalar_t, opmath_t>(y, HCo, H, scale_h);
    const scalar_t* row0 = coarse + b * cs.s0 + c * cs.s1 + ty.i0 * cs.s2;
    const scalar_t* row1 = coarse + b * cs.s0 + c * cs.s1 + ty.i1 * cs.s2;
    const int32_t* cells = map + (int64_t(b) * HB + y / s) * WB;
    const index_t py = y % s;
    VecN<scalar_t, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const index_t x = xg * kVec + j;
      const int32_t p = cells[x / s];
      scalar_t v;
      if (p >= 0) {
        v = pat[p * ps.s0 + c * ps.s1 + py * ps.s2 + (x % s) * ps.s3];
      } else {
        const LinearTap<opmath_t> tx = linear_tap<scalar_t, opmath_t>(x, WCo, W, scale_w);
        v = static_cast<scalar_t>(linear_mix<opmath_t>(
            static_cast<opmath_t>(row0[tx.i0 * cs.s3]), static_cast<opmath_t>(row0[tx.i1 * cs.s3]),
            static_cast<opmath_t>(row1[tx.i0 * cs.s3]), static_cast<opmath_t>(row1[tx.i1 * cs.s3]),
            ty.w0, ty.w1, tx.w0, tx.w1));
      }
      if (src != nullptr) {
        if (c == 0) {
          v = static_cast<scalar_t>(clamp01(static_cast<opmath_t>(v)));
        } else {
          // Rounded to scalar_t after the add, as fgr.add_(src) does.
          const scalar_t sum = static_cast<scalar_t>(
              static_cast<opmath_t>(v) +
              static_cast<opmath_t>(src[b * ss.s0 + (c - 1) * ss.s1 + y * ss.s2 + x * ss.s3]));
          v = static_cast<scalar_t>(clamp01(static_cast<opmath_t>(sum)));
        }
      }
      o.v[j] = v;
    }
    // out is contiguous and W % kVec == 0: the store is aligned.
    *reinterpret_cast<VecN<scalar_t, kVec>*>(out + ((int64_t(b) * C + c) * H + y) * W +
                                             int64_t(xg) * kVec) = o;
  }
}

at::Tensor compose_cuda(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                        const c10::optional<at::Tensor>& valid, at::IntArrayRef size,
                        const c10::optional<at::Tensor>& src) {
  const char* op = "compose";
  check_compose_args(op, coarse, patches, idx, valid, size, src, at::kCUDA);
  const int64_t B = coarse.size(0), C = coarse.size(1), HCo = coarse.size(2), WCo = coarse.size(3);
  const int64_t H = size[0], W = size[1];
  const int64_t s = patches.size(3);
  const at::cuda::OptionalCUDAGuard guard(coarse.device());

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HB = H / s, WB = W / s;
  const at::Tensor map = cell_map(op, idx_c, valid, B, HB, WB);
  at::Tensor out = at::empty({B, C, H, W}, coarse.options());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec4 = W % 4 == 0;
  const int64_t groups = vec4 ? n / 4 : n;
  const int64_t blocks = blocks_for(groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coarse.scalar_type(), "compose_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t sh = linear_scale<opmath_t>(HCo, H), sw = linear_scale<opmath_t>(WCo, W);
    const scalar_t* cp = coarse.data_ptr<scalar_t>();
    const scalar_t* pp = patches.data_ptr<scalar_t>();
    const scalar_t* sp = src.has_value() ? src->data_ptr<scalar_t>() : nullptr;
    const Strides4 cs = strides4(coarse), ps = strides4(patches);
    const Strides4 ss = src.has_value() ? strides4(*src) : cs;
    const int32_t* mp = map.data_ptr<int32_t>();
    scalar_t* optr = out.data_ptr<scalar_t>();
    auto launch = [&](auto index_tag, auto vec4_tag) {
      using index_t = decltype(index_tag);
      constexpr int kVec = decltype(vec4_tag)::value ? 4 : 1;
      compose_kernel<scalar_t, index_t, kVec><<<blocks, kThreads, 0, stream>>>(
          cp, cs, pp, ps, sp, ss, mp, optr, static_cast<index_t>(groups), static_cast<index_t>(C),
          static_cast<index_t>(H), static_cast<index_t>(W), static_cast<index_t>(s), HCo, WCo, HB,
          WB, sh, sw);
    };
    launch_variant(fits_int32(n), vec4, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CUDA, m) {
  m.impl("compose", &compose_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
