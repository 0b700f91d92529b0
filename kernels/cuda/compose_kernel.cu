// CUDA kernel of compose: the full-resolution output in one pass. Each
// element is its patch's value where the cell map names a patch, else the
// bilinear upsample of the coarse map; then MattingRefine's epilogue (clamp
// alpha; foreground + src, then clamp) when src is given.
//
// Two launches (after the map's fill): the cell map (cell_map.cu), then the
// output pass, over a 3-D grid (column groups, rows, B * C planes). A thread
// owns kVec consecutive columns of the output (one vector store when W
// allows) and walks kRows rows of a plane (more where the grid is capped):
// its column taps and cells are computed once, a row's tap and cell row
// once per row, and no integer division is left per element. A warp's
// stores are one contiguous run of its row; every output element is written
// exactly once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

constexpr int kBX = 32;  // threads along a row: one warp
constexpr int kBY = 8;   // rows per block
constexpr int64_t kRows = 4;  // rows per thread, where the grid allows
constexpr int64_t kMaxGridYZ = 65535;

// planes = B * C (cdiv divides by C). kS: the patch size when it is 4 (the
// refiner's), else 0 and s is runtime (sdiv). The column offsets into
// coarse's rows and a patch's rows, (WCo - 1) * cs.s3 and (s - 1) * ps.s3,
// are below 2^31 (32-bit).
template <typename scalar_t, int kS, int kVec>
__global__ void __launch_bounds__(kBX * kBY)
    compose_kernel(const scalar_t* __restrict__ coarse, const Strides4 cs,
                   const scalar_t* __restrict__ pat, const Strides4 ps,
                   const scalar_t* __restrict__ src, const Strides4 ss, const bool src_vec,
                   const int32_t* __restrict__ map, scalar_t* __restrict__ out,
                   const int64_t planes, const int64_t C, const FastDiv cdiv, const int64_t H,
                   const int64_t W, const FastDiv sdiv, const int64_t HCo, const int64_t WCo,
                   const int64_t HB, const int64_t WB, const at::opmath_type<scalar_t> scale_h,
                   const at::opmath_type<scalar_t> scale_w) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = VecN<scalar_t, kVec>;
  const int64_t x0 = (int64_t(blockIdx.x) * kBX + threadIdx.x) * kVec;
  if (x0 >= W) {
    return;  // no block-wide synchronisation below
  }
  const int64_t s = kS > 0 ? kS : sdiv.d;
  // The thread's columns: their taps (as offsets into a coarse row), cells,
  // and offsets into a patch row.
  int32_t col0[kVec], col1[kVec], pcol[kVec];
  opmath_t wx0[kVec], wx1[kVec];
  int64_t cell[kVec];
  int64_t cell_run = kS > 0 ? 0 : sdiv.div64(x0), px_run = x0 - cell_run * s;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t x = x0 + j;
    const LinearTap<opmath_t> tx = linear_tap_unrounded<opmath_t>(x, WCo, W, scale_w);
    col0[j] = static_cast<int32_t>(tx.i0 * cs.s3);
    col1[j] = static_cast<int32_t>(tx.i1 * cs.s3);
    wx0[j] = tx.w0;
    wx1[j] = tx.w1;
    int64_t px;
    if constexpr (kS > 0) {
      cell[j] = int64_t(uint64_t(x) / kS);
      px = int64_t(uint64_t(x) % kS);
    } else {
      cell[j] = cell_run;
      px = px_run;
      if (++px_run == s) {
        px_run = 0;
        ++cell_run;
      }
    }
    pcol[j] = static_cast<int32_t>(px * ps.s3);
  }
  // The thread's rows: y0, y0 + dy, ...; for a runtime s, y / s and y % s
  // are carried from row to row instead of divided.
  const int64_t y0 = int64_t(blockIdx.y) * kBY + threadIdx.y;
  const int64_t dy = int64_t(gridDim.y) * kBY;
  const int64_t dcy = kS > 0 ? 0 : sdiv.div64(dy), dpy = dy - dcy * s;
  const int64_t cy0 = kS > 0 ? 0 : sdiv.div64(y0), py0 = y0 - cy0 * s;
  // NB: loops not unrolled: that would multiply the registers, not the
  // memory parallelism, which comes from the warps.
#pragma unroll 1
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t b = cdiv.div64(plane), c = plane - b * C;
    const scalar_t* cplane = coarse + b * cs.s0 + c * cs.s1;
    const scalar_t* pplane = pat + c * ps.s1;
    const int32_t* mplane = map + b * HB * WB;
    // src's channel c - 1 for foreground channels, none for alpha.
    const scalar_t* splane =
        src != nullptr && c > 0 ? src + b * ss.s0 + (c - 1) * ss.s1 : nullptr;
    scalar_t* oplane = out + plane * H * W + x0;
    int64_t cy_run = cy0, py_run = py0;
#pragma unroll 1
    for (int64_t y = y0; y < H; y += dy) {
      int64_t cy, py;
      if constexpr (kS > 0) {
        cy = int64_t(uint64_t(y) / kS);
        py = int64_t(uint64_t(y) % kS);
      } else {
        cy = cy_run;
        py = py_run;
        cy_run += dcy;
        py_run += dpy;
        if (py_run >= s) {
          py_run -= s;
          ++cy_run;
        }
      }
      const LinearTap<opmath_t> ty = linear_tap_unrounded<opmath_t>(y, HCo, H, scale_h);
      const scalar_t* r0 = cplane + ty.i0 * cs.s2;
      const scalar_t* r1 = cplane + ty.i1 * cs.s2;
      const scalar_t* prow = pplane + py * ps.s2;
      const int32_t* cells = mplane + cy * WB;
      Vec o;
      int32_t p = -1;
      const scalar_t* patch_row = prow;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j == 0 || cell[j] != cell[j - 1]) {
          p = cells[cell[j]];  // one load per distinct cell
          patch_row = p >= 0 ? prow + int64_t(p) * ps.s0 : prow;
        }
        // NB: the upsample is computed for refined cells too (its reads hit
        // L1): without a branch per element, all of the row's loads can be
        // in flight at once.
        o.v[j] = static_cast<scalar_t>(linear_mix<opmath_t>(
            static_cast<opmath_t>(r0[col0[j]]), static_cast<opmath_t>(r0[col1[j]]),
            static_cast<opmath_t>(r1[col0[j]]), static_cast<opmath_t>(r1[col1[j]]), ty.w0, ty.w1,
            wx0[j], wx1[j]));
        if (p >= 0) {
          o.v[j] = patch_row[pcol[j]];
        }
      }
      if (src != nullptr) {
        if (splane == nullptr) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            o.v[j] = static_cast<scalar_t>(clamp01(static_cast<opmath_t>(o.v[j])));
          }
        } else {
          const scalar_t* srow = splane + y * ss.s2;
          Vec sv;
          if (src_vec) {
            sv = *reinterpret_cast<const Vec*>(srow + x0);
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
              sv.v[j] = srow[(x0 + j) * ss.s3];
            }
          }
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            // Rounded to scalar_t after the add, as fgr.add_(src) does.
            const scalar_t sum = static_cast<scalar_t>(static_cast<opmath_t>(o.v[j]) +
                                                       static_cast<opmath_t>(sv.v[j]));
            o.v[j] = static_cast<scalar_t>(clamp01(static_cast<opmath_t>(sum)));
          }
        }
      }
      // out is contiguous and W % kVec == 0: the store is aligned.
      store_vec(oplane + y * W, o);
    }
  }
}

// Writes the output into out, a contiguous (B, C, H, W) tensor on coarse's
// device; the arguments are checked by the caller.
void compose_impl(const char* op, const at::Tensor& coarse, const at::Tensor& patches,
                  const at::Tensor& idx, const c10::optional<at::Tensor>& valid,
                  const c10::optional<at::Tensor>& src, const at::Tensor& out) {
  const int64_t B = coarse.size(0), C = coarse.size(1), HCo = coarse.size(2), WCo = coarse.size(3);
  const int64_t H = out.size(2), W = out.size(3);
  const int64_t s = patches.size(3);
  const DeviceGuard guard(coarse.device());

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HB = H / s, WB = W / s;
  const at::Tensor map = cell_map(op, idx_c, valid, B, HB, WB);
  if (out.numel() == 0) {
    return;
  }
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coarse.scalar_type(), "compose_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // Four elements a thread where the rows allow it (out is contiguous;
    // compose_into's may start unaligned): 16-byte stores (float32; float64
    // takes two a thread), 8-byte ones for 16-bit types, whose 8-wide
    // vectors would double the registers (~128) and halve the occupancy for
    // no gain in bandwidth.
    constexpr int kVecMax = sizeof(scalar_t) == 8 ? 2 : 4;
    const bool vec = W % kVecMax == 0 &&
                     reinterpret_cast<uintptr_t>(out.data_ptr()) % (kVecMax * sizeof(scalar_t)) == 0;
    const int vec_len = vec ? kVecMax : 1;
    const opmath_t sh = linear_scale<opmath_t>(HCo, H), sw = linear_scale<opmath_t>(WCo, W);
    // NB: the kernel's offsets within a row are 32-bit; rows that span 2^31
    // elements or more (absurd strides, or 2^31 columns) are read from a
    // contiguous copy, or refused.
    auto row_fits = [](const at::Tensor& t) {
      return (t.size(3) - 1) * t.stride(3) < (int64_t(1) << 31);
    };
    const at::Tensor coarse_k = row_fits(coarse) ? coarse : coarse.contiguous();
    const at::Tensor patches_k = row_fits(patches) ? patches : patches.contiguous();
    TORCH_CHECK(row_fits(coarse_k) && row_fits(patches_k), op,
                ": coarse and patches must be narrower than 2^31 columns");
    const scalar_t* cp = coarse_k.data_ptr<scalar_t>();
    const scalar_t* pp = patches_k.data_ptr<scalar_t>();
    const scalar_t* sp = src.has_value() ? src->data_ptr<scalar_t>() : nullptr;
    const Strides4 cs = strides4(coarse_k), ps = strides4(patches_k);
    const Strides4 ss = src.has_value() ? strides4(*src) : cs;
    // src rows read as vectors too when each of its rows starts aligned.
    const bool src_vec = vec && sp != nullptr && ss.s3 == 1 && ss.s0 % vec_len == 0 &&
                         ss.s1 % vec_len == 0 && ss.s2 % vec_len == 0 &&
                         reinterpret_cast<uintptr_t>(sp) % (vec_len * sizeof(scalar_t)) == 0;
    const int32_t* mp = map.data_ptr<int32_t>();
    scalar_t* optr = out.data_ptr<scalar_t>();
    const FastDiv sdiv(s);
    const FastDiv cdiv(C);
    const dim3 block(kBX, kBY);
    const dim3 grid(static_cast<unsigned>((W / vec_len + kBX - 1) / kBX),
                    static_cast<unsigned>(std::min((H + kBY * kRows - 1) / (kBY * kRows), kMaxGridYZ)),
                    static_cast<unsigned>(std::min(B * C, kMaxGridYZ)));
    auto launch = [&](auto s_tag, auto vec_tag) {
      constexpr int kS = decltype(s_tag)::value ? 4 : 0;
      constexpr int kVec = decltype(vec_tag)::value ? kVecMax : 1;
      launch_kernel<compose_kernel<scalar_t, kS, kVec>>(grid, block, 0, stream, cp, cs, pp, ps, sp, ss,
                                                        src_vec, mp, optr, B * C, C, cdiv, H, W, sdiv,
                                                        HCo, WCo, HB, WB, sh, sw);
    };
    // NB: the refiner's s = 4 gets its own kernel, with the cell arithmetic
    // as shifts; W % 4 == 0 then, so its rows take vectors unless
    // compose_into's out starts unaligned (the generic kernel then).
    if (s == 4 && vec) {
      launch(std::true_type{}, std::true_type{});
    } else if (vec) {
      launch(std::false_type{}, std::true_type{});
    } else {
      launch(std::false_type{}, std::false_type{});
    }
  });
}

at::Tensor compose_cuda(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                        const c10::optional<at::Tensor>& valid, at::IntArrayRef size,
                        const c10::optional<at::Tensor>& src) {
  const char* op = "compose";
  check_compose_args(op, coarse, patches, idx, valid, size, src, kKernelDevice);
  at::Tensor out = at::empty({coarse.size(0), coarse.size(1), size[0], size[1]}, coarse.options());
  compose_impl(op, coarse, patches, idx, valid, src, out);
  return out;
}

void compose_into_cuda(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                       const c10::optional<at::Tensor>& valid, const c10::optional<at::Tensor>& src,
                       const at::Tensor& out) {
  const char* op = "compose_into";
  check_compose_into_args(op, coarse, patches, idx, valid, src, out, kKernelDevice);
  compose_impl(op, coarse, patches, idx, valid, src, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, PYMATTING_EXT_KERNEL_KEY, m) {
  m.impl("compose", &compose_cuda);
  m.impl("compose_into", &compose_into_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
