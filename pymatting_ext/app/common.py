"""What the command line, convert_video, the speed test and the exporters
share: the error for bad user input, the optional dependencies, and models
built from upstream's arguments and checkpoints.

Nothing here is imported by ``import pymatting_ext``; the optional packages
(PyAV, tqdm, Pillow, matplotlib, onnx) are imported where they are used.
"""
import importlib
import os
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["UserError", "require", "av_module", "pil_image", "numpy_module", "pick_device", "PRECISIONS",
           "dtype_of", "detect_backbone", "load_state_dict", "build_model", "UPSTREAM_DEFAULTS"]


class UserError(ValueError):
    """A problem with the user's files or settings, not a bug: the command
    line prints its message as one line, without a traceback."""


#: pip extra that provides each optional module.
_EXTRA = {"av": "cli", "tqdm": "cli", "PIL": "cli", "matplotlib": "cli", "numpy": "cli",
          "onnx": "export", "onnxruntime": "export", "onnxscript": "export"}
_PIP_NAME = {"av": "av", "PIL": "pillow", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
             "tqdm": "tqdm", "matplotlib": "matplotlib", "numpy": "numpy"}


def require(module: str, why: str):
    """Imports an optional dependency, or raises a UserError saying which
    extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA.get(module.split(".")[0], "cli")
        raise UserError(f"{why} needs {_PIP_NAME.get(module.split('.')[0], module)}, which is not installed "
                        f"({exc}); install it with `pip install 'pymatting_ext[{extra}]'`") from None


def av_module(why: str = "reading and writing video"):
    return require("av", why)


def pil_image(why: str = "reading and writing images"):
    require("PIL.Image", why)
    from PIL import Image
    return Image


def numpy_module(why: str = "reading and writing frames"):
    return require("numpy", why)


# -- device and precision -------------------------------------------------------

#: --precision names and their dtypes.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_of(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of fp32, fp16, bf16, got {precision!r}")
    return PRECISIONS[precision]


def pick_device(device: Optional[str]) -> torch.device:
    """The torch.device for --device (None: CUDA where there is a GPU, else
    the CPU), or a UserError for a GPU that is not there."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device name (try 'cpu', 'cuda' or 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA GPU (torch.cuda.is_available() is False)")
            raise UserError(f"--device {device}: no GPU is available here: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: only 'cpu' and 'cuda' devices are supported")
    return dev


# -- models and checkpoints -------------------------------------------------------

#: Upstream's defaults (inference_video.py and friends; MattingRefine's own
#: threshold default is 0.1, its scripts' is 0.7).
UPSTREAM_DEFAULTS = {"backbone_scale": 0.25, "refine_mode": "sampling", "refine_sample_pixels": 80_000,
                     "refine_threshold": 0.7, "refine_kernel_size": 3}


def detect_backbone(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The backbone a MattingBase/MattingRefine state dict was saved from, or
    None if the keys are of neither."""
    if any(k.startswith("backbone.features.") for k in state_dict):
        return "mobilenetv2"
    if any(k.startswith("backbone.layer4.") for k in state_dict):
        # ResNet-101's third stage has 23 blocks, ResNet-50's 6.
        return "resnet101" if any(k.startswith("backbone.layer3.22.") for k in state_dict) else "resnet50"
    return None


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a checkpoint file: upstream's official .pth files
    (a plain state dict), ours (torch.save(model.state_dict())), or a dict
    holding one under 'state_dict' / 'model_state_dict' / 'model'."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder, not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch.load raises many kinds for a bad file
        raise UserError(f"cannot read checkpoint {path!r}: {_why_unreadable(path)}; expected a state dict "
                        f"saved with torch.save(model.state_dict(), path)") from None
    if isinstance(data, torch.nn.Module):  # pragma: no cover - weights_only refuses modules
        data = data.state_dict()
    if isinstance(data, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise UserError(f"checkpoint {path!r} does not hold a state dict (a dict of tensors); "
                        f"got {type(data).__name__}")
    # Checkpoints saved from a DataParallel or compiled model prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if data and all(k.startswith(prefix) for k in data):
            data = {k[len(prefix):]: v for k, v in data.items()}
    return data


def _why_unreadable(path: str) -> str:
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        return str(exc)
    # torch.save writes a zip archive (a pickle in older versions).
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return ("it holds Python objects other than tensors, which torch.load(weights_only=True) refuses "
                "to unpickle")
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def _names(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_keys(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, backbone: str,
                model_type: str) -> None:
    """A UserError naming what does not match, before load_state_dict would."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {list(state[k].shape)} (expected {list(want[k].shape)})"
              for k in want if k in state and state[k].shape != want[k].shape]
    if not (missing or unexpected or shapes):
        return
    found = detect_backbone(state)
    hint = ""
    if found is not None and found != backbone:
        hint = f"; it looks like a {found} checkpoint: use --backbone {found}"
    elif model_type == "mattingrefine" and missing and all(k.startswith("refiner.") for k in missing):
        hint = "; it has no refiner weights (a MattingBase checkpoint?): use --model-type mattingbase"
    elif found is None:
        hint = "; it is not a MattingBase/MattingRefine checkpoint"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_names(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({_names(shapes, 2)})")
    raise UserError(f"checkpoint {path!r} does not match a {model_type} with backbone {backbone}: "
                    + "; ".join(parts) + hint)


def build_model(model_type: str = "mattingrefine", backbone: Optional[str] = None,
                backbone_scale: float = UPSTREAM_DEFAULTS["backbone_scale"],
                refine_mode: str = UPSTREAM_DEFAULTS["refine_mode"],
                refine_sample_pixels: int = UPSTREAM_DEFAULTS["refine_sample_pixels"],
                refine_threshold: float = UPSTREAM_DEFAULTS["refine_threshold"],
                refine_kernel_size: int = UPSTREAM_DEFAULTS["refine_kernel_size"],
                refine_prevent_oversampling: bool = True, checkpoint: Optional[str] = None,
                backend: str = "auto", default_backbone: str = "resnet50") -> Tuple[torch.nn.Module, dict]:
    """A pymatting_ext MattingRefine or MattingBase in eval mode, with the
    checkpoint's weights (strictly: every key and shape must match, and a
    mismatch is a UserError naming them) or random ones.

    backbone None: the checkpoint's (detected from its keys), else
    `default_backbone`. Returns (model, info) where info says what was
    loaded ('checkpoint': path or None, 'backbone': the backbone used)."""
    from .. import models

    if model_type not in ("mattingrefine", "mattingbase"):
        raise UserError(f"model type must be 'mattingrefine' or 'mattingbase', got {model_type!r}")
    state = load_state_dict(checkpoint) if checkpoint is not None else None
    if backbone is None:
        backbone = (detect_backbone(state) if state is not None else None) or default_backbone
    if backbone not in models.BACKBONES:
        raise UserError(f"backbone must be one of {', '.join(models.BACKBONES)}, got {backbone!r}")
    try:
        if model_type == "mattingbase":
            model = models.MattingBase(backbone)
        else:
            model = models.MattingRefine(backbone, backbone_scale, refine_mode, refine_sample_pixels,
                                         refine_threshold, refine_kernel_size, refine_prevent_oversampling,
                                         backend=backend)
    except ImportError as exc:
        raise UserError(f"building the model needs torchvision ({exc}); `pip install torchvision`") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if state is not None:
        if model_type == "mattingbase":
            # As upstream's scripts: a MattingRefine checkpoint serves MattingBase.
            state = {k: v for k, v in state.items() if not k.startswith("refiner.")}
        _check_keys(model, state, checkpoint, backbone, model_type)
        model.load_state_dict(state, strict=True)
    return model.eval(), {"checkpoint": checkpoint, "backbone": backbone, "model_type": model_type}
