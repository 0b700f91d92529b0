"""Triton kernels of replace and compose.

Both first build a (B, H/s, W/s) int32 map from a cell to the last valid
patch naming it (an atomic max over the patch numbers, so repeats resolve
as a sequential scatter would), then write every output element once: the
patch's value where the map names one, else x (replace) or the bilinear
upsample of the coarse map (compose, with MattingRefine's optional
epilogue).
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import bilinear, block_size, check_dtype, clamp01, known_empty, linear_scale, to_dtype, wrap


@triton.jit
def _cell_map_kernel(idx_ptr, valid_ptr, map_ptr, count, batch, cells_h, cells_w,
                     HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < count
    p64 = p.to(tl.int64)
    b = tl.load(idx_ptr + p64 * 3, mask=m, other=0)
    y = tl.load(idx_ptr + p64 * 3 + 1, mask=m, other=0)
    x = tl.load(idx_ptr + p64 * 3 + 2, mask=m, other=0)
    # Rows out of range are never written (the public ops reject them first).
    m = m & (b >= 0) & (b < batch) & (y >= 0) & (y < cells_h) & (x >= 0) & (x < cells_w)
    if HAS_VALID:
        m = m & (tl.load(valid_ptr + p64, mask=m, other=0) != 0)
    tl.atomic_max(map_ptr + (b * cells_h + y) * cells_w + x, p, mask=m)


def _cell_map(idx, valid, batch, cells_h, cells_w, device):
    cells = torch.full((batch * cells_h * cells_w,), -1, dtype=torch.int32, device=device)
    P = idx.shape[0]
    if not known_empty(P):
        v = valid.contiguous() if valid is not None else idx
        wrap(_cell_map_kernel)[(triton.cdiv(P, 1024),)](
            idx.contiguous(), v, cells, P, batch, cells_h, cells_w,
            HAS_VALID=valid is not None, BLOCK=1024)
    return cells


@triton.jit
def _patch_or(cell_ptr, patch_ptr, spp, spc, sph, spw, b, c, y, x, s, cells_h, cells_w, m):
    """The patch value at (b, c, y, x) and whether there is one."""
    owner = tl.load(cell_ptr + (b * cells_h + y // s) * cells_w + x // s, mask=m, other=-1)
    has = m & (owner >= 0)
    v = tl.load(patch_ptr + owner.to(tl.int64) * spp + c * spc + (y % s) * sph + (x % s) * spw,
                mask=has, other=0.0)
    return v, has


@triton.jit
def _nchw(e, channels, height, width):
    """(b, c, y, x) of flat index e into a contiguous (B, C, H, W) tensor."""
    x = e % width
    y = (e // width) % height
    c = (e // (width * height)) % channels
    return e // (width * height * channels), c, y, x


@triton.jit
def _replace_kernel(x_ptr, patch_ptr, cell_ptr, out_ptr, total, channels, height, width, s,
                    sxb, sxc, sxh, sxw, spp, spc, sph, spw, sob, soc, soh, sow, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    b, c, y, x = _nchw(e, channels, height, width)
    pv, has = _patch_or(cell_ptr, patch_ptr, spp, spc, sph, spw, b, c, y, x, s,
                        height // s, width // s, m)
    xv = tl.load(x_ptr + b * sxb + c * sxc + y * sxh + x * sxw, mask=m & ~has, other=0.0)
    tl.store(out_ptr + b * sob + c * soc + y * soh + x * sow, tl.where(has, pv, xv), mask=m)


def replace(x: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor]) -> torch.Tensor:
    check_dtype("replace", "x", x)
    B, C, H, W = x.shape
    s = patches.shape[-1]
    # In x's layout, as the C++ kernels (x.clone()).
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    cells = _cell_map(idx, valid, B, H // s, W // s, x.device)
    block = block_size(1024, 8192)
    wrap(_replace_kernel)[(triton.cdiv(out.numel(), block),)](
        x, patches, cells, out, out.numel(), C, H, W, s, *x.stride(), *patches.stride(), *out.stride(),
        BLOCK=block)
    return out


@triton.jit
def _compose_kernel(coarse_ptr, patch_ptr, cell_ptr, src_ptr, out_ptr, total, channels,
                    height, width, coarse_h, coarse_w, scale_h, scale_w, s,
                    scb, scc, sch, scw, spp, spc, sph, spw, ssb, ssc, ssh, ssw,
                    SAME: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK: tl.constexpr):
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    b, c, y, x = _nchw(e, channels, height, width)
    pv, has = _patch_or(cell_ptr, patch_ptr, spp, spc, sph, spw, b, c, y, x, s,
                        height // s, width // s, m)
    plane = coarse_ptr + b * scb + c * scc
    up = m & ~has
    if SAME:
        v = tl.load(plane + y * sch + x * scw, mask=up, other=0.0).to(dtype)
    else:
        v = to_dtype(bilinear(plane, y.to(tl.int32), x.to(tl.int32), coarse_h, coarse_w, scale_h, scale_w,
                              sch, scw, up, dtype), dtype)
    v = tl.where(has, pv.to(dtype), v)
    if EPILOGUE:
        cs = tl.maximum(c - 1, 0)
        sv = tl.load(src_ptr + b * ssb + cs * ssc + y * ssh + x * ssw, mask=m & (c > 0), other=0.0)
        # fgr + src is rounded to the dtype before the clamp, as upstream's
        # out-of-place add.
        summed = to_dtype(v.to(tl.float32) + sv.to(tl.float32), dtype)
        v = tl.where(c > 0, summed, v)
        v = clamp01(v.to(tl.float32)).to(dtype)
    tl.store(out_ptr + e, v, mask=m)


def compose(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor], size: Sequence[int],
            src: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_dtype("compose", "coarse", coarse)
    B, C, Hc, Wc = coarse.shape
    H, W = int(size[0]), int(size[1])
    s = patches.shape[-1]
    out = torch.empty((B, C, H, W), dtype=coarse.dtype, device=coarse.device)
    if out.numel() == 0:
        return out
    cells = _cell_map(idx, valid, B, H // s, W // s, coarse.device)
    src_t = src if src is not None else coarse
    block = block_size(1024, 8192)
    wrap(_compose_kernel)[(triton.cdiv(out.numel(), block),)](
        coarse, patches, cells, src_t, out, out.numel(), C, H, W, Hc, Wc,
        linear_scale(Hc, H), linear_scale(Wc, W), s,
        *coarse.stride(), *patches.stride(), *src_t.stride(),
        SAME=(Hc, Wc) == (H, W), EPILOGUE=src is not None, BLOCK=block)
    return out
