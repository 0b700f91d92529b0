// CUDA kernels of select_sampling and select_thresholding.
//
// select_sampling is a radix select over order keys (csrc/index_math.h; 16
// bits for float16/bfloat16, see key_of): one histogram launch per 8-bit
// digit, most significant first, each counting the digits of the keys that
// match the digits chosen so far; every block re-derives the chosen digits
// from the earlier histograms itself, so there is no host round trip and no
// extra launch per pass. A count launch then tallies, per block, the keys
// above the k-th largest and the ties with it, and a write launch emits
// exactly k rows per image in row-major order (block-wide scans, the running
// count carried from tile to tile) and every element of ref. Images go in
// slices of at most kSliceImages, whose scratch is reused from slice to
// slice. Nothing is sorted and nothing synchronises with the host, so the op
// can be captured in a CUDA graph. Integer atomics only: deterministic.
//
// select_thresholding writes ref and per-tile counts, scans the counts, reads
// the total (its one synchronisation: the output size), then writes idx.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"

namespace pymatting_ext {
namespace cuda {
namespace {

constexpr int kSelThreads = 256;
constexpr int kSelItems = 8;
constexpr int kSelTile = kSelThreads * kSelItems;
constexpr int kBins = 256;  // 8-bit digits
// Images per launch (gridDim.y): slices keep the scratch (histograms and
// counts, ~8 KB an image for float32) bounded however large the batch.
constexpr int64_t kSliceImages = 4096;
static_assert(kSliceImages <= 65535, "gridDim.y limit");

using ull = unsigned long long;
static_assert(kSelThreads == kBins, "one thread per histogram bin");

template <typename scalar_t>
using key_type = std::conditional_t<
    std::is_same_v<scalar_t, double>, uint64_t,
    std::conditional_t<std::is_same_v<scalar_t, float>, uint32_t, uint16_t>>;

template <typename scalar_t>
__device__ __forceinline__ key_type<scalar_t> key_of(scalar_t v) {
  return order_key(v);
}

// NB: float16/bfloat16 keys come from the 16 bits themselves, by order_key's
// rule on 16 bits (NaN above all, -0 equal to +0, negatives reversed). The
// widening to float that the CPU kernel keys on is exact and monotonic, so
// these keys order and tie exactly as its 32-bit keys do (for bfloat16 they
// are those keys' top halves), in two digit passes instead of four.
// `inf` is the bit pattern of +infinity; above it (sign aside) is NaN.
__device__ __forceinline__ uint16_t order_key16(uint16_t u, uint16_t inf) {
  if ((u & 0x7FFFu) > inf) {
    return 0xFFFFu;
  }
  if ((u & 0x7FFFu) == 0) {
    u = 0;
  }
  return (u & 0x8000u) ? static_cast<uint16_t>(~u) : static_cast<uint16_t>(u | 0x8000u);
}

template <>
__device__ __forceinline__ uint16_t key_of<c10::Half>(c10::Half v) {
  return order_key16(v.x, 0x7C00u);
}

template <>
__device__ __forceinline__ uint16_t key_of<c10::BFloat16>(c10::BFloat16 v) {
  return order_key16(v.x, 0x7F80u);
}

template <typename key_t>
struct RadixState {
  key_t prefix;  // the digits chosen so far
  key_t mask;    // their bits
  ull k_rem;     // rank (1-based, from the largest) among keys matching prefix
};

// The state after `passes` digit passes, from image b's histograms
// hist_b[pass][digit]. Called by all kSelThreads threads of a block; the
// result is in `st` (shared) for every thread on return.
template <typename key_t>
__device__ void resolve_state(const ull* __restrict__ hist_b, int passes, ull k,
                              RadixState<key_t>& st) {
  using Scan = cub::BlockScan<ull, kSelThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  constexpr int kKeyBits = 8 * sizeof(key_t);
  if (threadIdx.x == 0) {
    st.prefix = 0;
    st.mask = 0;
    st.k_rem = k;
  }
  __syncthreads();
  for (int d = 0; d < passes; ++d) {
    // Thread t holds digit 255 - t: the scan runs from the largest digit down.
    const int digit = kBins - 1 - static_cast<int>(threadIdx.x);
    const ull cnt = hist_b[d * kBins + digit];
    ull before;
    Scan(scan_tmp).ExclusiveSum(cnt, before);
    const ull k_rem = st.k_rem;
    __syncthreads();  // everyone has read st and is done with scan_tmp
    // Exactly one digit's range (before, before + cnt] holds k_rem: the keys
    // matching the prefix number at least k_rem.
    if (before < k_rem && k_rem <= before + cnt) {
      const int shift = kKeyBits - 8 * (d + 1);
      st.prefix |= static_cast<key_t>(digit) << shift;
      st.mask |= static_cast<key_t>(0xFF) << shift;
      st.k_rem = k_rem - before;
    }
    __syncthreads();
  }
}

// Pass `pass`: hist[b][pass][digit] += the number of keys of block's chunk
// that match the digits chosen so far and have `digit` at this pass.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelThreads)
    radix_histogram_kernel(const scalar_t* __restrict__ err, ull* __restrict__ hist, int64_t N,
                           int64_t chunk, int64_t k, int pass, int64_t b0) {
  using key_t = key_type<scalar_t>;
  constexpr int kPasses = sizeof(key_t);
  constexpr int kKeyBits = 8 * sizeof(key_t);
  const int64_t b = b0 + blockIdx.y;
  ull* hist_b = hist + int64_t(blockIdx.y) * kPasses * kBins;  // the slice's scratch
  __shared__ RadixState<key_t> st;
  __shared__ unsigned int local[kBins];
  local[threadIdx.x] = 0;
  resolve_state<key_t>(hist_b, pass, static_cast<ull>(k), st);  // syncs: local is zeroed
  const key_t prefix = st.prefix, mask = st.mask;
  const int shift = kKeyBits - 8 * (pass + 1);
  const scalar_t* src = err + b * N;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < N ? begin + chunk : N;
  const unsigned lane = threadIdx.x & 31u;
  // NB: the loop bounds are the same for every thread, so whole warps reach
  // __match_any_sync together.
  for (int64_t base = begin; base < end; base += kSelTile) {
    key_t keys[kSelItems];
    bool in[kSelItems];
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t i = base + j * kSelThreads + threadIdx.x;
      in[j] = i < end;
      keys[j] = in[j] ? key_of(src[i]) : key_t(0);
    }
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const bool match = in[j] && (keys[j] & mask) == prefix;
      const unsigned bin = match ? static_cast<unsigned>((keys[j] >> shift) & key_t(0xFF)) : kBins;
      // Warp-aggregated: one shared atomic per distinct bin in the warp (the
      // first passes see long runs of equal leading digits).
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
      if (match && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
        atomicAdd(&local[bin], static_cast<unsigned>(__popc(peers)));
      }
    }
  }
  __syncthreads();
  const unsigned c = local[threadIdx.x];
  if (c != 0) {
    atomicAdd(hist_b + pass * kBins + threadIdx.x, static_cast<ull>(c));
  }
}

// counts[b][block] = (keys above the k-th largest, keys equal to it) in the
// block's chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelThreads)
    radix_count_kernel(const scalar_t* __restrict__ err, const ull* __restrict__ hist,
                       int64_t* __restrict__ counts, int64_t N, int64_t chunk, int64_t k,
                       int64_t b0) {
  using key_t = key_type<scalar_t>;
  constexpr int kPasses = sizeof(key_t);
  using Reduce = cub::BlockReduce<ull, kSelThreads>;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  __shared__ RadixState<key_t> st;
  const int64_t b = b0 + blockIdx.y;
  resolve_state<key_t>(hist + int64_t(blockIdx.y) * kPasses * kBins, kPasses, static_cast<ull>(k),
                       st);
  const key_t kth = st.prefix;
  const scalar_t* src = err + b * N;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < N ? begin + chunk : N;
  // (above << 32) | ties: a chunk holds fewer than 2^31 keys.
  ull packed = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kSelThreads) {
    const key_t key = key_of(src[i]);
    packed += key > kth ? (ull(1) << 32) : (key == kth ? ull(1) : ull(0));
  }
  const ull total = Reduce(reduce_tmp).Sum(packed);
  if (threadIdx.x == 0) {
    int64_t* out = counts + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * 2;
    out[0] = static_cast<int64_t>(total >> 32);
    out[1] = static_cast<int64_t>(total & 0xFFFFFFFFull);
  }
}

// Writes the selected rows of the block's chunk and every element of ref
// there: row j of image b is the j-th selected cell in row-major order,
// where a cell is selected when its key is above the k-th largest, or equal
// to it and among the first (k - above) such cells.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelThreads)
    radix_write_kernel(const scalar_t* __restrict__ err, const ull* __restrict__ hist,
                       const int64_t* __restrict__ counts, scalar_t* __restrict__ ref,
                       int64_t* __restrict__ idx, bool* __restrict__ valid, int64_t N, int64_t W,
                       int64_t chunk, int64_t k, bool prevent_oversampling, int64_t b0) {
  using key_t = key_type<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kPasses = sizeof(key_t);
  using Reduce = cub::BlockReduce<int64_t, kSelThreads>;
  using Scan = cub::BlockScan<ull, kSelThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ RadixState<key_t> st;
  __shared__ int64_t start[2];
  const int64_t b = b0 + blockIdx.y;
  resolve_state<key_t>(hist + int64_t(blockIdx.y) * kPasses * kBins, kPasses, static_cast<ull>(k),
                       st);
  const key_t kth = st.prefix;
  const int64_t ties_needed = static_cast<int64_t>(st.k_rem);

  // Keys above and ties in the chunks before this block's.
  const int64_t* cb = counts + int64_t(blockIdx.y) * gridDim.x * 2;
  int64_t above0 = 0, ties0 = 0;
  for (int64_t g = threadIdx.x; g < blockIdx.x; g += kSelThreads) {
    above0 += cb[2 * g];
    ties0 += cb[2 * g + 1];
  }
  above0 = Reduce(tmp.reduce).Sum(above0);
  __syncthreads();
  ties0 = Reduce(tmp.reduce).Sum(ties0);
  if (threadIdx.x == 0) {
    start[0] = above0;
    start[1] = ties0;
  }
  __syncthreads();
  int64_t carry_above = start[0], carry_ties = start[1];

  const scalar_t* src = err + b * N;
  scalar_t* ref_b = ref + b * N;
  int64_t* idx_b = idx + b * k * 3;
  bool* valid_b = valid + b * k;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < N ? begin + chunk : N;
  for (int64_t base = begin; base < end; base += kSelTile) {
    // Blocked: thread t holds the kSelItems consecutive cells from
    // base + t * kSelItems, so a scan over threads is in row-major order.
    bool positive[kSelItems];
    unsigned char flag[kSelItems];  // 2: above, 1: tie, 0: neither
    ull packed = 0;
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kSelItems + j;
      flag[j] = 0;
      positive[j] = false;
      if (i < end) {
        const scalar_t v = src[i];
        positive[j] = static_cast<opmath_t>(v) > opmath_t(0);
        const key_t key = key_of(v);
        flag[j] = key > kth ? 2 : (key == kth ? 1 : 0);
      }
      packed += flag[j] == 2 ? (ull(1) << 32) : ull(flag[j]);
    }
    ull before, tile_total;
    Scan(tmp.scan).ExclusiveSum(packed, before, tile_total);
    int64_t a = carry_above + static_cast<int64_t>(before >> 32);
    int64_t t = carry_ties + static_cast<int64_t>(before & 0xFFFFFFFFull);
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kSelItems + j;
      bool one = false;
      if (flag[j] != 0) {
        if (flag[j] == 2 || t < ties_needed) {
          const int64_t pos = a + (t < ties_needed ? t : ties_needed);
          if (pos < k) {  // always true; never write out of bounds regardless
            const bool ok = !prevent_oversampling || positive[j];
            idx_b[3 * pos] = b;
            idx_b[3 * pos + 1] = i / W;
            idx_b[3 * pos + 2] = i % W;
            valid_b[pos] = ok;
            one = ok;
          }
        }
        if (flag[j] == 2) {
          ++a;
        } else {
          ++t;
        }
      }
      // NB: every cell, selected or not: ref is not zeroed beforehand.
      if (i < end) {
        ref_b[i] = one ? scalar_t(1) : scalar_t(0);
      }
    }
    carry_above += static_cast<int64_t>(tile_total >> 32);
    carry_ties += static_cast<int64_t>(tile_total & 0xFFFFFFFFull);
    __syncthreads();  // tmp.scan is reused by the next tile
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_sampling_cuda(const at::Tensor& err,
                                                                    int64_t k,
                                                                    bool prevent_oversampling) {
  const char* op = "select_sampling";
  check_select_args(op, err, kKernelDevice);
  TORCH_CHECK(k >= 0, op, ": k must be non-negative, got ", k);
  const DeviceGuard guard(err.device());
  const at::Tensor e = err.contiguous();
  const int64_t B = e.size(0), H = e.size(2), W = e.size(3), N = H * W;
  // NB: asking for more cells than there are selects all of them, where
  // upstream's topk raised.
  k = std::min(k, N);
  at::Tensor idx = at::empty({B * k, 3}, e.options().dtype(at::kLong));
  at::Tensor valid = at::empty({B * k}, e.options().dtype(at::kBool));
  if (B * k == 0) {
    return {at::zeros_like(e), idx, valid};
  }
  // Written in full by the write kernel.
  at::Tensor ref = at::empty_like(e);
  const cudaStream_t stream = current_stream();
  // Blocks per image: about two waves over the device for the whole batch,
  // each block a whole number of tiles, and fewer than 2^31 keys a block.
  const int64_t tiles = (N + kSelTile - 1) / kSelTile;
  const int64_t sms = sm_count();
  int64_t blocks = std::max<int64_t>(1, (2 * sms + B - 1) / B);
  blocks = std::min(blocks, tiles);
  blocks = std::max(blocks, (tiles + (int64_t(1) << 19) - 1) >> 19);
  const int64_t chunk = ((tiles + blocks - 1) / blocks) * kSelTile;
  const int64_t G = (N + chunk - 1) / chunk;
  TORCH_INTERNAL_ASSERT(G >= 1 && G <= INT32_MAX);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "select_sampling_cuda", [&] {
    using key_t = key_type<scalar_t>;
    constexpr int kPasses = sizeof(key_t);
    const int64_t S = std::min(B, kSliceImages);
    at::Tensor hist = at::empty({S, kPasses, kBins}, e.options().dtype(at::kLong));
    at::Tensor counts = at::empty({S, G, 2}, e.options().dtype(at::kLong));
    const scalar_t* src = e.data_ptr<scalar_t>();
    ull* hist_p = reinterpret_cast<ull*>(hist.data_ptr<int64_t>());
    int64_t* counts_p = counts.data_ptr<int64_t>();
    for (int64_t b0 = 0; b0 < B; b0 += S) {
      // Stream-ordered after the previous slice's kernels, which are done
      // with it; counts is overwritten in full.
      hist.zero_();
      const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(std::min(B - b0, S)));
      for (int pass = 0; pass < kPasses; ++pass) {
        launch_kernel<radix_histogram_kernel<scalar_t>>(grid, kSelThreads, 0, stream, src, hist_p, N,
                                                        chunk, k, pass, b0);
      }
      launch_kernel<radix_count_kernel<scalar_t>>(grid, kSelThreads, 0, stream, src, hist_p, counts_p,
                                                  N, chunk, k, b0);
      launch_kernel<radix_write_kernel<scalar_t>>(grid, kSelThreads, 0, stream, src, hist_p, counts_p,
                                                  ref.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                                                  valid.data_ptr<bool>(), N, W, chunk, k,
                                                  prevent_oversampling, b0);
    }
  });
  return {ref, idx, valid};
}

// ref[i] = err[i] > thr as 0/1 floats; counts[tile] = its number of ones.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelThreads)
    threshold_flag_kernel(const scalar_t* __restrict__ err, float* __restrict__ ref,
                          int64_t* __restrict__ counts, int64_t total,
                          at::opmath_type<scalar_t> thr) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<int, kSelThreads>;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kSelTile;
  int n = 0;
#pragma unroll
  for (int j = 0; j < kSelItems; ++j) {
    const int64_t i = base + j * kSelThreads + threadIdx.x;
    if (i < total) {
      const bool sel = static_cast<opmath_t>(err[i]) > thr;
      ref[i] = sel ? 1.f : 0.f;
      n += sel;
    }
  }
  n = Reduce(reduce_tmp).Sum(n);
  if (threadIdx.x == 0) {
    counts[blockIdx.x] = n;
  }
}

// offsets[t] = counts[0] + ... + counts[t - 1] for t <= T (offsets[T] is the
// total). One block, tiles of counts in sequence with a running carry.
__global__ void __launch_bounds__(kSelThreads)
    exclusive_scan_kernel(const int64_t* __restrict__ counts, int64_t* __restrict__ offsets,
                          int64_t T) {
  using Scan = cub::BlockScan<int64_t, kSelThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  int64_t carry = 0;
  for (int64_t base = 0; base < T; base += kSelTile) {
    int64_t v[kSelItems];
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t t = base + static_cast<int64_t>(threadIdx.x) * kSelItems + j;
      v[j] = t < T ? counts[t] : 0;
    }
    int64_t tile_total;
    Scan(scan_tmp).ExclusiveSum(v, v, tile_total);
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t t = base + static_cast<int64_t>(threadIdx.x) * kSelItems + j;
      if (t < T) {
        offsets[t] = carry + v[j];
      }
    }
    carry += tile_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    offsets[T] = carry;
  }
}

// idx rows of the ones of ref, tile by tile, each tile from its offset.
__global__ void __launch_bounds__(kSelThreads)
    threshold_write_kernel(const float* __restrict__ ref, const int64_t* __restrict__ offsets,
                           int64_t* __restrict__ idx, int64_t total, int64_t N, int64_t W) {
  using Scan = cub::BlockScan<int, kSelThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kSelTile;
  const int64_t count = offsets[blockIdx.x + 1] - offsets[blockIdx.x];
  if (count == 0) {
    return;  // the whole block: count is the same for every thread
  }
  bool sel[kSelItems];
  int n = 0;
#pragma unroll
  for (int j = 0; j < kSelItems; ++j) {
    const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kSelItems + j;
    sel[j] = i < total && ref[i] != 0.f;
    n += sel[j];
  }
  int before;
  Scan(scan_tmp).ExclusiveSum(n, before);
  int64_t pos = offsets[blockIdx.x] + before;
#pragma unroll
  for (int j = 0; j < kSelItems; ++j) {
    if (sel[j]) {
      const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kSelItems + j;
      idx[3 * pos] = i / N;
      idx[3 * pos + 1] = (i % N) / W;
      idx[3 * pos + 2] = i % W;
      ++pos;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> select_thresholding_cuda(const at::Tensor& err,
                                                            double threshold) {
  const char* op = "select_thresholding";
  check_select_args(op, err, kKernelDevice);
  const DeviceGuard guard(err.device());
  const at::Tensor e = err.contiguous();
  const int64_t B = e.size(0), H = e.size(2), W = e.size(3), N = H * W;
  const int64_t total = B * N;
  at::Tensor ref = at::empty({B, 1, H, W}, e.options().dtype(at::kFloat));
  if (total == 0) {
    return {ref, at::empty({0, 3}, e.options().dtype(at::kLong))};
  }
  const cudaStream_t stream = current_stream();
  const int64_t T = (total + kSelTile - 1) / kSelTile;
  TORCH_CHECK(T <= INT32_MAX, op, ": err has too many elements (", total, ")");
  at::Tensor counts = at::empty({T}, e.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({T + 1}, e.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "select_thresholding_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // NB: as torch.gt with a Python scalar, the threshold is first rounded to
    // err's dtype: 0.1 compares as 0.0999755859375 in float16.
    const opmath_t thr = static_cast<opmath_t>(static_cast<scalar_t>(threshold));
    launch_kernel<threshold_flag_kernel<scalar_t>>(static_cast<unsigned>(T), kSelThreads, 0, stream,
                                                   e.data_ptr<scalar_t>(), ref.data_ptr<float>(),
                                                   counts.data_ptr<int64_t>(), total, thr);
  });
  launch_kernel<exclusive_scan_kernel>(1, kSelThreads, 0, stream, counts.data_ptr<int64_t>(),
                                       offsets.data_ptr<int64_t>(), T);
  // The one synchronisation: the number of rows is the output's size.
  const int64_t P = offsets[T].item<int64_t>();
  at::Tensor idx = at::empty({P, 3}, e.options().dtype(at::kLong));
  if (P > 0) {
    launch_kernel<threshold_write_kernel>(static_cast<unsigned>(T), kSelThreads, 0, stream,
                                          ref.data_ptr<float>(), offsets.data_ptr<int64_t>(),
                                          idx.data_ptr<int64_t>(), total, N, W);
  }
  return {ref, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, PYMATTING_EXT_KERNEL_KEY, m) {
  m.impl("select_sampling", &select_sampling_cuda);
  m.impl("select_thresholding", &select_thresholding_cuda);
}

}  // namespace cuda
}  // namespace pymatting_ext
