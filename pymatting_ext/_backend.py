"""Which implementation runs an op: the backend switch shared by every op
and by Refiner."""
import torch

from . import _extension

__all__ = ["BACKENDS", "resolve"]

#: Names accepted by ``backend=``. 'auto' picks the fastest implementation
#: available for the tensors' device: the C++ kernels for CPU tensors when the
#: extension is loaded, otherwise the reference.
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`, or a ValueError/RuntimeError
    saying why the one asked for cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and _extension.available():
            return "cpu"
        return "reference"
    if backend == "cpu":
        _extension.require()
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, but the tensors are on {device}")
        return "cpu"
    if backend in ("cuda", "triton"):
        raise RuntimeError(f"backend={backend!r} is not available: this version of pymatting_ext "
                           f"has no {backend} kernels yet; use 'auto', 'cpu' or 'reference'")
    return backend
