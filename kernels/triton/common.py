"""Helpers shared by the Triton kernels: how a kernel is launched (raw, or
through torch's wrap_triton while an op is traced), the compiler options
every launch pins (FP_FUSION), the device guard, and the bilinear tap of
PyTorch's align_corners=False resize."""
import contextlib
import functools

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

try:  # torch >= 2.6: lets torch.compile see inside the launch
    from torch.library import wrap_triton as _torch_wrap_triton
except ImportError:  # pragma: no cover - older torch
    _torch_wrap_triton = None

try:
    from torch._subclasses.functional_tensor import FunctionalTensor
    _TRACED = (FakeTensor, FunctionalTensor)
except ImportError:  # pragma: no cover - older torch
    _TRACED = (FakeTensor,)


def _traced(args) -> bool:
    """Whether the launch is being traced (a triton_op's body run on fake or
    functional tensors) rather than run: decided by the first tensor, as a
    launch's tensors are all one kind."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return isinstance(a, _TRACED)
    return False


#: Whether Triton may contract a multiply and an add into one fused
#: multiply-add (its `enable_fp_fusion` compile option, True by default) in
#: the kernels of crop, compose, replace and select: pinned False, passed by
#: their launchers. Unfused, a compiled kernel rounds every product and sum
#: as the interpreter does (numpy, no fusion), so the interpreter's
#: bit-for-bit tests in CI hold for the GPU code too; so do the CPU kernels
#: (AVX2 without FMA) and csrc/index_math.h's formulas. Fused, the source
#: coordinate scale * (dst + 0.5) - 0.5 and the bilinear mix would round
#: once instead of twice: weights an ulp apart, at an integer boundary a
#: different tap, and bits no CPU run can reproduce. The kernels are bound
#: by memory, so the few extra instructions cost nothing measurable.
FP_FUSION = False


@functools.lru_cache(maxsize=None)
def _torch_keeps_compile_options() -> bool:
    """Whether torch.compile passes a Triton compile option given at a
    launch (``kernel[grid](..., enable_fp_fusion=False)``) on to the
    compiler: torch's Inductor validates and keeps them since it has
    try_filter_backend_options_for_target; before, only num_warps and the
    like were kept."""
    try:
        from torch._inductor.runtime import triton_helpers
    except ImportError:  # pragma: no cover - torch without Inductor
        return False
    return hasattr(triton_helpers, "try_filter_backend_options_for_target")


class _Launch:
    __slots__ = ("kernel", "grid")

    def __init__(self, kernel, grid):
        self.kernel = kernel
        self.grid = grid

    def __call__(self, *args, **kwargs):
        if _traced(args):
            if not compiled():
                # The interpreter cannot be traced; the outputs are already
                # allocated, there is nothing to compute.
                return None
            if _torch_wrap_triton is not None:
                if not _torch_keeps_compile_options():
                    # NB: an older torch would drop or reject the option in
                    # the graph; its Inductor then compiles with Triton's
                    # default (TRITON_DEFAULT_FP_FUSION).
                    kwargs.pop("enable_fp_fusion", None)
                return _torch_wrap_triton(self.kernel)[self.grid](*args, **kwargs)
        # NB: straight to Triton, never through torch's traceable wrapper:
        # outside a trace that wrapper runs the kernel through a
        # higher-order op that costs ~190 us of Python and adds an entry to
        # torch's kernel side table that is never freed.
        return self.kernel[self.grid](*args, **kwargs)


class wrap_triton:  # noqa: N801 - named as torch.library.wrap_triton, see below
    """``wrap_triton(kernel)[grid](*args)``: launches `kernel`, through
    ``torch.library.wrap_triton`` while a triton_op is traced (fake or
    functional tensors) and directly otherwise.

    NB: called by this bare name, at the call site, with the kernel's global
    name as argument: torch finds the kernels of a triton_op by reading its
    source (and that of the functions it calls by bare name) for
    ``wrap_triton(<name>)`` calls, and hashes them into its compile cache
    keys, so an edited kernel invalidates cached graphs. (torch 2.14 does not
    recognise the spelling ``torch.library.wrap_triton(<name>)``.)
    """

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return _Launch(self.kernel, grid)


def device_guard(device: torch.device):
    """Makes `device` current while the kernels launch: Triton launches on the
    current device and its current stream, whatever the tensors' device. A
    no-op for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def round_weights(device: torch.device) -> bool:
    """Whether bilinear weights are rounded to the tensors' dtype: as
    PyTorch's upsample on that device does (its CPU kernel rounds them for
    float16/bfloat16, its CUDA kernel keeps them in float32)."""
    return device.type != "cuda"


def compiled() -> bool:
    """True if the kernels are compiled for the GPU, False under Triton's
    interpreter (TRITON_INTERPRET=1 when they were defined)."""
    return _COMPILED


def known_empty(n) -> bool:
    """n == 0 for a size that may be symbolic while torch.compile traces:
    False where it cannot be known (the launch then covers zero programs)."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # pragma: no cover - older torch
        return n == 0
    return guard_or_false(n == 0)


def maybe_int64(n) -> bool:
    """n >= 2^31 for a size that may be symbolic while torch.compile traces:
    True where it cannot be known (int64 arithmetic is right either way)."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_true
    except ImportError:  # pragma: no cover - older torch
        return n >= 2 ** 31
    return guard_or_true(n >= 2 ** 31)


def block_size(gpu: int, interpreted: int) -> int:
    """A kernel's elements per program: `gpu` when compiled; under the
    interpreter, whose cost is per program, the larger `interpreted`. The
    kernels mask every access, so any power of two computes the same."""
    return gpu if compiled() else interpreted


def linear_scale(in_size: int, out_size: int) -> float:
    """in/out as PyTorch computes it for a float32 resize: one correctly
    rounded float32 division (a float32 kernel argument carries it exactly).

    NB: on the host, so it needs concrete sizes (torch.compile specialises
    symbolic ones); crop and compose compute it in the kernel instead
    (resize_scale)."""
    return float(np.float32(in_size) / np.float32(out_size))


@triton.jit
def _probe():
    pass


_COMPILED = isinstance(_probe, triton.runtime.jit.JITFunction)


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
def resize_scale(in_size, out_size):
    """in/out of a bilinear resize as PyTorch computes it in float32
    (csrc/index_math.h's linear_scale, ATen's area_pixel_compute_scale):
    both sizes rounded to float32, then one correctly rounded division.

    NB: computed from the integer sizes in the kernel, so no launcher needs
    a concrete size to make a float (torch.compile would specialise on it).
    div_rn, not `/`: Triton compiles a float32 `/` to the approximate
    div.full.f32 (2 ulp)."""
    return tl.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))


@triton.jit
def linear_tap(dst, in_size, scale, dtype: tl.constexpr, ROUND: tl.constexpr):
    """One axis of PyTorch's bilinear resize (align_corners=False) for output
    coordinates `dst` (int32): the two input indices and their weights, step
    for step as csrc/index_math.h's linear_tap (clamp the source coordinate
    at 0, floor, clamp the index, clamp the lambda).

    NB: weights rounded as PyTorch's upsample on the same device rounds them:
    to `dtype` when ROUND (its CPU kernel), kept in float32 otherwise (its
    CUDA kernel)."""
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.floor(src).to(tl.int32)
    i0 = tl.minimum(i0, in_size - 1)
    lam = src - i0.to(tl.float32)
    lam = tl.minimum(tl.maximum(lam, 0.0), 1.0)
    # NB: an axis of unchanged size reads one tap (scale is exactly 1 then,
    # and only then), as PyTorch and csrc/index_math.h do: the other tap's
    # zero weight would turn a NaN or infinity there into NaN here.
    i1 = tl.where(scale == 1.0, i0, i0 + (i0 < in_size - 1).to(tl.int32))
    w0 = 1.0 - lam
    w1 = lam
    if ROUND:
        w0 = to_dtype(w0, dtype).to(tl.float32)
        w1 = to_dtype(w1, dtype).to(tl.float32)
    return i0, i1, w0, w1


@triton.jit
def linear_mix(v00, v01, v10, v11, wy0, wy1, wx0, wx1):
    """The bilinear combination in PyTorch's order: the width pass inside,
    the height pass outside (csrc/index_math.h's linear_mix)."""
    return (v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1


@triton.jit
def clamp01(v):
    """clamp(v, 0, 1) that lets NaN through, as torch.clamp."""
    return tl.where(v < 0.0, 0.0, tl.where(v > 1.0, 1.0, v))


def check_dtype(op: str, name: str, t: torch.Tensor):
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: backend='triton' supports float32, float16 and bfloat16, but {name} is "
                         f"{t.dtype}; use backend 'cpu', 'cuda' or 'reference' for it")
