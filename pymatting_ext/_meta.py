"""Fake (meta) kernels of the compiled ops, so that torch.compile,
torch.library.opcheck and FakeTensor tracing know their output shapes.
Imported only when the extension is loaded (the schemas live in C++)."""
import torch

__all__ = []


def _min_cells(k, err):
    return min(k, err.shape[2] * err.shape[3])


@torch.library.register_fake("pymatting_ext::select_sampling")
def _select_sampling_fake(err, k, prevent_oversampling):
    torch._check(k >= 0, lambda: f"select_sampling: k must be non-negative, got {k}")
    n = err.shape[0] * _min_cells(k, err)
    ref = err.new_empty(err.shape)
    return ref, err.new_empty((n, 3), dtype=torch.long), err.new_empty((n,), dtype=torch.bool)


@torch.library.register_fake("pymatting_ext::select_thresholding")
def _select_thresholding_fake(err, threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return err.new_empty(err.shape, dtype=torch.float32), err.new_empty((count, 3), dtype=torch.long)


@torch.library.register_fake("pymatting_ext::crop")
def _crop_fake(inputs, idx, stride, padding, image_size, patch_size):
    channels = sum(t.shape[1] for t in inputs)
    return torch.empty((idx.shape[0], channels, patch_size[0], patch_size[1]),
                       dtype=inputs[0].dtype, device=inputs[0].device,
                       memory_format=torch.channels_last)


@torch.library.register_fake("pymatting_ext::replace")
def _replace_fake(x, patches, idx, valid):
    return torch.empty_like(x)


@torch.library.register_fake("pymatting_ext::compose")
def _compose_fake(coarse, patches, idx, valid, size, src):
    return coarse.new_empty((coarse.shape[0], coarse.shape[1], size[0], size[1]))
