// kernels/cuda/compose_kernel.cu compiled as C++ for the host execution harness (see
// build.py): its kernels and host wrappers, unchanged, registered for CPU
// tensors in the namespace pymatting_ext_cuda_host.
#include "compose_kernel.cu"
