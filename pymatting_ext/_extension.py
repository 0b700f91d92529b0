"""Fail-soft loading of the compiled extension ``pymatting_ext._C``.

Importing pymatting_ext never fails because the extension is missing or was
built against another torch: the reference backend still works, and asking for
a compiled backend raises an error that says what was built for what and how
to rebuild.
"""
import glob
import os
import sys
import warnings
from typing import Optional

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


def _compiled_files(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, "_C.*.so")) + glob.glob(os.path.join(folder, "_C.*.pyd"))
                  + glob.glob(os.path.join(folder, "_C.so")))


def _installed_elsewhere(here: str) -> Optional[str]:
    """A pymatting_ext folder with a compiled extension on sys.path other
    than `here` (an installed copy that the source folder shadows)."""
    for entry in sys.path:
        folder = os.path.join(os.path.abspath(entry or "."), "pymatting_ext")
        if os.path.realpath(folder) != os.path.realpath(here) and _compiled_files(folder):
            return folder
    return None


def _explain() -> str:
    """Why _C did not load, and what to do: the cause told apart from the
    error and the build record (each case is simulated in tests/build_checks/test_load.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    error = f"{type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}"
    text = str(_LOAD_ERROR)
    ours = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    head = "pymatting_ext's compiled extension could not be loaded"
    tail = "Meanwhile backend='reference' (plain PyTorch) works."
    if not _compiled_files(here) and os.path.isfile(os.path.join(os.path.dirname(here), "setup.py")):
        elsewhere = _installed_elsewhere(here)
        where = (f"; an installed copy is at {os.path.dirname(elsewhere)}, shadowed by this folder"
                 if elsewhere else "")
        return (f"{head}: Python imported pymatting_ext from its source folder {here}, which holds no "
                f"compiled extension (it was never built in place){where}. Run from another folder than "
                f"the checkout (or take it off sys.path/PYTHONPATH) to use the installed package, or build "
                f"in place with `pip install --no-build-isolation -e .`. {tail}")
    if not _compiled_files(here):
        return (f"{head}: the installation at {here} has no compiled extension ({error}). Reinstall it: "
                f"`pip install --no-build-isolation --force-reinstall --no-deps .` in the source tree. {tail}")
    if any(lib in text for lib in ("libcudart", "libcuda.so", "libnvrtc", "libcublas", "libc10_cuda",
                                     "libtorch_cuda")):
        built = BUILD_CONFIG and BUILD_CONFIG.get("with_cuda")
        return (f"{head}: a CUDA library it needs cannot be found ({error}). It was built with its CUDA "
                f"sources{'' if built else ' (as recorded)'}; this environment has {ours}. Install the "
                f"CUDA runtime that torch uses (torch's CUDA wheels bring it), or rebuild without CUDA "
                f"(`PYMATTING_EXT_CUDA=0 pip install --no-build-isolation --force-reinstall --no-deps .`). "
                f"{tail}")
    if BUILD_CONFIG is not None and BUILD_CONFIG.get("torch") != torch.__version__:
        return (f"{head} ({error}): it was built for torch {BUILD_CONFIG['torch']} (CUDA "
                f"{BUILD_CONFIG['torch_cuda']}) and this environment has {ours}; an extension only "
                f"loads into the torch it was built against. Rebuild it against this torch: "
                f"`pip install --no-build-isolation --force-reinstall --no-deps .` in the source tree. "
                f"{tail}")
    if "undefined symbol" in text:
        return (f"{head} ({error}): it was built for this torch version ({ours}) but against another "
                f"build of it (a symbol is missing: nightly, source or vendor builds differ). Rebuild it "
                f"in this environment: `pip install --no-build-isolation --force-reinstall --no-deps .`. "
                f"{tail}")
    built = "no build record (pymatting_ext/_build_config.py)" if BUILD_CONFIG is None else (
        f"built for torch {BUILD_CONFIG['torch']}, CUDA sources {'on' if BUILD_CONFIG['with_cuda'] else 'off'}")
    return (f"{head} ({error}; {built}; this environment has {ours}). Rebuilding it in this environment "
            f"usually helps: `pip install --no-build-isolation --force-reinstall --no-deps .`. {tail}")


def warn_if_missing():
    """One warning at import when the extension could not be loaded."""
    if _LOAD_ERROR is not None:
        warnings.warn(_explain(), RuntimeWarning, stacklevel=3)


def require():
    """Raise a RuntimeError that explains the failure if _C is not loaded."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_explain())
