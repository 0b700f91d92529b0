// CUDA kernels of crop and crop_into: patches from several inputs, each
// optionally sampled from a bilinear resize, without materialising the
// resized images.
//
// The output is channels-last, so its patches are a sequence of pixels
// (p, py, px), each a run of channels. A block owns T consecutive pixels:
// thread t computes pixel t (its bilinear taps once per input size, then
// every channel of every input) into shared memory, in the output's order;
// the block then stores the tile. Consecutive threads are consecutive
// columns of a patch row, so the reads of an input row coalesce (NCHW
// inputs; any strides work). When a launch writes all of out's channels the
// tile is one contiguous chunk of out, stored as 16-byte vectors (scalars
// at an unaligned head and at the tail); otherwise (crop_into, or an input
// set split over launches) it is one run per pixel, stored in the widest
// vectors its alignment allows. Tiles are pixels, not patches, so any patch
// size works (the full mode's one patch per image too).
//
// Inputs are cut into launches of at most kMaxSegments channel ranges and
// kMaxGroupBytes per pixel (one launch for the refiner's crops), so any
// number of inputs and channels fits. Every pixel of a launch's channels is
// written exactly once: zeros outside the image and for out-of-range idx
// rows (which also raise a device assertion).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

constexpr int kMaxSegments = 8;
// A launch's channels of one pixel, in bytes: 96 float32 channels (the
// refiner's crops have 42), so a 64-pixel tile fits in kTileBytes.
constexpr int64_t kMaxGroupBytes = 384;
constexpr int64_t kTileBytes = 24 * 1024;
constexpr int kMaxTile = 256;

// Channels [c0, c0 + channels) of one input.
template <typename scalar_t>
struct CropSegment {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* data;  // the input at (0, c0, 0, 0)
  int64_t sb, sc, sh, sw;
  int64_t height, width;
  opmath_t scale_h, scale_w;
  int32_t channels;
  int32_t slot;  // its first channel within the launch's pixel run
  bool resample;
  bool new_taps;  // resampled, from another size than the segment before
};

template <typename scalar_t>
struct CropArgs {
  CropSegment<scalar_t> seg[kMaxSegments];
  int n;
};

struct CropShape {
  int64_t pixels;  // P * PH * PW
  int64_t PH, PW;
  FastDiv div_ph, div_pw;
  int64_t c_out;   // out's channels
  int64_t c_first; // the launch's first channel in out
  int32_t cg;      // the launch's channels
  int32_t run_bytes;  // vector width of the per-pixel stores (!dense)
  int64_t stride, padding, H, W, B, HC, WC;
};

// Pixel runs: pixel t's cg channels go to chunk + t * c_out, as vectors of
// type Vec (the host checked the alignment).
template <typename Vec, typename scalar_t>
__device__ __forceinline__ void store_runs(const scalar_t* tile, scalar_t* chunk, int npix, int cg,
                                           int64_t c_out) {
  constexpr int kE = sizeof(Vec) / sizeof(scalar_t);
  const int nv = cg / kE;  // vectors per pixel
  const int total = npix * nv;
  // Consecutive threads take consecutive vectors; (t, j) steps without a
  // division per store.
  int t = static_cast<int>(threadIdx.x) / nv;
  int j = static_cast<int>(threadIdx.x) - t * nv;
  const int dt = static_cast<int>(blockDim.x) / nv;
  const int dj = static_cast<int>(blockDim.x) - dt * nv;
  for (int k = threadIdx.x; k < total; k += blockDim.x) {
    store_bits(chunk + t * c_out + j * kE, *reinterpret_cast<const Vec*>(tile + t * cg + j * kE));
    t += dt;
    j += dj;
    if (j >= nv) {
      j -= nv;
      ++t;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxTile)
    crop_kernel(const CropArgs<scalar_t> args, const int64_t* __restrict__ idx,
                scalar_t* __restrict__ out, const CropShape sh) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kV = 16 / sizeof(scalar_t);  // elements per 16 bytes
  scalar_t* tile = dynamic_shared<scalar_t>();

  const int T = blockDim.x;
  const int cg = sh.cg;
  const int64_t g0 = int64_t(blockIdx.x) * T;
  const int npix = static_cast<int>(sh.pixels - g0 < T ? sh.pixels - g0 : T);
  const bool dense = cg == sh.c_out;
  scalar_t* chunk = out + g0 * sh.c_out + sh.c_first;
  // NB: a dense tile sits `shift` elements into shared memory, so that
  // shared and global addresses agree modulo 16 bytes and both sides of a
  // vector copy are aligned.
  const int shift =
      dense ? static_cast<int>((reinterpret_cast<uintptr_t>(chunk) / sizeof(scalar_t)) & (kV - 1)) : 0;

  if (static_cast<int>(threadIdx.x) < npix) {
    const int64_t g = g0 + threadIdx.x;
    const int64_t q = sh.div_pw.div64(g);  // patch row
    const int64_t px = g - q * sh.PW;
    const int64_t p = sh.div_ph.div64(q);
    const int64_t py = q - p * sh.PH;
    const int64_t b = idx[3 * p], cy = idx[3 * p + 1], cx = idx[3 * p + 2];
    scalar_t* dst = tile + shift + static_cast<int>(threadIdx.x) * cg;
    bool inside = false;
    int64_t y = 0, x = 0;
    if (idx_row_ok(b, cy, cx, sh.B, sh.HC, sh.WC)) {
      y = patch_origin(cy, sh.stride, sh.padding) + py;
      x = patch_origin(cx, sh.stride, sh.padding) + px;
      inside = y >= 0 && y < sh.H && x >= 0 && x < sh.W;
    }
    if (!inside) {
      for (int c = 0; c < cg; ++c) {
        dst[c] = scalar_t(0);
      }
    } else {
      LinearTap<opmath_t> ty{}, tx{};
      // NB: unrolled with constant indices so that the segments are read
      // from the kernel's parameter space, never copied to local memory.
#pragma unroll
      for (int j = 0; j < kMaxSegments; ++j) {
        if (j < args.n) {
          const CropSegment<scalar_t>& s = args.seg[j];
          scalar_t* d = dst + s.slot;
          const scalar_t* base = s.data + b * s.sb;
          if (!s.resample) {
            const scalar_t* v = base + y * s.sh + x * s.sw;
#pragma unroll 4
            for (int c = 0; c < s.channels; ++c) {
              d[c] = v[c * s.sc];
            }
          } else {
            if (s.new_taps) {
              ty = linear_tap_unrounded<opmath_t>(y, s.height, sh.H, s.scale_h);
              tx = linear_tap_unrounded<opmath_t>(x, s.width, sh.W, s.scale_w);
            }
            const scalar_t* v00 = base + ty.i0 * s.sh + tx.i0 * s.sw;
            const scalar_t* v01 = base + ty.i0 * s.sh + tx.i1 * s.sw;
            const scalar_t* v10 = base + ty.i1 * s.sh + tx.i0 * s.sw;
            const scalar_t* v11 = base + ty.i1 * s.sh + tx.i1 * s.sw;
#pragma unroll 4
            for (int c = 0; c < s.channels; ++c) {
              const int64_t o = c * s.sc;
              d[c] = static_cast<scalar_t>(linear_mix<opmath_t>(
                  static_cast<opmath_t>(v00[o]), static_cast<opmath_t>(v01[o]),
                  static_cast<opmath_t>(v10[o]), static_cast<opmath_t>(v11[o]), ty.w0, ty.w1,
                  tx.w0, tx.w1));
            }
          }
        }
      }
    }
  }
  __syncthreads();

  if (dense) {
    const int E = npix * cg;
    const int head = min(E, (kV - shift) & (kV - 1));
    const int nvec = (E - head) / kV;
    for (int e = threadIdx.x; e < head; e += T) {
      chunk[e] = tile[shift + e];
    }
    const uint4* tv = reinterpret_cast<const uint4*>(tile + shift + head);
    uint4* gv = reinterpret_cast<uint4*>(chunk + head);
    for (int k = threadIdx.x; k < nvec; k += T) {
      store_bits(gv + k, tv[k]);
    }
    for (int e = head + nvec * kV + threadIdx.x; e < E; e += T) {
      chunk[e] = tile[shift + e];
    }
  } else {
    // run_bytes >= sizeof(scalar_t) (the host's choice).
    using Vec4 = std::conditional_t<sizeof(scalar_t) <= 4, unsigned int, uint2>;
    switch (sh.run_bytes) {
      case 16:
        store_runs<uint4>(tile, chunk, npix, cg, sh.c_out);
        break;
      case 8:
        store_runs<uint2>(tile, chunk, npix, cg, sh.c_out);
        break;
      case 4:
        store_runs<Vec4>(tile, chunk, npix, cg, sh.c_out);
        break;
      default:
        store_runs<typename RawBits<sizeof(scalar_t)>::type>(tile, chunk, npix, cg, sh.c_out);
        break;
    }
  }
}

// Writes the patches into channels [c_offset, c_offset + sum C_i) of out, a
// channels-last contiguous (P, C_out, PH, PW) tensor; the arguments are
// checked by the caller.
void crop_into_impl(const char* op, at::TensorList inputs, const at::Tensor& idx_c, int64_t stride,
                    int64_t padding, at::IntArrayRef image_size, int64_t c_offset,
                    const at::Tensor& out) {
  const at::Tensor& first = inputs[0];
  const int64_t B = first.size(0), H = image_size[0], W = image_size[1];
  const int64_t PH = out.size(2), PW = out.size(3), C_out = out.size(1);
  // A patch is anchored at a cell of the stride grid over the image; rows
  // outside it are caught on the device (idx_row_ok).
  const int64_t HC = (H + stride - 1) / stride, WC = (W + stride - 1) / stride;
  check_idx_grid(op, idx_c, B, HC, WC);
  const int64_t P = idx_c.size(0);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  if (P == 0 || C == 0) {
    return;
  }
  const int64_t pixels = P * PH * PW;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "crop_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int64_t sz = sizeof(scalar_t);
    constexpr int64_t cap = kMaxGroupBytes / sz;  // channels per launch
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const int64_t* idx_p = idx_c.data_ptr<int64_t>();
    CropShape shape{};
    shape.pixels = pixels;
    shape.PH = PH;
    shape.PW = PW;
    shape.div_ph = FastDiv(PH);
    shape.div_pw = FastDiv(PW);
    shape.c_out = C_out;
    shape.stride = stride;
    shape.padding = padding;
    shape.H = H;
    shape.W = W;
    shape.B = B;
    shape.HC = HC;
    shape.WC = WC;

    auto launch = [&](const CropArgs<scalar_t>& args, int64_t c_first, int64_t cg) {
      // As many pixels a tile as kTileBytes holds, at least 64.
      int T = kMaxTile;
      while (T > 64 && T * cg * sz > kTileBytes) {
        T /= 2;
      }
      const int64_t blocks = (pixels + T - 1) / T;
      TORCH_CHECK(blocks <= INT32_MAX, op, ": too many patch pixels (", pixels, ")");
      // Per-pixel runs: the widest vector that the runs' length, out's pixel
      // pitch and the runs' first address are all multiples of.
      const uintptr_t first_addr = reinterpret_cast<uintptr_t>(out_p + c_first);
      int run_bytes = 16;
      while (run_bytes > sz && ((cg * sz) % run_bytes != 0 || (C_out * sz) % run_bytes != 0 ||
                                first_addr % run_bytes != 0)) {
        run_bytes /= 2;
      }
      CropShape s = shape;
      s.c_first = c_first;
      s.cg = static_cast<int32_t>(cg);
      s.run_bytes = run_bytes;
      const size_t smem = static_cast<size_t>((T * cg + 16 / sz) * sz);
      launch_kernel<crop_kernel<scalar_t>>(static_cast<unsigned>(blocks), T, smem, stream, args, idx_p,
                                           out_p, s);
    };

    CropArgs<scalar_t> args{};
    int64_t cg = 0;       // channels of the launch being assembled
    int64_t c_next = 0;   // the next input channel's position among the C
    int64_t c_group = 0;  // the launch's first channel among the C
    auto flush = [&]() {
      if (args.n > 0) {
        launch(args, c_offset + c_group, cg);
      }
      args = CropArgs<scalar_t>{};
      cg = 0;
      c_group = c_next;
    };
    for (const auto& t : inputs) {
      const int64_t tc = t.size(1);
      for (int64_t c0 = 0; c0 < tc;) {
        if (args.n == kMaxSegments || cg == cap) {
          flush();
        }
        const int64_t n = std::min(tc - c0, cap - cg);
        CropSegment<scalar_t>& s = args.seg[args.n];
        s.data = t.data_ptr<scalar_t>() + c0 * t.stride(1);
        s.sb = t.stride(0);
        s.sc = t.stride(1);
        s.sh = t.stride(2);
        s.sw = t.stride(3);
        s.height = t.size(2);
        s.width = t.size(3);
        s.resample = s.height != H || s.width != W;
        s.scale_h = linear_scale<opmath_t>(s.height, H);
        s.scale_w = linear_scale<opmath_t>(s.width, W);
        s.channels = static_cast<int32_t>(n);
        s.slot = static_cast<int32_t>(cg);
        // NB: the refiner's hid, pha and fgr (and src, bgr) share a size:
        // their taps are computed once a pixel.
        const CropSegment<scalar_t>* prev = args.n > 0 ? &args.seg[args.n - 1] : nullptr;
        s.new_taps = s.resample && !(prev != nullptr && prev->resample &&
                                     prev->height == s.height && prev->width == s.width);
        ++args.n;
        cg += n;
        c0 += n;
        c_next += n;
      }
    }
    flush();
  });
}

at::Tensor crop_cuda(at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                     int64_t padding, at::IntArrayRef image_size, at::IntArrayRef patch_size) {
  const char* op = "crop";
  check_crop_args(op, inputs, idx, stride, padding, image_size, patch_size, kKernelDevice);
  const DeviceGuard guard(inputs[0].device());
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  const at::Tensor idx_c = idx.contiguous();
  // NB: channels-last, the layout the refiner's convolutions run fastest in.
  at::Tensor out = at::empty({idx_c.size(0), C, patch_size[0], patch_size[1]},
                             inputs[0].options().memory_format(at::MemoryFormat::ChannelsLast));
  crop_into_impl(op, inputs, idx_c, stride, padding, image_size, 0, out);
  return out;
}

void crop_into_cuda(at::TensorList inputs, const at::Tensor& idx, int64_t stride, int64_t padding,
                    at::IntArrayRef image_size, int64_t channel_offset, const at::Tensor& out) {
  const char* op = "crop_into";
  // NB: the CPU kernel's checks, in its order, so that both raise the same
  // message for the same input.
  TORCH_CHECK(out.dim() == 4, op, ": out must have shape (P, C, ph, pw), got ", out.sizes());
  check_crop_args(op, inputs, idx, stride, padding, image_size, {out.size(2), out.size(3)},
                  kKernelDevice);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  check_crop_into_out(op, out, inputs[0], idx, C, channel_offset);
  const DeviceGuard guard(inputs[0].device());
  const at::Tensor idx_c = idx.contiguous();
  crop_into_impl(op, inputs, idx_c, stride, padding, image_size, channel_offset, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, PYMATTING_EXT_KERNEL_KEY, m) {
  m.impl("crop", &crop_cuda);
  m.impl("crop_into", &crop_into_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
