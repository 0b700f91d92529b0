// kernels/cuda/replace_kernel.cu compiled as C++ for the host execution harness (see
// build.py): its kernels and host wrappers, unchanged, registered for CPU
// tensors in the namespace pymatting_ext_cuda_host.
#include "replace_kernel.cu"
