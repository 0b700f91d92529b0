// CPU kernel of compose: the full-resolution output in one pass. Each row is
// the bilinear upsample of the coarse map, with the refined cells taken from
// their patches and MattingRefine's clamp (and foreground + src) applied.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../index_math.h"
#include "cpu_common.h"

namespace pymatting_ext {
namespace cpu {
namespace {

template <typename scalar_t>
inline scalar_t clamp01(scalar_t v) {
  // NB: written so that NaN passes through, as torch.clamp does.
  return v < scalar_t(0) ? scalar_t(0) : (v > scalar_t(1) ? scalar_t(1) : v);
}

// Writes the output into out, a contiguous (B, C, H, W) tensor; the
// arguments are checked by the caller.
void compose_impl(const char* op, const at::Tensor& coarse, const at::Tensor& patches,
                  const at::Tensor& idx, const c10::optional<at::Tensor>& valid,
                  const c10::optional<at::Tensor>& src, const at::Tensor& out) {
  const int64_t B = coarse.size(0), C = coarse.size(1), HCo = coarse.size(2), WCo = coarse.size(3);
  const int64_t H = out.size(2), W = out.size(3);
  const int64_t s = patches.size(3);

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HB = H / s, WB = W / s;
  const std::vector<int32_t> map = cell_map(op, idx_c, valid, B, HB, WB);
  if (out.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coarse.scalar_type(), "compose_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<LinearTap<opmath_t>> rows(H), cols(W);
    const opmath_t sh = linear_scale<opmath_t>(HCo, H), sw = linear_scale<opmath_t>(WCo, W);
    for (int64_t y = 0; y < H; ++y) {
      rows[y] = linear_tap<scalar_t, opmath_t>(y, HCo, H, sh);
    }
    for (int64_t x = 0; x < W; ++x) {
      cols[x] = linear_tap<scalar_t, opmath_t>(x, WCo, W, sw);
    }
    const scalar_t* in = coarse.data_ptr<scalar_t>();
    const auto is = coarse.strides();
    const scalar_t* pat = patches.data_ptr<scalar_t>();
    const auto ps = patches.strides();
    const scalar_t* src_p = src.has_value() ? src->data_ptr<scalar_t>() : nullptr;
    const auto ss = src.has_value() ? src->strides() : is;
    scalar_t* out_all = out.data_ptr<scalar_t>();

    // Rows are handed out in (b, c, y) order, so a thread walks down a plane
    // and reuses the width-interpolated coarse rows of the row above.
    at::parallel_for(0, B * C * H, 16, [&](int64_t r0, int64_t r1) {
      std::vector<opmath_t> buf[2] = {std::vector<opmath_t>(W), std::vector<opmath_t>(W)};
      int64_t key[2] = {-1, -1};
      // The width pass of one coarse row into a buffer not holding `keep`.
      auto coarse_row = [&](int64_t plane, int64_t cy, int64_t keep) -> const opmath_t* {
        const int64_t k = plane * HCo + cy;
        for (int j = 0; j < 2; ++j) {
          if (key[j] == k) {
            return buf[j].data();
          }
        }
        const int j = key[0] == keep ? 1 : 0;
        const int64_t b = plane / C, c = plane % C;
        const scalar_t* row = in + b * is[0] + c * is[1] + cy * is[2];
        opmath_t* dst = buf[j].data();
        for (int64_t x = 0; x < W; ++x) {
          const auto& t = cols[x];
          dst[x] = static_cast<opmath_t>(row[t.i0 * is[3]]) * t.w0 +
                   static_cast<opmath_t>(row[t.i1 * is[3]]) * t.w1;
        }
        key[j] = k;
        return dst;
      };
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / H, y = r % H;
        const int64_t b = plane / C, c = plane % C;
        const auto& ty = rows[y];
        const opmath_t* top = coarse_row(plane, ty.i0, plane * HCo + ty.i1);
        const opmath_t* bottom = coarse_row(plane, ty.i1, plane * HCo + ty.i0);
        scalar_t* o = out_all + r * W;
        const opmath_t w0 = ty.w0, w1 = ty.w1;
        for (int64_t x = 0; x < W; ++x) {
          o[x] = static_cast<scalar_t>(top[x] * w0 + bottom[x] * w1);
        }
        const int32_t* cells = map.data() + (b * HB + y / s) * WB;
        const int64_t py = y % s;
        for (int64_t cx = 0; cx < WB; ++cx) {
          const int32_t p = cells[cx];
          if (p < 0) {
            continue;
          }
          const scalar_t* prow = pat + p * ps[0] + c * ps[1] + py * ps[2];
          for (int64_t px = 0; px < s; ++px) {
            o[cx * s + px] = prow[px * ps[3]];
          }
        }
        if (src_p != nullptr) {
          if (c == 0) {
            for (int64_t x = 0; x < W; ++x) {
              o[x] = clamp01(o[x]);
            }
          } else {
            const scalar_t* srow = src_p + b * ss[0] + (c - 1) * ss[1] + y * ss[2];
            for (int64_t x = 0; x < W; ++x) {
              // Rounded to scalar_t after the add, as fgr.add_(src) does.
              const scalar_t sum = static_cast<scalar_t>(static_cast<opmath_t>(o[x]) +
                                                         static_cast<opmath_t>(srow[x * ss[3]]));
              o[x] = clamp01(sum);
            }
          }
        }
      }
    });
  });
}

at::Tensor compose_cpu(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                       const c10::optional<at::Tensor>& valid, at::IntArrayRef size,
                       const c10::optional<at::Tensor>& src) {
  const char* op = "compose";
  check_compose_args(op, coarse, patches, idx, valid, size, src, at::kCPU);
  at::Tensor out = at::empty({coarse.size(0), coarse.size(1), size[0], size[1]}, coarse.options());
  compose_impl(op, coarse, patches, idx, valid, src, out);
  return out;
}

void compose_into_cpu(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                      const c10::optional<at::Tensor>& valid, const c10::optional<at::Tensor>& src,
                      const at::Tensor& out) {
  const char* op = "compose_into";
  check_compose_into_args(op, coarse, patches, idx, valid, src, out, at::kCPU);
  compose_impl(op, coarse, patches, idx, valid, src, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("compose", &compose_cpu);
  m.impl("compose_into", &compose_into_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
