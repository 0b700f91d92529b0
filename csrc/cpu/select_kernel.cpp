// CPU kernels of select_sampling and select_thresholding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#include "../index_math.h"
#include "cpu_common.h"

namespace pymatting_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_sampling_cpu(const at::Tensor& err,
                                                                   int64_t k,
                                                                   bool prevent_oversampling) {
  const char* op = "select_sampling";
  check_select_args(op, err, at::kCPU);
  TORCH_CHECK(k >= 0, op, ": k must be non-negative, got ", k);
  const at::Tensor e = err.contiguous();
  const int64_t B = e.size(0), H = e.size(2), W = e.size(3), N = H * W;
  // NB: asking for more cells than there are selects all of them, where
  // upstream's topk raised.
  k = std::min(k, N);
  at::Tensor ref = at::zeros_like(e);
  at::Tensor idx = at::empty({B * k, 3}, e.options().dtype(at::kLong));
  at::Tensor valid = at::empty({B * k}, e.options().dtype(at::kBool));
  if (B * k == 0) {
    return {ref, idx, valid};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "select_sampling_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using key_t = std::conditional_t<std::is_same_v<opmath_t, double>, uint64_t, uint32_t>;
    const scalar_t* src_all = e.data_ptr<scalar_t>();
    scalar_t* ref_all = ref.data_ptr<scalar_t>();
    int64_t* idx_all = idx.data_ptr<int64_t>();
    bool* valid_all = valid.data_ptr<bool>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<key_t> keys(N), scratch(N);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* src = src_all + b * N;
        for (int64_t i = 0; i < N; ++i) {
          keys[i] = order_key(static_cast<opmath_t>(src[i]));
        }
        // The k-th largest key; every key above it is taken, and of the keys
        // equal to it the first (k - above) in index order.
        std::copy(keys.begin(), keys.end(), scratch.begin());
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                         std::greater<key_t>());
        const key_t kth = scratch[k - 1];
        int64_t above = 0;
        for (int64_t i = 0; i < N; ++i) {
          above += keys[i] > kth;
        }
        int64_t ties = k - above;
        int64_t* out_idx = idx_all + 3 * b * k;
        bool* out_valid = valid_all + b * k;
        scalar_t* out_ref = ref_all + b * N;
        int64_t j = 0;
        for (int64_t i = 0; i < N && j < k; ++i) {
          bool take = keys[i] > kth;
          if (!take && keys[i] == kth && ties > 0) {
            take = true;
            --ties;
          }
          if (!take) {
            continue;
          }
          const bool ok = !prevent_oversampling || static_cast<opmath_t>(src[i]) > opmath_t(0);
          out_idx[3 * j] = b;
          out_idx[3 * j + 1] = i / W;
          out_idx[3 * j + 2] = i % W;
          out_valid[j] = ok;
          out_ref[i] = ok ? scalar_t(1) : scalar_t(0);
          ++j;
        }
      }
    });
  });
  return {ref, idx, valid};
}

std::tuple<at::Tensor, at::Tensor> select_thresholding_cpu(const at::Tensor& err,
                                                           double threshold) {
  const char* op = "select_thresholding";
  check_select_args(op, err, at::kCPU);
  const at::Tensor e = err.contiguous();
  const int64_t B = e.size(0), H = e.size(2), W = e.size(3), N = H * W;
  const int64_t total = B * N;
  at::Tensor ref = at::empty({B, 1, H, W}, e.options().dtype(at::kFloat));
  // Order-preserving compaction: count per chunk, prefix-sum, then write.
  constexpr int64_t kChunk = 1 << 15;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::vector<int64_t> counts(chunks + 1, 0);
  at::Tensor idx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "select_thresholding_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // NB: as torch.gt with a Python scalar, the threshold is first rounded to
    // err's dtype: 0.1 compares as 0.0999755859375 in float16.
    const opmath_t thr = static_cast<opmath_t>(static_cast<scalar_t>(threshold));
    const scalar_t* src = e.data_ptr<scalar_t>();
    float* out_ref = ref.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(total, (c + 1) * kChunk);
        int64_t n = 0;
        for (int64_t i = c * kChunk; i < end; ++i) {
          const bool sel = static_cast<opmath_t>(src[i]) > thr;
          out_ref[i] = sel ? 1.f : 0.f;
          n += sel;
        }
        counts[c + 1] = n;
      }
    });
    for (int64_t c = 0; c < chunks; ++c) {
      counts[c + 1] += counts[c];
    }
    idx = at::empty({counts[chunks], 3}, e.options().dtype(at::kLong));
    int64_t* out_idx = idx.data_ptr<int64_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(total, (c + 1) * kChunk);
        int64_t j = counts[c];
        for (int64_t i = c * kChunk; i < end; ++i) {
          if (out_ref[i] != 0.f) {
            out_idx[3 * j] = i / N;
            out_idx[3 * j + 1] = (i % N) / W;
            out_idx[3 * j + 2] = i % W;
            ++j;
          }
        }
      }
    });
  });
  return {ref, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("select_sampling", &select_sampling_cpu);
  m.impl("select_thresholding", &select_thresholding_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
