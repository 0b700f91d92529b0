"""The reference: every op and the whole refiner in plain PyTorch.

Short and obviously right rather than fast. It is the oracle the tests hold
every backend to, the backend used where no compiled kernel applies, and the
differentiable path. Semantics are those of docs/DESIGN.md; the compiled kernels
match them bit for bit except for float rounding in the bilinear weights.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose", "compose_into",
           "refine"]


def _bilinear(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def select_sampling(err: torch.Tensor, k: int, prevent_oversampling: bool):
    """Per image, the k largest values of err (B, 1, H, W); NaN counts as the
    largest and ties go to the lower flat index. Returns ref (err's dtype,
    1 where selected and, with prevent_oversampling, err > 0), idx (B*k, 3)
    rows (b, y, x) in row-major order, and valid (B*k,) bool."""
    B, _, H, W = err.shape
    k = torch.sym_min(k, H * W)  # NB: not min(): no guard on a symbolic size (torch.export)
    flat = err.reshape(B, H * W)
    # A stable descending sort keeps equal values in index order; torch.sort
    # puts NaN above every number.
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    chosen = order[:, :k].sort(dim=1).values
    positive = flat > 0 if prevent_oversampling else torch.ones_like(flat, dtype=torch.bool)
    selected = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, chosen, True)
    ref = (selected & positive).to(err.dtype).reshape(B, 1, H, W)
    valid = positive.gather(1, chosen).reshape(-1)
    batch = torch.arange(B * k, device=err.device) // max(k, 1)
    chosen = chosen.reshape(-1)
    idx = torch.stack([batch, chosen // W, chosen % W], dim=1)
    return ref, idx, valid


def select_thresholding(err: torch.Tensor, threshold: float):
    """ref = float32 (err > threshold), the threshold rounded to err's dtype
    first (as torch.gt does); idx = its nonzero cells (P, 3), row-major."""
    selected = err > threshold
    return selected.float(), torch.nonzero(selected[:, 0])


def crop(inputs: Sequence[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
         image_size: Sequence[int], patch_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Patches (P, sum C, ph, pw) of cat(bilinear(input -> image_size) for each
    input), patch p read at origin (stride*y - padding, stride*x - padding),
    zeros outside the image. Channels-last, as the compiled kernels."""
    H, W = image_size
    if patch_size is None:
        patch_size = (stride + 2 * padding, stride + 2 * padding)
    ph, pw = patch_size
    # (An input without channels contributes none; F.interpolate rejects it.)
    image = torch.cat([t if tuple(t.shape[2:]) == (H, W) else
                       _bilinear(t, (H, W)) if t.shape[1] else t.new_empty((t.shape[0], 0, H, W))
                       for t in inputs], 1)
    b, cy, cx = idx.unbind(1)
    ys = cy[:, None] * stride - padding + torch.arange(ph, device=idx.device)  # (P, ph)
    xs = cx[:, None] * stride - padding + torch.arange(pw, device=idx.device)  # (P, pw)
    inside = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
    # (P, ph, pw, C): advanced indices first, then the sliced channel dim.
    patches = image[b[:, None, None], :, ys.clamp(0, H - 1)[:, :, None], xs.clamp(0, W - 1)[:, None, :]]
    patches = torch.where(inside[..., None], patches, torch.zeros((), dtype=image.dtype, device=image.device))
    return patches.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def crop_into(inputs: Sequence[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
              image_size: Sequence[int], channel_offset: int, out: torch.Tensor) -> None:
    """crop's patches written into channels [channel_offset, channel_offset +
    sum C_i) of out (P, C_out, ph, pw); the other channels are left as they
    are."""
    patches = crop(inputs, idx, stride, padding, image_size, tuple(out.shape[2:]))
    out[:, channel_offset:channel_offset + patches.shape[1]] = patches


def cell_owner(idx: torch.Tensor, valid: Optional[torch.Tensor], batch: int, cells_h: int,
               cells_w: int) -> torch.Tensor:
    """(B, cells_h, cells_w) int64: the last valid patch naming each cell (as
    a sequential scatter leaves it), or -1."""
    order = torch.arange(idx.shape[0], device=idx.device)
    if valid is not None:
        order = torch.where(valid, order, torch.full_like(order, -1))
    cell = (idx[:, 0] * cells_h + idx[:, 1]) * cells_w + idx[:, 2]
    owner = torch.full((batch * cells_h * cells_w,), -1, dtype=torch.long, device=idx.device)
    return owner.scatter_reduce(0, cell, order, reduce="amax").view(batch, cells_h, cells_w)


def replace(x: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of x (B, C, H, W) with cell (y, x) of image b replaced by patch p
    (P, C, s, s), for every valid p; of several patches for one cell the last
    wins. Written as a per-pixel gather, so it never synchronises."""
    B, C, H, W = x.shape
    P, s = patches.shape[0], patches.shape[-1]
    owner = cell_owner(idx, valid, B, H // s, W // s)
    ys = torch.arange(H, device=x.device)
    xs = torch.arange(W, device=x.device)
    owner = owner[:, ys // s][:, :, xs // s]  # (B, H, W)
    ys, xs = ys % s, xs % s
    channels = torch.arange(C, device=x.device)
    # NB: cells no patch owns read an appended zero patch (and keep x's value
    # below): no branch on P, which may be 0 and is data-dependent under
    # torch.export (thresholding).
    patches = torch.cat([patches, patches.new_zeros((1,) + tuple(patches.shape[1:]))])
    values = patches[torch.where(owner >= 0, owner, P)[:, None], channels[None, :, None, None],
                     ys[None, None, :, None], xs[None, None, None, :]]
    return torch.where((owner >= 0)[:, None], values, x)


def compose(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor], size: Sequence[int],
            src: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bilinear(coarse -> size) with the refined cells replaced by their
    patches; with src, MattingRefine's epilogue: channel 0 clamped to [0, 1],
    the others clamp(x + src, 0, 1)."""
    out = replace(_bilinear(coarse, tuple(size)), patches, idx, valid)
    if src is not None:
        out = torch.cat([out[:, :1].clamp(0, 1), (out[:, 1:] + src).clamp(0, 1)], 1)
    return out


def compose_into(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
                 valid: Optional[torch.Tensor], src: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """compose's output (of out's height and width) written into out."""
    out.copy_(compose(coarse, patches, idx, valid, tuple(out.shape[2:]), src))


def refine(refiner: torch.nn.Module, src, bgr, pha, fgr, err, hid):
    """The whole refiner, as upstream computes it (BatchNorm as modules, no
    folding), built on the reference ops. `refiner` supplies the settings and
    layers of a pymatting_ext.Refiner or an upstream Refiner."""
    H, W = src.shape[2:]
    k3 = refiner.kernel_size == 3

    def stage1(x):
        x = refiner.relu(refiner.bn1(refiner.conv1(x)))
        return refiner.relu(refiner.bn2(refiner.conv2(x)))

    def stage2(x):
        return refiner.conv4(refiner.relu(refiner.bn3(refiner.conv3(x))))

    if refiner.mode == "full":
        p, q = (3, 2) if k3 else (0, 0)
        whole = torch.zeros((src.shape[0], 3), dtype=torch.long, device=src.device)
        whole[:, 0] = torch.arange(src.shape[0], device=src.device)
        x = crop([hid, pha, fgr, src, bgr], whole, 1, p, (H // 2, W // 2), (H // 2 + 2 * p, W // 2 + 2 * p))
        x = F.interpolate(stage1(x), (H + 2 * q, W + 2 * q), mode="nearest")
        y = crop([src, bgr], whole, 1, q, (H, W), (H + 2 * q, W + 2 * q))
        out = stage2(torch.cat([x, y], 1)).contiguous()
        ref = torch.ones((src.shape[0], 1, H // 4, W // 4), dtype=src.dtype, device=src.device)
        return out[:, :1], out[:, 1:], ref

    err = _bilinear(err, (H // 4, W // 4))
    if refiner.mode == "sampling":
        ref, idx, valid = select_sampling(err, refiner.sample_pixels // 16, refiner.prevent_oversampling)
        idx = idx[valid]
    else:
        ref, idx = select_thresholding(err, refiner.threshold)
    coarse = torch.cat([pha, fgr], 1)
    if idx.shape[0] == 0:
        out = _bilinear(coarse, (H, W))
        return out[:, :1], out[:, 1:], ref
    x = crop([hid, pha, fgr, src, bgr], idx, 2, 3 if k3 else 0, (H // 2, W // 2))
    x = F.interpolate(stage1(x), 8 if k3 else 4, mode="nearest")
    y = crop([src, bgr], idx, 4, 2 if k3 else 0, (H, W))
    x = stage2(torch.cat([x, y], 1))
    out = compose(coarse, x, idx, None, (H, W))
    return out[:, :1], out[:, 1:], ref
