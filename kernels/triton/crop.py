"""Triton kernel of crop and crop_into: patches from the channel
concatenation of several inputs, each sampled from a bilinear resize on the
fly, zeros outside.

The output is channels-last (memory order P, ph, pw, C), so a program takes
BLOCK consecutive output pixels and writes, for each input, a [BLOCK,
channels] tile whose rows are contiguous runs of the output.

One launch covers up to two input sizes ("groups", A and B) of up to three
inputs each: the refiner's [hid, pha, fgr] (coarse) and [src, bgr] (full
size) are one launch. The bilinear taps (indices and weights) depend on the
output pixel and the input size only, so they are computed once per pixel
and group and shared by the group's inputs and channels. Inputs are separate
kernel arguments (pointer and strides per slot, with a constexpr count per
group), so the launch stays traceable by torch.compile (no table of raw
pointers). More inputs or sizes take more launches.
"""
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .common import (FP_FUSION, check_dtype, compiled, device_guard, known_empty, linear_mix, linear_tap,
                     maybe_int64, resize_scale, round_weights, to_dtype, wrap_triton)

_GROUPS = 2     # input sizes per launch
_PER_GROUP = 3  # inputs per size per launch
_SLOTS = _GROUPS * _PER_GROUP


@triton.jit
def _crop_slot(x_ptr, sb, sc, sh, sw, channels, c_off, out_pix, pm, inside, b, y, x,
               y0, y1, x0, x1, wy0, wy1, wx0, wx1,
               RESAMPLE: tl.constexpr, CB: tl.constexpr, dtype: tl.constexpr):
    """One input's channels of the BLOCK pixels, in [CB, BLOCK] tiles written
    to out_pix + c_off + channel.

    NB: channels x pixels, pixels fastest: Triton's default layout then puts
    the lanes of a warp on neighbouring pixels (coalesced reads of the NCHW
    inputs) and each pixel in one thread, so its per-pixel index and tap
    arithmetic is not repeated by several threads; the store is transposed
    to contiguous runs of channels on the way out."""
    base = b * sb
    if RESAMPLE:
        r0 = base + y0.to(tl.int64) * sh
        r1 = base + y1.to(tl.int64) * sh
        c0 = x0.to(tl.int64) * sw
        c1 = x1.to(tl.int64) * sw
        a00 = (r0 + c0)[None, :]
        a01 = (r0 + c1)[None, :]
        a10 = (r1 + c0)[None, :]
        a11 = (r1 + c1)[None, :]
        wy0 = wy0[None, :]
        wy1 = wy1[None, :]
        wx0 = wx0[None, :]
        wx1 = wx1[None, :]
    else:
        a = (base + y.to(tl.int64) * sh + x.to(tl.int64) * sw)[None, :]
    lanes = tl.arange(0, CB)
    for start in range(0, channels, CB):
        c = start + lanes
        cm = (c < channels)[:, None]
        lm = inside[None, :] & cm
        plane = x_ptr + (c.to(tl.int64) * sc)[:, None]
        if RESAMPLE:
            v00 = tl.load(plane + a00, mask=lm, other=0.0).to(tl.float32)
            v01 = tl.load(plane + a01, mask=lm, other=0.0).to(tl.float32)
            v10 = tl.load(plane + a10, mask=lm, other=0.0).to(tl.float32)
            v11 = tl.load(plane + a11, mask=lm, other=0.0).to(tl.float32)
            v = to_dtype(linear_mix(v00, v01, v10, v11, wy0, wy1, wx0, wx1), dtype)
        else:
            v = tl.load(plane + a, mask=lm, other=0.0).to(dtype)
        tl.store(out_pix[None, :] + (c_off + c)[:, None], v, mask=pm[None, :] & cm)


@triton.jit
def _crop_group(N: tl.constexpr, RESAMPLE: tl.constexpr, in_h, in_w, height, width,
                p0, p0_sb, p0_sc, p0_sh, p0_sw, p0_c, p0_off,
                p1, p1_sb, p1_sc, p1_sh, p1_sw, p1_c, p1_off,
                p2, p2_sb, p2_sc, p2_sh, p2_sw, p2_c, p2_off,
                out_pix, pm, inside, b, y, x, CB0: tl.constexpr, CB1: tl.constexpr, CB2: tl.constexpr,
                ROUND: tl.constexpr, dtype: tl.constexpr):
    """The N inputs of one size (in_h x in_w, resized to height x width):
    the taps once, then each input's channels."""
    if RESAMPLE:
        y0, y1, wy0, wy1 = linear_tap(y, in_h, resize_scale(in_h, height), dtype, ROUND)
        x0, x1, wx0, wx1 = linear_tap(x, in_w, resize_scale(in_w, width), dtype, ROUND)
    else:
        y0, y1, wy0, wy1 = y, y, 1.0, 0.0
        x0, x1, wx0, wx1 = x, x, 1.0, 0.0
    if N > 0:
        _crop_slot(p0, p0_sb, p0_sc, p0_sh, p0_sw, p0_c, p0_off, out_pix, pm, inside, b, y, x,
                   y0, y1, x0, x1, wy0, wy1, wx0, wx1, RESAMPLE, CB0, dtype)
    if N > 1:
        _crop_slot(p1, p1_sb, p1_sc, p1_sh, p1_sw, p1_c, p1_off, out_pix, pm, inside, b, y, x,
                   y0, y1, x0, x1, wy0, wy1, wx0, wx1, RESAMPLE, CB1, dtype)
    if N > 2:
        _crop_slot(p2, p2_sb, p2_sc, p2_sh, p2_sw, p2_c, p2_off, out_pix, pm, inside, b, y, x,
                   y0, y1, x0, x1, wy0, wy1, wx0, wx1, RESAMPLE, CB2, dtype)


_SLOT_ARGS = ("sb", "sc", "sh", "sw", "c", "off")
_SIZE_ARGS = ["n_pix", "pix_per_patch", "patch_w", "c_out", "stride", "padding", "height", "width",
              "batch", "cells_h", "cells_w", "a_h", "a_w", "b_h", "b_w"]


@triton.jit(do_not_specialize=_SIZE_ARGS + [f"x{i}_{a}" for i in range(_SLOTS) for a in _SLOT_ARGS])
def _crop_kernel(idx_ptr, out_ptr, n_pix, pix_per_patch, patch_w, c_out, stride, padding, height, width,
                 batch, cells_h, cells_w,
                 a_h, a_w, b_h, b_w,
                 x0, x0_sb, x0_sc, x0_sh, x0_sw, x0_c, x0_off,
                 x1, x1_sb, x1_sc, x1_sh, x1_sw, x1_c, x1_off,
                 x2, x2_sb, x2_sc, x2_sh, x2_sw, x2_c, x2_off,
                 x3, x3_sb, x3_sc, x3_sh, x3_sw, x3_c, x3_off,
                 x4, x4_sb, x4_sc, x4_sh, x4_sw, x4_c, x4_off,
                 x5, x5_sb, x5_sc, x5_sh, x5_sw, x5_c, x5_off,
                 NA: tl.constexpr, NB: tl.constexpr, RESAMPLE_A: tl.constexpr, RESAMPLE_B: tl.constexpr,
                 CB0: tl.constexpr, CB1: tl.constexpr, CB2: tl.constexpr,
                 CB3: tl.constexpr, CB4: tl.constexpr, CB5: tl.constexpr,
                 ROUND: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Output pixel g (of n_pix = P * ph * pw) of patch p = g // (ph * pw),
    at image position (s*y - pad + py, s*x - pad + px) for idx row (b, y, x).
    Rows out of range (b outside [0, batch), y or x outside the cells_h x
    cells_w grid) are written as zeros, as reads outside the image are."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    if WIDE:  # more than 2^31 pixels: int64 pixel arithmetic
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = g < n_pix
    p = g // pix_per_patch
    r = g - p * pix_per_patch
    py = r // patch_w
    px = r - py * patch_w
    row = idx_ptr + p.to(tl.int64) * 3
    b = tl.load(row, mask=pm, other=-1)
    cy = tl.load(row + 1, mask=pm, other=0)
    cx = tl.load(row + 2, mask=pm, other=0)
    ok = pm & (b >= 0) & (b < batch) & (cy >= 0) & (cy < cells_h) & (cx >= 0) & (cx < cells_w)
    # In range for valid rows; 0 (never read) for the others.
    y = tl.where(ok, cy * stride - padding + py, 0).to(tl.int32)
    x = tl.where(ok, cx * stride - padding + px, 0).to(tl.int32)
    b = tl.where(ok, b, 0)
    inside = ok & (y >= 0) & (y < height) & (x >= 0) & (x < width)
    out_pix = out_ptr + g.to(tl.int64) * c_out
    if NA > 0:
        _crop_group(NA, RESAMPLE_A, a_h, a_w, height, width,
                    x0, x0_sb, x0_sc, x0_sh, x0_sw, x0_c, x0_off,
                    x1, x1_sb, x1_sc, x1_sh, x1_sw, x1_c, x1_off,
                    x2, x2_sb, x2_sc, x2_sh, x2_sw, x2_c, x2_off,
                    out_pix, pm, inside, b, y, x, CB0, CB1, CB2, ROUND, dtype)
    if NB > 0:
        _crop_group(NB, RESAMPLE_B, b_h, b_w, height, width,
                    x3, x3_sb, x3_sc, x3_sh, x3_sw, x3_c, x3_off,
                    x4, x4_sb, x4_sc, x4_sh, x4_sw, x4_c, x4_off,
                    x5, x5_sb, x5_sc, x5_sh, x5_sw, x5_c, x5_off,
                    out_pix, pm, inside, b, y, x, CB3, CB4, CB5, ROUND, dtype)


def _channel_block(c: int) -> int:
    """Channels of an input a tile holds: its channels rounded up to a power
    of two, at most 8 (more channels loop). Each thread holds CB channels x 4
    taps of its pixel: 8 keeps the crop of the refiner at ~80 registers
    (32 took 236)."""
    return min(triton.next_power_of_2(int(c)), 8)


def _launches(inputs, channel_offset):
    """The inputs with their output channel, grouped by size (first-seen
    order) and cut into launches of at most _GROUPS sizes of _PER_GROUP
    inputs each: [[(size, [(tensor, channel), ...]), ...], ...]."""
    groups = []
    offset = channel_offset
    for t in inputs:
        if t.shape[1] != 0:
            size = (t.shape[2], t.shape[3])
            for key, members in groups:
                if key == size:
                    members.append((t, offset))
                    break
            else:
                groups.append((size, [(t, offset)]))
        offset += t.shape[1]
    chunks = [(size, members[i:i + _PER_GROUP]) for size, members in groups
              for i in range(0, len(members), _PER_GROUP)]
    return [chunks[i:i + _GROUPS] for i in range(0, len(chunks), _GROUPS)]


def _launch(inputs, idx, stride, padding, H, W, out, channel_offset):
    P, C_out, PH, PW = out.shape
    if known_empty(P):
        return
    idx = idx.contiguous()
    B = inputs[0].shape[0]
    n_pix = P * PH * PW
    first = inputs[0]
    round_w = round_weights(out.device)
    for launch in _launches(inputs, channel_offset):
        launch = launch + [((1, 1), [])] * (_GROUPS - len(launch))
        group_args, slot_args, meta = [], [], {}
        for gi, (size, members) in enumerate(launch):
            name = "AB"[gi]
            resample = size != (H, W)
            group_args += [size[0], size[1]]
            meta[f"N{name}"] = len(members)
            meta[f"RESAMPLE_{name}"] = bool(resample) and len(members) > 0
            for j in range(_PER_GROUP):
                slot = gi * _PER_GROUP + j
                if j < len(members):
                    t, c = members[j]
                    slot_args += [t, *t.stride(), t.shape[1], c]
                    meta[f"CB{slot}"] = _channel_block(t.shape[1])
                else:  # unused: any valid tensor, never read
                    slot_args += [first, 0, 0, 0, 0, 0, 0]
                    meta[f"CB{slot}"] = 1
        # One pixel a thread on the GPU (4 warps); the interpreter's cost is
        # per program, so more pixels there.
        block = 128 if compiled() else 1024
        wrap_triton(_crop_kernel)[(triton.cdiv(n_pix, block),)](
            idx, out, n_pix, PH * PW, PW, C_out, stride, padding, H, W,
            B, triton.cdiv(H, stride), triton.cdiv(W, stride), *group_args, *slot_args,
            ROUND=round_w, WIDE=maybe_int64(n_pix + block), BLOCK=block, enable_fp_fusion=FP_FUSION, **meta)


def crop(inputs: List[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
         image_size: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    for i, t in enumerate(inputs):
        check_dtype("crop", f"inputs[{i}]", t)
    # NB: sizes as given, not int(): under torch.compile they may be symbolic.
    H, W = image_size[0], image_size[1]
    PH, PW = patch_size[0], patch_size[1]
    C = sum(t.shape[1] for t in inputs)
    first = inputs[0]
    out = torch.empty((idx.shape[0], C, PH, PW), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last)
    with device_guard(first.device):
        _launch(inputs, idx, stride, padding, H, W, out, 0)
    return out


def crop_into(inputs: List[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
              image_size: Sequence[int], channel_offset: int, out: torch.Tensor) -> None:
    """crop's patches written into channels [channel_offset, channel_offset +
    sum C_i) of out, channels-last contiguous (P, C_out, ph, pw); the other
    channels are left as they are."""
    for i, t in enumerate(inputs):
        check_dtype("crop_into", f"inputs[{i}]", t)
    C = sum(t.shape[1] for t in inputs)
    first = inputs[0]
    # NB: the raw op is reachable without pymatting_ext.ops' checks: these
    # keep its writes inside out.
    torch._check(out.dim() == 4, lambda: f"crop_into: out must be (P, C, ph, pw), got {tuple(out.shape)}")
    torch._check(out.shape[0] == idx.shape[0],
                 lambda: f"crop_into: out has {out.shape[0]} patches but idx has {idx.shape[0]} rows")
    torch._check(out.dtype == first.dtype, lambda: "crop_into: out must have the inputs' dtype")
    torch._check(out.device == first.device, lambda: "crop_into: out must be on the inputs' device")
    torch._check(channel_offset >= 0, lambda: f"crop_into: channel_offset must be >= 0, got {channel_offset}")
    torch._check(channel_offset + C <= out.shape[1],
                 lambda: f"crop_into: channels [{channel_offset}, {channel_offset + C}) do not fit in out's "
                         f"{out.shape[1]}")
    torch._check(out.is_contiguous(memory_format=torch.channels_last),
                 lambda: "crop_into: out must be channels-last contiguous")
    H, W = image_size[0], image_size[1]
    with device_guard(out.device):
        _launch(inputs, idx, stride, padding, H, W, out, channel_offset)
