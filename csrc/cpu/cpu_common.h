// Helpers for the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include "../checks.h"

namespace pymatting_ext {
namespace cpu {

// Checks every row of idx against the cell grid: 0 <= b < B, 0 <= y < Hc,
// 0 <= x < Wc. Serial: P is at most a few ten thousand in practice.
inline void check_idx_values(const char* op, const at::Tensor& idx_c, int64_t B, int64_t Hc,
                             int64_t Wc) {
  const int64_t* p = idx_c.data_ptr<int64_t>();
  const int64_t P = idx_c.size(0);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t b = p[3 * i], y = p[3 * i + 1], x = p[3 * i + 2];
    TORCH_CHECK(b >= 0 && b < B && y >= 0 && y < Hc && x >= 0 && x < Wc, op, ": idx row ", i,
                " = (", b, ", ", y, ", ", x, ") is out of range for a grid of B=", B, ", H=", Hc,
                ", W=", Wc, " cells");
  }
}

// (B, Hc, Wc) int32 map from a cell to the patch written there: the last
// valid patch naming the cell (a sequential scatter's result), or -1.
inline std::vector<int32_t> cell_map(const char* op, const at::Tensor& idx_c,
                                     const c10::optional<at::Tensor>& valid, int64_t B,
                                     int64_t Hc, int64_t Wc) {
  const int64_t P = idx_c.size(0);
  TORCH_CHECK(P < INT32_MAX, op, ": at most 2^31 - 1 patches are supported, got ", P);
  check_idx_values(op, idx_c, B, Hc, Wc);
  std::vector<int32_t> map(static_cast<size_t>(B * Hc * Wc), -1);
  const int64_t* p = idx_c.data_ptr<int64_t>();
  at::Tensor valid_c;
  const bool* v = nullptr;
  if (valid.has_value()) {
    valid_c = valid->contiguous();
    v = valid_c.data_ptr<bool>();
  }
  for (int64_t i = 0; i < P; ++i) {
    if (v == nullptr || v[i]) {
      map[(p[3 * i] * Hc + p[3 * i + 1]) * Wc + p[3 * i + 2]] = static_cast<int32_t>(i);
    }
  }
  return map;
}

}  // namespace cpu
}  // namespace pymatting_ext
