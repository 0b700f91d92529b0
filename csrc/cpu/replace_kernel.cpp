// CPU kernel of replace: a copy of x with patches written into their cells.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

namespace pymatting_ext {
namespace cpu {
namespace {

at::Tensor replace_cpu(const at::Tensor& x, const at::Tensor& patches, const at::Tensor& idx,
                       const c10::optional<at::Tensor>& valid) {
  const char* op = "replace";
  check_replace_args(op, x, patches, idx, valid, at::kCPU);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t s = patches.size(3);

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HC = H / s, WC = W / s;
  const std::vector<int32_t> map = cell_map(op, idx_c, valid, B, HC, WC);
  at::Tensor out = x.clone();
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "replace_cpu", [&] {
    const scalar_t* pat = patches.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const auto ps = patches.strides();
    const auto os = out.strides();
    // One task per cell; the map says which patch (if any) owns it, so every
    // cell is written by one thread even when idx repeats a cell.
    at::parallel_for(0, B * HC * WC, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t cell = c0; cell < c1; ++cell) {
        const int32_t p = map[cell];
        if (p < 0) {
          continue;
        }
        const int64_t b = cell / (HC * WC), cy = (cell / WC) % HC, cx = cell % WC;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t py = 0; py < s; ++py) {
            for (int64_t px = 0; px < s; ++px) {
              o[b * os[0] + c * os[1] + (cy * s + py) * os[2] + (cx * s + px) * os[3]] =
                  pat[p * ps[0] + c * ps[1] + py * ps[2] + px * ps[3]];
            }
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("replace", &replace_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
