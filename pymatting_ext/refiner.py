"""pymatting_ext.Refiner: a drop-in replacement for BackgroundMattingV2's
Refiner, built on the op set."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._backend import BACKENDS, resolve

__all__ = ["Refiner"]

_MODES = ("full", "sampling", "thresholding")
_CROP_METHODS = ("unfold", "roi_align", "gather")
_REPLACE_METHODS = ("scatter_nd", "scatter_element")


def _fold(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of conv followed by bn in eval mode, as one conv.
    Folded in float64 and rounded once to the weights' dtype."""
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if bn is not None:
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        b = (b - bn.running_mean.double()) * scale
        if bn.bias is not None:
            b = b + bn.bias.double()
        w = w * scale[:, None, None, None]
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


class Refiner(nn.Module):
    """Refines BackgroundMattingV2's coarse output to full resolution.

    Same arguments, defaults, parameter names and outputs as upstream's
    ``Refiner``; see DESIGN.md for the algorithm. ``patch_crop_method`` and
    ``patch_replace_method`` are accepted for compatibility: every choice
    gives the same (correct, also for batch > 1) result.

    ``backend`` chooses the implementation of the ops: 'auto', 'cpu', 'cuda',
    'triton' or 'reference' (see pymatting_ext._backend for what 'auto'
    picks, and the PYMATTING_EXT_BACKEND environment variable). Every
    backend is differentiable (crop, replace and compose have registered
    backward formulas), so training and gradients match upstream's.

    Input: src, bgr (B, 3, H, W) with H and W divisible by 4; pha (B, 1, Hc, Wc),
    fgr (B, 3, Hc, Wc), err (B, 1, Hc, Wc), hid (B, 32, Hc, Wc).
    Output: pha (B, 1, H, W), fgr (B, 3, H, W), ref (B, 1, H/4, W/4).
    """

    __constants__ = ["kernel_size", "patch_crop_method", "patch_replace_method"]

    def __init__(self, mode: str, sample_pixels: int, threshold: float, kernel_size: int = 3,
                 prevent_oversampling: bool = True, patch_crop_method: str = "unfold",
                 patch_replace_method: str = "scatter_nd", *, backend: str = "auto"):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"Refiner: mode must be one of {_MODES}, got {mode!r}")
        if kernel_size not in (1, 3):
            raise ValueError(f"Refiner: kernel_size must be 1 or 3, got {kernel_size!r}")
        if isinstance(sample_pixels, bool) or not isinstance(sample_pixels, int) or sample_pixels < 0:
            raise ValueError(f"Refiner: sample_pixels must be a non-negative int, got {sample_pixels!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"Refiner: threshold must be a float, got {threshold!r}")
        if patch_crop_method not in _CROP_METHODS:
            raise ValueError(f"Refiner: patch_crop_method must be one of {_CROP_METHODS}, got {patch_crop_method!r}")
        if patch_replace_method not in _REPLACE_METHODS:
            raise ValueError(f"Refiner: patch_replace_method must be one of {_REPLACE_METHODS}, "
                             f"got {patch_replace_method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"Refiner: backend must be one of {BACKENDS}, got {backend!r}")
        self.mode = mode
        self.sample_pixels = sample_pixels
        self.threshold = threshold
        self.kernel_size = kernel_size
        self.prevent_oversampling = prevent_oversampling
        self.patch_crop_method = patch_crop_method
        self.patch_replace_method = patch_replace_method
        self.backend = backend

        channels = [32, 24, 16, 12, 4]
        self.conv1 = nn.Conv2d(channels[0] + 6 + 4, channels[1], kernel_size, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[1])
        self.conv2 = nn.Conv2d(channels[1], channels[2], kernel_size, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[2])
        self.conv3 = nn.Conv2d(channels[2] + 6, channels[3], kernel_size, bias=False)
        self.bn3 = nn.BatchNorm2d(channels[3])
        self.conv4 = nn.Conv2d(channels[3], channels[4], kernel_size, bias=True)
        self.relu = nn.ReLU(True)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, sample_pixels={self.sample_pixels}, threshold={self.threshold}, "
                f"kernel_size={self.kernel_size}, prevent_oversampling={self.prevent_oversampling}, "
                f"backend={self.backend!r}")

    # -- checks ---------------------------------------------------------------

    def _check_inputs(self, src, bgr, pha, fgr, err, hid):
        named = (("src", src), ("bgr", bgr), ("pha", pha), ("fgr", fgr), ("err", err), ("hid", hid))
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Refiner: {name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"Refiner: {name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
        B, _, H, W = src.shape
        Hc, Wc = pha.shape[2:]
        expected = {"src": (B, 3, H, W), "bgr": (B, 3, H, W), "pha": (B, 1, Hc, Wc),
                    "fgr": (B, 3, Hc, Wc), "err": (B, 1, Hc, Wc), "hid": (B, 32, Hc, Wc)}
        for name, t in named:
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"Refiner: {name} must have shape {expected[name]} "
                                 f"(B, C, H, W from src, Hc, Wc from pha), got {tuple(t.shape)}")
        if H % 4 or W % 4 or H == 0 or W == 0:
            raise ValueError(f"Refiner: src's height and width must be positive multiples of 4, got {(H, W)}")
        if Hc == 0 or Wc == 0:
            raise ValueError(f"Refiner: the coarse inputs must not be empty, got pha of shape {tuple(pha.shape)}")
        for name, t in named:
            if t.device != src.device:
                raise ValueError(f"Refiner: {name} is on {t.device} but src is on {src.device}")
            if t.dtype != src.dtype:
                raise ValueError(f"Refiner: {name} has dtype {t.dtype} but src has {src.dtype}")
        if src.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise ValueError(f"Refiner: inputs must be float32, float64, float16 or bfloat16, got {src.dtype}")
        if self.mode not in _MODES:
            raise ValueError(f"Refiner: mode must be one of {_MODES}, got {self.mode!r}")
        if self.sample_pixels < 0:
            raise ValueError(f"Refiner: sample_pixels must be non-negative, got {self.sample_pixels}")

    # -- layers ---------------------------------------------------------------

    def _layers(self, fold: bool):
        """The two conv stages, with BatchNorm folded in (eval) or as
        modules (training: batch statistics and running-stat updates)."""
        if not fold:
            def stage1(x):
                x = self.relu(self.bn1(self.conv1(x)))
                return self.relu(self.bn2(self.conv2(x)))

            def stage2(x):
                return self.conv4(self.relu(self.bn3(self.conv3(x))))
            return stage1, stage2

        (w1, b1), (w2, b2), (w3, b3), (w4, b4) = (
            _fold(self.conv1, self.bn1), _fold(self.conv2, self.bn2),
            _fold(self.conv3, self.bn3), _fold(self.conv4, None))

        def stage1(x):
            x = F.conv2d(x, w1, b1).relu_()
            return F.conv2d(x, w2, b2).relu_()

        def stage2(x):
            x = F.conv2d(x, w3, b3).relu_()
            return F.conv2d(x, w4, b4)
        return stage1, stage2

    def _can_fold(self) -> bool:
        return not self.training and all(
            bn.running_mean is not None and bn.running_var is not None for bn in (self.bn1, self.bn2, self.bn3))

    # -- forward --------------------------------------------------------------

    def forward(self, src: torch.Tensor, bgr: torch.Tensor, pha: torch.Tensor, fgr: torch.Tensor,
                err: torch.Tensor, hid: torch.Tensor):
        return self._run(src, bgr, pha, fgr, err, hid, False)

    def forward_matting(self, src: torch.Tensor, bgr: torch.Tensor, pha: torch.Tensor, fgr: torch.Tensor,
                        err: torch.Tensor, hid: torch.Tensor):
        """forward followed by MattingRefine's epilogue, fused into compose:
        returns pha.clamp(0, 1), (fgr + src).clamp(0, 1) and ref, where fgr is
        the refined foreground residual."""
        return self._run(src, bgr, pha, fgr, err, hid, True)

    def _run(self, src: torch.Tensor, bgr: torch.Tensor, pha: torch.Tensor, fgr: torch.Tensor,
             err: torch.Tensor, hid: torch.Tensor, epilogue: bool):
        self._check_inputs(src, bgr, pha, fgr, err, hid)
        backend = resolve(self.backend, src.device, src.dtype)
        folded = self._can_fold()
        stage1, stage2 = self._layers(folded)
        B, _, H, W = src.shape
        k3 = self.kernel_size == 3
        p, q = (3, 2) if k3 else (0, 0)

        if self.mode == "full":
            whole = torch.zeros((B, 3), dtype=torch.long, device=src.device)
            whole[:, 0] = torch.arange(B, device=src.device)
            x = ops.run_crop(backend, [hid, pha, fgr, src, bgr], whole, 1, p, (H // 2, W // 2),
                             (H // 2 + 2 * p, W // 2 + 2 * p))
            x = F.interpolate(stage1(x), (H + 2 * q, W + 2 * q), mode="nearest")
            y = ops.run_crop(backend, [src, bgr], whole, 1, q, (H, W), (H + 2 * q, W + 2 * q))
            # Contiguous, so that pha and fgr are views with upstream's strides.
            out = stage2(torch.cat([x, y], 1)).contiguous()
            if epilogue:
                out = torch.cat([out[:, :1].clamp(0, 1), (out[:, 1:] + src).clamp(0, 1)], 1)
            ref = torch.ones((B, 1, H // 4, W // 4), dtype=src.dtype, device=src.device)
            return out[:, :1], out[:, 1:], ref

        err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
        valid: Optional[torch.Tensor] = None
        if self.mode == "sampling":
            k = min(self.sample_pixels // 16, (H // 4) * (W // 4))
            ref, idx, valid = ops.run_select_sampling(backend, err_q, k, bool(self.prevent_oversampling))
            if self.training:
                # BatchNorm's batch statistics must see the valid patches only,
                # as upstream's; this synchronises. (In eval mode the invalid
                # patches are skipped by compose, and get no gradient.)
                idx, valid = idx[valid], None
        else:
            ref, idx = ops.run_select_thresholding(backend, err_q, float(self.threshold))
        coarse = torch.cat([pha, fgr], 1)

        def patches(rows):
            x = ops.run_crop(backend, [hid, pha, fgr, src, bgr], rows, 2, p, (H // 2, W // 2))
            x = F.interpolate(stage1(x), 8 if k3 else 4, mode="nearest")
            y = ops.run_crop(backend, [src, bgr], rows, 4, q, (H, W))
            return stage2(torch.cat([x, y], 1))

        P = idx.shape[0]
        chunk = self._chunk_size(backend, folded)
        if self.training and P == 0:
            # As upstream: no patches, so BatchNorm sees no (empty) batch.
            x = coarse.new_empty((0, 4, 4, 4))
        elif chunk is None or P <= chunk:
            x = patches(idx)
        else:
            # NB: in eval mode every patch is computed independently, so the
            # CPU runs them in chunks whose intermediates stay in cache and in
            # the malloc heap, instead of ~100 MB of fresh pages per frame.
            x = torch.cat([patches(idx[i:i + chunk]) for i in range(0, P, chunk)])
        out = ops.run_compose(backend, coarse, x, idx, valid, (H, W), src if epilogue else None)
        return out[:, :1], out[:, 1:], ref

    #: Patches per chunk on the CPU in eval mode (see forward).
    cpu_chunk_patches = 512

    def _chunk_size(self, backend: str, folded: bool) -> Optional[int]:
        # Only the C++ CPU kernels gain: the reference resizes whole images
        # per call.
        if not folded or backend != "cpu" or torch.compiler.is_compiling():
            return None
        return self.cpu_chunk_patches
