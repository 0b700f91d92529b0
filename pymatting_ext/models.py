"""Whole-model drop-ins for BackgroundMattingV2: ``MattingBase`` and
``MattingRefine`` with upstream's arguments, submodule names (so its
checkpoints load unchanged, and ours load into upstream) and outputs, whose
refinement runs on pymatting_ext's :class:`Refiner`; and :func:`accelerate`,
which converts an existing upstream model in place.

    import pymatting_ext as pm
    model = pm.MattingRefine('resnet50', refine_mode='sampling').eval()
    model.load_state_dict(torch.load('pytorch_resnet50.pth'))

    # or, for a model built with upstream's classes:
    model = pm.accelerate(upstream_model)
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import BACKENDS
from ._checks import check_images, check_refiner_settings
from ._coarse import coarse_plan
from .refiner import Refiner

__all__ = ["Base", "MattingBase", "MattingRefine", "accelerate", "BACKBONES"]

#: Names accepted by ``backbone=``.
BACKBONES = ("resnet50", "resnet101", "mobilenetv2")


# -- encoders and decoder ------------------------------------------------------

class ResNetEncoder(nn.Module):
    """torchvision's ResNet-50/101 as a feature extractor: ``in_channels``
    input channels, the last stage dilated instead of strided (output stride
    16), no pooling or classifier.

    Returns the features at strides 16, 8, 4 and 2 and the input itself,
    coarsest first, as :class:`Decoder` takes them.
    """

    def __init__(self, in_channels: int, variant: str):
        super().__init__()
        # NB: torchvision is imported where a model is built, so that the
        # package imports without it.
        from torchvision.models import resnet50, resnet101

        build = {"resnet50": resnet50, "resnet101": resnet101}[variant]
        net = build(weights=None, replace_stride_with_dilation=[False, False, True])
        # NB: the children are registered in torchvision's order, so that
        # state_dict() lists its keys in the same order as upstream's.
        self.conv1 = net.conv1 if in_channels == 3 else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        s2 = self.relu(self.bn1(self.conv1(x)))
        s4 = self.layer1(self.maxpool(s2))
        s8 = self.layer2(s4)
        s16 = self.layer4(self.layer3(s8))
        return s16, s8, s4, s2, x


class MobileNetV2Encoder(nn.Module):
    """torchvision's MobileNetV2 as a feature extractor: ``in_channels``
    input channels, the last three blocks dilated and block 14 unstrided
    (output stride 16), without the final 1x1 convolution and classifier.
    Same outputs as :class:`ResNetEncoder`."""

    def __init__(self, in_channels: int):
        super().__init__()
        from torchvision.models import mobilenet_v2

        features = mobilenet_v2(weights=None).features[:-1]
        if in_channels != 3:
            features[0][0] = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        # conv[1][0] is each inverted-residual block's depthwise convolution.
        features[14].conv[1][0].stride = (1, 1)
        for block in features[15:]:
            depthwise = block.conv[1][0]
            depthwise.dilation = (2, 2)
            depthwise.padding = (2, 2)
        self.features = features

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        skips: List[Tensor] = [x]
        for i, block in enumerate(self.features):
            x = block(x)
            # After blocks 1, 3 and 6 the resolution is 1/2, 1/4 and 1/8.
            if i == 1 or i == 3 or i == 6:
                skips.append(x)
        return x, skips[3], skips[2], skips[1], skips[0]


def _upsample_concat(x: Tensor, skip: Tensor) -> Tensor:
    """x resized bilinearly to skip's resolution, then skip's channels appended."""
    x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
    return torch.cat([x, skip], dim=1)


class Decoder(nn.Module):
    """Four upsample-concatenate-convolve steps from stride 16 back to the
    input resolution. ``channels``: the input's channels, then each conv's
    output channels; ``feature_channels``: the skip features' channels, from
    stride 8 down to the input."""

    def __init__(self, channels: List[int], feature_channels: List[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(channels[0] + feature_channels[0], channels[1], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[1])
        self.conv2 = nn.Conv2d(channels[1] + feature_channels[1], channels[2], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[2])
        self.conv3 = nn.Conv2d(channels[2] + feature_channels[2], channels[3], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels[3])
        self.conv4 = nn.Conv2d(channels[3] + feature_channels[3], channels[4], 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, s8: Tensor, s4: Tensor, s2: Tensor, s1: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(_upsample_concat(x, s8))))
        x = self.relu(self.bn2(self.conv2(_upsample_concat(x, s4))))
        x = self.relu(self.bn3(self.conv3(_upsample_concat(x, s2))))
        return self.conv4(_upsample_concat(x, s1))


# -- models ------------------------------------------------------------------

class Base(nn.Module):
    """Encoder (ResNet or MobileNetV2) -> ASPP -> decoder, DeepLabV3+ style,
    with any number of input and output channels; upstream's ``Base``.

    Args:
        backbone: one of 'resnet50', 'resnet101', 'mobilenetv2'.
        in_channels, out_channels: channels of the input and the output.
    """

    def __init__(self, backbone: str, in_channels: int, out_channels: int):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"{type(self).__name__}: backbone must be one of {BACKBONES}, got {backbone!r}")
        from torchvision.models.segmentation.deeplabv3 import ASPP

        if backbone == "mobilenetv2":
            self.backbone = MobileNetV2Encoder(in_channels)
            self.aspp = ASPP(320, [3, 6, 9])
            skip_channels = [32, 24, 16, in_channels]
        else:
            self.backbone = ResNetEncoder(in_channels, backbone)
            self.aspp = ASPP(2048, [3, 6, 9])
            skip_channels = [512, 256, 64, in_channels]
        self.decoder = Decoder([256, 128, 64, 48, out_channels], skip_channels)

    def forward(self, x: Tensor) -> Tensor:
        s16, s8, s4, s2, s1 = self.backbone(x)
        return self.decoder(self.aspp(s16), s8, s4, s2, s1)

    def load_pretrained_deeplabv3_state_dict(self, state_dict, print_stats: bool = True):
        """Loads the weights of a DeepLabV3+ checkpoint from
        https://github.com/VainF/DeepLabV3Plus-Pytorch where names and shapes
        match ours (the ASPP and backbone; not the first conv, whose input
        channels differ), and leaves the rest as it is. For training from
        DeepLab weights only; use load_state_dict() for matting checkpoints."""
        renamed = {}
        for key, value in state_dict.items():
            key = key.replace("classifier.classifier.0", "aspp")
            # DeepLab's MobileNetV2 splits our backbone.features in two at
            # block 4; both halves keep the blocks' original indices.
            for part in ("backbone.low_level_features.", "backbone.high_level_features."):
                if key.startswith(part):
                    key = "backbone.features." + key[len(part):]
            renamed[key] = value
        current = self.state_dict()
        matched = {k: v for k, v in renamed.items() if k in current and current[k].shape == v.shape}
        current.update(matched)
        self.load_state_dict(current)
        if print_stats:
            print(f"Loaded state_dict: {len(matched)}/{len(current)} matched")


class MattingBase(Base):
    """The coarse matting network; upstream's ``MattingBase``.

    Args:
        backbone: one of 'resnet50', 'resnet101', 'mobilenetv2'.

    Input: src, bgr (B, 3, H, W), RGB in 0..1, the same shape, device and dtype.
    Output: pha (B, 1, H, W) alpha in 0..1; fgr (B, 3, H, W) foreground in
    0..1; err (B, 1, H, W) predicted error in 0..1; hid (B, 32, H, W) the
    hidden features the refiner takes.
    """

    def __init__(self, backbone: str):
        super().__init__(backbone, in_channels=6, out_channels=1 + 3 + 1 + 32)

    @torch.jit.unused
    def _check_against_model(self, who: str, src: Tensor) -> None:
        """The images on the model's device, in its dtype (under autocast the
        convolutions cast for themselves)."""
        param = next(self.parameters(), None)
        if param is None:
            return
        if src.device != param.device:
            raise ValueError(f"{who}: src and bgr are on {src.device} but the model is on {param.device}; "
                             f"move one of them (model.to({str(src.device)!r}) or src.to({str(param.device)!r}))")
        if src.dtype != param.dtype and not torch.is_autocast_enabled(src.device.type):
            raise ValueError(f"{who}: src and bgr are {src.dtype} but the model's parameters are "
                             f"{param.dtype}; convert the images (src.to({param.dtype})) or the model "
                             f"(model.to({src.dtype})), or run under torch.autocast")

    def _coarse_net(self, x: Tensor) -> Tensor:
        """backbone -> ASPP -> decoder; in eval inference on the CPU as a plan
        of fused oneDNN convolutions (pymatting_ext._coarse), else the modules."""
        if not torch.jit.is_scripting():
            plan = coarse_plan(self, x)
            if plan is not None:
                return plan(x)
        s16, s8, s4, s2, s1 = self.backbone(x)
        return self.decoder(self.aspp(s16), s8, s4, s2, s1)

    def _coarse(self, src: Tensor, bgr: Tensor,
                any_hid_layout: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """pha, the foreground residual (not yet added to src), err and hid,
        as views of one decoder output, activated in place as upstream does.
        With any_hid_layout (for the refiner, never returned), hid may be a
        channels-last view, and the others views of an NCHW copy."""
        x = torch.cat([src, bgr], dim=1)
        if not torch.jit.is_scripting():
            if any_hid_layout:
                plan = coarse_plan(self, x)
                if plan is not None:
                    head, hid = plan.head_and_hidden(x, 5)
                    pha = head[:, 0:1].clamp_(0.0, 1.0)
                    err = head[:, 4:5].clamp_(0.0, 1.0)
                    return pha, head[:, 1:4], err, hid.relu_()
        x = self._coarse_net(x)
        pha = x[:, 0:1].clamp_(0.0, 1.0)
        err = x[:, 4:5].clamp_(0.0, 1.0)
        hid = x[:, 5:].relu_()
        return pha, x[:, 1:4], err, hid

    def forward(self, src: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        check_images("MattingBase", ["src", "bgr"], [src, bgr], False, False)
        if not torch.jit.is_scripting():
            self._check_against_model("MattingBase", src)
        pha, fgr_residual, err, hid = self._coarse(src, bgr)
        fgr = (fgr_residual + src).clamp_(0.0, 1.0)
        return pha, fgr, err, hid


class MattingRefine(MattingBase):
    """The coarse network on a downsampled input, then pymatting_ext's
    :class:`Refiner` to full resolution; upstream's ``MattingRefine``.

    Args (upstream's, with its defaults):
        backbone: one of 'resnet50', 'resnet101', 'mobilenetv2'.
        backbone_scale: the input's downsampling factor for the coarse
            network, in (0, 1/2].
        refine_mode: 'sampling' (refine the ``refine_sample_pixels`` pixels of
            largest predicted error), 'thresholding' (refine where the error
            exceeds ``refine_threshold``) or 'full' (refine everywhere).
        refine_sample_pixels, refine_threshold, refine_kernel_size (1 or 3),
        refine_prevent_oversampling, refine_patch_crop_method,
        refine_patch_replace_method: the :class:`Refiner`'s arguments.
        backend (keyword only): the Refiner's ``backend``.

    Input: src, bgr (B, 3, H, W), RGB in 0..1, H and W divisible by 4.
    Output: pha (B, 1, H, W), fgr (B, 3, H, W), pha_sm, fgr_sm, err_sm
    (B, 1|3|1, Hc, Wc) the coarse results at Hc = int(H * backbone_scale)
    (the same for W), ref_sm (B, 1, H/4, W/4): 1 where a 4x4 block was refined.
    """

    def __init__(self, backbone: str, backbone_scale: float = 1 / 4, refine_mode: str = "sampling",
                 refine_sample_pixels: int = 80_000, refine_threshold: float = 0.1,
                 refine_kernel_size: int = 3, refine_prevent_oversampling: bool = True,
                 refine_patch_crop_method: str = "unfold", refine_patch_replace_method: str = "scatter_nd",
                 *, backend: str = "auto"):
        if (isinstance(backbone_scale, bool) or not isinstance(backbone_scale, (int, float))
                or not 0 < backbone_scale <= 0.5):
            raise ValueError(f"MattingRefine: backbone_scale must be a number in (0, 1/2], got {backbone_scale!r}")
        check_refiner_settings("MattingRefine", refine_mode, refine_sample_pixels, refine_threshold,
                               refine_kernel_size, refine_patch_crop_method, refine_patch_replace_method, backend,
                               prefix="refine_")
        super().__init__(backbone)
        self.backbone_scale = backbone_scale
        self.refiner = Refiner(refine_mode, refine_sample_pixels, refine_threshold, refine_kernel_size,
                               refine_prevent_oversampling, refine_patch_crop_method,
                               refine_patch_replace_method, backend=backend)

    # NB: forward reads only what upstream's MattingRefine also has
    # (backbone_scale, backbone, aspp, decoder, refiner), so that accelerate()
    # can turn an upstream instance into this class in place.
    def forward(self, src: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        check_images("MattingRefine", ["src", "bgr"], [src, bgr], True, False)
        if not torch.jit.is_scripting():
            self._check_against_model("MattingRefine", src)
        H, W = src.shape[2], src.shape[3]
        # NB: x < 1 rather than int(x) < 1 (the same for x >= 0): a range, not the
        # exact size that int() would fix under torch.export with dynamic sizes.
        if H * self.backbone_scale < 1 or W * self.backbone_scale < 1:
            raise ValueError(f"MattingRefine: src of {H}x{W} is too small for backbone_scale="
                             f"{self.backbone_scale}: the coarse input would be empty")
        # As upstream: the coarse size is int(H * scale), and the resize uses
        # the scale that size implies.
        src_sm = F.interpolate(src, scale_factor=self.backbone_scale, mode="bilinear", align_corners=False,
                               recompute_scale_factor=True)
        bgr_sm = F.interpolate(bgr, scale_factor=self.backbone_scale, mode="bilinear", align_corners=False,
                               recompute_scale_factor=True)
        pha_sm, fgr_residual_sm, err_sm, hid_sm = self._coarse(src_sm, bgr_sm, True)
        # The clamp of pha and the addition of src to fgr happen inside the
        # refiner's compose kernel: no further full-resolution pass.
        pha, fgr, ref_sm = self.refiner.forward_matting(src, bgr, pha_sm, fgr_residual_sm, err_sm, hid_sm)
        fgr_sm = src_sm.add_(fgr_residual_sm).clamp_(0.0, 1.0)
        return pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm


# -- accelerate ----------------------------------------------------------------

_REFINER_SETTINGS = ("mode", "sample_pixels", "threshold", "kernel_size", "prevent_oversampling",
                     "patch_crop_method", "patch_replace_method")
_REFINER_CHILDREN = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "relu"}
_BASE_CHILDREN = {"backbone", "aspp", "decoder"}


def _has_layout(module: nn.Module, class_name: str, children: set) -> bool:
    """True if module is a `class_name` (upstream's, from the PyPI package or
    a copy of its repository) with exactly these submodules and no
    parameters or buffers of its own."""
    return (type(module).__name__ == class_name and set(module._modules) == children
            and not module._parameters and not module._buffers)


def _check_refiner(refiner: nn.Module, backend: str) -> None:
    """Raises unless `refiner` can become a pymatting_ext Refiner by changing
    its class: upstream's settings, all valid, and parameters and buffers of
    the names and shapes ours has for them."""
    if isinstance(refiner, Refiner):
        return
    if not _has_layout(refiner, "Refiner", _REFINER_CHILDREN):
        raise TypeError(f"accelerate: expected BackgroundMattingV2's Refiner, got {type(refiner).__name__} "
                        f"with submodules {sorted(refiner._modules)}")
    missing = [name for name in _REFINER_SETTINGS if not hasattr(refiner, name)]
    if missing:
        raise TypeError(f"accelerate: the Refiner lacks upstream's settings {missing}")
    settings = [getattr(refiner, name) for name in _REFINER_SETTINGS]
    # A template on the meta device validates the settings (ValueError) and
    # gives the shapes to expect, without allocating anything.
    with torch.device("meta"):
        template = Refiner(*settings, backend=backend)
    want = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in refiner.state_dict().items()}
    if want != have:
        raise TypeError(f"accelerate: the Refiner's parameters and buffers {have} differ from those "
                        f"expected for its settings {want}")


def _convert_refiner(refiner: nn.Module, backend: str) -> None:
    # NB: changing the class keeps the object, its Parameters (an optimizer
    # built on them still works), hooks, device, dtype and training flag.
    # Ours reads the same attributes as upstream's, plus `backend`. A
    # subclass of ours keeps its class.
    if not isinstance(refiner, Refiner):
        refiner.__class__ = Refiner
    refiner.backend = backend
    for name in ("max_patches", "fused"):
        if not hasattr(refiner, name):
            setattr(refiner, name, None)


def accelerate(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Makes a model built with upstream's classes (backgroundmattingv2, or a
    copy of its repository) run on pymatting_ext, in place, and returns it.

    - ``MattingRefine``: its refiner becomes a pymatting_ext :class:`Refiner`
      and the model a pymatting_ext :class:`MattingRefine`, whose forward
      fuses the final clamp and foreground addition into the refiner's
      compose kernel. The backbone, ASPP and decoder stay the objects they
      are (their forward is the same as ours).
    - ``Refiner``: becomes a pymatting_ext :class:`Refiner`, so a model of
      your own that holds it is accelerated too.
    - ``MattingBase`` or ``Base``: returned unchanged; they have no refiner.
    - pymatting_ext's own models and Refiner: returned with the refiner's
      backend set to ``backend``.

    Conversion changes the objects' class (``obj.__class__``) after checking
    that their attributes, submodules and parameter shapes are upstream's:
    the objects, their Parameters, buffers, hooks, device, dtype and training
    flag stay as they are, state_dict() is unchanged, and an optimizer built
    before keeps working. Afterwards they are no longer instances of
    upstream's classes. Nothing is changed if a check fails.

    Args:
        model: the module to accelerate.
        backend: the Refiner's ``backend`` (see :class:`Refiner`).

    Raises:
        TypeError: for anything else (a scripted or compiled module included:
            accelerate the eager model first, then script or compile it).
        ValueError: for an unknown ``backend`` or invalid refiner settings.
    """
    if backend not in BACKENDS:
        raise ValueError(f"accelerate: backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(model, torch.jit.ScriptModule) or hasattr(model, "_orig_mod"):
        raise TypeError(f"accelerate: cannot convert a scripted or compiled module ({type(model).__name__}); "
                        f"accelerate the eager model, then script or compile it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: expected a BackgroundMattingV2 MattingRefine, MattingBase or Refiner, "
                        f"got {type(model).__name__}")

    if isinstance(model, Refiner) or _has_layout(model, "Refiner", _REFINER_CHILDREN):
        _check_refiner(model, backend)
        _convert_refiner(model, backend)
        return model

    if isinstance(model, MattingRefine) or _has_layout(model, "MattingRefine", _BASE_CHILDREN | {"refiner"}):
        if not isinstance(getattr(model, "backbone_scale", None), (int, float)):
            raise TypeError("accelerate: the MattingRefine has no numeric backbone_scale")
        _check_refiner(model.refiner, backend)
        _convert_refiner(model.refiner, backend)
        if not isinstance(model, MattingRefine):
            model.__class__ = MattingRefine
        return model

    if isinstance(model, Base) or any(_has_layout(model, name, _BASE_CHILDREN) for name in ("MattingBase", "Base")):
        return model

    raise TypeError(f"accelerate: expected a BackgroundMattingV2 MattingRefine, MattingBase or Refiner, "
                    f"got {type(model).__name__}")
