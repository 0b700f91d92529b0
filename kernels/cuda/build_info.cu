// Describes what the CUDA half of the extension was compiled for. The op
// kernels of the CUDA backend live beside this file and register themselves
// for the CUDA dispatch key.
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#define PYMATTING_EXT_STR2(...) #__VA_ARGS__
#define PYMATTING_EXT_STR(...) PYMATTING_EXT_STR2(__VA_ARGS__)

namespace pymatting_ext {
namespace {

std::string cuda_build_info() {
  std::string info = "cudart " + std::to_string(CUDART_VERSION);
#ifdef __CUDA_ARCH_LIST__
  info += "; archs " PYMATTING_EXT_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymatting_ext, m) {
  m.def("cuda_build_info() -> str", &cuda_build_info);
}

}  // namespace pymatting_ext
