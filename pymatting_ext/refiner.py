"""pymatting_ext.Refiner: a drop-in replacement for BackgroundMattingV2's
Refiner, built on the op set."""
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._backend import BACKENDS, resolve
from ._checks import check_images
from ._fused import refine_sparse
from ._tiles import plan_tiles, tile_cost

__all__ = ["Refiner"]

_MODES = ("full", "sampling", "thresholding")
_CROP_METHODS = ("unfold", "roi_align", "gather")
_REPLACE_METHODS = ("scatter_nd", "scatter_element")


def _fold(weight: Tensor, bias: Optional[Tensor], mean: Optional[Tensor], var: Optional[Tensor],
          gamma: Optional[Tensor], beta: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """Weights and bias of a conv followed by an eval-mode BatchNorm (mean and
    var None: no BatchNorm), as one conv. Folded in float64 and rounded once
    to the weights' dtype."""
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if mean is not None and var is not None:
        scale = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            scale = scale * gamma.double()
        b = (b - mean.double()) * scale
        if beta is not None:
            b = b + beta.double()
        w = w * scale[:, None, None, None]
    return w.to(weight.dtype), b.to(weight.dtype)


# The ops as the Refiner calls them: in TorchScript, the C++ ops through the
# dispatcher (a scripted Refiner needs the compiled extension, on CPU or CUDA);
# in Python, pymatting_ext.ops on the resolved backend.

@torch.jit.unused
def _resolve(backend: str, src: Tensor) -> str:
    return resolve(backend, src.device, src.dtype)


@torch.jit.unused
def _py_select_sampling(backend: str, err: Tensor, k: int, prevent: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return ops.run_select_sampling(backend, err, k, prevent)


@torch.jit.unused
def _py_select_thresholding(backend: str, err: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    return ops.run_select_thresholding(backend, err, threshold)


@torch.jit.unused
def _py_crop(backend: str, inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
             patch_size: List[int]) -> Tensor:
    return ops.run_crop(backend, inputs, idx, stride, padding, image_size, patch_size)


@torch.jit.unused
def _py_compose(backend: str, coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor],
                size: List[int], src: Optional[Tensor]) -> Tensor:
    return ops.run_compose(backend, coarse, patches, idx, valid, size, src)


@torch.jit.unused
def _py_compose_into(backend: str, coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor],
                     src: Optional[Tensor], out: Tensor) -> None:
    ops.run_compose_into(backend, coarse, patches, idx, valid, src, out)


@torch.jit.unused
def _py_refine_fused(src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, hid: Tensor, idx: Tensor,
                     valid: Optional[Tensor], folded: List[Tensor], kernel_size: int, epilogue: bool) -> Tensor:
    return refine_sparse(src, bgr, pha, fgr, hid, idx, valid, folded, kernel_size, epilogue)


@torch.jit.unused
def _promote_under_autocast(*tensors: Tensor) -> List[Tensor]:
    """Under autocast the coarse maps may come in a lower precision than src:
    the ops take one dtype, the widest. (Otherwise unchanged, and mixed
    dtypes are an error.)"""
    if not all(isinstance(t, Tensor) for t in tensors) or not torch.is_autocast_enabled(tensors[0].device.type):
        return list(tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


_free_cache = {}


@torch.jit.unused
def _free_memory(device: torch.device) -> int:
    """Free bytes on `device`: the driver's free memory plus what PyTorch's
    caching allocator holds unused (CUDA), or the memory the OS has
    available (CPU). Re-read at most every second (and never during CUDA
    graph capture, where the last reading serves)."""
    import time

    key = str(device)
    now = time.monotonic()
    cached = _free_cache.get(key)
    if cached is not None and (now - cached[0] < 1.0 or _capturing(device)):
        return cached[1]
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 8 << 30
    _free_cache[key] = (now, int(free))
    return int(free)


@torch.jit.unused
def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _select_sampling(backend: str, err: Tensor, k: int, prevent: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.select_sampling(err, k, prevent)
    return _py_select_sampling(backend, err, k, prevent)


def _select_thresholding(backend: str, err: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.select_thresholding(err, threshold)
    return _py_select_thresholding(backend, err, threshold)


def _crop(backend: str, inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
          patch_size: List[int]) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.crop(inputs, idx, stride, padding, image_size, patch_size)
    return _py_crop(backend, inputs, idx, stride, padding, image_size, patch_size)


@torch.jit.unused
def _py_crop_into(backend: str, inputs: List[Tensor], idx: Tensor, stride: int, padding: int,
                  image_size: List[int], channel_offset: int, out: Tensor) -> None:
    ops.run_crop_into(backend, inputs, idx, stride, padding, image_size, channel_offset, out)


def _crop_into(backend: str, inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
               channel_offset: int, out: Tensor) -> None:
    if torch.jit.is_scripting():
        torch.ops.pymatting_ext.crop_into(inputs, idx, stride, padding, image_size, channel_offset, out)
    else:
        _py_crop_into(backend, inputs, idx, stride, padding, image_size, channel_offset, out)


def _compose(backend: str, coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor],
             size: List[int], src: Optional[Tensor]) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.pymatting_ext.compose(coarse, patches, idx, valid, size, src)
    return _py_compose(backend, coarse, patches, idx, valid, size, src)


class Refiner(nn.Module):
    """Refines BackgroundMattingV2's coarse output to full resolution.

    Same arguments, defaults, parameter names and outputs as upstream's
    ``Refiner``; see docs/DESIGN.md for the algorithm. ``patch_crop_method`` and
    ``patch_replace_method`` are accepted for compatibility: every choice
    gives the same (correct, also for batch > 1) result.

    ``backend`` chooses the implementation of the ops: 'auto', 'cpu', 'cuda',
    'triton' or 'reference' (see pymatting_ext._backend for what 'auto'
    picks, and the PYMATTING_EXT_BACKEND environment variable). Every
    backend is differentiable (crop, replace and compose have registered
    backward formulas), so training and gradients match upstream's.

    ``max_patches`` (eval mode): patches per chunk, None for a default that
    bounds the memory (see _chunk_size). ``fused`` (eval mode, sparse modes,
    backend 'triton'): None runs the fused patch kernel (pymatting_ext._fused:
    crop, the four convolutions and the write of each refined cell in one
    kernel) wherever Triton compiles for a GPU, True also under Triton's
    interpreter, False never. ``merge_cells`` (eval mode, sparse modes, on
    the CPU with the 'cpu' or 'reference' backend, without autograd):
    neighbouring selected cells go through the convolutions together, as
    tiles of 2x2 to 8x8 cells, where a cost model says that computes less
    (pymatting_ext._tiles); the results are the same. False computes every
    cell alone, as on a GPU (where planning would wait on the device).

    ``reuse_output`` (default False; sparse modes, op set): write pha and fgr
    into one full-resolution buffer kept from the previous call of the same
    shape, dtype and device, instead of a new one each call. On the CPU a
    new 4K output is ~133 MB of fresh pages from the OS, and their page
    faults cost more than writing it; reused, they are paid once. The
    returned pha and fgr are then views of that buffer, overwritten by the
    next call: copy them (or finish with them) before calling again, and do
    not call one such Refiner from several threads at once. It applies only
    to inference without autograd (eval mode, or no input or parameter
    requiring grad under grad mode), in eager Python: training, autograd,
    TorchScript, torch.compile traces and CUDA graph captures get a new
    output every call, as without it.

    Input: src, bgr (B, 3, H, W) with H and W divisible by 4; pha (B, 1, Hc, Wc),
    fgr (B, 3, Hc, Wc), err (B, 1, Hc, Wc), hid (B, 32, Hc, Wc).
    Output: pha (B, 1, H, W), fgr (B, 3, H, W), ref (B, 1, H/4, W/4).
    """

    __constants__ = ["kernel_size", "patch_crop_method", "patch_replace_method"]

    def __init__(self, mode: str, sample_pixels: int, threshold: float, kernel_size: int = 3,
                 prevent_oversampling: bool = True, patch_crop_method: str = "unfold",
                 patch_replace_method: str = "scatter_nd", *, backend: str = "auto",
                 max_patches: Optional[int] = None, fused: Optional[bool] = None, merge_cells: bool = True,
                 reuse_output: bool = False):
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
        if max_patches is not None and (isinstance(max_patches, bool) or not isinstance(max_patches, int)
                                        or max_patches < 1):
            raise ValueError(f"Refiner: max_patches must be a positive int or None, got {max_patches!r}")
        self.mode = mode
        self.sample_pixels = sample_pixels
        self.threshold = threshold
        self.kernel_size = kernel_size
        self.prevent_oversampling = prevent_oversampling
        self.patch_crop_method = patch_crop_method
        self.patch_replace_method = patch_replace_method
        if fused not in (None, True, False):
            raise ValueError(f"Refiner: fused must be None, True or False, got {fused!r}")
        if not isinstance(merge_cells, bool):
            raise ValueError(f"Refiner: merge_cells must be True or False, got {merge_cells!r}")
        if not isinstance(reuse_output, bool):
            raise ValueError(f"Refiner: reuse_output must be True or False, got {reuse_output!r}")
        self.backend = backend
        self.max_patches = max_patches
        self.fused = fused
        self.merge_cells = merge_cells
        self.reuse_output = reuse_output

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

    @torch.jit.unused
    def _check_inputs(self, src, bgr, pha, fgr, err, hid):
        check_images("Refiner", (("src", src), ("bgr", bgr), ("pha", pha), ("fgr", fgr), ("err", err),
                                 ("hid", hid)), (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        if self.mode not in _MODES:
            raise ValueError(f"Refiner: mode must be one of {_MODES}, got {self.mode!r}")
        if self.sample_pixels < 0:
            raise ValueError(f"Refiner: sample_pixels must be non-negative, got {self.sample_pixels}")

    # -- layers ---------------------------------------------------------------

    # NB: not state: never saved, scripted or compared.
    __jit_ignored_attributes__ = ["_fold_cache", "_kept_output"]

    def _folded(self) -> List[Tensor]:
        """[w1, b1, ..., w4, b4]: the four convolutions with BatchNorm folded in
        (eval mode). Eager inference reuses the last fold while no parameter
        or buffer has changed (see _cached_fold)."""
        if not torch.jit.is_scripting():
            cached = self._cached_fold()
            if cached is not None:
                return cached
        return self._fold_now()

    @torch.jit.unused
    def _fold_sources(self) -> List[Tensor]:
        return [t for t in (self.conv1.weight, self.conv1.bias, self.bn1.running_mean, self.bn1.running_var,
                            self.bn1.weight, self.bn1.bias, self.conv2.weight, self.conv2.bias,
                            self.bn2.running_mean, self.bn2.running_var, self.bn2.weight, self.bn2.bias,
                            self.conv3.weight, self.conv3.bias, self.bn3.running_mean, self.bn3.running_var,
                            self.bn3.weight, self.bn3.bias, self.conv4.weight, self.conv4.bias)
                if t is not None]

    @torch.jit.unused
    def _cached_fold(self) -> Optional[List[Tensor]]:
        """The folded weights, computed once and reused while every source
        tensor is the same (storage, in-place version, dtype, device) and the
        eps are too; None where no cache applies: while torch.compile traces
        (it folds the constants itself), or where autograd must see the fold
        (grad enabled and a parameter requires grad).

        NB: refolding costs ~49 small launches per forward on a GPU, more
        than all the refiner's other launches together."""
        if torch.compiler.is_compiling():
            return None
        sources = self._fold_sources()
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return None
        try:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in sources)
        except RuntimeError:  # inference tensors carry no version counter
            return None
        key = key + ((self.bn1.eps, self.bn2.eps, self.bn3.eps),)
        cache = self.__dict__.get("_fold_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        # Plain tensors (not inference tensors, no autograd history), so the
        # cache serves inference_mode, no_grad and input-gradient calls alike.
        with torch.inference_mode(False), torch.no_grad():
            folded = self._fold_now()
        self.__dict__["_fold_cache"] = (key, folded)
        return folded

    def _fold_now(self) -> List[Tensor]:
        w1, b1 = _fold(self.conv1.weight, self.conv1.bias, self.bn1.running_mean, self.bn1.running_var,
                       self.bn1.weight, self.bn1.bias, self.bn1.eps)
        w2, b2 = _fold(self.conv2.weight, self.conv2.bias, self.bn2.running_mean, self.bn2.running_var,
                       self.bn2.weight, self.bn2.bias, self.bn2.eps)
        w3, b3 = _fold(self.conv3.weight, self.conv3.bias, self.bn3.running_mean, self.bn3.running_var,
                       self.bn3.weight, self.bn3.bias, self.bn3.eps)
        w4, b4 = _fold(self.conv4.weight, self.conv4.bias, None, None, None, None, 0.0)
        return [w1, b1, w2, b2, w3, b3, w4, b4]

    def _stage1(self, x: Tensor, folded: List[Tensor]) -> Tensor:
        """conv1, bn1, relu, conv2, bn2, relu: folded (eval) or as modules
        (training: batch statistics and running-stat updates)."""
        if len(folded) == 0:
            x = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(x)))
        x = F.conv2d(x, folded[0], folded[1]).relu_()
        return F.conv2d(x, folded[2], folded[3]).relu_()

    def _stage2(self, x: Tensor, folded: List[Tensor]) -> Tensor:
        """conv3, bn3, relu, conv4."""
        if len(folded) == 0:
            return self.conv4(self.relu(self.bn3(self.conv3(x))))
        x = F.conv2d(x, folded[4], folded[5]).relu_()
        return F.conv2d(x, folded[6], folded[7])

    def _can_fold(self) -> bool:
        return (not self.training and self.bn1.running_mean is not None and self.bn1.running_var is not None
                and self.bn2.running_mean is not None and self.bn2.running_var is not None
                and self.bn3.running_mean is not None and self.bn3.running_var is not None)

    # -- forward --------------------------------------------------------------

    def forward(self, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, err: Tensor,
                hid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self._run(src, bgr, pha, fgr, err, hid, False)

    @torch.jit.export
    def forward_matting(self, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, err: Tensor,
                        hid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """forward followed by MattingRefine's epilogue, fused into compose:
        returns pha.clamp(0, 1), (fgr + src).clamp(0, 1) and ref, where fgr is
        the refined foreground residual."""
        return self._run(src, bgr, pha, fgr, err, hid, True)

    def _patches(self, backend: str, idx: Tensor, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor,
                 hid: Tensor, folded: List[Tensor], tile: int = 1) -> Tensor:
        """The refined (P, 4, 4, 4) patches of the cells idx names; with
        tile > 1 (eval mode, see _merged_patches), idx names tiles of
        tile x tile cells of the cell grid, and the patches are
        (P, 4, 4 * tile, 4 * tile)."""
        H, W = src.shape[2], src.shape[3]
        k3 = self.kernel_size == 3
        p, q = (3, 2) if k3 else (0, 0)
        x = _crop(backend, [hid, pha, fgr, src, bgr], idx, 2 * tile, p, [H // 2, W // 2],
                  [2 * tile + 2 * p, 2 * tile + 2 * p])
        x = self._stage1(x, folded)
        side = 4 * tile + 2 * q
        if self._in_place_ok(folded, x, src, bgr):
            # conv3's input assembled in one buffer: the full-resolution crop
            # written into its last channels, the upsampled stage-1 output
            # into the first, instead of an upsample, a crop and a cat that
            # write and reread it all twice (~0.4 GB at 4K).
            c1 = x.shape[1]
            z = torch.empty([idx.shape[0], c1 + 6, side, side], dtype=x.dtype, device=x.device,
                            memory_format=torch.channels_last)
            _crop_into(backend, [src, bgr], idx, 4 * tile, q, [H, W], c1, z)
            r = side // x.shape[2]
            # NB: nearest upsample by an integer factor = each value repeated.
            z[:, :c1].view(z.shape[0], c1, x.shape[2], r, x.shape[3], r).copy_(
                x[:, :, :, None, :, None].expand(-1, -1, -1, r, -1, r))
            return self._stage2(z, folded)
        x = F.interpolate(x, size=side, mode="nearest")
        y = _crop(backend, [src, bgr], idx, 4 * tile, q, [H, W], [side, side])
        return self._stage2(torch.cat([x, y.to(x.dtype)], 1), folded)

    def _in_place_ok(self, folded: List[Tensor], x: Tensor, src: Tensor, bgr: Tensor) -> bool:
        """Whether _patches may assemble conv3's input in place: eval mode,
        the stage-1 output in the inputs' dtype (under autocast it may not
        be), and no autograd through the in-place writes."""
        if len(folded) == 0 or x.dtype != src.dtype:
            return False
        return not torch.is_grad_enabled() or not (x.requires_grad or src.requires_grad or bgr.requires_grad)

    def _run(self, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, err: Tensor, hid: Tensor,
             epilogue: bool) -> Tuple[Tensor, Tensor, Tensor]:
        # NB: written for TorchScript too. Scripted, the C++ ops check the
        # arguments and the dispatcher picks their CPU or CUDA kernels.
        backend = "scripted"
        if not torch.jit.is_scripting():
            src, bgr, pha, fgr, err, hid = _promote_under_autocast(src, bgr, pha, fgr, err, hid)
            self._check_inputs(src, bgr, pha, fgr, err, hid)
            backend = _resolve(self.backend, src)
        folded: List[Tensor] = self._folded() if self._can_fold() else []
        B, H, W = src.shape[0], src.shape[2], src.shape[3]
        k3 = self.kernel_size == 3
        p, q = (3, 2) if k3 else (0, 0)

        if self.mode == "full":
            whole = torch.zeros((B, 3), dtype=torch.long, device=src.device)
            whole[:, 0] = torch.arange(B, device=src.device)
            x = _crop(backend, [hid, pha, fgr, src, bgr], whole, 1, p, [H // 2, W // 2],
                      [H // 2 + 2 * p, W // 2 + 2 * p])
            x = F.interpolate(self._stage1(x, folded), size=[H + 2 * q, W + 2 * q], mode="nearest")
            y = _crop(backend, [src, bgr], whole, 1, q, [H, W], [H + 2 * q, W + 2 * q])
            # Contiguous, so that pha and fgr are views with upstream's strides.
            out = self._stage2(torch.cat([x, y.to(x.dtype)], 1), folded).to(src.dtype).contiguous()
            if epilogue:
                out = torch.cat([out[:, :1].clamp(0, 1), (out[:, 1:] + src).clamp(0, 1)], 1)
            ref = torch.ones((B, 1, H // 4, W // 4), dtype=src.dtype, device=src.device)
            return out[:, :1], out[:, 1:], ref

        err_q = F.interpolate(err, size=[H // 4, W // 4], mode="bilinear", align_corners=False)
        valid: Optional[Tensor] = None
        if self.mode == "sampling":
            # NB: the op takes at most every cell itself; a min() here would fix
            # the frame size under torch.export with dynamic sizes.
            k = self.sample_pixels // 16
            ref, idx, valid_all = _select_sampling(backend, err_q, k, bool(self.prevent_oversampling))
            if self.training:
                # BatchNorm's batch statistics must see the valid patches only,
                # as upstream's; this synchronises. (In eval mode the invalid
                # patches are skipped by compose, and get no gradient.)
                idx = idx[valid_all]
            else:
                valid = valid_all
        else:
            ref, idx = _select_thresholding(backend, err_q, float(self.threshold))
        if not torch.jit.is_scripting():
            if self._fused_ok(backend, folded, src, bgr, pha, fgr, hid):
                out = _py_refine_fused(src, bgr, pha, fgr, hid, idx, valid, folded, self.kernel_size, epilogue)
                return out[:, :1], out[:, 1:], ref
        coarse = torch.cat([pha, fgr], 1)

        P = idx.shape[0]
        chunk: Optional[int] = None
        if not torch.jit.is_scripting():
            chunk = self._chunk_size(backend, len(folded) > 0, src)
        if self.training and P == 0:
            # As upstream: no patches, so BatchNorm sees no (empty) batch.
            x = coarse.new_empty([0, 4, 4, 4])
        elif not torch.jit.is_scripting() and self._merge_ok(backend, folded, src, bgr, pha, fgr, hid):
            idx, x = self._merged_patches(backend, idx, valid, src, bgr, pha, fgr, hid, folded, chunk)
            valid = None
        elif chunk is None or P <= chunk:
            x = self._patches(backend, idx, src, bgr, pha, fgr, hid, folded)
        else:
            # NB: in eval mode every patch is computed independently, so they
            # run in chunks of bounded memory (see _chunk_size). P is known
            # on the host: no synchronisation.
            parts: List[Tensor] = []
            for i in range(0, P, chunk):
                parts.append(self._patches(backend, idx[i:i + chunk], src, bgr, pha, fgr, hid, folded))
            x = torch.cat(parts)
        # (Under autocast the convolutions may return a lower precision.)
        x = x.to(coarse.dtype)
        epilogue_src: Optional[Tensor] = src if epilogue else None
        if not torch.jit.is_scripting():
            kept = self._output_to_reuse(coarse, x, epilogue_src, H, W)
            if kept is not None:
                _py_compose_into(backend, coarse, x, idx, valid, epilogue_src, kept)
                return kept[:, :1], kept[:, 1:], ref
        out = _compose(backend, coarse, x, idx, valid, [H, W], epilogue_src)
        return out[:, :1], out[:, 1:], ref

    @torch.jit.unused
    def _output_to_reuse(self, coarse: Tensor, patches: Tensor, src: Optional[Tensor], H: int,
                         W: int) -> Optional[Tensor]:
        """With reuse_output, the (B, C, H, W) buffer that compose writes
        into: the previous call's where shape, dtype and device match, else
        a new one kept for the next call. None where a new output is due
        (see the class docstring): reuse off, autograd, a torch.compile
        trace, a CUDA graph capture."""
        if not getattr(self, "reuse_output", False) or torch.compiler.is_compiling() or _capturing(coarse.device):
            return None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (coarse, patches, src)):
            return None
        shape = (coarse.shape[0], coarse.shape[1], H, W)
        kept = self.__dict__.get("_kept_output")
        if kept is None or tuple(kept.shape) != shape or kept.dtype != coarse.dtype or kept.device != coarse.device:
            # NB: a plain tensor (not an inference tensor), so that calls in
            # and out of inference_mode can all write it.
            with torch.inference_mode(False):
                kept = torch.empty(shape, dtype=coarse.dtype, device=coarse.device)
            self.__dict__["_kept_output"] = kept
        return kept

    @torch.jit.unused
    def _fused_ok(self, backend: str, folded: List[Tensor], src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor,
                  hid: Tensor) -> bool:
        """Whether the sparse modes run the fused patch kernel
        (pymatting_ext._fused): eval mode (folded weights) without autograd,
        on the Triton backend; with fused=None only where Triton compiles
        for a GPU, with fused=True under its interpreter too (CI's way of
        testing it), never with fused=False."""
        fused = getattr(self, "fused", None)
        if fused is False or len(folded) == 0:
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in [src, bgr, pha, fgr, hid] + folded):
            if fused:
                raise ValueError("Refiner: fused=True runs without autograd (eval inference); call it under "
                                 "torch.no_grad() or torch.inference_mode(), or set fused=None")
            return False
        if backend != "triton":
            if fused:
                raise ValueError(f"Refiner: fused=True needs backend='triton', but the backend is {backend!r}")
            return False
        if folded[0].dtype != src.dtype:  # under autocast
            return False
        return bool(fused) or src.device.type == "cuda"

    @torch.jit.unused
    def _merge_ok(self, backend: str, folded: List[Tensor], src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor,
                  hid: Tensor) -> bool:
        """Whether the sparse modes may compute neighbouring cells together
        (merge_cells): eval mode without autograd, on the CPU, with the C++
        kernels or the reference, and not while torch.compile traces (the
        plan depends on the data). Never on a GPU: planning reads idx on the
        host, and eval sampling there never waits on the device."""
        if not getattr(self, "merge_cells", True) or len(folded) == 0 or torch.compiler.is_compiling():
            return False
        if src.device.type != "cpu" or backend not in ("cpu", "reference"):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in [src, bgr, pha, fgr, hid] + folded))

    #: Tile sides (in cells) that merge_cells may use, each dividing the next.
    merge_tile_sizes = (2, 4, 8)
    #: The least saving, in single cells' cost, for which a tile side gets a
    #: pass of its own (a pass costs a crop and four convolution calls).
    merge_min_saving_cells = 32
    #: The least fraction of the cost a tile must save to be taken: the cost
    #: model is good to about that (a pair of cells in a 2 x 2 tile, 2.5% by
    #: the model, measured a loss).
    merge_min_gain = 0.1

    @torch.jit.unused
    def _merge_costs(self, folded: List[Tensor]) -> Dict[int, float]:
        """{tile side: cost} for plan_tiles; 1 is a single cell."""
        return {t: float(tile_cost(folded, self.kernel_size, t)) for t in (1,) + tuple(self.merge_tile_sizes)}

    @torch.jit.unused
    def _merged_patches(self, backend: str, idx: Tensor, valid: Optional[Tensor], src: Tensor, bgr: Tensor,
                        pha: Tensor, fgr: Tensor, hid: Tensor, folded: List[Tensor],
                        chunk: Optional[int]) -> Tuple[Tensor, Tensor]:
        """The refined patches of the valid cells of idx, with tiles of
        neighbouring cells computed together where plan_tiles finds that
        cheaper. Returns (idx', patches): those cells in an order of its own
        (each cell once, so compose does not mind the order)."""
        if valid is not None:
            idx = idx[valid]
        B, H, W = src.shape[0], src.shape[2], src.shape[3]
        costs = self._merge_costs(folded)
        single, tiles = plan_tiles(idx, B, H // 4, W // 4, costs, self.merge_tile_sizes,
                                   self.merge_min_saving_cells * costs[1], self.merge_min_gain)
        rows: List[Tensor] = []
        parts: List[Tensor] = []
        if single.shape[0] > 0:
            cells = idx if single.shape[0] == idx.shape[0] else idx[single]
            rows.append(cells)
            step = cells.shape[0] if chunk is None else chunk
            for i in range(0, cells.shape[0], step):
                parts.append(self._patches(backend, cells[i:i + step], src, bgr, pha, fgr, hid, folded))
        for T, tile_idx, in_tiles, where in tiles:
            # The cells by tile, so that each chunk of tiles gives the next run.
            where, order = torch.sort(where, stable=True)
            cells = idx[in_tiles[order]]
            rows.append(cells)
            ly, lx = cells[:, 1] % T, cells[:, 2] % T
            # NB: conv3's input, the largest intermediate, sets a tile's memory
            # against a cell's (8 x 8 a cell at kernel_size 3; a tile of 8 x 8
            # cells ~20 cells, not 64), and so the tiles a chunk.
            q = 2 if self.kernel_size == 3 else 0
            per_tile = -(-(4 * T + 2 * q) ** 2 // (4 + 2 * q) ** 2)
            step = tile_idx.shape[0] if chunk is None else max(1, chunk // per_tile)
            bounds = torch.searchsorted(where, torch.arange(0, tile_idx.shape[0] + step, step)).tolist()
            for j, i in enumerate(range(0, tile_idx.shape[0], step)):
                out = self._patches(backend, tile_idx[i:i + step], src, bgr, pha, fgr, hid, folded, T)
                n, C = out.shape[0], out.shape[1]
                # (n, C, 4T, 4T) as (n, T, 4, T, 4, C): each cell's 4 x 4 block.
                blocks = out.permute(0, 2, 3, 1).reshape(n, T, 4, T, 4, C)
                r = slice(bounds[j], bounds[j + 1])
                parts.append(blocks[where[r] - i, ly[r], :, lx[r]].permute(0, 3, 1, 2))  # (R, C, 4, 4)
        if not parts:
            return idx, src.new_empty([0, 4, 4, 4])
        return torch.cat(rows), torch.cat(parts)

    #: Patches per chunk on the CPU in eval mode (see forward). NB: measured
    #: on 2 cores (AMD EPYC) with uniform random err, 1536 beat 512 by 8%
    #: at HD and 20% at 4K (fewer calls, each with its serial part), and tied
    #: with boundary err. A chunk's crop (16.5 MB at kernel_size 3) is
    #: streamed to memory by the crop kernel (see crop_kernel.cpp).
    cpu_chunk_patches = 1536
    #: The most memory the patches of one chunk may take by default (bytes):
    #: a quarter of the free device memory, at most this.
    chunk_budget_bytes = 1 << 30
    #: Elements of intermediates per patch, all stages together (crop 42x8x8,
    #: conv1 24x6x6, conv2, conv3's input 22x8x8 and output, the result),
    #: rounded up for allocator slack: the estimate behind the default chunk.
    _elements_per_patch = 8192

    @torch.jit.unused
    def _chunk_size(self, backend: str, folded: bool, like: Optional[Tensor] = None) -> Optional[int]:
        """Patches per chunk in eval mode, or None for one chunk.

        max_patches when set; else on the C++ CPU kernels cpu_chunk_patches
        (the intermediates then stay in cache and in malloc's heap instead of
        ~100 MB of fresh pages a frame); else as many patches as fit in
        chunk_budget_bytes or a quarter of the free memory of `like`'s device,
        whichever is less. Training is never chunked: BatchNorm's batch
        statistics need every patch at once. Neither is a torch.compile trace
        (the patch count may be symbolic) unless max_patches asks for it."""
        if not folded:
            return None
        if self.max_patches is not None:
            return self.max_patches
        if torch.compiler.is_compiling():
            return None
        if backend == "cpu":
            return self.cpu_chunk_patches
        budget = self.chunk_budget_bytes
        if like is not None:
            budget = min(budget, _free_memory(like.device) // 4)
            per_patch = self._elements_per_patch * like.element_size()
            return max(256, budget // per_patch)
        return None
