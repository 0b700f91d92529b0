"""The coarse network (backbone, ASPP, decoder) for eval inference on the
CPU, as a plan of oneDNN convolutions.

Eager PyTorch runs the coarse network as upstream does: each convolution in
NCHW (oneDNN then reorders its input, output and weights to and from its
blocked layout every call), each BatchNorm and ReLU a pass of its own over
memory. The plan instead runs every convolution through oneDNN's fused op
(``torch.ops.mkldnn._convolution_pointwise``, the one Inductor's CPU backend
emits):

- BatchNorm folded into the convolution's weights and bias (in float64,
  rounded once), as the refiner's fold;
- the weights prepacked once in oneDNN's blocked layout;
- activations channels-last from the input to the decoder's output;
- bias, ReLU, ReLU6 and the residual additions applied by the convolution
  itself (oneDNN post-ops).

The results are upstream's to within float32 rounding (the fold and the
order of the sums differ). The plan serves eval inference only: CPU tensors,
float32, or bfloat16 where the CPU has native bfloat16 (parameters in
bfloat16, or float32 under ``torch.autocast('cpu', torch.bfloat16)``), no
autograd, no hooks, and not while TorchScript, ``torch.compile``,
``torch.export`` or the ONNX exporter trace (they get the modules, as does
any layout the plan does not recognise). It is built on the first call and
cached beside the model; any change to a parameter or buffer (in place,
``load_state_dict``, ``.to()``) rebuilds it, as the refiner's fold cache.
The environment variable PYMATTING_EXT_COARSE_PLAN=0 turns it off (the
modules then run, as upstream's). Building a plan also keeps glibc's heap
from shrinking between frames (_malloc.keep_heap).
"""
import os
import weakref
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _malloc
from .refiner import fold_batchnorm, tensors_key

__all__ = ["coarse_plan", "prepare", "CoarsePlan", "ENV_VAR"]

#: Environment variable: 0 runs the modules instead of the plan.
ENV_VAR = "PYMATTING_EXT_COARSE_PLAN"

#: model -> (key, plan or None). Beside the model rather than in it, so that
#: copying, pickling or scripting a model never meets oneDNN's packed tensors.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Unsupported(Exception):
    """A module layout the plan does not know: the model runs its modules."""


def _fold(conv: nn.Conv2d, bn: Optional[nn.Module]) -> Tuple[Tensor, Tensor]:
    """conv followed by an eval BatchNorm (or nothing), as one conv's weight
    and bias in float64 (the refiner's fold)."""
    if bn is None:
        return fold_batchnorm(conv.weight, conv.bias, None, None, None, None, 0.0)
    return fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


class _Conv:
    """One convolution with its BatchNorm folded in and its activation (and
    optionally a residual addition before it) applied by oneDNN."""

    def __init__(self, conv: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module], dtype: torch.dtype,
                 pad_out: bool = False):
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise _Unsupported(f"expected a zero-padded Conv2d, got {conv!r}")
        if bn is not None and (not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or bn.running_mean is None
                               or bn.running_var is None):
            # (SyncBatchNorm in eval mode is BatchNorm2d with its running statistics.)
            raise _Unsupported(f"expected an eval BatchNorm2d, got {type(bn).__name__}")
        if act is None:
            self.attr, self.scalars = "none", []
        elif type(act) is nn.ReLU:
            self.attr, self.scalars = "relu", []
        elif type(act) is nn.ReLU6:
            self.attr, self.scalars = "hardtanh", [0.0, 6.0]
        else:
            raise _Unsupported(f"no fused activation for {type(act).__name__}")
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.out_channels = conv.out_channels  # (the useful ones, without pad_out's)
        self.dtype = dtype
        # The output channels rounded up to a multiple of 16 with zero
        # weights, for a last layer whose caller slices them off: oneDNN's
        # AVX-512 kernels work in blocks of 16 channels, and the decoder's
        # 37 (2 blocks and a tail of 5) ran slower than 48 (fp32: 33 against
        # 28 ms at 270x480; no difference in bfloat16).
        self.pad_out = pad_out and conv.groups == 1
        # Folded and packed on the first call, for that input's size: oneDNN
        # picks the weights' layout by the problem's shape (packed without it,
        # the 1x1 convolutions at stride 16 ran 6x slower), and one layer at a
        # time keeps the transient copies small.
        self.source: Optional[Tuple[nn.Module, Optional[nn.Module]]] = (conv, bn)
        self.weight: Optional[Tensor] = None
        self.bias: Optional[Tensor] = None

    def _pack(self, x: Tensor) -> None:
        w, b = _fold(*self.source)
        if self.pad_out and w.shape[0] % 16:
            extra = 16 - w.shape[0] % 16
            w = torch.cat([w, w.new_zeros((extra,) + w.shape[1:])])
            b = torch.cat([b, b.new_zeros(extra)])
        self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to(self.dtype).to_mkldnn(), *self.args,
                                                                 list(x.shape))
        self.bias = b.to(self.dtype)  # (as autocast's convolutions: the bias in the weights' dtype)
        self.source = None

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.weight is None:
            self._pack(x)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, self.attr,
                                                           self.scalars, "")
        unary = None if self.attr == "none" else self.attr
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, self.weight, self.bias, *self.args,
                                                              "add", 1.0, unary, self.scalars, "")


#: A layer's constructor, (conv, bn, act, pad_out=False) -> _Conv: the plan's
#: dtype bound, and each layer recorded in CoarsePlan.layers.
_Make = Callable[..., _Conv]


def _conv_bn_act(seq: nn.Module, make: _Make) -> _Conv:
    """A Sequential of (Conv2d, BatchNorm2d[, activation][, Dropout]), as
    torchvision's Conv2dNormActivation, ASPP branches and upstream's
    ConvBNReLU."""
    layers = [m for m in seq.children() if not (isinstance(m, nn.Dropout) or type(m) is nn.Identity)]
    if len(layers) not in (2, 3):
        raise _Unsupported(f"expected conv, BatchNorm and an activation, got {seq!r}")
    return make(layers[0], layers[1], layers[2] if len(layers) == 3 else None)


def _resnet(enc: nn.Module, make: _Make) -> Callable[[Tensor], List[Tensor]]:
    """ResNetEncoder (ours or upstream's): stem, max pool, four stages of
    bottlenecks; returns [s16, s8, s4, s2]."""
    stem = make(enc.conv1, enc.bn1, enc.relu)
    pool = enc.maxpool
    if type(pool) is not nn.MaxPool2d:
        raise _Unsupported("expected a MaxPool2d")
    stages = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        blocks = []
        for block in getattr(enc, name):
            if not {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"} <= set(block._modules) or hasattr(block, "conv4"):
                raise _Unsupported(f"expected a torchvision Bottleneck, got {type(block).__name__}")
            down = None
            if block.downsample is not None:
                if len(block.downsample) != 2:
                    raise _Unsupported("expected a downsample of conv and BatchNorm")
                down = make(block.downsample[0], block.downsample[1], None)
            blocks.append((make(block.conv1, block.bn1, block.relu),
                           make(block.conv2, block.bn2, block.relu),
                           make(block.conv3, block.bn3, block.relu), down))
        stages.append(blocks)

    def run(x: Tensor) -> List[Tensor]:
        s2 = stem(x)
        x = F.max_pool2d(s2, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        out = []
        for blocks in stages:
            for c1, c2, c3, down in blocks:
                x = c3(c2(c1(x)), down(x) if down is not None else x)
            out.append(x)
        return [out[3], out[1], out[0], s2]

    return run


def _mobilenet(enc: nn.Module, make: _Make) -> Callable[[Tensor], List[Tensor]]:
    """MobileNetV2Encoder (ours or upstream's): 18 blocks of features, the
    skips after blocks 1, 3 and 6; returns [s16, s8, s4, s2]."""
    features = list(enc.features)
    if len(features) != 18:
        raise _Unsupported("expected MobileNetV2's 18 feature blocks")
    steps = []
    for block in features:
        if hasattr(block, "use_res_connect"):
            layers = list(block.conv)
            convs = [_conv_bn_act(m, make) for m in layers[:-2]]
            convs.append(make(layers[-2], layers[-1], None))
            steps.append((convs, bool(block.use_res_connect)))
        else:
            steps.append(([_conv_bn_act(block, make)], False))

    def run(x: Tensor) -> List[Tensor]:
        skips = []
        for i, (convs, residual) in enumerate(steps):
            y = x
            for conv in convs[:-1]:
                y = conv(y)
            x = convs[-1](y, x) if residual else convs[-1](y)
            if i == 1 or i == 3 or i == 6:
                skips.append(x)
        return [x, skips[2], skips[1], skips[0]]

    return run


def _aspp(aspp: nn.Module, make: _Make) -> Callable[[Tensor], Tensor]:
    """torchvision's ASPP: a 1x1 branch, three atrous branches, image pooling,
    then the 1x1 projection (its Dropout is the identity in eval)."""
    branches = list(aspp.convs)
    if len(branches) < 2 or not isinstance(branches[-1][0], nn.AdaptiveAvgPool2d):
        raise _Unsupported("expected torchvision's ASPP")
    convs = [_conv_bn_act(b, make) for b in branches[:-1]]
    pooled = _conv_bn_act(nn.Sequential(*list(branches[-1])[1:]), make)
    project = _conv_bn_act(aspp.project, make)

    def run(x: Tensor) -> Tensor:
        parts = [conv(x) for conv in convs]
        p = pooled(x.mean((2, 3), keepdim=True))
        parts.append(F.interpolate(p, size=x.shape[2:], mode="bilinear", align_corners=False))
        return project(torch.cat(parts, 1))

    return run


def _decoder(dec: nn.Module, make: _Make) -> Callable[[Tensor, List[Tensor]], Tensor]:
    """Decoder (ours or upstream's): four upsample-concatenate-convolve steps;
    the last convolution's output may have zero channels appended."""
    relu = dec.relu
    convs = [make(dec.conv1, dec.bn1, relu), make(dec.conv2, dec.bn2, relu),
             make(dec.conv3, dec.bn3, relu), make(dec.conv4, None, None, pad_out=True)]

    def run(x: Tensor, skips: List[Tensor]) -> Tensor:
        for conv, skip in zip(convs, skips):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = conv(torch.cat([x, skip.to(x.dtype)], 1))
        return x

    return run


class CoarsePlan:
    """backbone -> ASPP -> decoder of one model, in one dtype, for one input
    size (see the module docstring). Called with the 6-channel input,
    returns the decoder's output in NCHW, as the modules do. Its weights are
    packed during its first call."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        backbone = model.backbone
        self.dtype = dtype
        self.layers: List[_Conv] = []

        def make(conv: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module], pad_out: bool = False) -> _Conv:
            layer = _Conv(conv, bn, act, dtype, pad_out)
            self.layers.append(layer)
            return layer

        self.backbone = _mobilenet(backbone, make) if hasattr(backbone, "features") else _resnet(backbone, make)
        self.aspp = _aspp(model.aspp, make)
        self.decoder = _decoder(model.decoder, make)
        self.channels = model.decoder.conv4.out_channels

    def __call__(self, x: Tensor) -> Tensor:
        return self._run(x)[:, :self.channels].contiguous()

    def head_and_hidden(self, x: Tensor, head: int) -> Tuple[Tensor, Tensor]:
        """The decoder's output split in two: its first `head` channels in
        NCHW, and the others (hid) as a view of the channels-last output
        itself. For MattingRefine, whose refiner crops hid as fast in either
        layout: at 270x480 the NCHW copy of hid's 32 channels took ~5 ms."""
        out = self._run(x)
        return out[:, :head].contiguous(), out[:, head:self.channels]

    def _run(self, x: Tensor) -> Tensor:
        """The decoder's output, channels-last, its channels maybe padded."""
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        s16, s8, s4, s2 = self.backbone(x)
        return self.decoder(self.aspp(s16), [s8, s4, s2, x])

    def nbytes(self) -> int:
        """The memory its packed weights and biases hold (0 before its first
        call): its cost beside the model's own parameters."""
        return sum(torch.ops.mkldnn._nbytes(layer.weight) + layer.bias.numel() * layer.bias.element_size()
                   for layer in self.layers if layer.weight is not None and layer.bias is not None)


def _plan_dtype(model: nn.Module, x: Tensor) -> Optional[torch.dtype]:
    """The dtype the plan would run in, or None where the modules must run."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or param.dtype != torch.float32:
            return None
        dtype = torch.bfloat16
    elif param.dtype == x.dtype and param.dtype in (torch.float32, torch.bfloat16):
        dtype = param.dtype
    else:
        return None
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return dtype


def _key(model: nn.Module, dtype: torch.dtype) -> Optional[tuple]:
    """What the plan depends on: every parameter and buffer (storage,
    in-place version, dtype, device, shape), the BatchNorm eps, the plan's dtype;
    None where a module has hooks or a tensor has no version counter. (A
    training forward updates BatchNorm's running statistics without bumping
    their version counter, but bumps its num_batches_tracked, a buffer.)"""
    parts: list = [dtype]
    for part in (model.backbone, model.aspp, model.decoder):
        for m in part.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return None
            if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                parts.append(m.eps)
        tensors = tensors_key(list(part.parameters()) + list(part.buffers()))
        if tensors is None:
            return None
        parts.extend(tensors)
    return tuple(parts)


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def coarse_plan(model: nn.Module, x: Tensor) -> Optional[CoarsePlan]:
    """The model's cached CoarsePlan for input x, built on first use; None
    where the modules must run (see the module docstring)."""
    if (model.training or type(x) is not Tensor or x.device.type != "cpu" or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or _exporting() or not torch.backends.mkldnn.is_available()
            or os.environ.get(ENV_VAR, "1") == "0"):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    dtype = _plan_dtype(model, x)
    if dtype is None:
        return None
    key = _key(model, dtype)
    if key is None:
        return None
    # One plan per input size (the packing depends on it): a video keeps one.
    key = key + (tuple(x.shape),)
    cached = _PLANS.get(model)
    if cached is None or cached[0] != key:
        try:
            with torch.inference_mode(False), torch.no_grad():
                plan: Optional[CoarsePlan] = CoarsePlan(model, dtype)
        except _Unsupported:
            plan = None
        # CPU inference: keep each frame's memory in the heap for the next.
        _malloc.keep_heap()
        cached = (key, plan)
        _PLANS[model] = cached
    return cached[1]


def prepare(model: nn.Module, size: Tuple[int, int, int, int], dtype: Optional[torch.dtype] = None) -> bool:
    """Builds `model`'s plan ahead of its first call on src of `size` (B, C,
    H, W) and `dtype` (default: its parameters'), where one applies, by one
    call of its coarse network on zeros: the command line does this before
    the first frame and shows it. True if the model's calls will run it."""
    if not all(hasattr(model, name) for name in ("backbone", "aspp", "decoder", "_coarse_net")):
        return False
    param = next(model.parameters(), None)
    if param is None:
        return False
    B, _, H, W = size
    scale = getattr(model, "backbone_scale", 1.0)
    # (As MattingRefine: int(H * scale) by F.interpolate's recompute_scale_factor.)
    Hc, Wc = (int(H * scale), int(W * scale)) if scale != 1.0 else (H, W)
    x = torch.zeros(B, 6, Hc, Wc, dtype=dtype or param.dtype, device=param.device)
    with torch.inference_mode():
        if coarse_plan(model, x) is None:
            return False
        model._coarse_net(x)
    return True
