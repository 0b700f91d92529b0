"""Fake (meta) kernels of the ops, so that torch.compile,
torch.library.opcheck and FakeTensor tracing know their output shapes.

``register(namespace)`` attaches them to the C++ schemas (namespace
'pymatting_ext', done at import when the extension is loaded); the Triton
ops reuse them where they are opaque (see _triton.py)."""
import torch

__all__ = ["FAKES", "register"]


def _min_cells(k, err):
    # NB: sym_min, not min(): no guard on a symbolic frame size.
    return torch.sym_min(k, err.shape[2] * err.shape[3])


def select_sampling_fake(err, k, prevent_oversampling):
    torch._check(k >= 0, lambda: f"select_sampling: k must be non-negative, got {k}")
    n = err.shape[0] * _min_cells(k, err)
    ref = err.new_empty(err.shape)
    return ref, err.new_empty((n, 3), dtype=torch.long), err.new_empty((n,), dtype=torch.bool)


def select_thresholding_fake(err, threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return err.new_empty(err.shape, dtype=torch.float32), err.new_empty((count, 3), dtype=torch.long)


def crop_fake(inputs, idx, stride, padding, image_size, patch_size):
    channels = sum(t.shape[1] for t in inputs)
    return torch.empty((idx.shape[0], channels, patch_size[0], patch_size[1]),
                       dtype=inputs[0].dtype, device=inputs[0].device,
                       memory_format=torch.channels_last)


def crop_into_fake(inputs, idx, stride, padding, image_size, channel_offset, out):
    return None


def replace_fake(x, patches, idx, valid):
    # x's layout, as the compiled kernels return it.
    return torch.empty_like(x)


def compose_fake(coarse, patches, idx, valid, size, src):
    return coarse.new_empty((coarse.shape[0], coarse.shape[1], size[0], size[1]))


def compose_into_fake(coarse, patches, idx, valid, src, out):
    return None


FAKES = {"select_sampling": select_sampling_fake, "select_thresholding": select_thresholding_fake,
         "crop": crop_fake, "crop_into": crop_into_fake, "replace": replace_fake, "compose": compose_fake,
         "compose_into": compose_into_fake}


def register(namespace: str):
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
