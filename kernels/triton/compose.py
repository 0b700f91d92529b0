"""Triton kernels of replace and compose.

Both first build a (B, H/s, W/s) int32 map from a cell to the last valid
patch naming it (an atomic max over the patch numbers, so repeats resolve
as a sequential scatter would), then write every output element once: the
patch's value where the map names one, else x (replace) or the bilinear
upsample of the coarse map (compose, with MattingRefine's optional
epilogue).

The writing kernels run on a grid of (rows x column blocks, images): a
program covers ROWS output rows by BLOCK columns of one image and loops over
the channels, so the cell owners, the patch offsets and the bilinear taps
(row weights and column weights) are computed once per program and shared by
every channel, and no element index is ever divided at run time (the patch
size S is a compile-time constant: 4 in the refiner).
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import (FP_FUSION, check_dtype, clamp01, compiled, device_guard, known_empty, linear_mix,
                     linear_tap, resize_scale, round_weights, to_dtype, wrap_triton)

#: Grid axis 1 (images) is limited to 65535 programs by CUDA.
_MAX_GRID_Y = 65535


@triton.jit(do_not_specialize=["count", "batch", "cells_h", "cells_w"])
def _cell_map_kernel(idx_ptr, valid_ptr, map_ptr, count, batch, cells_h, cells_w,
                     HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = p < count
    b = tl.load(idx_ptr + p * 3, mask=m, other=0)
    y = tl.load(idx_ptr + p * 3 + 1, mask=m, other=0)
    x = tl.load(idx_ptr + p * 3 + 2, mask=m, other=0)
    # Rows out of range are never written (the public ops reject them first).
    m = m & (b >= 0) & (b < batch) & (y >= 0) & (y < cells_h) & (x >= 0) & (x < cells_w)
    if HAS_VALID:
        m = m & (tl.load(valid_ptr + p, mask=m, other=0) != 0)
    tl.atomic_max(map_ptr + (b * cells_h + y) * cells_w + x, p.to(tl.int32), mask=m)


def _cell_map(idx, valid, batch, cells_h, cells_w, device):
    P = idx.shape[0]
    # NB: the map holds patch numbers in int32.
    torch._check(P < 2 ** 31, lambda: f"backend='triton' takes fewer than 2^31 idx rows, got {P}")
    cells = torch.full((batch * cells_h * cells_w,), -1, dtype=torch.int32, device=device)
    if not known_empty(P):
        v = valid.contiguous() if valid is not None else idx
        wrap_triton(_cell_map_kernel)[(triton.cdiv(P, 1024),)](
            idx.contiguous(), v, cells, P, batch, cells_h, cells_w,
            HAS_VALID=valid is not None, BLOCK=1024, enable_fp_fusion=FP_FUSION)
    return cells


@triton.jit
def _tile(x_blocks, batch_offset, height, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row block, column block) of image b: b (int64), the rows
    [ROWS, 1] and columns [1, BLOCK] (int32) and the in-range mask."""
    pid = tl.program_id(0)
    row_block = pid // x_blocks
    col_block = pid - row_block * x_blocks
    b = tl.program_id(1).to(tl.int64) + batch_offset
    y = (row_block * ROWS + tl.arange(0, ROWS))[:, None]
    x = (col_block * BLOCK + tl.arange(0, BLOCK))[None, :]
    return b, y, x, (y < height) & (x < width)


@triton.jit
def _owners(cell_ptr, spp, sph, spw, b, y, x, m, cells_h, cells_w, S: tl.constexpr):
    """The patch owning each (y, x) of image b (where `has`), and the offset of
    (y, x) within that patch, channel 0."""
    cell = (b * cells_h + y // S) * cells_w + x // S
    owner = tl.load(cell_ptr + cell, mask=m, other=-1)
    has = m & (owner >= 0)
    offset = owner.to(tl.int64) * spp + (y % S).to(tl.int64) * sph + (x % S).to(tl.int64) * spw
    return has, offset


@triton.jit(do_not_specialize=["channels", "height", "width", "x_blocks", "batch_offset",
                               "sxb", "sxc", "sxh", "spp", "spc", "sph", "spw", "sob", "soc", "soh"])
def _replace_kernel(x_ptr, patch_ptr, cell_ptr, out_ptr, channels, height, width, x_blocks, batch_offset,
                    sxb, sxc, sxh, sxw, spp, spc, sph, spw, sob, soc, soh, sow,
                    S: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # NB: sxw and sow stay specialised: ==1 (NCHW) makes rows contiguous.
    b, y, x, m = _tile(x_blocks, batch_offset, height, width, ROWS, BLOCK)
    has, poff = _owners(cell_ptr, spp, sph, spw, b, y, x, m, height // S, width // S, S)
    keep = m & ~has
    y64 = y.to(tl.int64)
    x64 = x.to(tl.int64)
    x_at = x_ptr + b * sxb + y64 * sxh + x64 * sxw
    out_at = out_ptr + b * sob + y64 * soh + x64 * sow
    for c in range(0, channels):
        c64 = tl.cast(c, tl.int64)
        pv = tl.load(patch_ptr + poff + c64 * spc, mask=has, other=0.0)
        xv = tl.load(x_at + c64 * sxc, mask=keep, other=0.0)
        tl.store(out_at + c64 * soc, tl.where(has, pv, xv), mask=m)


def _check_cells(op, H, W, s):
    """The cell map has (H / s) x (W / s) cells, and every pixel looks its
    cell up. NB: the raw ops are reachable without pymatting_ext.ops'
    checks; these keep their reads inside the map."""
    torch._check(H % s == 0, lambda: f"{op}: the height {H} must be divisible by the patch size {s}")
    torch._check(W % s == 0, lambda: f"{op}: the width {W} must be divisible by the patch size {s}")


def _batch_offsets(B):
    """The first image of each launch of the writing kernels: a launch's
    grid axis 1 covers at most _MAX_GRID_Y images.

    NB: one launch without a loop where B fits: a loop over a symbolic B
    would fix its value under torch.compile (a recompile per batch size);
    this only guards B <= _MAX_GRID_Y."""
    return [0] if B <= _MAX_GRID_Y else range(0, B, _MAX_GRID_Y)


def _tiling():
    """(ROWS, BLOCK) of the writing kernels: one row of 256 columns a program
    on the GPU; under the interpreter, whose cost is per program, more rows."""
    return (1, 256) if compiled() else (16, 256)


def replace(x: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor]) -> torch.Tensor:
    check_dtype("replace", "x", x)
    B, C, H, W = x.shape
    s = patches.shape[-1]
    _check_cells("replace", H, W, s)
    # In x's layout, as the C++ kernels (x.clone()).
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    with device_guard(x.device):
        cells = _cell_map(idx, valid, B, H // s, W // s, x.device)
        rows, block = _tiling()
        x_blocks = triton.cdiv(W, block)
        for b0 in _batch_offsets(B):
            wrap_triton(_replace_kernel)[(triton.cdiv(H, rows) * x_blocks, torch.sym_min(B - b0, _MAX_GRID_Y))](
                x, patches, cells, out, C, H, W, x_blocks, b0, *x.stride(), *patches.stride(), *out.stride(),
                S=s, ROWS=rows, BLOCK=block, enable_fp_fusion=FP_FUSION)
    return out


@triton.jit(do_not_specialize=["channels", "height", "width", "coarse_h", "coarse_w", "x_blocks",
                               "batch_offset", "scb", "scc", "sch", "scw", "spp", "spc", "sph", "spw",
                               "ssb", "ssc", "ssh"])
def _compose_kernel(coarse_ptr, patch_ptr, cell_ptr, src_ptr, out_ptr, channels, height, width,
                    coarse_h, coarse_w, x_blocks, batch_offset,
                    scb, scc, sch, scw, spp, spc, sph, spw, ssb, ssc, ssh, ssw,
                    S: tl.constexpr, SAME: tl.constexpr, EPILOGUE: tl.constexpr, ROUND: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # NB: ssw stays specialised: ==1 makes src's rows contiguous.
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    b, y, x, m = _tile(x_blocks, batch_offset, height, width, ROWS, BLOCK)
    has, poff = _owners(cell_ptr, spp, sph, spw, b, y, x, m, height // S, width // S, S)
    up = m & ~has
    if SAME:
        at = y.to(tl.int64) * sch + x.to(tl.int64) * scw
    else:
        # Row weights once per program, column weights once for all channels.
        y0, y1, wy0, wy1 = linear_tap(y, coarse_h, resize_scale(coarse_h, height), dtype, ROUND)
        x0, x1, wx0, wx1 = linear_tap(x, coarse_w, resize_scale(coarse_w, width), dtype, ROUND)
        r0 = y0.to(tl.int64) * sch
        r1 = y1.to(tl.int64) * sch
        c0 = x0.to(tl.int64) * scw
        c1 = x1.to(tl.int64) * scw
    src_at = src_ptr + b * ssb + y.to(tl.int64) * ssh + x.to(tl.int64) * ssw
    # out is contiguous (B, C, H, W): int64, as C*H*W may pass 2^31.
    out_at = out_ptr + (b * channels * height + y) * width + x
    plane_size = height.to(tl.int64) * width
    for c in range(0, channels):
        c64 = tl.cast(c, tl.int64)
        plane = coarse_ptr + b * scb + c64 * scc
        if SAME:
            v = tl.load(plane + at, mask=up, other=0.0).to(dtype)
        else:
            v00 = tl.load(plane + r0 + c0, mask=up, other=0.0).to(tl.float32)
            v01 = tl.load(plane + r0 + c1, mask=up, other=0.0).to(tl.float32)
            v10 = tl.load(plane + r1 + c0, mask=up, other=0.0).to(tl.float32)
            v11 = tl.load(plane + r1 + c1, mask=up, other=0.0).to(tl.float32)
            v = to_dtype(linear_mix(v00, v01, v10, v11, wy0, wy1, wx0, wx1), dtype)
        pv = tl.load(patch_ptr + poff + c64 * spc, mask=has, other=0.0)
        v = tl.where(has, pv.to(dtype), v)
        if EPILOGUE:
            # Channel 0 (alpha) is clamped; the foreground's are fgr + src,
            # rounded to the dtype before the clamp as upstream's
            # out-of-place add.
            sv = tl.load(src_at + (c64 - 1) * ssc, mask=m & (c > 0), other=0.0)
            summed = to_dtype(v.to(tl.float32) + sv.to(tl.float32), dtype)
            v = tl.where(c > 0, summed, v)
            v = clamp01(v.to(tl.float32)).to(dtype)
        tl.store(out_at + c64 * plane_size, v, mask=m)


def compose(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor], size: Sequence[int],
            src: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_dtype("compose", "coarse", coarse)
    B, C = coarse.shape[:2]
    # NB: not int(size[i]): under torch.compile the sizes may be symbolic.
    out = torch.empty((B, C, size[0], size[1]), dtype=coarse.dtype, device=coarse.device)
    _compose(coarse, patches, idx, valid, src, out)
    return out


def compose_into(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
                 valid: Optional[torch.Tensor], src: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """compose written into out, contiguous (B, C, H, W) (checked: the
    kernel addresses it as such)."""
    check_dtype("compose_into", "coarse", coarse)
    torch._check(out.dim() == 4, lambda: f"compose_into: out must be (B, C, H, W), got {tuple(out.shape)}")
    torch._check(out.shape[0] == coarse.shape[0] and out.shape[1] == coarse.shape[1],
                 lambda: f"compose_into: out must have coarse's batch size and channels, got {tuple(out.shape)}")
    torch._check(out.dtype == coarse.dtype, lambda: "compose_into: out must have coarse's dtype")
    torch._check(out.device == coarse.device, lambda: "compose_into: out must be on coarse's device")
    torch._check(out.is_contiguous(), lambda: "compose_into: out must be contiguous")
    _compose(coarse, patches, idx, valid, src, out)


def _compose(coarse, patches, idx, valid, src, out):
    """The cell map and the writing launches of compose into out."""
    B, C, Hc, Wc = coarse.shape
    H, W = out.shape[2], out.shape[3]
    s = patches.shape[-1]
    _check_cells("compose", H, W, s)
    if out.numel() == 0:
        return
    src_t = src if src is not None else coarse
    with device_guard(coarse.device):
        cells = _cell_map(idx, valid, B, H // s, W // s, coarse.device)
        rows, block = _tiling()
        x_blocks = triton.cdiv(W, block)
        for b0 in _batch_offsets(B):
            wrap_triton(_compose_kernel)[(triton.cdiv(H, rows) * x_blocks, torch.sym_min(B - b0, _MAX_GRID_Y))](
                coarse, patches, cells, src_t, out, C, H, W, Hc, Wc, x_blocks, b0,
                *coarse.stride(), *patches.stride(), *src_t.stride(),
                S=s, SAME=(Hc, Wc) == (H, W), EPILOGUE=src is not None, ROUND=round_weights(coarse.device),
                ROWS=rows, BLOCK=block, enable_fp_fusion=FP_FUSION)
