// Argument checks shared by every backend's host code. Messages name the op
// and the argument, and say what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace pymatting_ext {

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* shape) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; they must match");
}

// idx: (P, 3) int64 rows (b, y, x) on `device`. Checks only the metadata; the
// values are checked where they are read (check_idx_values on the CPU).
inline void check_idx_meta(const char* op, const at::Tensor& idx, const at::Device& device) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(1) == 3, op, ": idx must have shape (P, 3), got ",
              idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == device, op, ": idx is on ", idx.device(), " but the data is on ",
              device);
}

inline void check_valid_meta(const char* op, const c10::optional<at::Tensor>& valid,
                             const at::Tensor& idx) {
  if (!valid.has_value()) {
    return;
  }
  const at::Tensor& v = *valid;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == idx.size(0), op,
              ": valid must have shape (P,) with P = idx.size(0) = ", idx.size(0), ", got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kBool, op, ": valid must be bool, got ", v.scalar_type());
  TORCH_CHECK(v.device() == idx.device(), op, ": valid is on ", v.device(), " but idx is on ",
              idx.device());
}

}  // namespace pymatting_ext
