// CPU kernel of crop: patches from several inputs, each optionally sampled
// from a bilinear resize, without materialising the resized images.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../index_math.h"
#include "avx2.h"
#include "cpu_common.h"

namespace pymatting_ext {
namespace cpu {
namespace {

template <typename scalar_t>
struct CropPlane {
  const scalar_t* data;
  int64_t stride_b, stride_h, stride_w;
  // One past the last element of the plane's tensor.
  const scalar_t* hi;
};

// Up to 8 channels of a source that sit next to each other at every pixel
// (a channels-last tensor's): channel first + k (k < n) of pixel (b, y, x)
// is at data[k + b * stride_b + y * stride_h + x * stride_w].
template <typename scalar_t>
struct ChannelRun {
  int64_t first, n;
  const scalar_t* data;
  int64_t stride_b, stride_h, stride_w;
  // The end of the memory the run may read (the nearest of its planes'
  // tensors' ends): whole 8-lane loads stay before it.
  const scalar_t* hi;
};

// Whether two planes, runs or spans step through memory alike.
template <typename A, typename B>
inline bool same_strides(const A& a, const B& b) {
  return a.stride_b == b.stride_b && a.stride_h == b.stride_h && a.stride_w == b.stride_w;
}

// Consecutive inputs of one size are one source: their channels are
// gathered and blended together.
template <typename scalar_t>
struct CropSource {
  std::vector<CropPlane<scalar_t>> planes;
  int64_t height, width;
  bool resample;
  // Whether every plane's rows are contiguous (stride_w == 1): the vector
  // path then reads each plane's rows and transposes; otherwise (channels-
  // last inputs) it reads each pixel's channels, by `runs`.
  bool planar = true;
  std::vector<ChannelRun<scalar_t>> runs;
  // The memory a pixel's channels span, per tensor: planes that share
  // strides and lie within one pixel's stride of each other are one span
  // (a channels-last tensor's channels), read together when prefetched.
  struct Span {
    const scalar_t* lo;
    const scalar_t* hi;  // one past the last channel's element
    int64_t stride_b, stride_h, stride_w;
  };
  std::vector<Span> spans;
  // Taps over the resampled image's rows and columns (empty if !resample).
  std::vector<LinearTap<at::opmath_type<scalar_t>>> rows, cols;
  // The column taps as arrays, for the vector path (loaded 8 at a time).
  std::vector<int32_t> col_i0, col_i1;
  std::vector<at::opmath_type<scalar_t>> col_w0, col_w1;
};

// The input rows [r_lo, r_hi) and columns [q_lo, q_hi) of a source that
// output rows [ylo, yhi) and columns [xlo, xhi) read (non-empty ranges).
struct SourceWindow {
  int64_t r_lo, r_hi, q_lo, q_hi;
};

template <typename scalar_t>
inline SourceWindow source_window(const CropSource<scalar_t>& s, int64_t ylo, int64_t yhi, int64_t xlo,
                                  int64_t xhi) {
  if (!s.resample) {
    return {ylo, yhi, xlo, xhi};
  }
  return {s.rows[ylo].i0, s.rows[yhi - 1].i1 + 1, s.cols[xlo].i0, s.cols[xhi - 1].i1 + 1};
}

// out[i] = a[i] * wa + b[i] * wb for n contiguous elements, in opmath_t,
// rounded to T once: one pass of linear_mix, vectorised by the compiler.
template <typename T, typename opmath_t>
inline void blend_run(T* __restrict__ out, const opmath_t* __restrict__ a,
                      const opmath_t* __restrict__ b, opmath_t wa, opmath_t wb, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(a[i] * wa + b[i] * wb);
  }
}

// Per-thread scratch of the resampled sources: the source window with the
// channels innermost, and its width pass.
template <typename opmath_t>
struct CropScratch {
  std::vector<opmath_t> window, widened;
};

// The channels of resampled source `s` over image rows [ylo, yhi) and
// columns [xlo, xhi) of image b, written to out (the first of those pixels,
// at its source's first channel; rows row_pitch apart, pixels C_out apart).
// NB: separable, width pass first, which is linear_mix's order of
// operations exactly (the same bits): a source row is blended across once
// per output column and reused by every output row that reads it, and
// both passes run over contiguous channels.
template <typename scalar_t, typename opmath_t>
void crop_resampled(const CropSource<scalar_t>& s, int64_t b, int64_t ylo, int64_t yhi, int64_t xlo,
                    int64_t xhi, scalar_t* out, int64_t row_pitch, int64_t C_out,
                    CropScratch<opmath_t>& scratch) {
  const int64_t SC = static_cast<int64_t>(s.planes.size());
  const auto [r_lo, r_hi, q_lo, q_hi] = source_window(s, ylo, yhi, xlo, xhi);
  const int64_t nr = r_hi - r_lo, nq = q_hi - q_lo, nx = xhi - xlo;
  scratch.window.resize(static_cast<size_t>(nr * nq * SC));
  scratch.widened.resize(static_cast<size_t>(nr * nx * SC));
  opmath_t* win = scratch.window.data();
  // Each plane's rows read contiguously, transposed into the window.
  for (int64_t c = 0; c < SC; ++c) {
    const auto& pl = s.planes[c];
    const scalar_t* plane = pl.data + b * pl.stride_b + q_lo * pl.stride_w;
    for (int64_t r = 0; r < nr; ++r) {
      const scalar_t* irow = plane + (r_lo + r) * pl.stride_h;
      opmath_t* w = win + r * nq * SC + c;
      if (pl.stride_w == 1) {
        for (int64_t q = 0; q < nq; ++q) {
          w[q * SC] = static_cast<opmath_t>(irow[q]);
        }
      } else {
        for (int64_t q = 0; q < nq; ++q) {
          w[q * SC] = static_cast<opmath_t>(irow[q * pl.stride_w]);
        }
      }
    }
  }
  // Width pass: every window row at the output's columns.
  opmath_t* wid = scratch.widened.data();
  for (int64_t r = 0; r < nr; ++r) {
    const opmath_t* wrow = win + r * nq * SC;
    opmath_t* drow = wid + r * nx * SC;
    for (int64_t x = 0; x < nx; ++x) {
      const auto& tx = s.cols[xlo + x];
      blend_run(drow + x * SC, wrow + (tx.i0 - q_lo) * SC, wrow + (tx.i1 - q_lo) * SC, tx.w0, tx.w1, SC);
    }
  }
  // Height pass, straight into the channels-last output.
  for (int64_t y = ylo; y < yhi; ++y) {
    const auto& ty = s.rows[y];
    const opmath_t* top = wid + (ty.i0 - r_lo) * nx * SC;
    const opmath_t* bottom = wid + (ty.i1 - r_lo) * nx * SC;
    scalar_t* orow = out + (y - ylo) * row_pitch;
    if (SC == C_out) {
      blend_run(orow, top, bottom, ty.w0, ty.w1, nx * SC);
    } else {
      for (int64_t x = 0; x < nx; ++x) {
        blend_run(orow + x * C_out, top + x * SC, bottom + x * SC, ty.w0, ty.w1, SC);
      }
    }
  }
}

// The channels of a source of the image's own size: a copy, transposed to
// channels-last (arguments as crop_resampled's).
template <typename scalar_t>
void crop_direct(const CropSource<scalar_t>& s, int64_t b, int64_t ylo, int64_t yhi, int64_t xlo,
                 int64_t xhi, scalar_t* out, int64_t row_pitch, int64_t C_out) {
  const int64_t SC = static_cast<int64_t>(s.planes.size());
  for (int64_t c = 0; c < SC; ++c) {
    const auto& pl = s.planes[c];
    const scalar_t* plane = pl.data + b * pl.stride_b + xlo * pl.stride_w;
    for (int64_t y = ylo; y < yhi; ++y) {
      const scalar_t* irow = plane + y * pl.stride_h;
      scalar_t* o = out + (y - ylo) * row_pitch + c;
      if (pl.stride_w == 1) {
        for (int64_t x = 0; x < xhi - xlo; ++x) {
          o[x * C_out] = irow[x];
        }
      } else {
        for (int64_t x = 0; x < xhi - xlo; ++x) {
          o[x * C_out] = irow[x * pl.stride_w];
        }
      }
    }
  }
}

// Window rows one 8-row block of the vector path may read (the check in
// vector_path_fits keeps to it).
constexpr int64_t kVectorMaxRows = 24;

// Whether a source's taps suit the vector path: the rows of any 8-row block
// read at most kVectorMaxRows input rows, and for a planar source the
// columns of any 8-column block at most 16 input columns (true for
// upsampling and for downsampling by up to 2, the refiner's cases).
template <typename scalar_t>
bool vector_path_fits(const CropSource<scalar_t>& s, int64_t H, int64_t W) {
  if (!s.resample) {
    return true;
  }
  if (s.width > INT32_MAX) {
    return false;
  }
  for (int64_t x = 0; x + 8 <= W && s.planar; ++x) {
    const SourceWindow w = source_window(s, 0, 1, x, x + 8);
    if (w.q_hi - w.q_lo > 16) {
      return false;
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    const SourceWindow w = source_window(s, y, std::min(y + 8, H), 0, 1);
    if (w.r_hi - w.r_lo > kVectorMaxRows) {
      return false;
    }
  }
  return true;
}

// The vector path for other types than float32 (and off x86-64): never
// called (the caller's flag is never set for them), there to compile.
template <typename scalar_t>
inline void crop_vector(const std::vector<CropSource<scalar_t>>&, int64_t, int64_t, int64_t, int64_t, int64_t,
                        scalar_t*, int64_t, int64_t) {}

#if PYMATTING_EXT_AVX2
// 8 lanes from p: a plain load where whole, else the first n (zeros after).
PYMATTING_EXT_TARGET_AVX2 inline __m256 load_run(const float* p, bool whole, int64_t n) {
  return whole ? _mm256_loadu_ps(p) : load_first(p, n);
}

// The vector path of a source that is not planar (channels-last inputs)
// over the 8 x 8 block of image rows [by, by + ny) and columns [bx, bx + 8)
// of image b, into o (the block's first pixel, at the source's first
// channel): per run of channels, each pixel's channels loaded at once,
// blended across, then down, and stored, with no transposes. across:
// scratch of kVectorMaxRows x 8 vectors.
// NB: a run of fewer than 8 channels is loaded 8 lanes wide where that
// stays in its memory (the lanes after its channels, never stored, hold
// whatever follows them).
// NB: the same operations in the same order as crop_resampled, so the same
// bits.
PYMATTING_EXT_TARGET_AVX2 void crop_pixels(const CropSource<float>& s, int64_t b, int64_t by, int64_t ny,
                                           int64_t bx, float* o, int64_t row_pitch, int64_t C_out,
                                           __m256 (*across)[8]) {
  if (!s.resample) {
    for (const auto& R : s.runs) {
      for (int64_t y = 0; y < ny; ++y) {
        const float* row = R.data + b * R.stride_b + (by + y) * R.stride_h + bx * R.stride_w;
        const bool whole = R.hi - (row + 7 * R.stride_w) >= 8;
        float* orow = o + y * row_pitch + R.first;
        for (int64_t x = 0; x < 8; ++x) {
          store_first(orow + x * C_out, load_run(row + x * R.stride_w, whole, R.n), R.n);
        }
      }
    }
    return;
  }
  const SourceWindow win = source_window(s, by, by + ny, bx, bx + 8);
  const int64_t nr = win.r_hi - win.r_lo;
  int64_t q0[8], q1[8];
  __m256 w0[8], w1[8];
  for (int64_t x = 0; x < 8; ++x) {
    const auto& t = s.cols[bx + x];
    q0[x] = t.i0;
    q1[x] = t.i1;
    w0[x] = _mm256_set1_ps(t.w0);
    w1[x] = _mm256_set1_ps(t.w1);
  }
  for (const auto& R : s.runs) {
    // Width pass: each window row at the block's 8 columns.
    for (int64_t r = 0; r < nr; ++r) {
      const float* row = R.data + b * R.stride_b + (win.r_lo + r) * R.stride_h;
      // NB: strides are not negative: the last column's load is the last.
      const bool whole = R.hi - (row + (win.q_hi - 1) * R.stride_w) >= 8;
      for (int64_t x = 0; x < 8; ++x) {
        const __m256 a = load_run(row + q0[x] * R.stride_w, whole, R.n);
        const __m256 c = load_run(row + q1[x] * R.stride_w, whole, R.n);
        across[r][x] = _mm256_add_ps(_mm256_mul_ps(a, w0[x]), _mm256_mul_ps(c, w1[x]));
      }
    }
    // Height pass, straight into the channels-last output.
    for (int64_t y = 0; y < ny; ++y) {
      const auto& t = s.rows[by + y];
      const __m256* top = across[t.i0 - win.r_lo];
      const __m256* bottom = across[t.i1 - win.r_lo];
      const __m256 wy0 = _mm256_set1_ps(t.w0), wy1 = _mm256_set1_ps(t.w1);
      float* orow = o + y * row_pitch + R.first;
      for (int64_t x = 0; x < 8; ++x) {
        store_first(orow + x * C_out, _mm256_add_ps(_mm256_mul_ps(top[x], wy0), _mm256_mul_ps(bottom[x], wy1)),
                    R.n);
      }
    }
  }
}

// The float32 AVX2 path over image rows [ylo, yhi) and columns [xlo, xhi)
// of image b, all inside the image, xhi - xlo a multiple of 8 (out as
// crop_resampled's, at the first source's first channel). Blocks of up to
// 8 x 8 pixels: per channel, each window row is blended across the block's
// 8 columns at once (permutes by the taps' indices), then down the rows;
// the blocks of 8 channels are transposed to channels-last and stored.
// Sources that are not planar take crop_pixels instead.
// NB: the same operations in the same order as crop_resampled (mul, mul,
// add; width pass first), so the same bits.
PYMATTING_EXT_TARGET_AVX2 void crop_vector(const std::vector<CropSource<float>>& sources, int64_t b,
                                           int64_t ylo, int64_t yhi, int64_t xlo, int64_t xhi,
                                           float* out, int64_t row_pitch, int64_t C_out) {
  // The width pass of a group of 8 channels: [channel][window row] (planar
  // sources) or [window row][column] (the others).
  __m256 across[8][kVectorMaxRows];
  __m256 (*rows_by_column)[8] = reinterpret_cast<__m256 (*)[8]>(&across[0][0]);
  alignas(32) static const float kZeros[8] = {};
  const __m256i seven = _mm256_set1_epi32(7);
  for (int64_t by = ylo; by < yhi; by += 8) {
    const int64_t ny = std::min<int64_t>(8, yhi - by);
    for (int64_t bx = xlo; bx < xhi; bx += 8) {
      float* o = out + (by - ylo) * row_pitch + (bx - xlo) * C_out;
      int64_t c_base = 0;
      for (const auto& s : sources) {
        const int64_t SC = static_cast<int64_t>(s.planes.size());
        if (!s.planar) {
          crop_pixels(s, b, by, ny, bx, o + c_base, row_pitch, C_out, rows_by_column);
          c_base += SC;
          continue;
        }
        const SourceWindow win = source_window(s, by, by + ny, bx, bx + 8);
        const int64_t r_lo = win.r_lo, nr = win.r_hi - win.r_lo, q_lo = win.q_lo;
        const bool wide = win.q_hi - q_lo > 8;
        // Window columns that exist: the loads read no further.
        const int64_t avail = s.width - q_lo;
        __m256i i0 = _mm256_setzero_si256(), i1 = i0;
        __m256 w0 = _mm256_setzero_ps(), w1 = w0, hi0 = w0, hi1 = w0;
        if (s.resample) {
          const __m256i base = _mm256_set1_epi32(static_cast<int>(q_lo));
          i0 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(&s.col_i0[bx])), base);
          i1 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(&s.col_i1[bx])), base);
          w0 = _mm256_loadu_ps(&s.col_w0[bx]);
          w1 = _mm256_loadu_ps(&s.col_w1[bx]);
          hi0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i0, seven));
          hi1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i1, seven));
        }
        for (int64_t g = 0; g < SC; g += 8) {
          const int64_t n = std::min<int64_t>(8, SC - g);
          if (!s.resample) {
            // Rows of the group's planes at the block's columns; a missing
            // channel (n < 8) reads zeros.
            const float* first[8];
            int64_t pitch[8];
            for (int64_t c = 0; c < 8; ++c) {
              const CropPlane<float>* pl = c < n ? &s.planes[g + c] : nullptr;
              first[c] = pl ? pl->data + b * pl->stride_b + by * pl->stride_h + bx : kZeros;
              pitch[c] = pl ? pl->stride_h : 0;
            }
            for (int64_t y = 0; y < ny; ++y) {
              __m256 v[8];
              for (int64_t c = 0; c < 8; ++c) {
                v[c] = _mm256_loadu_ps(first[c] + y * pitch[c]);
              }
              transpose8(v);
              float* orow = o + y * row_pitch + c_base + g;
              for (int64_t k = 0; k < 8; ++k) {
                store_first(orow + k * C_out, v[k], n);
              }
            }
            continue;
          }
          // Width pass: each window row of each channel at the block's 8
          // columns (zeros for a missing channel).
          for (int64_t c = 0; c < 8; ++c) {
            if (c >= n) {
              for (int64_t r = 0; r < nr; ++r) {
                across[c][r] = _mm256_setzero_ps();
              }
              continue;
            }
            const auto& pl = s.planes[g + c];
            const float* plane = pl.data + b * pl.stride_b + q_lo;
            for (int64_t r = 0; r < nr; ++r) {
              const float* row = plane + (r_lo + r) * pl.stride_h;
              const __m256 lo = load_first(row, avail);
              __m256 a, c1;
              if (wide) {
                const __m256 hi = load_first(row + 8, avail - 8);
                a = pick16(lo, hi, i0, hi0);
                c1 = pick16(lo, hi, i1, hi1);
              } else {
                a = _mm256_permutevar8x32_ps(lo, i0);
                c1 = _mm256_permutevar8x32_ps(lo, i1);
              }
              across[c][r] = _mm256_add_ps(_mm256_mul_ps(a, w0), _mm256_mul_ps(c1, w1));
            }
          }
          // Height pass, row by row: the 8 channels' rows, transposed to
          // the block's 8 pixels and stored.
          for (int64_t y = 0; y < ny; ++y) {
            const auto& t = s.rows[by + y];
            const int64_t k0 = t.i0 - r_lo, k1 = t.i1 - r_lo;
            const __m256 wy0 = _mm256_set1_ps(t.w0), wy1 = _mm256_set1_ps(t.w1);
            __m256 v[8];
            for (int64_t c = 0; c < 8; ++c) {
              v[c] = _mm256_add_ps(_mm256_mul_ps(across[c][k0], wy0), _mm256_mul_ps(across[c][k1], wy1));
            }
            transpose8(v);
            float* orow = o + y * row_pitch + c_base + g;
            for (int64_t k = 0; k < 8; ++k) {
              store_first(orow + k * C_out, v[k], n);
            }
          }
        }
        c_base += SC;
      }
    }
  }
}
#endif  // PYMATTING_EXT_AVX2

// Asks for the cache line at p, into L2.
// NB: L2, not L1: a patch's windows are ~500 lines (30 KB) that are asked
// for a few patches ahead of their use, which L1 (32 KB) cannot hold.
// NB: GCC (12, at -O2 and above) deletes a loop of __builtin_prefetch as
// if it had no effect; an asm statement it keeps.
inline void prefetch_line(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Asks for the cache lines of a patch's source windows (image b, output
// rows [y_lo, y_hi), columns [x_lo, x_hi)) ahead of their use, each line once.
// NB: the patches are scattered over the image, so every row of a window
// is a cache miss that the hardware prefetchers cannot foresee (rows are a
// whole image row apart); without this the kernel waits on memory latency
// rather than bandwidth.
template <typename scalar_t>
void prefetch_windows(const std::vector<CropSource<scalar_t>>& sources, int64_t b, int64_t y_lo,
                      int64_t y_hi, int64_t x_lo, int64_t x_hi) {
  if (y_lo >= y_hi || x_lo >= x_hi) {
    return;
  }
  for (const auto& s : sources) {
    const auto [r_lo, r_hi, q_lo, q_hi] = source_window(s, y_lo, y_hi, x_lo, x_hi);
    for (const auto& sp : s.spans) {
      const int64_t first_q = q_lo * sp.stride_w, last_q = (q_hi - 1) * sp.stride_w + (sp.hi - sp.lo) - 1;
      for (int64_t r = r_lo; r < r_hi; ++r) {
        const scalar_t* row = sp.lo + b * sp.stride_b + r * sp.stride_h;
        const uintptr_t first = reinterpret_cast<uintptr_t>(row + first_q);
        const uintptr_t last = reinterpret_cast<uintptr_t>(row + last_q);
        for (uintptr_t line = first & ~uintptr_t(63); line <= last; line += 64) {
          prefetch_line(reinterpret_cast<const void*>(line));
        }
      }
    }
  }
}

// Writes the patches into channels [c_offset, c_offset + sum C_i) of out, a
// channels-last contiguous (P, C_out, PH, PW) tensor; the arguments are
// checked by the caller.
void crop_into_impl(const char* op, at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                    int64_t padding, at::IntArrayRef image_size, int64_t c_offset,
                    const at::Tensor& out) {
  const at::Tensor& first = inputs[0];
  const int64_t B = first.size(0), H = image_size[0], W = image_size[1];
  const int64_t PH = out.size(2), PW = out.size(3), C_out = out.size(1);
  const at::Tensor idx_c = idx.contiguous();
  // A patch is anchored at a cell of the stride grid over the image.
  check_idx_values(op, idx_c, B, (H + stride - 1) / stride, (W + stride - 1) / stride);
  const int64_t P = idx_c.size(0);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  if (P == 0 || C == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "crop_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<CropSource<scalar_t>> sources;
    for (const auto& t : inputs) {
      if (sources.empty() || sources.back().height != t.size(2) || sources.back().width != t.size(3)) {
        CropSource<scalar_t> s;
        s.height = t.size(2);
        s.width = t.size(3);
        s.resample = s.height != H || s.width != W;
        if (s.resample) {
          const opmath_t sh = linear_scale<opmath_t>(s.height, H);
          const opmath_t sw = linear_scale<opmath_t>(s.width, W);
          for (int64_t y = 0; y < H; ++y) {
            s.rows.push_back(linear_tap<scalar_t, opmath_t>(y, s.height, H, sh));
          }
          for (int64_t x = 0; x < W; ++x) {
            s.cols.push_back(linear_tap<scalar_t, opmath_t>(x, s.width, W, sw));
          }
        }
        sources.push_back(std::move(s));
      }
      const scalar_t* data = t.data_ptr<scalar_t>();
      int64_t last = 0;
      for (int64_t d = 0; d < t.dim(); ++d) {
        last += (t.size(d) - 1) * t.stride(d);
      }
      for (int64_t c = 0; c < t.size(1); ++c) {
        sources.back().planes.push_back(
            {data + c * t.stride(1), t.stride(0), t.stride(2), t.stride(3), data + last + 1});
      }
    }
    for (auto& s : sources) {
      s.planar = std::all_of(s.planes.begin(), s.planes.end(), [](const auto& pl) { return pl.stride_w == 1; });
      for (const auto& pl : s.planes) {
        // Joins a span of the same strides whose pixel it lies in.
        bool joined = false;
        for (auto& sp : s.spans) {
          const scalar_t* lo = std::min(sp.lo, pl.data);
          const scalar_t* hi = std::max(sp.hi, pl.data + 1);
          if (same_strides(sp, pl) && hi - lo <= std::max<int64_t>(pl.stride_w, 1)) {
            sp.lo = lo;
            sp.hi = hi;
            joined = true;
            break;
          }
        }
        if (!joined) {
          s.spans.push_back({pl.data, pl.data + 1, pl.stride_b, pl.stride_h, pl.stride_w});
        }
      }
    }
    // The float32 vector path, where the CPU has it and every source suits it.
    bool vector = false;
    if (std::is_same_v<scalar_t, float> && PYMATTING_EXT_AVX2) {
      vector = avx2_enabled();
      for (auto& s : sources) {
        vector = vector && vector_path_fits(s, H, W);
      }
      for (auto& s : sources) {
        if (vector && !s.planar) {
          // Runs of up to 8 channels adjacent in memory.
          for (int64_t c = 0; c < static_cast<int64_t>(s.planes.size()); ++c) {
            const auto& pl = s.planes[c];
            auto* last = s.runs.empty() ? nullptr : &s.runs.back();
            if (last != nullptr && last->n < 8 && last->data + last->n == pl.data && same_strides(*last, pl)) {
              ++last->n;
              last->hi = std::min(last->hi, pl.hi);
            } else {
              s.runs.push_back({c, 1, pl.data, pl.stride_b, pl.stride_h, pl.stride_w, pl.hi});
            }
          }
        }
        if (vector && s.resample && s.planar) {
          for (const auto& t : s.cols) {
            s.col_i0.push_back(static_cast<int32_t>(t.i0));
            s.col_i1.push_back(static_cast<int32_t>(t.i1));
            s.col_w0.push_back(t.w0);
            s.col_w1.push_back(t.w1);
          }
        }
      }
    }
    const int64_t* idx_p = idx_c.data_ptr<int64_t>();
    scalar_t* out_all = out.data_ptr<scalar_t>();
    const int64_t row_pitch = PW * C_out;
    // NB: patches are cut into tiles of at most kTileRows x kTileCols pixels,
    // so that a few huge patches (the full mode's whole-image crop) still
    // spread over threads and a tile's scratch stays in cache; the refiner's
    // 8 x 8 patches are one tile each.
    constexpr int64_t kTileRows = 16, kTileCols = 64;
    const int64_t tiles_y = (PH + kTileRows - 1) / kTileRows, tiles_x = (PW + kTileCols - 1) / kTileCols;
    const int64_t tiles = tiles_y * tiles_x;
    // Patches prefetched ahead of the one being cut (when a patch is one tile).
    constexpr int64_t kAhead = 4;
    // NB: the crop's scattered stores would wait on the reads for ownership
    // of an output beyond the caches (see kStreamBytes). So where a patch is
    // one tile, written whole, and the output is that large, each patch is
    // assembled in a buffer that stays in L1 and streamed out. Measured on 2
    // cores (AMD EPYC): the refiner's 1536-patch chunks (16.5 MB) crop 30%
    // faster so, and the whole refiner runs 3-6% faster although conv1 then
    // reads the patches from memory rather than cache.
    const int64_t patch_elems = PH * row_pitch;
    const bool stream = vector && tiles == 1 && C == C_out && out.nbytes() >= kStreamBytes;
    at::parallel_for(0, P * tiles, 8, [&](int64_t t0, int64_t t1) {
      CropScratch<opmath_t> scratch;
      std::vector<scalar_t> patch_buffer(stream ? patch_elems + 64 / sizeof(scalar_t) : 0);
      scalar_t* assembled = reinterpret_cast<scalar_t*>(
          (reinterpret_cast<uintptr_t>(patch_buffer.data()) + 63) & ~uintptr_t(63));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / tiles, ty = (t % tiles) / tiles_x, tx = t % tiles_x;
        const int64_t py0 = ty * kTileRows, py1 = std::min(PH, py0 + kTileRows);
        const int64_t px0 = tx * kTileCols, px1 = std::min(PW, px0 + kTileCols);
        const int64_t b = idx_p[3 * p];
        const int64_t oy = patch_origin(idx_p[3 * p + 1], stride, padding);
        const int64_t ox = patch_origin(idx_p[3 * p + 2], stride, padding);
        if (tiles == 1 && p + kAhead < P) {
          const int64_t* n = idx_p + 3 * (p + kAhead);
          const int64_t ny = patch_origin(n[1], stride, padding), nx = patch_origin(n[2], stride, padding);
          prefetch_windows(sources, n[0], std::max(ny, int64_t(0)), std::min(ny + PH, H),
                           std::max(nx, int64_t(0)), std::min(nx + PW, W));
        }
        scalar_t* o = stream ? assembled : out_all + p * patch_elems + c_offset;
        // The part of the tile inside the image (image coordinates); the
        // rest is zeros.
        const int64_t y_lo = std::max(oy + py0, int64_t(0)), y_hi = std::min(oy + py1, H);
        const int64_t x_lo = std::max(ox + px0, int64_t(0)), x_hi = std::min(ox + px1, W);
        const bool any = y_lo < y_hi && x_lo < x_hi;
        const bool whole = y_lo == oy + py0 && y_hi == oy + py1 && x_lo == ox + px0 && x_hi == ox + px1;
        for (int64_t py = py0; py < py1 && !whole; ++py) {
          const int64_t y = oy + py;
          const bool row_in = any && y >= y_lo && y < y_hi;
          for (int64_t px = px0; px < px1; ++px) {
            const int64_t x = ox + px;
            if (!row_in || x < x_lo || x >= x_hi) {
              std::fill_n(o + py * row_pitch + px * C_out, C, scalar_t(0));
            }
          }
        }
        if (any) {
          scalar_t* inside = o + (y_lo - oy) * row_pitch + (x_lo - ox) * C_out;
          // Columns [x_lo, x_mid) by the vector path, in blocks of 8; the
          // rest by the portable loops.
          int64_t x_mid = x_lo;
          if (vector) {
            x_mid = x_lo + (x_hi - x_lo) / 8 * 8;
            if (x_mid > x_lo) {
              crop_vector(sources, b, y_lo, y_hi, x_lo, x_mid, inside, row_pitch, C_out);
            }
          }
          scalar_t* rest = inside + (x_mid - x_lo) * C_out;
          int64_t c_base = 0;
          for (const auto& s : sources) {
            if (x_mid == x_hi) {
              break;
            }
            if (s.resample) {
              crop_resampled(s, b, y_lo, y_hi, x_mid, x_hi, rest + c_base, row_pitch, C_out, scratch);
            } else {
              crop_direct(s, b, y_lo, y_hi, x_mid, x_hi, rest + c_base, row_pitch, C_out);
            }
            c_base += static_cast<int64_t>(s.planes.size());
          }
        }
        if (stream) {
          stream_store(out_all + p * patch_elems, assembled, patch_elems);
        }
      }
      if (stream) {
        stream_fence();
      }
    });
  });
}

at::Tensor crop_cpu(at::TensorList inputs, const at::Tensor& idx, int64_t stride,
                    int64_t padding, at::IntArrayRef image_size, at::IntArrayRef patch_size) {
  const char* op = "crop";
  check_crop_args(op, inputs, idx, stride, padding, image_size, patch_size, at::kCPU);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  // NB: channels-last, because that is the layout in which oneDNN runs the
  // refiner's small convolutions fastest (5x faster than NCHW at HD).
  at::Tensor out = at::empty({idx.size(0), C, patch_size[0], patch_size[1]},
                             inputs[0].options().memory_format(at::MemoryFormat::ChannelsLast));
  crop_into_impl(op, inputs, idx, stride, padding, image_size, 0, out);
  return out;
}

void crop_into_cpu(at::TensorList inputs, const at::Tensor& idx, int64_t stride, int64_t padding,
                   at::IntArrayRef image_size, int64_t channel_offset, const at::Tensor& out) {
  const char* op = "crop_into";
  TORCH_CHECK(out.dim() == 4, op, ": out must have shape (P, C, ph, pw), got ", out.sizes());
  check_crop_args(op, inputs, idx, stride, padding, image_size, {out.size(2), out.size(3)}, at::kCPU);
  int64_t C = 0;
  for (const auto& t : inputs) {
    C += t.size(1);
  }
  check_crop_into_out(op, out, inputs[0], idx, C, channel_offset);
  crop_into_impl(op, inputs, idx, stride, padding, image_size, channel_offset, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymatting_ext, CPU, m) {
  m.impl("crop", &crop_cpu);
  m.impl("crop_into", &crop_into_cpu);
}

}  // namespace cpu
}  // namespace pymatting_ext
