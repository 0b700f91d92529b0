"""Compiling the kernels ahead of the first frame, and counting what was
compiled."""
import sys
from typing import Sequence

import torch

from .common import compiled


def _kernels():
    """Every launched @triton.jit kernel (named *_kernel) of the package's
    loaded modules, by name."""
    import triton

    found = {}
    prefix = f"{__package__}."
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(prefix) or module is None:
            continue
        name = module_name[len(prefix):]
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction):
                found[f"{name}.{attr}"] = value
    return found


def compiled_variants() -> dict:
    """{kernel name: number of compiled variants (all devices)}; empty under
    the interpreter, which compiles nothing."""
    counts = {}
    for name, kernel in _kernels().items():
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:  # Triton >= 3.0: device -> (kernel cache, ...)
            counts[name] = sum(len(entry[0]) for entry in caches.values())
        else:  # pragma: no cover - older Triton
            counts[name] = sum(len(c) for c in getattr(kernel, "cache", {}).values())
    return counts


def warmup(device="cuda", dtype: torch.dtype = torch.float32, *,
           modes: Sequence[str] = ("sampling", "thresholding", "full"), backbone_scale: float = 0.25,
           epilogue: bool = True, allow_tf32: Sequence[bool] = (True, False)) -> dict:
    """Compiles the Triton kernels that ``pymatting_ext.Refiner(...,
    backend='triton')`` launches for `dtype` on `device`, by running a small
    Refiner of each mode (both kernel sizes, with and without
    prevent_oversampling; with ``epilogue``, also MattingRefine's fused
    epilogue) on a 64x96 frame whose coarse inputs are `backbone_scale` of
    its size, as MattingRefine's are. float32 runs under each setting of
    torch.backends.cudnn.allow_tf32 in `allow_tf32` (restored afterwards):
    the fused kernel compiles a variant for each (TF32 or IEEE dots; the
    tests turn TF32 off, PyTorch's default is on).

    The kernels take sizes as unspecialised arguments, so what compiles here
    serves every frame size (Triton also caches it on disk for the next
    process). Returns compiled_variants() afterwards. Under the interpreter
    it runs the same calls and compiles nothing.
    """
    from pymatting_ext import Refiner  # the package imports this module first

    device = torch.device(device)
    H, W = 64, 96
    Hc, Wc = int(H * backbone_scale), int(W * backbone_scale)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=g).to(device, dtype)

    src, bgr = rand(1, 3, H, W), rand(1, 3, H, W)
    pha, fgr, err, hid = rand(1, 1, Hc, Wc), rand(1, 3, Hc, Wc), rand(1, 1, Hc, Wc), rand(1, 32, Hc, Wc)
    saved = torch.backends.cudnn.allow_tf32
    try:
        with torch.no_grad():
            for tf32 in (allow_tf32 if dtype == torch.float32 else (saved,)):
                torch.backends.cudnn.allow_tf32 = bool(tf32)
                for mode in modes:
                    for kernel_size in (3, 1):
                        for prevent in (True, False):
                            refiner = Refiner(mode, 16 * 40, 0.5, kernel_size, prevent, backend="triton")
                            refiner = refiner.to(device, dtype).eval()
                            refiner(src, bgr, pha, fgr, err, hid)
                            if epilogue:
                                refiner.forward_matting(src, bgr, pha, fgr, err, hid)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return compiled_variants() if compiled() else {}
