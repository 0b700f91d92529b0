"""The Triton backend: the kernels of kernels/triton (installed as
pymatting_ext.triton_kernels) registered as ops in the namespace
``pymatting_ext_triton``, with the schemas of the C++ ops.

crop, replace, compose and select_sampling are ``torch.library.triton_op``s,
so torch.compile traces into their launches; select_thresholding reads its
output size back from the device, so it is an opaque custom op with a fake
kernel of data-dependent size, as the C++ op.

Imported on first use of backend='triton' (see _backend.triton_status): Triton
decides between compiling and interpreting (TRITON_INTERPRET=1) when the
kernels are defined.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import triton_kernels as _k

__all__ = []

_NS = "pymatting_ext_triton"

if hasattr(torch.library, "triton_op"):
    def _op(name):
        return torch.library.triton_op(f"{_NS}::{name}", mutates_args=())
else:  # pragma: no cover - torch < 2.6: opaque to torch.compile
    def _op(name):
        return torch.library.custom_op(f"{_NS}::{name}", mutates_args=())


@_op("select_sampling")
def select_sampling(err: Tensor, k: int, prevent_oversampling: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _k.select_sampling(err, k, prevent_oversampling)


@torch.library.custom_op(f"{_NS}::select_thresholding", mutates_args=())
def select_thresholding(err: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    return _k.select_thresholding(err, threshold)


@select_thresholding.register_fake
def _select_thresholding_fake(err, threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return err.new_empty(err.shape, dtype=torch.float32), err.new_empty((count, 3), dtype=torch.long)


@_op("crop")
def crop(inputs: List[Tensor], idx: Tensor, stride: int, padding: int, image_size: List[int],
         patch_size: List[int]) -> Tensor:
    return _k.crop(inputs, idx, stride, padding, image_size, patch_size)


@_op("replace")
def replace(x: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor]) -> Tensor:
    return _k.replace(x, patches, idx, valid)


@_op("compose")
def compose(coarse: Tensor, patches: Tensor, idx: Tensor, valid: Optional[Tensor], size: List[int],
            src: Optional[Tensor]) -> Tensor:
    return _k.compose(coarse, patches, idx, valid, size, src)
