// The cell map of replace and compose (declared in cuda_common.cuh): for each
// s x s cell of the output, the patch written there.
#include "cpu/cpu_common.h"
#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

// map[(b * HC + y) * WC + x] = the largest valid p naming the cell: the last
// valid patch, as a sequential scatter would leave it. Integer atomicMax is
// order-independent, so the map is deterministic.
__global__ void cell_map_kernel(int32_t* __restrict__ map, const int64_t* __restrict__ idx,
                                const bool* __restrict__ valid, int64_t P, int64_t B, int64_t HC,
                                int64_t WC) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P;
       p += int64_t(gridDim.x) * blockDim.x) {
    // NB: every row is range-checked, valid or not, as on the CPU.
    const int64_t b = idx[3 * p], y = idx[3 * p + 1], x = idx[3 * p + 2];
    if (!idx_row_ok(b, y, x, B, HC, WC) || (valid != nullptr && !valid[p])) {
      continue;
    }
    atomicMax(map + (b * HC + y) * WC + x, static_cast<int32_t>(p));
  }
}

}  // namespace

void check_idx_grid(const char* op, const at::Tensor& idx_c, int64_t B, int64_t HC, int64_t WC) {
  if (idx_c.size(0) == 0 || B * HC * WC > 0) {
    return;
  }
  // NB: the CPU kernels' own check, on the first row, so that the message is
  // theirs word for word.
  cpu::check_idx_values(op, idx_c.narrow(0, 0, 1).cpu(), B, HC, WC);
  TORCH_CHECK(false, op, ": idx has ", idx_c.size(0), " rows but the grid of B=", B, ", H=", HC,
              ", W=", WC, " cells is empty");
}

at::Tensor cell_map(const char* op, const at::Tensor& idx_c, const c10::optional<at::Tensor>& valid,
                    int64_t B, int64_t HC, int64_t WC) {
  const int64_t P = idx_c.size(0);
  TORCH_CHECK(P < INT32_MAX, op, ": at most 2^31 - 1 patches are supported, got ", P);
  check_idx_grid(op, idx_c, B, HC, WC);
  const int64_t cells = B * HC * WC;
  at::Tensor map = at::full({cells}, -1, idx_c.options().dtype(at::kInt));
  if (P == 0) {
    return map;
  }
  at::Tensor valid_c;
  const bool* v = nullptr;
  if (valid.has_value()) {
    valid_c = valid->contiguous();
    v = valid_c.data_ptr<bool>();
  }
  launch_kernel<cell_map_kernel>(static_cast<unsigned>(blocks_for(P)), kThreads, 0, current_stream(),
                                 map.data_ptr<int32_t>(), idx_c.data_ptr<int64_t>(), v, P, B, HC, WC);
  return map;
}

}  // namespace cuda
}  // namespace pymatting_ext
