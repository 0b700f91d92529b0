"""pymatting_ext: fast kernels for BackgroundMattingV2's refiner, as a
drop-in replacement for its ``Refiner``, ``MattingBase`` and ``MattingRefine``.

    from pymatting_ext import Refiner
    refiner = Refiner('sampling', 80_000, 0.1).eval()
    refiner.load_state_dict(upstream_refiner.state_dict())

    model = pymatting_ext.MattingRefine('resnet50').eval()
    model.load_state_dict(torch.load('pytorch_resnet50.pth'))

    pymatting_ext.accelerate(upstream_model)   # in place
"""
from . import _extension
from ._backend import BACKENDS
from . import ops, reference
from .ops import compose, compose_into, crop, crop_into, replace, select_sampling, select_thresholding
from .refiner import Refiner
from .models import MattingBase, MattingRefine, accelerate
from .graphs import cuda_graph
from ._warmup import warmup

if _extension.available():
    from . import _autograd, _meta
    _meta.register("pymatting_ext")  # fake kernels for the C++ schemas
    _autograd.register("pymatting_ext")
else:
    _extension.warn_if_missing()

__version__ = "0.1.0"

__all__ = ["Refiner", "MattingBase", "MattingRefine", "accelerate", "cuda_graph", "warmup",
           "ops", "reference", "select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose",
           "compose_into", "BACKENDS", "build_info", "extension_available", "library_path", "convert_video"]


def __getattr__(name):
    # NB: convert_video needs the cli extra (PyAV, tqdm, Pillow): imported on
    # first use, so that `import pymatting_ext` needs torch only.
    if name == "convert_video":
        from .app.pipeline import convert_video
        return convert_video
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def library_path() -> str:
    """The compiled extension's file: what a C++ program loads (dlopen with
    RTLD_LAZY | RTLD_GLOBAL) before torch::jit::load of a scripted model that
    uses pymatting_ext's ops."""
    return _extension.library_path()


def extension_available() -> bool:
    """True if the compiled extension (the 'cpu' backend) is loaded."""
    return _extension.available()


def build_info() -> dict:
    """What was built and what was loaded: the build configuration recorded
    by setup.py, whether _C loaded (and why not), and what the CUDA part was
    compiled for."""
    import torch

    info = _extension.build_config()
    info["loaded"] = _extension.available()
    info["load_error"] = None if _extension.available() else str(_extension.load_error())
    if _extension.available():
        info["compiled"] = torch.ops.pymatting_ext.build_info()
        if _extension.cuda_compiled():
            info["cuda"] = torch.ops.pymatting_ext.cuda_build_info()
    return info
