"""Helpers shared by the Triton kernels: the bilinear tap of PyTorch's
align_corners=False resize, and the launcher wrapper."""
import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

try:  # torch >= 2.6: lets torch.compile see inside the launch
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch
    _wrap_triton = None


class _Interpreted:
    """An interpreted kernel (TRITON_INTERPRET=1), which torch cannot trace:
    launched as is, and skipped while the op is traced with fake tensors
    (the outputs are already allocated; there is nothing to compute)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                return
            self.kernel[grid](*args, **kwargs)
        return launch


def wrap(kernel):
    """The kernel, launchable as ``wrap(kernel)[grid](...)``; wrapped for
    torch.compile where torch supports it."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        return _Interpreted(kernel)
    return _wrap_triton(kernel) if _wrap_triton is not None else kernel


def compiled() -> bool:
    """True if the kernels are compiled for the GPU, False under Triton's
    interpreter (TRITON_INTERPRET=1 when they were defined)."""
    return isinstance(_probe, triton.runtime.jit.JITFunction)


def known_empty(n) -> bool:
    """n == 0 for a size that may be symbolic while torch.compile traces:
    False where it cannot be known (the launch then covers zero programs)."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # pragma: no cover - older torch
        return n == 0
    return guard_or_false(n == 0)


def block_size(gpu: int, interpreted: int) -> int:
    """A kernel's elements per program: `gpu` when compiled; under the
    interpreter, whose cost is per program, the larger `interpreted`. The
    kernels mask every access, so any power of two computes the same."""
    return gpu if compiled() else interpreted


def linear_scale(in_size: int, out_size: int) -> float:
    """in/out as PyTorch computes it for a float32 resize: one correctly
    rounded float32 division (a float32 kernel argument carries it exactly)."""
    return float(np.float32(in_size) / np.float32(out_size))


@triton.jit
def _probe():
    pass


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """float32 v converted to `dtype`, rounding to nearest even.

    NB: for bfloat16 the rounding is done by hand: Triton's interpreter
    truncates float32 -> bfloat16, the GPU rounds to nearest; by hand both
    give PyTorch's result."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """v (float32) rounded to `dtype` and back, as PyTorch rounds the
    bilinear weights to the tensor's dtype."""
    return to_dtype(v, dtype).to(tl.float32)


@triton.jit
def linear_tap(dst, in_size, scale, dtype: tl.constexpr):
    """One axis of PyTorch's bilinear resize (align_corners=False) for output
    coordinates `dst` (int tensor): the two input indices and their weights,
    step for step as csrc/index_math.h's linear_tap (clamp the source
    coordinate at 0, floor, clamp the index, clamp and round the lambda)."""
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.floor(src).to(tl.int32)
    i0 = tl.minimum(i0, in_size - 1)
    lam = src - i0.to(tl.float32)
    lam = tl.minimum(tl.maximum(lam, 0.0), 1.0)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    return i0, i1, round_to(1.0 - lam, dtype), round_to(lam, dtype)


@triton.jit
def bilinear(plane, y, x, in_h, in_w, scale_h, scale_w, sh, sw, mask, dtype: tl.constexpr):
    """The bilinear resize (align_corners=False) of the (in_h, in_w) plane
    with strides (sh, sw), at output coordinates (y, x) (int32), in float32,
    in PyTorch's order: the width pass inside, the height pass outside
    (csrc/index_math.h's linear_mix)."""
    y0, y1, wy0, wy1 = linear_tap(y, in_h, scale_h, dtype)
    x0, x1, wx0, wx1 = linear_tap(x, in_w, scale_w, dtype)
    r0 = plane + y0.to(tl.int64) * sh
    r1 = plane + y1.to(tl.int64) * sh
    v00 = tl.load(r0 + x0.to(tl.int64) * sw, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(r0 + x1.to(tl.int64) * sw, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(r1 + x0.to(tl.int64) * sw, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(r1 + x1.to(tl.int64) * sw, mask=mask, other=0.0).to(tl.float32)
    return (v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1


@triton.jit
def clamp01(v):
    """clamp(v, 0, 1) that lets NaN through, as torch.clamp."""
    return tl.where(v < 0.0, 0.0, tl.where(v > 1.0, 1.0, v))


def check_dtype(op: str, name: str, t: torch.Tensor):
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: backend='triton' supports float32, float16 and bfloat16, but {name} is "
                         f"{t.dtype}; use backend 'cpu', 'cuda' or 'reference' for it")
