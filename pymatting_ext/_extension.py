"""Fail-soft loading of the compiled extension ``pymatting_ext._C``.

Importing pymatting_ext never fails because the extension is missing or was
built against another torch: the reference backend still works, and asking for
a compiled backend raises an error that says what was built for what and how
to rebuild.
"""
import warnings

import torch

__all__ = ["available", "load_error", "require", "build_config", "cuda_compiled", "cuda_kernels", "library_path"]

try:
    from ._build_config import BUILD_CONFIG
except ImportError:  # a source checkout that was never built
    BUILD_CONFIG = None

_LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)
except (ImportError, OSError) as exc:  # missing, or built against another torch
    _LOAD_ERROR = exc


def available() -> bool:
    """True if the compiled extension is loaded."""
    return _LOAD_ERROR is None


def load_error():
    return _LOAD_ERROR


def build_config() -> dict:
    """What setup.py recorded about the build (empty if never built)."""
    return dict(BUILD_CONFIG or {})


def cuda_compiled() -> bool:
    """True if the loaded extension holds the CUDA sources."""
    return available() and hasattr(torch.ops.pymatting_ext, "cuda_build_info")


def library_path() -> str:
    """The file of the loaded extension: the library a C++ program loads
    (dlopen) before torch::jit::load of a scripted model that uses the ops."""
    require()
    from . import _C
    return _C.__file__


def cuda_kernels() -> bool:
    """True if the CUDA kernels of the ops are registered (an extension built
    with its CUDA sources)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("pymatting_ext::crop", "CUDA")


def _explain() -> str:
    if BUILD_CONFIG is None:
        built = "it has not been built (no pymatting_ext/_build_config.py)"
    else:
        built = (f"it was built for torch {BUILD_CONFIG['torch']} "
                 f"(CUDA {BUILD_CONFIG['torch_cuda']}, CUDA sources "
                 f"{'on' if BUILD_CONFIG['with_cuda'] else 'off'})")
    return (f"pymatting_ext's compiled extension could not be loaded ({_LOAD_ERROR}); "
            f"{built} and this environment has torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}). Rebuild it against this torch with "
            f"`pip install --no-build-isolation --force-reinstall --no-deps .` in the "
            f"source tree, or use backend='reference'.")


def warn_if_missing():
    """One warning at import when the extension could not be loaded."""
    if _LOAD_ERROR is not None:
        warnings.warn(_explain() + " Until then only the reference backend runs.", RuntimeWarning,
                      stacklevel=3)


def require():
    """Raise a RuntimeError that explains the failure if _C is not loaded."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_explain())
