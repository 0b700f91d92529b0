// Argument checks shared by every backend's host code. Messages name the op
// and the argument, and say what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>

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

// Each op's full argument check, shared by its CPU and CUDA kernels so that
// both reject the same input with the same message. `kernel` is the device
// type the calling kernel takes; `what` names the tensor whose device is
// reported ("x is", "inputs are").

inline void check_kernel_device(const char* op, const char* what, const at::Tensor& t,
                                at::DeviceType kernel) {
  TORCH_CHECK(t.device().type() == kernel, op, ": this kernel takes ",
              kernel == at::kCUDA ? "CUDA" : "CPU", " tensors, ", what, " on ", t.device());
}

// err: (B, 1, H, W) of the select ops.
inline void check_select_args(const char* op, const at::Tensor& err, at::DeviceType kernel) {
  check_rank(op, "err", err, 4, "(B, 1, H, W)");
  TORCH_CHECK(err.size(1) == 1, op, ": err must have shape (B, 1, H, W), got ", err.sizes());
  check_float_dtype(op, "err", err);
  check_kernel_device(op, "err is", err, kernel);
}

inline void check_crop_args(const char* op, at::TensorList inputs, const at::Tensor& idx,
                            int64_t stride, int64_t padding, at::IntArrayRef image_size,
                            at::IntArrayRef patch_size, at::DeviceType kernel) {
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
  check_kernel_device(op, "inputs are", first, kernel);
  check_idx_meta(op, idx, first.device());
}

// out of crop_into: channels-last contiguous (P, C_out, ph, pw), the inputs'
// dtype and device, one patch per idx row, room for the inputs' C channels
// from channel_offset on.
inline void check_crop_into_out(const char* op, const at::Tensor& out, const at::Tensor& first,
                                const at::Tensor& idx, int64_t C, int64_t channel_offset) {
  check_rank(op, "out", out, 4, "(P, C, ph, pw)");
  check_same(op, "out", out, "inputs[0]", first);
  TORCH_CHECK(out.size(0) == idx.size(0), op, ": out has ", out.size(0),
              " patches but idx has ", idx.size(0), " rows");
  TORCH_CHECK(out.size(2) > 0 && out.size(3) > 0, op, ": out's patches must not be empty, got ",
              out.sizes());
  TORCH_CHECK(channel_offset >= 0 && channel_offset + C <= out.size(1), op, ": channel_offset (",
              channel_offset, ") plus the inputs' ", C, " channels must fit in out's ", out.size(1),
              " channels");
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": out must be channels-last contiguous, got strides ", out.strides());
}

// patches (P, C, s, s) of replace and compose, written into the s x s cells
// of an (H, W) image (`target` has the channels, `extent` names H and W),
// and the idx and valid rows that place them.
inline void check_patch_args(const char* op, const at::Tensor& patches, const char* target, int64_t C,
                             const char* extent, int64_t H, int64_t W, const at::Tensor& idx,
                             const c10::optional<at::Tensor>& valid, const at::Device& device) {
  const int64_t s = patches.size(3);
  TORCH_CHECK(patches.size(1) == C && patches.size(2) == s && s > 0, op,
              ": patches must have shape (P, ", C, ", s, s) to match ", target, "'s ", C,
              " channels, got ", patches.sizes());
  TORCH_CHECK(H % s == 0 && W % s == 0, op, ": ", extent, " (", H, ", ", W,
              ") must be divisible by the patch size ", s);
  check_idx_meta(op, idx, device);
  TORCH_CHECK(idx.size(0) == patches.size(0), op, ": idx has ", idx.size(0),
              " rows but there are ", patches.size(0), " patches");
  check_valid_meta(op, valid, idx);
}

inline void check_replace_args(const char* op, const at::Tensor& x, const at::Tensor& patches,
                               const at::Tensor& idx, const c10::optional<at::Tensor>& valid,
                               at::DeviceType kernel) {
  check_rank(op, "x", x, 4, "(B, C, H, W)");
  check_rank(op, "patches", patches, 4, "(P, C, s, s)");
  check_float_dtype(op, "x", x);
  check_same(op, "patches", patches, "x", x);
  check_kernel_device(op, "x is", x, kernel);
  check_patch_args(op, patches, "x", x.size(1), "x's height and width", x.size(2), x.size(3), idx,
                   valid, x.device());
}

inline void check_compose_args(const char* op, const at::Tensor& coarse, const at::Tensor& patches,
                               const at::Tensor& idx, const c10::optional<at::Tensor>& valid,
                               at::IntArrayRef size, const c10::optional<at::Tensor>& src,
                               at::DeviceType kernel) {
  check_rank(op, "coarse", coarse, 4, "(B, C, Hc, Wc)");
  check_rank(op, "patches", patches, 4, "(P, C, s, s)");
  check_float_dtype(op, "coarse", coarse);
  check_same(op, "patches", patches, "coarse", coarse);
  check_kernel_device(op, "coarse is", coarse, kernel);
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, op,
              ": size must be two positive sizes (H, W), got ", size);
  const int64_t B = coarse.size(0), C = coarse.size(1);
  TORCH_CHECK(coarse.size(2) > 0 && coarse.size(3) > 0, op, ": coarse must not be empty, got ",
              coarse.sizes());
  const int64_t H = size[0], W = size[1];
  check_patch_args(op, patches, "coarse", C, "size", H, W, idx, valid, coarse.device());
  if (src.has_value()) {
    check_same(op, "src", *src, "coarse", coarse);
    TORCH_CHECK(C >= 2, op, ": with src, coarse must hold alpha and at least one foreground channel, got ",
                C, " channels");
    TORCH_CHECK(src->dim() == 4 && src->size(0) == B && src->size(1) == C - 1 &&
                    src->size(2) == H && src->size(3) == W,
                op, ": src must have shape (", B, ", ", C - 1, ", ", H, ", ", W, "), got ",
                src->sizes());
  }
}

// compose_into's arguments: compose's, the size being out's (H, W), and out
// contiguous (B, C, H, W) with coarse's B and C, dtype and device.
inline void check_compose_into_args(const char* op, const at::Tensor& coarse, const at::Tensor& patches,
                                    const at::Tensor& idx, const c10::optional<at::Tensor>& valid,
                                    const c10::optional<at::Tensor>& src, const at::Tensor& out,
                                    at::DeviceType kernel) {
  check_rank(op, "out", out, 4, "(B, C, H, W)");
  check_compose_args(op, coarse, patches, idx, valid, {out.size(2), out.size(3)}, src, kernel);
  check_same(op, "out", out, "coarse", coarse);
  TORCH_CHECK(out.size(0) == coarse.size(0) && out.size(1) == coarse.size(1), op,
              ": out must have coarse's batch size and channels (", coarse.size(0), ", ", coarse.size(1),
              ", H, W), got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous, got strides ", out.strides());
}

}  // namespace pymatting_ext
