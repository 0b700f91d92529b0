"""pymatting_ext.warmup: the Triton kernels compiled ahead of the first
frame, by running small Refiners of every mode (above the Refiner and the
kernels, so that neither imports the other's side)."""
from typing import Sequence

import torch

from .refiner import Refiner

__all__ = ["warmup"]


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
    # NB: here, not at the top: `import pymatting_ext` needs no Triton.
    from .triton_kernels import compiled, compiled_variants

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
