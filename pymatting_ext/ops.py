"""The public ops. Each checks its arguments (a ValueError naming the argument
for bad input), picks a backend (see pymatting_ext._backend) and runs the C++
op through the dispatcher (its CPU or CUDA kernel), the Triton op, or the
reference. On every backend but 'cpu', whose kernels check for themselves,
idx's values are range-checked on the host first (this synchronises; the
Refiner calls the unchecked run_* functions).

Shapes: B images, cells of the stride grid indexed by idx rows (b, y, x).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from ._backend import resolve

__all__ = ["select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose", "compose_into"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_tensor(op, name, t, rank, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_dtype(op, name, t):
    if t.dtype not in _DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_like(op, name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                         f"all tensors must be on one device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _check_int(op, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def _check_size(op, name, size):
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in size):
        raise ValueError(f"{op}: {name} must be two positive ints (H, W), got {tuple(size)}")


def _check_idx(op, idx, device, rows=None):
    _check_tensor(op, "idx", idx, 2, "(P, 3)")
    if idx.shape[1] != 3 or idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be an int64 tensor of shape (P, 3), got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{op}: idx is on {idx.device} but the data is on {device}")
    if rows is not None and idx.shape[0] != rows:
        raise ValueError(f"{op}: idx has {idx.shape[0]} rows but there are {rows} patches")


def _check_idx_values(op, idx, grid):
    """Range check of idx's values, on the host (it synchronises): the
    reference's indexing would clamp or wrap silently, and the GPU kernels can
    only assert on the device. (The C++ CPU kernels check for themselves.)"""
    if idx.numel() == 0:
        return
    upper = torch.tensor(grid, device=idx.device)
    bad = ((idx < 0) | (idx >= upper)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: idx row {row} = {tuple(idx[row].tolist())} is out of range for a grid of "
                         f"B={grid[0]}, H={grid[1]}, W={grid[2]} cells")


def _check_valid(op, valid, idx):
    if valid is None:
        return
    _check_tensor(op, "valid", valid, 1, "(P,)")
    if valid.dtype != torch.bool or valid.shape[0] != idx.shape[0] or valid.device != idx.device:
        raise ValueError(f"{op}: valid must be a bool tensor of shape ({idx.shape[0]},) on {idx.device}, "
                         f"got {valid.dtype} {tuple(valid.shape)} on {valid.device}")


def _check_err(op, err):
    _check_tensor(op, "err", err, 4, "(B, 1, H, W)")
    if err.shape[1] != 1:
        raise ValueError(f"{op}: err must have shape (B, 1, H, W), got {tuple(err.shape)}")
    _check_dtype(op, "err", err)


def select_sampling(err: torch.Tensor, k: int, prevent_oversampling: bool = True, *,
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the k largest cells of err (B, 1, H, W) (k is capped at
    H*W); NaN counts as the largest, ties go to the lower flat index.

    Returns ``ref`` (err's shape and dtype; 1 where selected and, with
    prevent_oversampling, err > 0), ``idx`` (B*k, 3) int64 rows (b, y, x) in
    row-major order, and ``valid`` (B*k,) bool: err > 0 at idx with
    prevent_oversampling, else all true. Shapes depend on k only, so this
    never synchronises with the device."""
    _check_err("select_sampling", err)
    _check_int("select_sampling", "k", k, 0)
    return run_select_sampling(resolve(backend, err.device, err.dtype), err, k, bool(prevent_oversampling))


def select_thresholding(err: torch.Tensor, threshold: float, *,
                        backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``ref`` = float32 (err > threshold), the threshold rounded to err's
    dtype as torch.gt does, and ``idx`` (P, 3) int64: its selected cells in
    row-major order. P depends on the data."""
    _check_err("select_thresholding", err)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"select_thresholding: threshold must be a float, got {type(threshold).__name__}")
    return run_select_thresholding(resolve(backend, err.device, err.dtype), err, float(threshold))


def _check_crop(op, inputs, idx, stride, padding, image_size, patch_size):
    """The checks of crop and crop_into; returns (inputs as a list, image_size,
    patch_size as tuples)."""
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError(f"{op}: inputs must hold at least one tensor")
    for i, t in enumerate(inputs):
        _check_tensor(op, f"inputs[{i}]", t, 4, "(B, C, H, W)")
        _check_dtype(op, f"inputs[{i}]", t)
        _check_like(op, f"inputs[{i}]", t, "inputs[0]", inputs[0])
        if t.shape[0] != inputs[0].shape[0]:
            raise ValueError(f"{op}: inputs[{i}] has batch size {t.shape[0]} but inputs[0] has {inputs[0].shape[0]}")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"{op}: inputs[{i}] must not be empty, got {tuple(t.shape)}")
    _check_int(op, "stride", stride, 1)
    _check_int(op, "padding", padding, 0)
    image_size = tuple(image_size)
    _check_size(op, "image_size", image_size)
    patch_size = (stride + 2 * padding,) * 2 if patch_size is None else tuple(patch_size)
    _check_size(op, "patch_size", patch_size)
    _check_idx(op, idx, inputs[0].device)
    return inputs, image_size, patch_size


def crop(inputs: Sequence[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
         image_size: Sequence[int], patch_size: Optional[Sequence[int]] = None, *,
         backend: str = "auto") -> torch.Tensor:
    """Patches (P, sum C_i, ph, pw), channels-last, from the channel
    concatenation of ``inputs`` (each (B, C_i, H_i, W_i)) bilinearly resized
    to ``image_size`` (align_corners=False; inputs already of that size are
    read directly). Patch p starts at (stride*y - padding, stride*x - padding)
    for idx row (b, y, x); reads outside the image are zeros. ``patch_size``
    defaults to stride + 2*padding square."""
    op = "crop"
    inputs, image_size, patch_size = _check_crop(op, inputs, idx, stride, padding, image_size, patch_size)
    b = resolve(backend, inputs[0].device, inputs[0].dtype)
    if b != "cpu":
        _check_idx_values(op, idx, (inputs[0].shape[0], -(-image_size[0] // stride), -(-image_size[1] // stride)))
    return run_crop(b, inputs, idx, stride, padding, image_size, patch_size)


def crop_into(inputs: Sequence[torch.Tensor], idx: torch.Tensor, stride: int, padding: int,
              image_size: Sequence[int], channel_offset: int, out: torch.Tensor, *,
              backend: str = "auto") -> None:
    """crop, written into channels [channel_offset, channel_offset + sum C_i)
    of ``out``, a channels-last contiguous (P, C_out, ph, pw) tensor of the
    inputs' dtype and device (the patch size is out's); out's other channels
    are left as they are. Not differentiable (it writes in place)."""
    op = "crop_into"
    _check_tensor(op, "out", out, 4, "(P, C, ph, pw)")
    inputs, image_size, _ = _check_crop(op, inputs, idx, stride, padding, image_size, tuple(out.shape[2:]))
    _check_like(op, "out", out, "inputs[0]", inputs[0])
    _check_int(op, "channel_offset", channel_offset, 0)
    channels = sum(t.shape[1] for t in inputs)
    if out.shape[0] != idx.shape[0]:
        raise ValueError(f"{op}: out has {out.shape[0]} patches but idx has {idx.shape[0]} rows")
    if channel_offset + channels > out.shape[1]:
        raise ValueError(f"{op}: channel_offset ({channel_offset}) plus the inputs' {channels} channels must fit "
                         f"in out's {out.shape[1]} channels")
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{op}: out must be channels-last contiguous, got strides {tuple(out.stride())}")
    b = resolve(backend, inputs[0].device, inputs[0].dtype)
    if b != "cpu":
        _check_idx_values(op, idx, (inputs[0].shape[0], -(-image_size[0] // stride), -(-image_size[1] // stride)))
    run_crop_into(b, inputs, idx, stride, padding, image_size, channel_offset, out)


def _check_patches(op, patches, channels, name_of_x, x):
    _check_tensor(op, "patches", patches, 4, "(P, C, s, s)")
    _check_like(op, "patches", patches, name_of_x, x)
    s = patches.shape[3]
    if patches.shape[1] != channels or patches.shape[2] != s or s == 0:
        raise ValueError(f"{op}: patches must have shape (P, {channels}, s, s) to match {name_of_x}, "
                         f"got {tuple(patches.shape)}")
    return s


def replace(x: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """A copy of x (B, C, H, W) with the s-by-s cell (y, x) of image b replaced
    by patch p (P, C, s, s) for each idx row (b, y, x) whose ``valid`` is
    true; of several patches for one cell, the last wins."""
    op = "replace"
    _check_tensor(op, "x", x, 4, "(B, C, H, W)")
    _check_dtype(op, "x", x)
    s = _check_patches(op, patches, x.shape[1], "x", x)
    if x.shape[2] % s or x.shape[3] % s:
        raise ValueError(f"{op}: x's height and width {tuple(x.shape[2:])} must be divisible by the patch size {s}")
    _check_idx(op, idx, x.device, patches.shape[0])
    _check_valid(op, valid, idx)
    b = resolve(backend, x.device, x.dtype)
    if b != "cpu":
        _check_idx_values(op, idx, (x.shape[0], x.shape[2] // s, x.shape[3] // s))
    return run_replace(b, x, patches, idx, valid)


def compose(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
            valid: Optional[torch.Tensor], size: Sequence[int], src: Optional[torch.Tensor] = None, *,
            backend: str = "auto") -> torch.Tensor:
    """The full-resolution output (B, C, H, W) in one pass: the bilinear
    upsample of ``coarse`` (B, C, Hc, Wc) to ``size``, with every cell that a
    valid patch names taken from that patch. With ``src`` (B, C-1, H, W),
    MattingRefine's epilogue: channel 0 clamped to [0, 1], the others
    clamp(value + src, 0, 1)."""
    op = "compose"
    size = _check_compose(op, coarse, patches, idx, valid, size, src)
    b = resolve(backend, coarse.device, coarse.dtype)
    if b != "cpu":
        _check_idx_values(op, idx, (coarse.shape[0], size[0] // patches.shape[3], size[1] // patches.shape[3]))
    return run_compose(b, coarse, patches, idx, valid, size, src)


def compose_into(coarse: torch.Tensor, patches: torch.Tensor, idx: torch.Tensor,
                 valid: Optional[torch.Tensor], src: Optional[torch.Tensor], out: torch.Tensor, *,
                 backend: str = "auto") -> None:
    """compose, written into ``out``: a contiguous (B, C, H, W) tensor of
    coarse's dtype and device, whose height and width are the output's
    size. Reusing one ``out`` across calls spares a fresh full-resolution
    allocation (and, on the CPU, its page faults) per call. Not
    differentiable (it writes in place)."""
    op = "compose_into"
    _check_tensor(op, "out", out, 4, "(B, C, H, W)")
    size = _check_compose(op, coarse, patches, idx, valid, tuple(out.shape[2:]), src)
    _check_like(op, "out", out, "coarse", coarse)
    if tuple(out.shape[:2]) != tuple(coarse.shape[:2]):
        raise ValueError(f"{op}: out must have coarse's batch size and channels "
                         f"({coarse.shape[0]}, {coarse.shape[1]}, H, W), got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous, got strides {tuple(out.stride())}")
    b = resolve(backend, coarse.device, coarse.dtype)
    if b != "cpu":
        _check_idx_values(op, idx, (coarse.shape[0], size[0] // patches.shape[3], size[1] // patches.shape[3]))
    run_compose_into(b, coarse, patches, idx, valid, src, out)


def _check_compose(op, coarse, patches, idx, valid, size, src):
    """The checks of compose and compose_into; returns size as a tuple."""
    _check_tensor(op, "coarse", coarse, 4, "(B, C, Hc, Wc)")
    _check_dtype(op, "coarse", coarse)
    if coarse.shape[2] == 0 or coarse.shape[3] == 0:
        raise ValueError(f"{op}: coarse must not be empty, got {tuple(coarse.shape)}")
    s = _check_patches(op, patches, coarse.shape[1], "coarse", coarse)
    size = tuple(size)
    _check_size(op, "size", size)
    if size[0] % s or size[1] % s:
        raise ValueError(f"{op}: size {size} must be divisible by the patch size {s}")
    _check_idx(op, idx, coarse.device, patches.shape[0])
    _check_valid(op, valid, idx)
    if src is not None:
        _check_tensor(op, "src", src, 4, "(B, C-1, H, W)")
        _check_like(op, "src", src, "coarse", coarse)
        want = (coarse.shape[0], coarse.shape[1] - 1) + size
        if coarse.shape[1] < 2 or tuple(src.shape) != want:
            raise ValueError(f"{op}: src must have shape {want} (coarse holds alpha then the foreground), "
                             f"got {tuple(src.shape)}")
    return size


# The ops without argument checks, on a resolved backend: one call from the
# caller to the dispatcher (or the reference). For callers that made their
# own checks and whose idx comes from a select op (Refiner): the reference's
# value check of idx would synchronise with the device. Scriptable: in
# TorchScript they call the C++ ops, whose kernels the dispatcher picks by
# device, and `backend` is ignored.

def _compiled(backend: str):
    """The op namespace of a compiled backend: the C++ schemas (whose CPU and
    CUDA kernels the dispatcher picks by device) or the Triton ops."""
    return torch.ops.pymatting_ext_triton if backend == "triton" else torch.ops.pymatting_ext


def run_select_sampling(backend: str, err: Tensor, k: int,
                        prevent_oversampling: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.select_sampling(err, k, prevent_oversampling)
    if backend == "reference":
        return reference.select_sampling(err, k, prevent_oversampling)
    return _compiled(backend).select_sampling(err, k, prevent_oversampling)


def run_select_thresholding(backend: str, err: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.select_thresholding(err, threshold)
    if backend == "reference":
        return reference.select_thresholding(err, threshold)
    return _compiled(backend).select_thresholding(err, threshold)


def run_crop(backend: str, inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
             patch_size: Optional[List[int]] = None) -> Tensor:
    size = [stride + 2 * padding, stride + 2 * padding] if patch_size is None else patch_size
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.crop(inputs, idx, stride, padding, image_size, size)
    if backend == "reference":
        return reference.crop(inputs, idx, stride, padding, tuple(image_size), tuple(size))
    return _compiled(backend).crop(list(inputs), idx, stride, padding, list(image_size), list(size))


def run_crop_into(backend: str, inputs: List[Tensor], idx: Tensor, stride: int, padding: int,
                  image_size: List[int], channel_offset: int, out: Tensor) -> None:
    """run_crop writing into channels [channel_offset, ...) of the channels-last
    out (P, C_out, ph, pw) instead of a new tensor."""
    if torch.jit.is_scripting():
        torch.ops.pymatting_ext.crop_into(inputs, idx, stride, padding, image_size, channel_offset, out)
    elif backend == "reference":
        reference.crop_into(inputs, idx, stride, padding, tuple(image_size), channel_offset, out)
    else:
        _compiled(backend).crop_into(list(inputs), idx, stride, padding, list(image_size), channel_offset, out)


def run_replace(backend: str, x: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor]) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.replace(x, patches, idx, valid)
    if backend == "reference":
        return reference.replace(x, patches, idx, valid)
    return _compiled(backend).replace(x, patches, idx, valid)


def run_compose(backend: str, coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor],
                size: List[int], src: Optional[Tensor] = None) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.compose(coarse, patches, idx, valid, size, src)
    if backend == "reference":
        return reference.compose(coarse, patches, idx, valid, tuple(size), src)
    return _compiled(backend).compose(coarse, patches, idx, valid, list(size), src)


def run_compose_into(backend: str, coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor],
                     src: Optional[Tensor], out: Tensor) -> None:
    """run_compose writing into the contiguous out (B, C, H, W) instead of a
    new tensor."""
    if torch.jit.is_scripting():
        torch.ops.pymatting_ext.compose_into(coarse, patches, idx, valid, src, out)
    elif backend == "reference":
        reference.compose_into(coarse, patches, idx, valid, src, out)
    else:
        _compiled(backend).compose_into(coarse, patches, idx, valid, src, out)
