// CPU kernel of crop: patches from several inputs, each optionally sampled
// from a bilinear resize, without materialising the resized images.
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
struct CropSource {
  const scalar_t* data;
  int64_t channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
  bool resample;
  // Taps over the resampled image's rows and columns (empty if !resample).
  std::vector<LinearTap<at::opmath_type<scalar_t>>> rows, cols;
};

at::Tensor crop_cpu(at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                    int64_t padding, at::IntArrayRef image_size, at::IntArrayRef patch_size) {
  const char* op = "crop";
  TORCH_CHECK(!inputs.empty(), op, ": inputs must hold at least one tensor");
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(image_size.size() == 2 && image_size[0] > 0 && image_size[1] > 0, op,
              ": image_size must be two positive sizes (H, W), got ", image_size);
  TORCH_CHECK(patch_size.size() == 2 && patch_size[0] > 0 && patch_size[1] > 0, op,
              ": patch_size must be two positive sizes (h, w), got ", patch_size);
  const at::Tensor& first = inputs[0];
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = "inputs[" + std::to_string(i) + "]";
    check_rank(op, name.c_str(), inputs[i], 4, "(B, C, H, W)");
    check_float_dtype(op, name.c_str(), inputs[i]);
    check_same(op, name.c_str(), inputs[i], "inputs[0]", first);
    TORCH_CHECK(inputs[i].size(0) == first.size(0), op, ": ", name, " has batch size ",
                inputs[i].size(0), " but inputs[0] has ", first.size(0));
    TORCH_CHECK(inputs[i].size(2) > 0 && inputs[i].size(3) > 0, op, ": ", name,
                " must not be empty, got ", inputs[i].sizes());
  }
  TORCH_CHECK(first.device().is_cpu(), op, ": this kernel takes CPU tensors, inputs are on ",
              first.device());
  check_idx_meta(op, idx, first.device());

  const int64_t B = first.size(0), H = image_size[0], W = image_size[1];
  const int64_t PH = patch_size[0], PW = patch_size[1];
  const at::Tensor idx_c = idx.contiguous();
  // A patch is anchored at a cell of the stride grid over the image.
  check_idx_values(op, idx_c, B, (H + stride - 1) / stride, (W + stride - 1) / stride);
  const int64_t P = idx_c.size(0);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  // NB: channels-last, because that is the layout in which oneDNN runs the
  // refiner's small convolutions fastest (5x faster than NCHW at HD).
  at::Tensor out = at::empty({P, C, PH, PW}, first.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (P == 0 || C == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "crop_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<CropSource<scalar_t>> sources;
    for (const auto& t : inputs) {
      CropSource<scalar_t> s;
      s.data = t.data_ptr<scalar_t>();
      s.channels = t.size(1);
      s.height = t.size(2);
      s.width = t.size(3);
      s.stride_b = t.stride(0);
      s.stride_c = t.stride(1);
      s.stride_h = t.stride(2);
      s.stride_w = t.stride(3);
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
    const int64_t* idx_p = idx_c.data_ptr<int64_t>();
    scalar_t* out_all = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = idx_p[3 * p];
        const int64_t oy = patch_origin(idx_p[3 * p + 1], stride, padding);
        const int64_t ox = patch_origin(idx_p[3 * p + 2], stride, padding);
        scalar_t* o = out_all + p * PH * PW * C;
        int64_t c_base = 0;
        for (const auto& s : sources) {
          for (int64_t c = 0; c < s.channels; ++c) {
            const scalar_t* plane = s.data + b * s.stride_b + c * s.stride_c;
            scalar_t* oc = o + c_base + c;
            for (int64_t py = 0; py < PH; ++py) {
              const int64_t y = oy + py;
              scalar_t* orow = oc + py * PW * C;
              if (y < 0 || y >= H) {
                for (int64_t px = 0; px < PW; ++px) {
                  orow[px * C] = scalar_t(0);
                }
                continue;
              }
              if (!s.resample) {
                const scalar_t* irow = plane + y * s.stride_h;
                for (int64_t px = 0; px < PW; ++px) {
                  const int64_t x = ox + px;
                  orow[px * C] = (x >= 0 && x < W) ? irow[x * s.stride_w] : scalar_t(0);
                }
                continue;
              }
              const auto& ty = s.rows[y];
              const scalar_t* r0 = plane + ty.i0 * s.stride_h;
              const scalar_t* r1 = plane + ty.i1 * s.stride_h;
              for (int64_t px = 0; px < PW; ++px) {
                const int64_t x = ox + px;
                if (x < 0 || x >= W) {
                  orow[px * C] = scalar_t(0);
                  continue;
                }
                const auto& tx = s.cols[x];
                const int64_t a = tx.i0 * s.stride_w, d = tx.i1 * s.stride_w;
                orow[px * C] = static_cast<scalar_t>(linear_mix<opmath_t>(
                    r0[a], r0[d], r1[a], r1[d], ty.w0, ty.w1, tx.w0, tx.w1));
              }
            }
          }
          c_base += s.channels;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("crop", &crop_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
