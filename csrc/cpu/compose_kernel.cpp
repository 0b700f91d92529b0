// CPU kernel of compose: the full-resolution output in one pass. Each row is
// the bilinear upsample of the coarse map, with the refined cells taken from
// their patches and MattingRefine's clamp (and foreground + src) applied.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "../index_math.h"
#include "avx2.h"
#include "cpu_common.h"

namespace pymatting_ext {
namespace cpu {
namespace {

template <typename scalar_t>
inline scalar_t clamp01(scalar_t v) {
  // NB: written so that NaN passes through, as torch.clamp does.
  return v < scalar_t(0) ? scalar_t(0) : (v > scalar_t(1) ? scalar_t(1) : v);
}

// The refined cells of each row of cells: for cell row (b, cy), the
// entries [start[b * HB + cy], start[b * HB + cy + 1]) of cells, each a
// column cx and the patch written there, by increasing cx (from cell_map).
struct CellRows {
  std::vector<int64_t> start;
  std::vector<std::pair<int64_t, int32_t>> cells;
};

inline CellRows cell_rows(const std::vector<int32_t>& map, int64_t rows, int64_t WB) {
  CellRows r;
  r.start.reserve(static_cast<size_t>(rows + 1));
  for (int64_t i = 0; i < rows; ++i) {
    r.start.push_back(static_cast<int64_t>(r.cells.size()));
    for (int64_t cx = 0; cx < WB; ++cx) {
      const int32_t p = map[static_cast<size_t>(i * WB + cx)];
      if (p >= 0) {
        r.cells.emplace_back(cx, p);
      }
    }
  }
  r.start.push_back(static_cast<int64_t>(r.cells.size()));
  return r;
}

// The width pass of the vector path: for each block of 8 output columns
// whose taps read at most 8 coarse columns, the first of them and the taps
// relative to it (the other blocks, and the last W % 8 columns, take the
// portable loop).
struct ColumnBlocks {
  std::vector<int64_t> first;  // per block; -1: the portable loop
  std::vector<int32_t> i0, i1;  // per column, relative to its block's first
  std::vector<float> w0, w1;
};

template <typename opmath_t>
ColumnBlocks column_blocks(const std::vector<LinearTap<opmath_t>>& cols) {
  ColumnBlocks cb;
  const int64_t W = static_cast<int64_t>(cols.size());
  for (int64_t bx = 0; bx + 8 <= W; bx += 8) {
    const int64_t q = cols[bx].i0;
    const bool fits = cols[bx + 7].i1 - q < 8;
    cb.first.push_back(fits ? q : -1);
    for (int64_t x = bx; x < bx + 8; ++x) {
      cb.i0.push_back(static_cast<int32_t>(fits ? cols[x].i0 - q : 0));
      cb.i1.push_back(static_cast<int32_t>(fits ? cols[x].i1 - q : 0));
      cb.w0.push_back(static_cast<float>(cols[x].w0));
      cb.w1.push_back(static_cast<float>(cols[x].w1));
    }
  }
  return cb;
}

// dst[x] = row[t.i0] * t.w0 + row[t.i1] * t.w1 (t = cols[x]) for x in
// [x0, x1): the portable width pass of one coarse row (elements `step` apart).
template <typename scalar_t, typename opmath_t>
inline void widen_row(const scalar_t* row, int64_t step, const std::vector<LinearTap<opmath_t>>& cols,
                      int64_t x0, int64_t x1, opmath_t* dst) {
  for (int64_t x = x0; x < x1; ++x) {
    const auto& t = cols[x];
    dst[x] = static_cast<opmath_t>(row[t.i0 * step]) * t.w0 + static_cast<opmath_t>(row[t.i1 * step]) * t.w1;
  }
}

// The vector path's row operations: each returns whether it ran. They run
// for float32 on x86-64 (the AVX2 overloads below); the caller only asks
// when the vector path is on, which it never is for other types.
template <typename scalar_t, typename opmath_t>
inline bool widen_row_vector(const scalar_t*, int64_t, const ColumnBlocks&,
                             const std::vector<LinearTap<opmath_t>>&, opmath_t*) {
  return false;
}

template <typename scalar_t, typename opmath_t>
inline bool blend_rows_vector(const opmath_t*, const opmath_t*, opmath_t, opmath_t, scalar_t*, int64_t) {
  return false;
}

template <typename scalar_t>
inline bool epilogue_vector(scalar_t*, const scalar_t*, int64_t) {
  return false;
}

// The AVX2 overloads, in the portable loops' operations and order (mul,
// mul, add; the same clamp), so the same bits.
#if PYMATTING_EXT_AVX2
// widen_row of a contiguous coarse row (WCo elements), the blocks that fit
// 8 output columns at a time.
PYMATTING_EXT_TARGET_AVX2 inline bool widen_row_vector(const float* row, int64_t WCo, const ColumnBlocks& cb,
                                                       const std::vector<LinearTap<float>>& cols, float* dst) {
  const int64_t blocks = static_cast<int64_t>(cb.first.size());
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t bx = 8 * k, q = cb.first[k];
    if (q < 0) {
      widen_row(row, 1, cols, bx, bx + 8, dst);
      continue;
    }
    const __m256 v = load_first(row + q, WCo - q);
    const __m256 a = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&cb.i0[bx])));
    const __m256 b = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&cb.i1[bx])));
    _mm256_storeu_ps(dst + bx, _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(&cb.w0[bx])),
                                             _mm256_mul_ps(b, _mm256_loadu_ps(&cb.w1[bx]))));
  }
  widen_row(row, 1, cols, 8 * blocks, static_cast<int64_t>(cols.size()), dst);
  return true;
}

// o[x] = top[x] * w0 + bottom[x] * w1 for x in [0, n).
PYMATTING_EXT_TARGET_AVX2 inline bool blend_rows_vector(const float* top, const float* bottom, float w0, float w1,
                                                        float* o, int64_t n) {
  const __m256 a = _mm256_set1_ps(w0), b = _mm256_set1_ps(w1);
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    _mm256_storeu_ps(o + x, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(top + x), a),
                                          _mm256_mul_ps(_mm256_loadu_ps(bottom + x), b)));
  }
  for (; x < n; ++x) {
    o[x] = top[x] * w0 + bottom[x] * w1;
  }
  return true;
}

// clamp01 of each lane: NaN passes (neither comparison holds), -0 stays.
PYMATTING_EXT_TARGET_AVX2 inline __m256 clamp01_avx2(__m256 v) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
  return _mm256_blendv_ps(v, one, _mm256_cmp_ps(v, one, _CMP_GT_OQ));
}

// o[x] = clamp01(o[x] (+ s[x] where s)) for x in [0, n) (s contiguous).
PYMATTING_EXT_TARGET_AVX2 inline bool epilogue_vector(float* o, const float* s, int64_t n) {
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    __m256 v = _mm256_loadu_ps(o + x);
    if (s != nullptr) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(s + x));
    }
    _mm256_storeu_ps(o + x, clamp01_avx2(v));
  }
  for (; x < n; ++x) {
    o[x] = clamp01(s != nullptr ? o[x] + s[x] : o[x]);
  }
  return true;
}
#endif  // PYMATTING_EXT_AVX2

// Writes the output into out, a contiguous (B, C, H, W) tensor; the
// arguments are checked by the caller.
void compose_impl(const char* op, const at::Tensor& coarse, const at::Tensor& patches,
                  const at::Tensor& idx, const c10::optional<at::Tensor>& valid,
                  const c10::optional<at::Tensor>& src, const at::Tensor& out) {
  const int64_t B = coarse.size(0), C = coarse.size(1), HCo = coarse.size(2), WCo = coarse.size(3);
  const int64_t H = out.size(2), W = out.size(3);
  const int64_t s = patches.size(3);

  const at::Tensor idx_c = idx.contiguous();
  const int64_t HB = H / s, WB = W / s;
  const CellRows refined = cell_rows(cell_map(op, idx_c, valid, B, HB, WB), B * HB, WB);
  if (out.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coarse.scalar_type(), "compose_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<LinearTap<opmath_t>> rows(H), cols(W);
    const opmath_t sh = linear_scale<opmath_t>(HCo, H), sw = linear_scale<opmath_t>(WCo, W);
    for (int64_t y = 0; y < H; ++y) {
      rows[y] = linear_tap<scalar_t, opmath_t>(y, HCo, H, sh);
    }
    for (int64_t x = 0; x < W; ++x) {
      cols[x] = linear_tap<scalar_t, opmath_t>(x, WCo, W, sw);
    }
    const scalar_t* in = coarse.data_ptr<scalar_t>();
    const auto is = coarse.strides();
    const scalar_t* pat = patches.data_ptr<scalar_t>();
    const auto ps = patches.strides();
    const scalar_t* src_p = src.has_value() ? src->data_ptr<scalar_t>() : nullptr;
    const auto ss = src.has_value() ? src->strides() : is;
    scalar_t* out_all = out.data_ptr<scalar_t>();
    // The float32 vector path where the CPU has it: rows assembled in a
    // buffer (in L1) and, for an output beyond the caches, streamed out.
    const bool vector = std::is_same_v<scalar_t, float> && avx2_enabled();
    const bool stream = vector && out.nbytes() >= kStreamBytes;
    const ColumnBlocks blocks = vector && is[3] == 1 ? column_blocks(cols) : ColumnBlocks();

    // Rows are handed out in (b, c, y) order, so a thread walks down a plane
    // and reuses the width-interpolated coarse rows of the row above.
    at::parallel_for(0, B * C * H, 16, [&](int64_t r0, int64_t r1) {
      std::vector<opmath_t> buf[2] = {std::vector<opmath_t>(W), std::vector<opmath_t>(W)};
      std::vector<scalar_t> assembled(stream ? W : 0);
      int64_t key[2] = {-1, -1};
      // The width pass of one coarse row into a buffer not holding `keep`.
      auto coarse_row = [&](int64_t plane, int64_t cy, int64_t keep) -> const opmath_t* {
        const int64_t k = plane * HCo + cy;
        for (int j = 0; j < 2; ++j) {
          if (key[j] == k) {
            return buf[j].data();
          }
        }
        const int j = key[0] == keep ? 1 : 0;
        const int64_t b = plane / C, c = plane % C;
        const scalar_t* row = in + b * is[0] + c * is[1] + cy * is[2];
        opmath_t* dst = buf[j].data();
        if (!(vector && is[3] == 1 && widen_row_vector(row, WCo, blocks, cols, dst))) {
          widen_row(row, is[3], cols, 0, W, dst);
        }
        key[j] = k;
        return dst;
      };
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / H, y = r % H;
        const int64_t b = plane / C, c = plane % C;
        const auto& ty = rows[y];
        const opmath_t* top = coarse_row(plane, ty.i0, plane * HCo + ty.i1);
        const opmath_t* bottom = coarse_row(plane, ty.i1, plane * HCo + ty.i0);
        scalar_t* o = stream ? assembled.data() : out_all + r * W;
        const opmath_t w0 = ty.w0, w1 = ty.w1;
        if (!(vector && blend_rows_vector(top, bottom, w0, w1, o, W))) {
          for (int64_t x = 0; x < W; ++x) {
            o[x] = static_cast<scalar_t>(top[x] * w0 + bottom[x] * w1);
          }
        }
        const int64_t cell_row = b * HB + y / s, py = y % s;
        for (int64_t e = refined.start[cell_row]; e < refined.start[cell_row + 1]; ++e) {
          const auto [cx, p] = refined.cells[e];
          const scalar_t* prow = pat + p * ps[0] + c * ps[1] + py * ps[2];
          scalar_t* dst = o + cx * s;
          for (int64_t px = 0; px < s; ++px) {
            dst[px] = prow[px * ps[3]];
          }
        }
        if (src_p != nullptr) {
          const scalar_t* srow = c == 0 ? nullptr : src_p + b * ss[0] + (c - 1) * ss[1] + y * ss[2];
          if (vector && (srow == nullptr || ss[3] == 1) && epilogue_vector(o, srow, W)) {
            // The vector path did it.
          } else if (srow == nullptr) {
            for (int64_t x = 0; x < W; ++x) {
              o[x] = clamp01(o[x]);
            }
          } else {
            for (int64_t x = 0; x < W; ++x) {
              // Rounded to scalar_t after the add, as fgr.add_(src) does.
              o[x] = clamp01(static_cast<scalar_t>(static_cast<opmath_t>(o[x]) +
                                                   static_cast<opmath_t>(srow[x * ss[3]])));
            }
          }
        }
        if (stream) {
          stream_store(out_all + r * W, o, W);
        }
      }
      if (stream) {
        stream_fence();
      }
    });
  });
}

at::Tensor compose_cpu(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                       const c10::optional<at::Tensor>& valid, at::IntArrayRef size,
                       const c10::optional<at::Tensor>& src) {
  const char* op = "compose";
  check_compose_args(op, coarse, patches, idx, valid, size, src, at::kCPU);
  at::Tensor out = at::empty({coarse.size(0), coarse.size(1), size[0], size[1]}, coarse.options());
  compose_impl(op, coarse, patches, idx, valid, src, out);
  return out;
}

void compose_into_cpu(const at::Tensor& coarse, const at::Tensor& patches, const at::Tensor& idx,
                      const c10::optional<at::Tensor>& valid, const c10::optional<at::Tensor>& src,
                      const at::Tensor& out) {
  const char* op = "compose_into";
  check_compose_into_args(op, coarse, patches, idx, valid, src, out, at::kCPU);
  compose_impl(op, coarse, patches, idx, valid, src, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("compose", &compose_cpu);
  m.impl("compose_into", &compose_into_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
