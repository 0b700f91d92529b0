// The schemas of pymatting_ext's ops, registered once. Each backend registers
// its kernels for these names in its own file (csrc/cpu/*.cpp for CPU,
// kernels/cuda/*.cu for CUDA); fake kernels live in pymatting_ext/_meta.py
// and autograd in pymatting_ext/_autograd.py. docs/DESIGN.md gives the
// semantics.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace pymatting_ext {

std::string build_info() {
  // NB: only a description of what was compiled; kernels reach CUDA through
  // the dispatcher, never through this macro.
#ifdef PYMATTING_EXT_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

TORCH_LIBRARY(pymatting_ext, m) {
  // err: (B, 1, Hq, Wq). Per image, the k largest values (NaN largest, ties to
  // the lower flat index). ref: (B, 1, Hq, Wq) in err's dtype, 1 where
  // selected (and, with prevent_oversampling, err > 0). idx: (B*k, 3) int64
  // rows (b, y, x) in row-major order. valid: (B*k,) bool, err > 0 at idx when
  // prevent_oversampling, else all true.
  m.def("select_sampling(Tensor err, int k, bool prevent_oversampling) -> (Tensor ref, Tensor idx, Tensor valid)");
  // err: (B, 1, Hq, Wq). ref: float32 (B, 1, Hq, Wq) = err > threshold, the
  // threshold rounded to err's dtype first. idx: (P, 3) int64, row-major.
  m.def("select_thresholding(Tensor err, float threshold) -> (Tensor ref, Tensor idx)");
  // inputs: (B, C_i, H_i, W_i), each bilinearly resampled to image_size
  // (skipped where it already has that size). Returns (P, sum C_i, Ph, Pw),
  // channels-last, patch p read at origin (stride*y - padding,
  // stride*x - padding), zeros outside the image.
  m.def("crop(Tensor[] inputs, Tensor idx, int stride, int padding, SymInt[2] image_size, SymInt[2] patch_size) -> Tensor");
  // crop's patches written into channels [channel_offset, channel_offset +
  // sum C_i) of `out`, a channels-last contiguous (P, C_out, ph, pw) tensor of
  // the inputs' dtype and device (the patch size is out's); out's other
  // channels are left as they are. Lets the refiner assemble conv3's input
  // (P, 22, 8, 8) in place instead of a cat.
  m.def("crop_into(Tensor[] inputs, Tensor idx, int stride, int padding, SymInt[2] image_size, int channel_offset, Tensor(a!) out) -> ()");
  // x: (B, C, H, W), patches: (P, C, s, s). A copy of x with the block
  // (y*s, x*s) of image b replaced by patch p, for every p (valid ones only).
  m.def("replace(Tensor x, Tensor patches, Tensor idx, Tensor? valid) -> Tensor");
  // coarse: (B, C, Hc, Wc) bilinearly upsampled to `size`, with every block
  // that has a (valid) patch taken from the patch instead. With `src`
  // (B, C-1, H, W), channel 0 is clamped to [0, 1] and channels 1.. become
  // clamp(value + src, 0, 1): MattingRefine's epilogue.
  m.def("compose(Tensor coarse, Tensor patches, Tensor idx, Tensor? valid, SymInt[2] size, Tensor? src) -> Tensor");
  // compose written into `out`, a contiguous (B, C, H, W) tensor of coarse's
  // dtype and device (the size is out's). Lets a caller keep one output
  // across frames instead of fresh pages every call (~133 MB at 4K).
  m.def("compose_into(Tensor coarse, Tensor patches, Tensor idx, Tensor? valid, Tensor? src, Tensor(a!) out) -> ()");
  m.def("build_info() -> str", &build_info);
}

}  // namespace pymatting_ext

// Importing pymatting_ext._C runs the static registrations above; the module
// itself holds nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
