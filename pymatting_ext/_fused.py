"""The fused eval-mode sparse refiner as one op:
``torch.ops.pymatting_ext_fused.refine_sparse``.

Given the cells the select op chose, it writes the refiner's whole output
(B, 4, H, W) in two Triton launches (kernels/triton/fused.py): the fused
patch kernel (both crops sampled from the inputs, the four folded
convolutions, the refined 4x4 cell written into the output) and the coarse
pass (the bilinear upsample of cat(pha, fgr) into every other cell), with
MattingRefine's epilogue when asked. No patch tensor or intermediate
activation is written to memory, and nothing synchronises with the host, so
the eval sampling Refiner stays CUDA-graph capturable.

It is an opaque custom op with a fake kernel, so torch.compile sees one op
(and does not trace into the launches). It runs on CUDA tensors in float32,
float16 or bfloat16, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is first used), which is how CI tests
it. Eval mode only: it has no backward (training keeps the differentiable
path of the op set).

The Refiner calls ``refine_sparse(src, bgr, pha, fgr, hid, idx, valid,
self._folded(), self.kernel_size, epilogue)``.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import TRITON_DTYPES, load_triton, triton_interpreting
from ._checks import check_images, weight_shapes

__all__ = ["refine_sparse"]

_NS = "pymatting_ext_fused"
_OP = "refine_sparse"

#: The folded weights' names, in Refiner._folded()'s order.
_WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")


def _kernels():
    """kernels/triton/fused.py, imported on first use (Triton decides
    between compiling and interpreting when the kernels are defined)."""
    ok, why = load_triton()
    if not ok:
        raise RuntimeError(f"{_OP}: the fused refiner needs Triton: {why}")
    from .triton_kernels import fused
    return fused


def _check(src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, hid: Tensor, idx: Tensor,
           valid: Optional[Tensor], weights: Sequence[Tensor], kernel_size: int) -> None:
    """Shapes, dtypes and devices (never values: no synchronisation); a
    ValueError naming the argument."""
    op = _OP
    check_images(op, ["src", "bgr", "pha", "fgr", "hid"], [src, bgr, pha, fgr, hid])
    if src.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}: inputs must be float32, float16 or bfloat16, got {src.dtype}")
    if not isinstance(idx, Tensor):
        raise TypeError(f"{op}: idx must be a Tensor, got {type(idx).__name__}")
    if src.device.type != "cuda" and not (src.device.type == "cpu" and triton_interpreting()):
        raise ValueError(f"{op}: the fused refiner runs on CUDA tensors (CPU tensors only under Triton's "
                         f"interpreter, TRITON_INTERPRET=1), but src is on {src.device}")
    if idx.dim() != 2 or idx.shape[1] != 3 or idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be an int64 tensor of shape (P, 3), got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != src.device:
        raise ValueError(f"{op}: idx is on {idx.device} but src is on {src.device}")
    if valid is not None:
        if not isinstance(valid, Tensor):
            raise TypeError(f"{op}: valid must be a Tensor or None, got {type(valid).__name__}")
        if valid.dim() != 1 or valid.dtype != torch.bool or valid.shape[0] != idx.shape[0] \
                or valid.device != src.device:
            raise ValueError(f"{op}: valid must be a bool tensor of shape ({idx.shape[0]},) on {src.device}, "
                             f"got {valid.dtype} {tuple(valid.shape)} on {valid.device}")
    if isinstance(kernel_size, bool) or kernel_size not in (1, 3):
        raise ValueError(f"{op}: kernel_size must be 1 or 3, got {kernel_size!r}")
    if len(weights) != len(_WEIGHT_NAMES):
        raise ValueError(f"{op}: weights must be the 8 folded tensors [w1, b1, w2, b2, w3, b3, w4, b4] "
                         f"(Refiner._folded()), got {len(weights)}")
    for name, w, shape in zip(_WEIGHT_NAMES, weights, weight_shapes(kernel_size)):
        if not isinstance(w, Tensor):
            raise TypeError(f"{op}: weights[{name}] must be a Tensor, got {type(w).__name__}")
        if tuple(w.shape) != shape:
            raise ValueError(f"{op}: weights[{name}] must have shape {shape} for kernel_size {kernel_size}, "
                             f"got {tuple(w.shape)}")
        if w.dtype != src.dtype or w.device != src.device:
            raise ValueError(f"{op}: weights[{name}] must be {src.dtype} on {src.device} (the inputs' dtype and "
                             f"device), got {w.dtype} on {w.device}")


@torch.library.custom_op(f"{_NS}::{_OP}", mutates_args=())
def _refine_sparse_op(src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, hid: Tensor, idx: Tensor,
                      valid: Optional[Tensor], weights: List[Tensor], kernel_size: int, allow_tf32: bool,
                      epilogue: bool) -> Tensor:
    _check(src, bgr, pha, fgr, hid, idx, valid, weights, kernel_size)
    # NB: the kernel reads the weights as contiguous (C_out, C_in, k, k);
    # the folded ones are (a no-op then).
    return _kernels().refine_sparse(src, bgr, pha, fgr, hid, idx, valid, [w.contiguous() for w in weights],
                                    kernel_size, bool(allow_tf32), bool(epilogue))


@_refine_sparse_op.register_fake
def _refine_sparse_fake(src, bgr, pha, fgr, hid, idx, valid, weights, kernel_size, allow_tf32, epilogue):
    _check(src, bgr, pha, fgr, hid, idx, valid, weights, kernel_size)
    return src.new_empty((src.shape[0], 4, src.shape[2], src.shape[3]))


def refine_sparse(src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, hid: Tensor, idx: Tensor,
                  valid: Optional[Tensor], folded: Sequence[Tensor], kernel_size: int, epilogue: bool = False, *,
                  allow_tf32: Optional[bool] = None, check_indices: bool = False) -> Tensor:
    """The eval sparse refiner's output (B, 4, H, W) in src's dtype,
    contiguous: out[:, :1] is pha, out[:, 1:] fgr.

    - src, bgr (B, 3, H, W), H and W multiples of 4; pha (B, 1, Hc, Wc),
      fgr (B, 3, Hc, Wc), hid (B, 32, Hc, Wc); one device and dtype
      (float32, float16 or bfloat16).
    - idx (P, 3) int64 rows (b, y, x) of quarter-resolution cells (the
      select ops' output, any strides); valid (P,) bool or None (all
      valid): cells whose valid is False keep the coarse upsample. Rows out
      of range are skipped (never read or written past the tensors); with
      ``check_indices`` they raise a ValueError instead (that check
      synchronises).
    - folded: Refiner._folded(), [w1, b1, w2, b2, w3, b3, w4, b4] with
      BatchNorm folded in, in the inputs' dtype.
    - epilogue: MattingRefine's (pha clamped to [0, 1], fgr + src clamped).
    - allow_tf32: float32 convolutions in TF32 (None:
      torch.backends.cudnn.allow_tf32, as the convolutions replaced).

    Several valid rows naming one cell are fine (they write the same
    values). Never synchronises unless check_indices.
    """
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    if check_indices and isinstance(idx, Tensor) and isinstance(src, Tensor) and src.dim() == 4 \
            and idx.dim() == 2 and idx.shape[1] == 3 and idx.numel() > 0:
        upper = torch.tensor([src.shape[0], src.shape[2] // 4, src.shape[3] // 4], device=idx.device)
        bad = ((idx < 0) | (idx >= upper)).any(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{_OP}: idx row {row} = {tuple(idx[row].tolist())} is out of range for a grid of "
                             f"B={src.shape[0]}, H={src.shape[2] // 4}, W={src.shape[3] // 4} cells")
    return torch.ops.pymatting_ext_fused.refine_sparse(src, bgr, pha, fgr, hid, idx, valid, list(folded),
                                                       int(kernel_size), bool(allow_tf32), bool(epilogue))
