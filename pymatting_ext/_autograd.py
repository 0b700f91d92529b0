"""Backward formulas of the differentiable ops (crop, replace, compose),
registered for the C++ ops (namespace pymatting_ext) and the Triton ops
(pymatting_ext_triton). The select ops return indices and a 0/1 map: their
outputs are marked non-differentiable, as upstream's topk/gt + nonzero give
no gradient.

Each formula is the adjoint of its op written with plain torch calls:
- crop: the patches' gradients added back into each input's image at
  image_size (index_put_ with accumulate, so overlapping windows sum), then
  through the adjoint of the bilinear resize (upsample_bilinear2d_backward,
  PyTorch's own, with the same weights) for the inputs that were resampled;
- replace: the gradient goes to the patch that owns a cell (the last valid
  one naming it), and to x everywhere else;
- compose: the same split, the part outside the refined cells going through
  the resize's adjoint to coarse; with src, MattingRefine's clamps pass the
  gradient only where the clamped value was inside [0, 1] (as torch.clamp),
  and the foreground's gradient also goes to src.
None of them synchronises with the device.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import reference

__all__ = ["register"]


def _split_by_owner(grad: Tensor, idx: Tensor, valid: Optional[Tensor], s: int):
    """grad (B, C, H, W) split into the part outside the owned cells and the
    owning patches' (P, C, s, s) share."""
    B, C, H, W = grad.shape
    owner = reference.cell_owner(idx, valid, B, H // s, W // s)
    owned = (owner >= 0).repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None]
    rest = grad.masked_fill(owned, 0)
    blocks = grad.reshape(B, C, H // s, s, W // s, s).permute(0, 2, 4, 1, 3, 5)
    mine = owner[idx[:, 0], idx[:, 1], idx[:, 2]] == torch.arange(idx.shape[0], device=idx.device)
    patches = blocks[idx[:, 0], idx[:, 1], idx[:, 2]] * mine[:, None, None, None].to(grad.dtype)
    return rest, patches


def _taps(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device):
    """One axis of PyTorch's bilinear resize (align_corners=False): for each
    output coordinate the two input indices and their weights, as
    csrc/index_math.h's linear_tap (weights rounded to the tensor's dtype)."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(in_size, dtype=opmath) / torch.tensor(out_size, dtype=opmath)
    src = (scale * (torch.arange(out_size, device=device, dtype=opmath) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    lam = (src - i0.to(opmath)).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, (1 - lam).to(dtype), lam.to(dtype)


def _resize_backward(grad: Tensor, input_shape) -> Tensor:
    """Adjoint of F.interpolate(x, grad's size, 'bilinear', align_corners=False)
    for x of input_shape (identity where the sizes match, as the forward reads
    such inputs directly): the separable transpose, width then height, by
    index_add.

    NB: written out rather than aten's upsample_bilinear2d_backward, which
    rejects symbolic sizes while torch.compile traces a backward."""
    H, W = grad.shape[2], grad.shape[3]
    hi, wi = input_shape[2], input_shape[3]
    if (H, W) == (hi, wi):
        return grad
    x0, x1, wx0, wx1 = _taps(W, wi, grad.dtype, grad.device)
    y0, y1, wy0, wy1 = _taps(H, hi, grad.dtype, grad.device)
    rows = grad.new_zeros((grad.shape[0], grad.shape[1], H, wi))
    rows.index_add_(3, x0, grad * wx0).index_add_(3, x1, grad * wx1)
    out = grad.new_zeros((grad.shape[0], grad.shape[1], hi, wi))
    return out.index_add_(2, y0, rows * wy0[:, None]).index_add_(2, y1, rows * wy1[:, None])


# -- crop ----------------------------------------------------------------------

def _crop_setup(ctx, inputs, output):
    tensors, idx, stride, padding, image_size, patch_size = inputs
    ctx.shapes = [t.shape for t in tensors]
    ctx.geometry = (stride, padding, tuple(image_size), tuple(patch_size))
    ctx.save_for_backward(idx)


def _crop_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    stride, padding, (H, W), (ph, pw) = ctx.geometry
    P = idx.shape[0]
    ys = idx[:, 1:2] * stride - padding + torch.arange(ph, device=idx.device)  # (P, ph)
    xs = idx[:, 2:3] * stride - padding + torch.arange(pw, device=idx.device)  # (P, pw)
    inside = (((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :])  # (P, ph, pw)
    where = (idx[:, 0, None, None].expand(P, ph, pw), ys.clamp(0, H - 1)[:, :, None].expand(P, ph, pw),
             xs.clamp(0, W - 1)[:, None, :].expand(P, ph, pw))
    # (P, ph, pw, C), zero outside the image so that clamped positions add 0.
    values = grad.permute(0, 2, 3, 1) * inside[..., None].to(grad.dtype)
    grads: List[Optional[Tensor]] = []
    offset = 0
    for shape in ctx.shapes:
        c = shape[1]
        image = grad.new_zeros((shape[0], H, W, c))
        image.index_put_(where, values[..., offset:offset + c], accumulate=True)
        grads.append(_resize_backward(image.permute(0, 3, 1, 2), shape))
        offset += c
    return grads, None, None, None, None, None


# -- replace -------------------------------------------------------------------

def _replace_setup(ctx, inputs, output):
    x, patches, idx, valid = inputs
    ctx.s = patches.shape[-1]
    ctx.save_for_backward(idx, valid)


def _replace_backward(ctx, grad):
    idx, valid = ctx.saved_tensors
    rest, patches = _split_by_owner(grad, idx, valid, ctx.s)
    return rest, patches, None, None


# -- compose -------------------------------------------------------------------

def _compose_backward_for(namespace: str):
    def setup(ctx, inputs, output):
        coarse, patches, idx, valid, size, src = inputs
        ctx.size = tuple(size)
        ctx.has_src = src is not None
        ctx.save_for_backward(coarse, patches, idx, valid, src)

    def backward(ctx, grad):
        coarse, patches, idx, valid, src = ctx.saved_tensors
        grad_src = None
        if ctx.has_src:
            # The values before MattingRefine's clamps, recomputed.
            raw = getattr(torch.ops, namespace).compose(coarse, patches, idx, valid, list(ctx.size), None)
            fgr = raw[:, 1:] + src
            passes = torch.cat([(raw[:, :1] >= 0) & (raw[:, :1] <= 1), (fgr >= 0) & (fgr <= 1)], 1)
            grad = grad * passes.to(grad.dtype)
            grad_src = grad[:, 1:]
        rest, grad_patches = _split_by_owner(grad, idx, valid, patches.shape[-1])
        return _resize_backward(rest, coarse.shape), grad_patches, None, None, None, grad_src

    return setup, backward


# -- select ------------------------------------------------------------------

def _select_setup(ctx, inputs, output):
    # Indices and a 0/1 map, as upstream's topk/gt + nonzero: constants to
    # autograd.
    ctx.mark_non_differentiable(*output)


def _select_backward(ctx, *grads):
    raise RuntimeError("select_sampling and select_thresholding are not differentiable")


def register(namespace: str):
    """Attach the backward formulas to namespace::crop, ::replace, ::compose,
    and mark the select ops' outputs as not differentiable."""
    for name in ("select_sampling", "select_thresholding"):
        torch.library.register_autograd(f"{namespace}::{name}", _select_backward, setup_context=_select_setup)
    torch.library.register_autograd(f"{namespace}::crop", _crop_backward, setup_context=_crop_setup)
    torch.library.register_autograd(f"{namespace}::replace", _replace_backward, setup_context=_replace_setup)
    setup, backward = _compose_backward_for(namespace)
    torch.library.register_autograd(f"{namespace}::compose", backward, setup_context=setup)
