"""The fused eval-mode refiner: crop, the four convolutions and the write of
each refined 4x4 cell in one Triton kernel (sparse modes, kernel_size 1 and
3), and a second pass that writes the upsampled coarse result into every
other cell. No patch tensor and no intermediate activation is written to
memory; the only full-resolution tensor written is the output.

A program takes BLOCK_P cells (idx rows) and lays each one out as R = S x S
rows of a [BLOCK_P * R, channels] tile, S = 8 (kernel_size 3) or 4
(kernel_size 1); row r is position (r // S, r % S) of patch r // R, in
stage 1 a position of the half-resolution crop, in stage 2 one of the
full-resolution crop:

- kernel_size 3: crop 1 is the 8x8 window at half resolution, origin
  (2y - 3, 2x - 3); conv1 is valid on its top-left 6x6, conv2 on 4x4; the
  nearest upsample maps (i, j) to (i // 2, j // 2); crop 2 is the 8x8 window
  at full resolution, origin (4y - 2, 4x - 2); conv3 is valid on 6x6, conv4
  on the 4x4 that is the cell (4y + i, 4x + j). Every layer is computed on
  all 64 rows; rows outside a layer's valid window hold values that no valid
  row reads.
- kernel_size 1: the convolutions are pointwise, so the nearest upsample
  commutes with conv1 and conv2: crop 1 is sampled straight at the upsampled
  positions (2y + i // 2, 2x + j // 2) on the 4x4 grid and no row is moved.

A 3x3 convolution is an implicit GEMM computed tap by tap on the output
side: out[r] = sum over taps t of (X @ W_t)[r + s_t], s_t = dy * S + dx
(within the patch), so each tap is one tl.dot ([rows, C_in] x [C_in,
C_out], fp32 accumulation) and one row gather of its [rows, C_out] result
with tl.gather. Gathering the output instead of the input moves C_out
columns instead of C_in (32 instead of 64 for conv1, 16 instead of 32 for
conv2 and conv3). The nearest upsample before conv3 is one more row gather.

NB: tl.gather, not a scratch buffer in global memory: it exists in the
Tritons in use (3.6 on the GPU machine, 3.8 in CI: the kernel compiles for
sm_90 with both, and both interpreters run it), needs no barrier, no
allocation and no bound on the grid, and keeps the shifted rows on the SM:
with one patch (64 rows) a program, Triton gives the gather a layout in
which a warp holds all 64 rows of its columns and lowers it to warp
shuffles (each tap's dot result goes to that layout through shared
memory: the one layout conversion a tap, as the sm_90 TTGIR shows;
tests/build_checks/test_triton_compile.py checks it). A global scratch buffer would be written and re-read through
L2 nine times per layer, with a __syncthreads between, and could race if
a barrier were misplaced (which the interpreter cannot show).

Channels are padded to powers of two: crop 1 is sampled as hid [rows, 32]
and the rest [rows, 16] (pha, fgr, src/2, bgr/2, six zeros), and conv1
takes them as one [rows, 64] operand (16 more zeros; see _operand),
conv1 out 24 -> 32, conv2 out 16, conv3 in 16 (upsampled) + 16 (crop 2:
src, bgr, ten zeros) as one [rows, 32] operand, conv3 out 12 -> 16, conv4
out 4 -> 16. The weights are read straight from the folded (C_out, C_in, k,
k) tensors, tap by tap, with masks for the padding (no packed copy to cache
or rebuild); Triton stages each tap's tile through shared memory (float32:
a 3-deep cp.async ring, overlapping the previous taps' dots).

NB: so each program reads all the weights, 61 KB in float32 (31 KB in
float16), more than its crops (45 KB in float32). Kept in shared memory for a
persistent program's whole run instead, they take 117 KB (float32, the
dots' padded tiles) and the taps must be unrolled (Triton cannot index
shared memory by a loop variable): compiled for sm_90 that spilled at 255
registers (Triton 3.8: 2 KB in float32, 208 bytes in float16; 3.6: 1.4 KB
and 360 bytes), and its 133 KB of shared memory in float32 fit one program
per SM instead of two. Several patches a program (BLOCK_P) share the
reads instead, at a cost in registers: benchmarks/bench_fused_tiling.py
times which tiling wins.

Rounding follows the unfused path: the bilinear samples are rounded to the
inputs' dtype (as the crop op writes them), each layer's activations are
rounded to the dtype before the next layer's tl.dot (fp32 accumulation,
bias added in fp32), the refined value is rounded to the dtype before
MattingRefine's epilogue. float32 runs tl.dot with input_precision "tf32"
or "ieee" (the caller passes torch.backends.cudnn.allow_tf32).
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .common import (FP_FUSION, clamp01, compiled, device_guard, linear_mix, linear_scale, linear_tap,
                     round_weights, to_dtype, wrap_triton)

__all__ = ["refine_patches_into", "fill_coarse_into", "refine_sparse", "launch_config", "coarse_tiling"]


# -- the fused patch kernel ---------------------------------------------------

@triton.jit
def _mm(a, w, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ w with fp32 accumulation.

    NB: UPCAST (bfloat16 under the interpreter only): Triton's interpreter
    multiplies bfloat16 bit patterns as integers; bfloat16 -> float32 is
    exact and so are the products, so float32 operands give the tensor
    cores' result."""
    if UPCAST:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _tap_weights(w_ptr, c_in, c_out, t, TAPS: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    """[K, N]: tap t of a contiguous (c_out, c_in, kh, kw) weight, zeros in
    the padding (k >= c_in, n >= c_out)."""
    k = tl.arange(0, K)[:, None]
    n = tl.arange(0, N)[None, :]
    m = (k < c_in) & (n < c_out)
    return tl.load(w_ptr + (n * c_in + k) * TAPS + t, mask=m, other=0.0)


@triton.jit
def _operand(a, b, BY_COLUMNS: tl.constexpr):
    """[M, 2C]: tl.dot's operand of the C channels of a, then those of b,
    from [C, M] tiles (channels, rows).

    NB: conv1 and conv3 each take one operand of all their input channels
    (one tl.dot a tap) rather than two operands whose dots are chained
    through the accumulator: Triton gives the first dot of such a chain
    another warp layout than the second (all 8 warps along the rows, which
    with 64 rows makes the second warpgroup repeat the first), so every tap
    converted between the two (seen in the sm_90 TTGIR;
    tests/build_checks/test_triton_compile.py checks that no such conversion is left).
    Adding the two dots' results instead changes nothing: Triton folds
    dot(a, b) + c into dot(a, b, c). For conv1 it costs 16 columns of
    zeros (64 instead of 48), for conv3 none; on the GPU the zeros add
    nothing to the accumulator, under the interpreter the one matmul sums
    in another order than two did (a float32 ulp).

    BY_COLUMNS: the tiles transposed first, then joined as columns, rather
    than joined as rows and transposed: the same values, but registers
    differ by far with the Triton version (sm_90, 8 warps): joined as rows,
    Triton 3.6 (the GPU machine's) takes 128 registers at kernel_size 3 in
    float32 where by columns it takes 222; the "ieee" dots (float32 on the
    FMA units) at kernel_size 1 take 64 (Triton 3.8) and 122 (3.6) joined by
    columns, 168 and 171 by rows."""
    if BY_COLUMNS:
        a = tl.trans(a)
        b = tl.trans(b)
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))
    else:
        return tl.trans(tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1])))


@triton.jit
def _bias(b_ptr, c_out, N: tl.constexpr):
    n = tl.arange(0, N)
    return tl.load(b_ptr + n, mask=n < c_out, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _conv(a, w_ptr, b_ptr, c_in, c_out, base, pos, TAPS: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
          S: tl.constexpr, R: tl.constexpr, K3: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[M, N] float32: the convolution of the [M, K] operand a (rows: the
    S x S positions of each patch) with the (c_out, c_in, k, k) weight, one
    dot a tap shifted into place, plus the bias (columns past c_out zero).

    NB: the tap loop is not unrolled: unrolled, the compiler hoisted every
    tap's weight loads (spilling at 255 registers)."""
    acc = tl.zeros([a.shape[0], N], tl.float32)
    for t in range(TAPS):
        y = _mm(a, _tap_weights(w_ptr, c_in, c_out, t, TAPS, K, N), PRECISION, UPCAST)
        acc = _shift_add(acc, y, base, pos, (t // 3) * S + t % 3, R, K3)
    return acc + _bias(b_ptr, c_out, N)


@triton.jit
def _shift_add(acc, y, base, pos, shift, R: tl.constexpr, K3: tl.constexpr):
    """acc + y[r + shift]: row r + shift of the same patch (rows that wrap
    round are outside the layer's valid window, whose values no valid row
    reads). kernel_size 1: acc + y."""
    if K3:
        rows = base + ((pos + shift) & (R - 1))
        return acc + tl.gather(y, tl.broadcast_to(rows[:, None], y.shape), 0)
    else:
        return acc + y


@triton.jit
def _sample(at, y0, y1, x0, x1, sh, sw, wy0, wy1, wx0, wx1, m, RESAMPLE: tl.constexpr, dtype: tl.constexpr):
    """Bilinear sample (RESAMPLE) or plain read (at y0, x0) of the planes
    `at` points to, rounded to dtype; zero where not m."""
    if RESAMPLE:
        v00 = tl.load(at + y0 * sh + x0 * sw, mask=m, other=0.0).to(tl.float32)
        v01 = tl.load(at + y0 * sh + x1 * sw, mask=m, other=0.0).to(tl.float32)
        v10 = tl.load(at + y1 * sh + x0 * sw, mask=m, other=0.0).to(tl.float32)
        v11 = tl.load(at + y1 * sh + x1 * sw, mask=m, other=0.0).to(tl.float32)
        return to_dtype(linear_mix(v00, v01, v10, v11, wy0, wy1, wx0, wx1), dtype)
    else:
        return tl.load(at + y0 * sh + x0 * sw, mask=m, other=0.0).to(dtype)


@triton.jit
def _taps(dst, in_size, scale, RESAMPLE: tl.constexpr, ROUND: tl.constexpr, dtype: tl.constexpr):
    """One axis's bilinear taps of the rows' coordinates dst, as [1, rows]
    (int64 indices)."""
    if RESAMPLE:
        i0, i1, w0, w1 = linear_tap(dst, in_size, scale, dtype, ROUND)
    else:
        i0, i1, w0, w1 = dst, dst, tl.full(dst.shape, 1.0, tl.float32), tl.zeros(dst.shape, tl.float32)
    return i0.to(tl.int64)[None, :], i1.to(tl.int64)[None, :], w0[None, :], w1[None, :]


_INT_ARGS = ["count", "sip", "sic", "svp", "batch", "height", "width", "coarse_h", "coarse_w",
             "ssb", "ssc", "ssh", "gsb", "gsc", "gsh", "psb", "psc", "psh", "fsb", "fsc", "fsh",
             "hsb", "hsc", "hsh"]


@triton.jit(do_not_specialize=_INT_ARGS)
def _refine_kernel(out_ptr, map_ptr, idx_ptr, valid_ptr,
                   src_ptr, bgr_ptr, pha_ptr, fgr_ptr, hid_ptr,
                   w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,
                   count, sip, sic, svp, batch, height, width, coarse_h, coarse_w, scale_h, scale_w,
                   ssb, ssc, ssh, ssw, gsb, gsc, gsh, gsw, psb, psc, psh, psw,
                   fsb, fsc, fsh, fsw, hsb, hsc, hsh, hsw,
                   K3: tl.constexpr, HAS_VALID: tl.constexpr, EPILOGUE: tl.constexpr,
                   RESAMPLE: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_P: tl.constexpr):
    """Refined cells idx[p] = (b, y, x) for p in this program's BLOCK_P,
    written to out[b, :, 4y:4y+4, 4x:4x+4] (out contiguous (B, 4, H, W));
    map[b, y, x] = 1 marks each cell written. Rows out of range, and rows
    whose valid is False, are neither written nor marked."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    S: tl.constexpr = 8 if K3 else 4
    R: tl.constexpr = S * S
    M: tl.constexpr = BLOCK_P * R
    TAPS: tl.constexpr = 9 if K3 else 1
    r = tl.arange(0, M)
    pos = r % R
    base = r - pos
    py = pos // S
    px = pos % S
    p = tl.program_id(0) * BLOCK_P + r // R
    ok = p < count
    row = idx_ptr + p.to(tl.int64) * sip
    b = tl.load(row, mask=ok, other=0)
    cy = tl.load(row + sic, mask=ok, other=0)
    cx = tl.load(row + 2 * sic, mask=ok, other=0)
    cells_h = height // 4
    cells_w = width // 4
    ok = ok & (b >= 0) & (b < batch) & (cy >= 0) & (cy < cells_h) & (cx >= 0) & (cx < cells_w)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + p.to(tl.int64) * svp, mask=ok, other=0) != 0)
    b = tl.where(ok, b, 0).to(tl.int64)
    cy = tl.where(ok, cy, 0).to(tl.int32)
    cx = tl.where(ok, cx, 0).to(tl.int32)
    # NB: int8 stores of 1: several rows naming one cell write the same byte
    # (and, in eval mode, the same refined values).
    tl.store(map_ptr + (b * cells_h + cy) * cells_w + cx, tl.full([M], 1, tl.int8), mask=ok & (pos == 0))

    # Tiles of invalid patches only (err == 0 with prevent_oversampling) are
    # skipped whole.
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        # NB: the crops are sampled as [channels, rows] tiles and transposed
        # for tl.dot: Triton's default layout then spreads the rows over the
        # lanes, so that each thread holds the taps and addresses of few rows
        # (as [rows, channels] tiles each thread held those of 16 rows, and
        # the crop alone took 215 registers).
        ch16 = tl.arange(0, 16)[:, None]
        ch32 = tl.arange(0, 32)[:, None]
        bb = b[None, :]

        # -- crop 1: [hid | pha fgr src bgr] at half resolution -----------
        if K3:
            hy = 2 * cy - 3 + py
            hx = 2 * cx - 3 + px
        else:
            hy = 2 * cy + py // 2
            hx = 2 * cx + px // 2
        in1 = ok & (hy >= 0) & (hy < height // 2) & (hx >= 0) & (hx < width // 2)
        hy = tl.where(in1, hy, 0)
        hx = tl.where(in1, hx, 0)
        m1 = in1[None, :]
        y0, y1, wy0, wy1 = _taps(hy, coarse_h, scale_h, RESAMPLE, ROUND, dtype)
        x0, x1, wx0, wx1 = _taps(hx, coarse_w, scale_w, RESAMPLE, ROUND, dtype)
        a_hid = _sample(hid_ptr + bb * hsb + ch32.to(tl.int64) * hsc, y0, y1, x0, x1, hsh, hsw,
                        wy0, wy1, wx0, wx1, m1, RESAMPLE, dtype)
        # The other 10 channels, one plane at a time (a [16, rows] tile with
        # 6 channels masked would compute and hold 16).
        a_rest = tl.where(ch16 == 0, _sample(pha_ptr + bb * psb, y0, y1, x0, x1, psh, psw,
                                             wy0, wy1, wx0, wx1, m1, RESAMPLE, dtype), 0.0)
        for c in tl.static_range(3):
            at = fgr_ptr + bb * fsb + fsc.to(tl.int64) * c
            a_rest = tl.where(ch16 == 1 + c, _sample(at, y0, y1, x0, x1, fsh, fsw,
                                                     wy0, wy1, wx0, wx1, m1, RESAMPLE, dtype), a_rest)
        # src and bgr halved: scale 2, taps (2h, 2h + 1) with weights 1/2.
        y0, y1, wy0, wy1 = _taps(hy, height, 2.0, True, ROUND, dtype)
        x0, x1, wx0, wx1 = _taps(hx, width, 2.0, True, ROUND, dtype)
        for c in tl.static_range(3):
            at = src_ptr + bb * ssb + ssc.to(tl.int64) * c
            a_rest = tl.where(ch16 == 4 + c, _sample(at, y0, y1, x0, x1, ssh, ssw,
                                                     wy0, wy1, wx0, wx1, m1, True, dtype), a_rest)
            at = bgr_ptr + bb * gsb + gsc.to(tl.int64) * c
            a_rest = tl.where(ch16 == 7 + c, _sample(at, y0, y1, x0, x1, gsh, gsw,
                                                     wy0, wy1, wx0, wx1, m1, True, dtype), a_rest)
        # conv1's input as one [rows, 64] tile: hid, the other 10 channels,
        # 22 zeros (see _operand).
        BY_COLUMNS: tl.constexpr = PRECISION == "ieee" and not K3
        a_rest = tl.reshape(tl.permute(tl.join(a_rest.to(dtype), tl.zeros([16, M], dtype)), (2, 0, 1)), (32, M))
        a1 = _operand(a_hid, a_rest, BY_COLUMNS)

        # -- conv1 + ReLU, conv2 + ReLU ---------------------------------
        z1 = to_dtype(tl.maximum(_conv(a1, w1_ptr, b1_ptr, 42, 24, base, pos, TAPS, 64, 32, S, R, K3, PRECISION,
                                       UPCAST), 0.0), dtype)
        z2 = to_dtype(tl.maximum(_conv(z1, w2_ptr, b2_ptr, 24, 16, base, pos, TAPS, 32, 16, S, R, K3, PRECISION,
                                       UPCAST), 0.0), dtype)
        if K3:
            # The nearest upsample 4x4 -> 8x8.
            z2 = tl.gather(z2, tl.broadcast_to((base + (py // 2) * S + px // 2)[:, None], z2.shape), 0)

        # -- crop 2: src, bgr at full resolution ------------------------
        if K3:
            fy = 4 * cy - 2 + py
            fx = 4 * cx - 2 + px
        else:
            fy = 4 * cy + py
            fx = 4 * cx + px
        in2 = ok & (fy >= 0) & (fy < height) & (fx >= 0) & (fx < width)
        fy64 = tl.where(in2, fy, 0).to(tl.int64)[None, :]
        fx64 = tl.where(in2, fx, 0).to(tl.int64)[None, :]
        m2 = in2[None, :]
        a_crop = tl.zeros([16, M], dtype)
        for c in tl.static_range(3):
            a_crop = tl.where(ch16 == c, tl.load(src_ptr + bb * ssb + ssc.to(tl.int64) * c + fy64 * ssh + fx64 * ssw,
                                                 mask=m2, other=0.0), a_crop)
            a_crop = tl.where(ch16 == 3 + c, tl.load(bgr_ptr + bb * gsb + gsc.to(tl.int64) * c + fy64 * gsh
                                                     + fx64 * gsw, mask=m2, other=0.0), a_crop)
        a3 = _operand(tl.trans(z2), a_crop, BY_COLUMNS)

        # -- conv3 + ReLU, conv4 ----------------------------------------
        z3 = to_dtype(tl.maximum(_conv(a3, w3_ptr, b3_ptr, 22, 12, base, pos, TAPS, 32, 16, S, R, K3, PRECISION,
                                       UPCAST), 0.0), dtype)
        v = _conv(z3, w4_ptr, b4_ptr, 12, 4, base, pos, TAPS, 16, 16, S, R, K3, PRECISION, UPCAST)

        # -- the refined cell, written into the output ------------------
        if K3:
            oy = 4 * cy + py
            ox = 4 * cx + px
            wm = ok & (py < 4) & (px < 4)
        else:
            oy = fy
            ox = fx
            wm = ok
        plane = height.to(tl.int64) * width
        out_at = out_ptr + b * 4 * plane + tl.where(wm, oy, 0).to(tl.int64) * width + tl.where(wm, ox, 0)
        src_at = src_ptr + b * ssb + tl.where(wm, oy, 0).to(tl.int64) * ssh + tl.where(wm, ox, 0).to(tl.int64) * ssw
        c16 = tl.arange(0, 16)[None, :]
        for c in tl.static_range(4):
            # Channel c as a [rows] vector (one nonzero term: exact).
            vc = to_dtype(tl.sum(tl.where(c16 == c, v, 0.0), axis=1), dtype)
            if EPILOGUE:
                # Alpha clamped; foreground = fgr + src rounded to the dtype,
                # then clamped (as upstream's out-of-place add and clamp).
                if c > 0:
                    sv = tl.load(src_at + ssc.to(tl.int64) * (c - 1), mask=wm, other=0.0)
                    vc = to_dtype(vc.to(tl.float32) + sv.to(tl.float32), dtype)
                vc = clamp01(vc.to(tl.float32)).to(dtype)
            tl.store(out_at + plane * c, vc, mask=wm)


# -- the coarse pass ------------------------------------------------------------

_COARSE_INT_ARGS = ["height", "width", "coarse_h", "coarse_w", "x_blocks", "y_blocks",
                    "ssb", "ssc", "ssh", "psb", "psc", "psh", "fsb", "fsc", "fsh"]


@triton.jit(do_not_specialize=_COARSE_INT_ARGS)
def _coarse_kernel(out_ptr, map_ptr, src_ptr, pha_ptr, fgr_ptr, height, width, coarse_h, coarse_w,
                   scale_h, scale_w, x_blocks, y_blocks,
                   ssb, ssc, ssh, ssw, psb, psc, psh, psw, fsb, fsc, fsh, fsw,
                   SAME: tl.constexpr, EPILOGUE: tl.constexpr, ROUND: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, :, y, x] = bilinear(cat(pha, fgr) -> (H, W)) (with
    MattingRefine's epilogue) wherever map[b, y // 4, x // 4] == 0; the
    refined cells are left alone."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    tiles = x_blocks * y_blocks
    b = (pid // tiles).to(tl.int64)
    t = pid - (pid // tiles) * tiles
    row_block = t // x_blocks
    col_block = t - row_block * x_blocks
    y = (row_block * ROWS + tl.arange(0, ROWS))[:, None]
    x = (col_block * BLOCK + tl.arange(0, BLOCK))[None, :]
    m = (y < height) & (x < width)
    cells_h = height // 4
    cells_w = width // 4
    refined = tl.load(map_ptr + (b * cells_h + y // 4) * cells_w + x // 4, mask=m, other=1)
    up = m & (refined == 0)
    if SAME:
        ry0 = y.to(tl.int64)
        cx0 = x.to(tl.int64)
    else:
        y0, y1, wy0, wy1 = linear_tap(y, coarse_h, scale_h, dtype, ROUND)
        x0, x1, wx0, wx1 = linear_tap(x, coarse_w, scale_w, dtype, ROUND)
        ry0 = y0.to(tl.int64)
        ry1 = y1.to(tl.int64)
        cx0 = x0.to(tl.int64)
        cx1 = x1.to(tl.int64)
    plane = height.to(tl.int64) * width
    out_at = out_ptr + b * 4 * plane + y.to(tl.int64) * width + x
    src_at = src_ptr + b * ssb + y.to(tl.int64) * ssh + x.to(tl.int64) * ssw
    for c in tl.static_range(4):
        if c == 0:
            at = pha_ptr + b * psb
            sh = psh
            sw = psw
        else:
            at = fgr_ptr + b * fsb + fsc.to(tl.int64) * (c - 1)
            sh = fsh
            sw = fsw
        if SAME:
            v = tl.load(at + ry0 * sh + cx0 * sw, mask=up, other=0.0).to(dtype)
        else:
            v00 = tl.load(at + ry0 * sh + cx0 * sw, mask=up, other=0.0).to(tl.float32)
            v01 = tl.load(at + ry0 * sh + cx1 * sw, mask=up, other=0.0).to(tl.float32)
            v10 = tl.load(at + ry1 * sh + cx0 * sw, mask=up, other=0.0).to(tl.float32)
            v11 = tl.load(at + ry1 * sh + cx1 * sw, mask=up, other=0.0).to(tl.float32)
            v = to_dtype(linear_mix(v00, v01, v10, v11, wy0, wy1, wx0, wx1), dtype)
        if EPILOGUE:
            if c == 0:
                v = clamp01(v.to(tl.float32)).to(dtype)
            else:
                sv = tl.load(src_at + ssc.to(tl.int64) * (c - 1), mask=up, other=0.0)
                v = clamp01(to_dtype(v.to(tl.float32) + sv.to(tl.float32), dtype).to(tl.float32)).to(dtype)
        tl.store(out_at + c * plane, v, mask=up)


# -- launchers ------------------------------------------------------------------

def launch_config(kernel_size: int, block_p: Optional[int] = None, num_warps: Optional[int] = None,
                  gpu: Optional[bool] = None, precision: str = "tf32"):
    """(BLOCK_P, num_warps) of the fused kernel: patches and warps per
    program, powers of two, at least 32 rows (patches x 64 at kernel_size 3,
    x 16 at 1) a program. precision: the tl.dots' input_precision ("ieee":
    float32 with TF32 off, whose dots run on the FMA units).

    Defaults on the GPU (gpu None: compiled()): 1 patch (64 rows) at
    kernel_size 3 and 4 patches (64 rows) at 1 (2 patches, 32 rows, for
    "ieee": 64 registers, where 64 rows take 150 with Triton 3.8 and 127
    with 3.6), on 8 warps: no spills and the fewest registers per thread
    among the tilings compiled for sm_90 with Triton 3.6 and 3.8 (python
    tests/build_checks/test_triton_compile.py --fused prints them; not timed on a GPU
    yet: benchmarks/bench_fused_tiling.py times every tiling). Under the
    interpreter, whose cost is per program, 32 patches.

    NB: 16 rows (kernel_size 1, one patch) crash Triton 3.6's layout pass."""
    if gpu is None:
        gpu = compiled()
    if block_p is None:
        if not gpu:
            block_p = 32
        elif kernel_size == 3:
            block_p = 1
        else:
            block_p = 2 if precision == "ieee" else 4
    if num_warps is None:
        num_warps = 8
    for name, v in (("block_p", block_p), ("num_warps", num_warps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"refine_patches_into: {name} must be a power of two, got {v!r}")
    if block_p * (64 if kernel_size == 3 else 16) < 32:
        raise ValueError(f"refine_patches_into: block_p must be at least 2 at kernel_size 1 (32 rows a "
                         f"program), got {block_p}")
    return block_p, num_warps


def coarse_tiling(gpu: Optional[bool] = None):
    """(ROWS, BLOCK) of the coarse pass: one row of 256 pixels a program on
    the GPU; under the interpreter more rows."""
    if gpu is None:
        gpu = compiled()
    return (1, 256) if gpu else (16, 256)


# NB: both launches pin enable_fp_fusion to common.FP_FUSION (off), as the
# op set's do: the crop's coordinates and blends, the biases, ReLUs and the
# epilogue then round one operation at a time, as under the interpreter
# that CI tests this kernel with (its tl.dots are not affected). Compiled
# for sm_90 (Triton 3.8) it costs 2-5% more instructions and at most 2
# registers a thread.


def refine_patches_into(out: torch.Tensor, cell_map: torch.Tensor, src: torch.Tensor, bgr: torch.Tensor,
                        pha: torch.Tensor, fgr: torch.Tensor, hid: torch.Tensor, idx: torch.Tensor,
                        valid: Optional[torch.Tensor], weights: List[torch.Tensor], kernel_size: int,
                        allow_tf32: bool, epilogue: bool, block_p: Optional[int] = None,
                        num_warps: Optional[int] = None) -> None:
    """Writes the refined cells idx (P, 3) int64 rows (b, y, x) (those whose
    valid (P,) bool is True; valid None: all) into out, contiguous (B, 4, H,
    W) in the inputs' dtype, and sets cell_map (B * H/4 * W/4,) int8 to 1 at
    each. weights: the folded [w1, b1, w2, b2, w3, b3, w4, b4], contiguous,
    in the inputs' dtype. Unchecked: pymatting_ext._fused checks."""
    P = idx.shape[0]
    if P == 0:
        return
    B, _, H, W = src.shape
    Hc, Wc = pha.shape[2], pha.shape[3]
    fp32 = src.dtype == torch.float32
    precision = "tf32" if (allow_tf32 or not fp32) else "ieee"
    bp, nw = launch_config(kernel_size, block_p, num_warps, precision=precision)
    upcast = src.dtype == torch.bfloat16 and not compiled()
    v = valid if valid is not None else idx
    w1, b1, w2, b2, w3, b3, w4, b4 = weights
    wrap_triton(_refine_kernel)[(triton.cdiv(P, bp),)](
        out, cell_map, idx, v, src, bgr, pha, fgr, hid, w1, b1, w2, b2, w3, b3, w4, b4,
        P, idx.stride(0), idx.stride(1), v.stride(0), B, H, W, Hc, Wc,
        linear_scale(Hc, H // 2), linear_scale(Wc, W // 2),
        *src.stride(), *bgr.stride(), *pha.stride(), *fgr.stride(), *hid.stride(),
        K3=kernel_size == 3, HAS_VALID=valid is not None, EPILOGUE=bool(epilogue),
        RESAMPLE=(Hc, Wc) != (H // 2, W // 2), ROUND=round_weights(src.device), PRECISION=precision,
        UPCAST=upcast, BLOCK_P=bp, num_warps=nw, enable_fp_fusion=FP_FUSION)


def fill_coarse_into(out: torch.Tensor, cell_map: torch.Tensor, src: torch.Tensor, pha: torch.Tensor,
                     fgr: torch.Tensor, epilogue: bool) -> None:
    """Writes bilinear(cat(pha, fgr) -> (H, W)) (with the epilogue) into every
    pixel of out (B, 4, H, W) whose cell is 0 in cell_map."""
    B, _, H, W = out.shape
    Hc, Wc = pha.shape[2], pha.shape[3]
    if out.numel() == 0:
        return
    rows, block = coarse_tiling()
    x_blocks, y_blocks = triton.cdiv(W, block), triton.cdiv(H, rows)
    wrap_triton(_coarse_kernel)[(B * y_blocks * x_blocks,)](
        out, cell_map, src, pha, fgr, H, W, Hc, Wc, linear_scale(Hc, H), linear_scale(Wc, W), x_blocks, y_blocks,
        *src.stride(), *pha.stride(), *fgr.stride(),
        SAME=(Hc, Wc) == (H, W), EPILOGUE=bool(epilogue), ROUND=round_weights(out.device), ROWS=rows, BLOCK=block,
        enable_fp_fusion=FP_FUSION)


def refine_sparse(src: torch.Tensor, bgr: torch.Tensor, pha: torch.Tensor, fgr: torch.Tensor, hid: torch.Tensor,
                  idx: torch.Tensor, valid: Optional[torch.Tensor], weights: List[torch.Tensor], kernel_size: int,
                  allow_tf32: bool, epilogue: bool, block_p: Optional[int] = None,
                  num_warps: Optional[int] = None) -> torch.Tensor:
    """The eval sparse refiner's output (B, 4, H, W): the refined cells from
    the fused kernel, every other pixel the bilinear upsample of cat(pha,
    fgr); with `epilogue`, MattingRefine's clamp of alpha and (fgr + src)
    clamped. Two launches (and a memset of the int8 cell map), no host
    synchronisation.

    NB: the cell map (1 byte a cell: 0.13 MB at HD) lets the coarse pass skip
    the refined cells, so every output byte is written once; composing
    everything first and overwriting the refined cells would write those
    cells twice (64 values a cell, 1.3 MB at HD for 5,000 fp32 cells, more in
    thresholding mode) and read src for them twice."""
    B, _, H, W = src.shape
    out = torch.empty((B, 4, H, W), dtype=src.dtype, device=src.device)
    cell_map = torch.zeros((B * (H // 4) * (W // 4),), dtype=torch.int8, device=src.device)
    with device_guard(src.device):
        # The refined cells first: they mark the map the coarse pass reads.
        refine_patches_into(out, cell_map, src, bgr, pha, fgr, hid, idx, valid, weights, kernel_size,
                            allow_tf32, epilogue, block_p, num_warps)
        fill_coarse_into(out, cell_map, src, pha, fgr, epilogue)
    return out
