"""The checks of the refiner's input images, shared by Refiner and the
fused op (pymatting_ext._fused)."""
import torch

__all__ = ["CHANNELS", "check_images"]

#: Channels of the refiner's inputs, by name; src and bgr are at full
#: resolution, the others at the coarse one.
CHANNELS = {"src": 3, "bgr": 3, "pha": 1, "fgr": 3, "err": 1, "hid": 32}


@torch.jit.unused
def check_images(op: str, named, dtypes) -> None:
    """The refiner's input images, given as (name, tensor) pairs starting
    with src (names from CHANNELS): 4-D, the shapes that src (B, H, W) and
    pha (Hc, Wc) imply, H and W positive multiples of 4, not empty, one
    device and one dtype among `dtypes`. A TypeError or ValueError naming
    the argument. Shared by Refiner and the fused op."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    tensors = dict(named)
    src, pha = tensors["src"], tensors["pha"]
    B, _, H, W = src.shape
    Hc, Wc = pha.shape[2:]
    for name, t in named:
        size = (H, W) if name in ("src", "bgr") else (Hc, Wc)
        expected = (B, CHANNELS[name]) + tuple(size)
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected} "
                             f"(B, C, H, W from src, Hc, Wc from pha), got {tuple(t.shape)}")
    if H % 4 or W % 4 or H == 0 or W == 0:
        raise ValueError(f"{op}: src's height and width must be positive multiples of 4, got {(H, W)}")
    if Hc == 0 or Wc == 0:
        raise ValueError(f"{op}: the coarse inputs must not be empty, got pha of shape {tuple(pha.shape)}")
    for name, t in named:
        if t.device != src.device:
            raise ValueError(f"{op}: {name} is on {t.device} but src is on {src.device}")
        if t.dtype != src.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but src has {src.dtype}")
    if src.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        raise ValueError(f"{op}: inputs must be {', '.join(names[:-1])} or {names[-1]}, got {src.dtype}")
