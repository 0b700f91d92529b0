"""Bad arguments to the Refiner get a clear error naming the argument: its
constructor's, its tensors' (rank, channels, batch, sizes, dtypes) and an
attribute set after construction."""
import pytest
import torch

import pymatting_ext as pm

from helpers import refiner_inputs


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="dense"), "mode"),
    (dict(kernel_size=5), "kernel_size"),
    (dict(sample_pixels=-16), "sample_pixels"),
    (dict(sample_pixels=1.5), "sample_pixels"),
    (dict(threshold="high"), "threshold"),
    (dict(patch_crop_method="slice"), "patch_crop_method"),
    (dict(patch_replace_method="paste"), "patch_replace_method"),
    (dict(backend="tpu"), "backend"),
])
def test_refiner_constructor_rejects(kwargs, match):
    args = dict(mode="sampling", sample_pixels=1000, threshold=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pm.Refiner(**args)


def good_inputs(B=2):
    return list(refiner_inputs(B, 32, 48, 8, 12))


NAMES = ["src", "bgr", "pha", "fgr", "err", "hid"]


@pytest.mark.parametrize("mode", ["sampling", "thresholding", "full"])
@pytest.mark.parametrize("case", [
    ("src", lambda t: t[0], "src"),                        # wrong rank
    ("bgr", lambda t: t[:, :2], "bgr"),                    # channel count
    ("hid", lambda t: t[:, :16], "hid"),
    ("fgr", lambda t: t[:1], "fgr"),                       # batch mismatch
    ("err", lambda t: t[..., :-1], "err"),                 # coarse size mismatch
    ("pha", lambda t: t.double(), "pha"),                  # mixed dtypes
    ("src", lambda t: t[..., :-2], "src|bgr"),             # W not divisible by 4 (and != bgr)
])
def test_refiner_rejects_bad_tensors(mode, case):
    name, change, match = case
    x = good_inputs()
    x[NAMES.index(name)] = change(x[NAMES.index(name)])
    with pytest.raises(ValueError, match=match):
        pm.Refiner(mode, 1000, 0.1).eval()(*x)


@pytest.mark.parametrize("H,W", [(30, 48), (32, 46), (34, 50)])
def test_refiner_rejects_sizes_not_divisible_by_4(H, W):
    x = list(refiner_inputs(1, H, W, 8, 12))
    with pytest.raises(ValueError, match="multiples of 4"):
        pm.Refiner("sampling", 1000, 0.1).eval()(*x)


def test_refiner_rejects_unsupported_dtype_and_non_tensor():
    x = [t.to(torch.int32) for t in good_inputs()]
    with pytest.raises(ValueError, match="float32"):
        pm.Refiner("sampling", 1000, 0.1)(*x)
    x = good_inputs()
    x[0] = x[0].numpy()
    with pytest.raises(TypeError, match="src"):
        pm.Refiner("sampling", 1000, 0.1)(*x)


def test_refiner_rejects_negative_sample_pixels_set_later():
    r = pm.Refiner("sampling", 1000, 0.1).eval()
    r.sample_pixels = -32
    with pytest.raises(ValueError, match="sample_pixels"):
        r(*good_inputs())
