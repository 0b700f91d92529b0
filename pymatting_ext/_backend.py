"""Which implementation runs an op: the backend switch shared by every op
and by Refiner.

``backend=`` takes one of BACKENDS:

- ``'cpu'``: the C++ kernels of the compiled extension, for CPU tensors.
- ``'cuda'``: the hand-written CUDA kernels of the extension, for CUDA tensors
  (needs an extension built with its CUDA sources).
- ``'triton'``: the Triton kernels, for CUDA tensors in float32, float16 or
  bfloat16 (CPU tensors too when TRITON_INTERPRET=1 is set before the first
  use: Triton's interpreter, for testing).
- ``'reference'``: plain PyTorch, any device and dtype, differentiable.
- ``'auto'``: decided from the tensors alone, the same way every time:
  CPU tensors -> 'cpu' if the extension is loaded, else 'reference';
  CUDA tensors -> 'cuda' if the extension has its CUDA kernels, else 'triton'
  if Triton is installed and the dtype is one it supports, else 'reference';
  any other device -> 'reference'.

The environment variable PYMATTING_EXT_BACKEND, when set to a backend name,
replaces 'auto' everywhere (an explicit ``backend=`` still wins). A backend
that cannot run the tensors at hand raises an error saying why.
"""
import importlib.util
import os
from typing import List, Optional

import torch

from . import _extension

__all__ = ["BACKENDS", "ENV_VAR", "resolve", "compiled_backends", "triton_status", "load_triton"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

#: Environment variable that overrides 'auto'.
ENV_VAR = "PYMATTING_EXT_BACKEND"

#: The dtypes the Triton kernels support.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_triton_state = None  # None: not tried yet; else (ok, why)


def triton_status():
    """(True, '') if the Triton backend can be used, else (False, why),
    without loading it: load_triton's result once it has run, before that
    whether Triton is installed."""
    if _triton_state is not None:
        return _triton_state
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed; `pip install triton`"
    return True, ""


def load_triton():
    """Imports Triton and defines the Triton kernels and ops (registering
    the pymatting_ext_triton ops), once; (True, '') or (False, why)."""
    global _triton_state
    if _triton_state is None:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            _triton_state = (False, f"Triton is not installed ({exc}); `pip install triton`")
        else:
            try:
                from . import _triton  # noqa: F401  (registers the pymatting_ext_triton ops)
            except Exception as exc:  # noqa: BLE001 - any failure to define the kernels
                _triton_state = (False, f"the Triton kernels could not be loaded: {exc!r}")
            else:
                _triton_state = (True, "")
    return _triton_state


def triton_interpreting() -> bool:
    """True if Triton runs its interpreter (TRITON_INTERPRET=1), which takes
    CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _auto(device: torch.device, dtype: Optional[torch.dtype]) -> str:
    if device.type == "cpu":
        return "cpu" if _extension.available() else "reference"
    if device.type == "cuda":
        if _extension.cuda_kernels():
            return "cuda"
        if (dtype is None or dtype in TRITON_DTYPES) and load_triton()[0]:
            return "triton"
    return "reference"


def resolve(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend for tensors of `dtype` on `device`, or a
    ValueError/RuntimeError saying why the one asked for cannot run them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "")
        if not override:
            return _auto(device, dtype)
        if override not in BACKENDS:
            raise ValueError(f"the environment variable {ENV_VAR} must be one of {BACKENDS}, got {override!r}")
        if override == "auto":
            return _auto(device, dtype)
        backend = override
    if backend == "cpu":
        _extension.require()
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, but the tensors are on {device}")
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors, but the tensors are on {device}")
        _extension.require()
        if not _extension.cuda_kernels():
            raise RuntimeError("backend='cuda' is not available: the extension was built without its CUDA "
                               f"kernels ({_extension.build_config().get('reason', 'unknown reason')}); "
                               "rebuild with a CUDA toolkit (PYMATTING_EXT_CUDA=1), or use 'triton' or 'reference'")
    elif backend == "triton":
        ok, why = load_triton()
        if not ok:
            raise RuntimeError(f"backend='triton' is not available: {why}")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"backend='triton' runs on CUDA tensors (CPU tensors only under Triton's "
                             f"interpreter, TRITON_INTERPRET=1), but the tensors are on {device}")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports float32, float16 and bfloat16, got {dtype}; "
                             "use 'cpu', 'cuda' or 'reference' for it")
    return backend


def compiled_backends(device: torch.device, dtype: Optional[torch.dtype] = None) -> List[str]:
    """The compiled backends ('cpu', 'cuda', 'triton') that resolve accepts
    for tensors of `dtype` on `device`, the one 'auto' picks first."""
    found = []
    for backend in ("cpu", "cuda", "triton"):
        try:
            resolve(backend, device, dtype)
        except (ValueError, RuntimeError):
            continue
        found.append(backend)
    auto = _auto(device, dtype)
    return sorted(found, key=lambda b: b != auto)
