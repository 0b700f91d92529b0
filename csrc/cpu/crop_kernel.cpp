// CPU kernel of crop: patches from several inputs, each optionally sampled
// from a bilinear resize, without materialising the resized images.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../index_math.h"
#include "cpu_common.h"

namespace pymatting_ext {
namespace cpu {
namespace {

template <typename scalar_t>
struct CropPlane {
  const scalar_t* data;
  int64_t stride_b, stride_h, stride_w;
};

// Consecutive inputs of one size are one source: their channels are
// gathered and blended together.
template <typename scalar_t>
struct CropSource {
  std::vector<CropPlane<scalar_t>> planes;
  int64_t height, width;
  bool resample;
  // Taps over the resampled image's rows and columns (empty if !resample).
  std::vector<LinearTap<at::opmath_type<scalar_t>>> rows, cols;
};

// Writes the patches into channels [c_offset, c_offset + sum C_i) of out, a
// channels-last contiguous (P, C_out, PH, PW) tensor; the arguments are
// checked by the caller.
void crop_into_impl(const char* op, at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                    int64_t padding, at::IntArrayRef image_size, int64_t c_offset,
                    const at::Tensor& out) {
  const at::Tensor& first = inputs[0];
  const int64_t B = first.size(0), H = image_size[0], W = image_size[1];
  const int64_t PH = out.size(2), PW = out.size(3), C_out = out.size(1);
  const at::Tensor idx_c = idx.contiguous();
  // A patch is anchored at a cell of the stride grid over the image.
  check_idx_values(op, idx_c, B, (H + stride - 1) / stride, (W + stride - 1) / stride);
  const int64_t P = idx_c.size(0);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  if (P == 0 || C == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "crop_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<CropSource<scalar_t>> sources;
    for (const auto& t : inputs) {
      if (sources.empty() || sources.back().height != t.size(2) || sources.back().width != t.size(3)) {
        CropSource<scalar_t> s;
        s.height = t.size(2);
        s.width = t.size(3);
        s.resample = s.height != H || s.width != W;
        if (s.resample) {
          const opmath_t sh = linear_scale<opmath_t>(s.height, H);
          const opmath_t sw = linear_scale<opmath_t>(s.width, W);
          for (int64_t y = 0; y < H; ++y) {
            s.rows.push_back(linear_tap<scalar_t, opmath_t>(y, s.height, H, sh));
          }
          for (int64_t x = 0; x < W; ++x) {
            s.cols.push_back(linear_tap<scalar_t, opmath_t>(x, s.width, W, sw));
          }
        }
        sources.push_back(std::move(s));
      }
      for (int64_t c = 0; c < t.size(1); ++c) {
        sources.back().planes.push_back(
            {t.data_ptr<scalar_t>() + c * t.stride(1), t.stride(0), t.stride(2), t.stride(3)});
      }
    }
    const int64_t* idx_p = idx_c.data_ptr<int64_t>();
    scalar_t* out_all = out.data_ptr<scalar_t>();
    // Work items are strips of up to kStrip patch rows, so that a few huge
    // patches (the full mode's whole-image crop) still spread over threads.
    constexpr int64_t kStrip = 16;
    const int64_t strips = (PH + kStrip - 1) / kStrip;
    at::parallel_for(0, P * strips, 8, [&](int64_t t0, int64_t t1) {
      std::vector<opmath_t> local;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / strips;
        const int64_t py0 = (t % strips) * kStrip, py1 = std::min(PH, py0 + kStrip);
        const int64_t b = idx_p[3 * p];
        const int64_t oy = patch_origin(idx_p[3 * p + 1], stride, padding);
        const int64_t ox = patch_origin(idx_p[3 * p + 2], stride, padding);
        scalar_t* o = out_all + p * PH * PW * C_out + c_offset;
        // The part of the strip inside the image; everything else is zero.
        const int64_t y_lo = std::max(oy + py0, int64_t(0)), y_hi = std::min(oy + py1, H);
        const int64_t x_lo = std::max(ox, int64_t(0)), x_hi = std::min(ox + PW, W);
        for (int64_t py = py0; py < py1; ++py) {
          const int64_t y = oy + py;
          for (int64_t px = 0; px < PW; ++px) {
            const int64_t x = ox + px;
            if (y < y_lo || y >= y_hi || x < x_lo || x >= x_hi) {
              std::fill_n(o + (py * PW + px) * C_out, C, scalar_t(0));
            }
          }
        }
        if (y_lo >= y_hi || x_lo >= x_hi) {
          continue;
        }
        int64_t c_base = 0;
        for (const auto& s : sources) {
          const int64_t SC = static_cast<int64_t>(s.planes.size());
          if (!s.resample) {
            for (int64_t y = y_lo; y < y_hi; ++y) {
              scalar_t* orow = o + ((y - oy) * PW - ox) * C_out + c_base;
              for (int64_t c = 0; c < SC; ++c) {
                const auto& pl = s.planes[c];
                const scalar_t* irow = pl.data + b * pl.stride_b + y * pl.stride_h;
                for (int64_t x = x_lo; x < x_hi; ++x) {
                  orow[x * C_out + c] = irow[x * pl.stride_w];
                }
              }
            }
            c_base += SC;
            continue;
          }
          // NB: the source window is first gathered channels-innermost, so
          // the blend below runs over contiguous channels (vectorised) and
          // writes the channels-last output contiguously.
          const int64_t r_lo = s.rows[y_lo].i0, r_hi = s.rows[y_hi - 1].i1 + 1;
          const int64_t q_lo = s.cols[x_lo].i0, q_hi = s.cols[x_hi - 1].i1 + 1;
          const int64_t nq = q_hi - q_lo;
          local.resize(static_cast<size_t>((r_hi - r_lo) * nq * SC));
          for (int64_t c = 0; c < SC; ++c) {
            const auto& pl = s.planes[c];
            const scalar_t* plane = pl.data + b * pl.stride_b;
            for (int64_t r = r_lo; r < r_hi; ++r) {
              const scalar_t* irow = plane + r * pl.stride_h;
              opmath_t* lrow = local.data() + (r - r_lo) * nq * SC + c;
              for (int64_t q = q_lo; q < q_hi; ++q) {
                lrow[(q - q_lo) * SC] = static_cast<opmath_t>(irow[q * pl.stride_w]);
              }
            }
          }
          for (int64_t y = y_lo; y < y_hi; ++y) {
            const auto& ty = s.rows[y];
            const opmath_t* l0 = local.data() + (ty.i0 - r_lo) * nq * SC;
            const opmath_t* l1 = local.data() + (ty.i1 - r_lo) * nq * SC;
            const opmath_t wy0 = ty.w0, wy1 = ty.w1;
            scalar_t* orow = o + ((y - oy) * PW - ox) * C_out + c_base;
            for (int64_t x = x_lo; x < x_hi; ++x) {
              const auto& tx = s.cols[x];
              const opmath_t* a0 = l0 + (tx.i0 - q_lo) * SC;
              const opmath_t* a1 = l0 + (tx.i1 - q_lo) * SC;
              const opmath_t* b0 = l1 + (tx.i0 - q_lo) * SC;
              const opmath_t* b1 = l1 + (tx.i1 - q_lo) * SC;
              const opmath_t wx0 = tx.w0, wx1 = tx.w1;
              scalar_t* oc = orow + x * C_out;
              for (int64_t c = 0; c < SC; ++c) {
                oc[c] = static_cast<scalar_t>(linear_mix<opmath_t>(a0[c], a1[c], b0[c], b1[c], wy0, wy1, wx0, wx1));
              }
            }
          }
          c_base += SC;
        }
      }
    });
  });
}

at::Tensor crop_cpu(at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                    int64_t padding, at::IntArrayRef image_size, at::IntArrayRef patch_size) {
  const char* op = "crop";
  check_crop_args(op, inputs, idx, stride, padding, image_size, patch_size, at::kCPU);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  // NB: channels-last, because that is the layout in which oneDNN runs the
  // refiner's small convolutions fastest (5x faster than NCHW at HD).
  at::Tensor out = at::empty({idx.size(0), C, patch_size[0], patch_size[1]},
                             inputs[0].options().memory_format(at::MemoryFormat::ChannelsLast));
  crop_into_impl(op, inputs, idx, stride, padding, image_size, 0, out);
  return out;
}

void crop_into_cpu(at::TensorList inputs, const at::Tensor& idx, int64_t stride, int64_t padding,
                   at::IntArrayRef image_size, int64_t channel_offset, const at::Tensor& out) {
  const char* op = "crop_into";
  TORCH_CHECK(out.dim() == 4, op, ": out must have shape (P, C, ph, pw), got ", out.sizes());
  check_crop_args(op, inputs, idx, stride, padding, image_size, {out.size(2), out.size(3)}, at::kCPU);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  check_crop_into_out(op, out, inputs[0], idx, C, channel_offset);
  crop_into_impl(op, inputs, idx, stride, padding, image_size, channel_offset, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("crop", &crop_cpu);
  m.impl("crop_into", &crop_into_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
