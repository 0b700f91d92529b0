"""What the refiner is and what it accepts, in one place: its layer
channels, its settings and the checks of its input images, shared by
Refiner, the models (MattingBase, MattingRefine) and the fused op
(pymatting_ext._fused). A bad argument gets a TypeError or ValueError
naming it."""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._backend import BACKENDS

__all__ = ["CHANNELS", "LAYER_CHANNELS", "MODES", "CROP_METHODS", "REPLACE_METHODS", "weight_shapes",
           "check_images", "check_refiner_settings"]

#: Channels of the refiner's inputs, by name; src and bgr are at full
#: resolution, the others at the coarse one.
def channels_of(name: str) -> int:
    """CHANNELS[name], in a form TorchScript compiles."""
    if name == "hid":
        return 32
    return 1 if name == "pha" or name == "err" else 3


CHANNELS = {name: channels_of(name) for name in ("src", "bgr", "pha", "fgr", "err", "hid")}
#: Channels through the refiner (BackgroundMattingV2's): hid's 32, then the
#: outputs of conv1, conv2, conv3 and conv4. conv1 also takes pha, fgr, src
#: and bgr (4 + 6 channels), conv3 src and bgr at full resolution (6).
LAYER_CHANNELS = (32, 24, 16, 12, 4)

MODES = ("full", "sampling", "thresholding")
CROP_METHODS = ("unfold", "roi_align", "gather")
REPLACE_METHODS = ("scatter_nd", "scatter_element")


def weight_shapes(k: int) -> List[Tuple[int, ...]]:
    """Shapes of the folded [w1, b1, w2, b2, w3, b3, w4, b4] for kernel size
    k: 42 -> 24 -> 16, 16 + 6 -> 12 -> 4 channels."""
    c = LAYER_CHANNELS
    ins = (c[0] + 10, c[1], c[2] + 6, c[3])
    shapes: List[Tuple[int, ...]] = []
    for cin, cout in zip(ins, c[1:]):
        shapes += [(cout, cin, k, k), (cout,)]
    return shapes


def check_images(op: str, names: List[str], tensors: List[Tensor], multiple_of_4: bool = True,
                 allow_empty_batch: bool = True) -> None:
    """The images `names` (from CHANNELS, src first): 4-D, with their
    channels; bgr the shape of src, the coarse inputs (B, C, Hc, Wc) with B
    from src and Hc, Wc from pha; one device and one dtype, float32,
    float64, float16 or bfloat16; H and W of src positive (multiples of 4
    with `multiple_of_4`), and B too unless `allow_empty_batch`.
    Scriptable: the models check their input with it in TorchScript too."""
    if not torch.jit.is_scripting():
        for name, t in zip(names, tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in zip(names, tensors):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, C, H, W), got shape {list(t.shape)}")
        if (name == "src" or name == "bgr") and t.shape[1] != 3:
            raise ValueError(f"{op}: {name} must have 3 (RGB) channels, got shape {list(t.shape)}")
    src = tensors[0]
    coarse: Optional[Tensor] = None
    for name, t in zip(names, tensors):
        if name == "pha":
            coarse = t
    for name, t in zip(names, tensors):
        if name == "bgr" and t.shape != src.shape:
            raise ValueError(f"{op}: src and bgr must have the same shape, got {list(src.shape)} "
                             f"and {list(t.shape)}")
        if coarse is not None and name != "src" and name != "bgr":
            want = [src.shape[0], channels_of(name), coarse.shape[2], coarse.shape[3]]
            if list(t.shape) != want:
                raise ValueError(f"{op}: {name} must have shape {want} (B from src, Hc, Wc from pha), "
                                 f"got {list(t.shape)}")
    for name, t in zip(names, tensors):
        if t.device != src.device:
            raise ValueError(f"{op}: {name} is on {t.device} but src is on {src.device}; they must be on "
                             f"the same device")
        if t.dtype != src.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but src has {src.dtype}; they must have "
                             f"the same dtype")
    dtype = src.dtype
    if dtype != torch.float32 and dtype != torch.float64 and dtype != torch.float16 and dtype != torch.bfloat16:
        raise ValueError(f"{op}: the images must be floating-point tensors (float32, float64, float16 or "
                         f"bfloat16) with values in 0..1, got {dtype}")
    H, W = src.shape[2], src.shape[3]
    if H == 0 or W == 0 or (src.shape[0] == 0 and not allow_empty_batch):
        raise ValueError(f"{op}: the images must not be empty, got src of shape {list(src.shape)}")
    if multiple_of_4 and (H % 4 != 0 or W % 4 != 0):
        raise ValueError(f"{op}: src's height and width must be positive multiples of 4 (divisible by 4), "
                         f"got {H}x{W}")
    if coarse is not None and (coarse.shape[2] == 0 or coarse.shape[3] == 0):
        raise ValueError(f"{op}: the coarse inputs must not be empty, got pha of shape {list(coarse.shape)}")


def _choice(op: str, name: str, value, allowed: Sequence) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_refiner_settings(op: str, mode, sample_pixels, threshold, kernel_size, crop_method, replace_method,
                           backend, prefix: str = "") -> None:
    """Upstream's Refiner arguments and ours' backend; names as the caller
    spells them (MattingRefine: prefix 'refine_')."""
    _choice(op, prefix + "mode", mode, MODES)
    _choice(op, prefix + "kernel_size", kernel_size, (1, 3))
    if not _is_int(sample_pixels) or sample_pixels < 0:
        raise ValueError(f"{op}: {prefix}sample_pixels must be a non-negative int, got {sample_pixels!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{op}: {prefix}threshold must be a number, got {threshold!r}")
    _choice(op, prefix + "patch_crop_method", crop_method, CROP_METHODS)
    _choice(op, prefix + "patch_replace_method", replace_method, REPLACE_METHODS)
    _choice(op, "backend", backend, BACKENDS)


def check_refiner_options(op: str, max_patches, fused, merge_cells, reuse_output) -> None:
    """Our Refiner's own keyword options."""
    if max_patches is not None and (not _is_int(max_patches) or max_patches < 1):
        raise ValueError(f"{op}: max_patches must be a positive int or None, got {max_patches!r}")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"{op}: fused must be None, True or False, got {fused!r}")
    for name, value in (("merge_cells", merge_cells), ("reuse_output", reuse_output)):
        if not isinstance(value, bool):
            raise ValueError(f"{op}: {name} must be True or False, got {value!r}")
