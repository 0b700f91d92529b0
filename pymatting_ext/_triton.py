"""The Triton backend: the kernels of kernels/triton (installed as
pymatting_ext.triton_kernels) registered as ops in the namespace
``pymatting_ext_triton``, with the schemas of the C++ ops.

crop, crop_into, replace, compose, compose_into and select_sampling are
``torch.library.triton_op``s, so torch.compile traces into their launches;
select_thresholding reads its output size back from the device, so it is an
opaque custom op with a fake kernel of data-dependent size, as the C++ op.
Under Triton's interpreter (TRITON_INTERPRET=1) torch cannot trace kernels,
so there every op is an opaque custom op with the C++ ops' fake kernels.

Every op runs on its tensors' device (made current for the launches, as the
C++ ops' device guard does), whatever device is current.

NB: the bodies call the launchers by their bare names: torch finds a
triton_op's kernels by reading its source (through such calls down to the
``wrap_triton(kernel)`` call sites) and hashes them into its compile cache.

Imported on first use of backend='triton' (_backend.load_triton): Triton
decides between compiling and interpreting (TRITON_INTERPRET=1) when the
kernels are defined.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import triton_kernels as _k
from . import _autograd
from ._meta import FAKES
from .triton_kernels.compose import compose as _compose, compose_into as _compose_into, replace as _replace
from .triton_kernels.crop import crop as _crop, crop_into as _crop_into
from .triton_kernels.select import select_sampling as _select_sampling
from .triton_kernels.select import select_thresholding as _select_thresholding

__all__ = []

_NS = "pymatting_ext_triton"

#: True where torch.compile can trace into the kernels' launches.
TRACEABLE = hasattr(torch.library, "triton_op") and _k.compiled()


def _op(name, mutates_args=()):
    if TRACEABLE:
        return torch.library.triton_op(f"{_NS}::{name}", mutates_args=mutates_args)

    def opaque(fn):
        op = torch.library.custom_op(f"{_NS}::{name}", mutates_args=mutates_args)(fn)
        op.register_fake(FAKES[name])
        return op
    return opaque


@_op("select_sampling")
def select_sampling(err: Tensor, k: int, prevent_oversampling: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _select_sampling(err, k, prevent_oversampling)


# NB: not a triton_op, so never traced: its launches go straight to Triton
# (triton_kernels.common.wrap_triton).
@torch.library.custom_op(f"{_NS}::select_thresholding", mutates_args=())
def select_thresholding(err: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    return _select_thresholding(err, threshold)


select_thresholding.register_fake(FAKES["select_thresholding"])


@_op("crop")
def crop(inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
         patch_size: List[int]) -> Tensor:
    return _crop(inputs, idx, stride, padding, image_size, patch_size)


@_op("crop_into", mutates_args={"out"})
def crop_into(inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
              channel_offset: int, out: Tensor) -> None:
    _crop_into(inputs, idx, stride, padding, image_size, channel_offset, out)


@_op("replace")
def replace(x: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor]) -> Tensor:
    return _replace(x, patches, idx, valid)


@_op("compose")
def compose(coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor], size: List[int],
            src: Optional[Tensor]) -> Tensor:
    return _compose(coarse, patches, idx, valid, size, src)


@_op("compose_into", mutates_args={"out"})
def compose_into(coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor], src: Optional[Tensor],
                 out: Tensor) -> None:
    _compose_into(coarse, patches, idx, valid, src, out)


_autograd.register(_NS)
