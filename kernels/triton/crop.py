"""Triton kernel of crop: patches from the channel concatenation of several
inputs, each sampled from a bilinear resize on the fly, zeros outside.

The output is channels-last (memory order P, ph, pw, C). One launch per
input, over the P*ph*pw*C_i values of that input's channels in output order
(patch, row, column, channel fastest), so that neighbouring lanes write
neighbouring addresses.
"""
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .common import bilinear, block_size, check_dtype, known_empty, linear_scale, to_dtype, wrap


@triton.jit
def _crop_kernel(x_ptr, idx_ptr, out_ptr, total,
                 sxb, sxc, sxh, sxw,
                 channels, in_h, in_w, out_channels, channel_offset,
                 height, width, stride, padding, patch_h, patch_w,
                 scale_h, scale_w,
                 RESAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    per_patch = patch_h * patch_w * channels
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = g < total
    p = g // per_patch
    e = (g % per_patch).to(tl.int32)
    c = e % channels
    pix = e // channels
    py = pix // patch_w
    px = pix % patch_w
    b = tl.load(idx_ptr + p * 3, mask=m, other=0)
    y = (tl.load(idx_ptr + p * 3 + 1, mask=m, other=0) * stride - padding + py).to(tl.int32)
    x = (tl.load(idx_ptr + p * 3 + 2, mask=m, other=0) * stride - padding + px).to(tl.int32)
    inside = m & (y >= 0) & (y < height) & (x >= 0) & (x < width)
    plane = x_ptr + b * sxb + c.to(tl.int64) * sxc
    if RESAMPLE:
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        v = bilinear(plane, y, x, in_h, in_w, scale_h, scale_w, sxh, sxw, inside, dtype)
        v = to_dtype(tl.where(inside, v, 0.0), dtype)
    else:
        v = tl.load(plane + y.to(tl.int64) * sxh + x.to(tl.int64) * sxw, mask=inside, other=0.0)
    dst = out_ptr + p * patch_h * patch_w * out_channels + pix.to(tl.int64) * out_channels + channel_offset + c
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=m)


def crop(inputs: List[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
         image_size: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    for i, t in enumerate(inputs):
        check_dtype("crop", f"inputs[{i}]", t)
    H, W = int(image_size[0]), int(image_size[1])
    PH, PW = int(patch_size[0]), int(patch_size[1])
    P = idx.shape[0]
    C = sum(t.shape[1] for t in inputs)
    first = inputs[0]
    out = torch.empty((P, C, PH, PW), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last)
    if known_empty(P) or C == 0:
        return out
    idx = idx.contiguous()
    offset = 0
    for t in inputs:
        Ci, Hi, Wi = t.shape[1], t.shape[2], t.shape[3]
        if Ci == 0:
            continue
        resample = (Hi, Wi) != (H, W)
        total = P * PH * PW * Ci
        block = block_size(1024, 16384)
        wrap(_crop_kernel)[(triton.cdiv(total, block),)](
            t, idx, out, total, *t.stride(), Ci, Hi, Wi, C, offset, H, W, stride, padding, PH, PW,
            linear_scale(Hi, H), linear_scale(Wi, W), RESAMPLE=resample, BLOCK=block)
        offset += Ci
    return out
