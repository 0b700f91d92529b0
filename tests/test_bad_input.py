"""Bad input gets a clear error naming the argument, from the public ops, from
the raw C++ ops and from Refiner: never a crash or silent garbage."""
import pytest
import torch

import pymatting_ext as pm

from helpers import refiner_inputs

OPS = torch.ops.pymatting_ext
ERRORS = (ValueError, TypeError, RuntimeError)


# -- Refiner -------------------------------------------------------------------

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


def test_backend_for_another_device_says_why():
    # (test_triton.py covers a missing Triton, interpreter and dtype limits.)
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        pm.Refiner("sampling", 1000, 0.1, backend="cuda")(*good_inputs())
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        pm.select_sampling(torch.rand(1, 1, 4, 4), 2, backend="cuda")


# -- ops -----------------------------------------------------------------------

def idx_rows(*rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_select_rejects(backend):
    with pytest.raises(ValueError, match="err"):
        pm.select_sampling(torch.rand(1, 2, 4, 4), 3, backend=backend)
    with pytest.raises(ValueError, match="err"):
        pm.select_sampling(torch.rand(1, 4, 4), 3, backend=backend)
    with pytest.raises(ValueError, match="k"):
        pm.select_sampling(torch.rand(1, 1, 4, 4), -1, backend=backend)
    with pytest.raises(ValueError, match="err"):
        pm.select_thresholding(torch.randint(0, 2, (1, 1, 4, 4)), 0.5, backend=backend)
    with pytest.raises(TypeError, match="threshold"):
        pm.select_thresholding(torch.rand(1, 1, 4, 4), "0.5", backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [(-1, 0, 0), (2, 0, 0), (0, -1, 0), (0, 5, 0), (0, 0, 6), (0, 0, -3)])
def test_out_of_range_idx_is_an_error(backend, bad):
    x = torch.rand(2, 3, 20, 24)       # cells of 4: 5 x 6
    idx = idx_rows((0, 1, 1), bad)
    patches = torch.rand(2, 3, 4, 4)
    with pytest.raises(ERRORS, match="idx"):
        pm.crop([x], idx, 4, 2, (20, 24), backend=backend)
    with pytest.raises(ERRORS, match="idx"):
        pm.replace(x, patches, idx, backend=backend)
    with pytest.raises(ERRORS, match="idx"):
        pm.compose(torch.rand(2, 3, 5, 6), patches, idx, None, (20, 24), backend=backend)


@pytest.mark.parametrize("bad", [(-1, 0, 0), (2, 0, 0), (0, 5, 0), (0, 0, 6), (0, -7, 0)])
def test_raw_ops_check_idx_values(bad):
    x = torch.rand(2, 3, 20, 24)
    idx = idx_rows((0, 1, 1), bad)
    patches = torch.rand(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="idx row 1"):
        OPS.crop([x], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="idx row 1"):
        OPS.replace(x, patches, idx, None)
    with pytest.raises(RuntimeError, match="idx row 1"):
        OPS.compose(torch.rand(2, 3, 5, 6), patches, idx, None, [20, 24], None)


def test_raw_ops_check_metadata():
    x = torch.rand(2, 3, 20, 24)
    idx = idx_rows((0, 1, 1))
    with pytest.raises(RuntimeError, match="idx must have shape"):
        OPS.crop([x], idx[:, :2], 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="idx must be int64"):
        OPS.crop([x], idx.int(), 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="inputs"):
        OPS.crop([], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match=r"inputs\[1\]"):
        OPS.crop([x, x.double()], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match=r"inputs\[1\]"):
        OPS.crop([x, x[:1]], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="stride"):
        OPS.crop([x], idx, 0, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="padding"):
        OPS.crop([x], idx, 4, -1, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="err"):
        OPS.select_sampling(torch.rand(2, 3, 4, 4), 3, True)
    with pytest.raises(RuntimeError, match="k must be non-negative"):
        OPS.select_sampling(torch.rand(2, 1, 4, 4), -3, True)
    with pytest.raises(RuntimeError, match="err must be float32"):
        OPS.select_thresholding(torch.zeros(2, 1, 4, 4, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="patches"):
        OPS.replace(x, torch.rand(1, 2, 4, 4), idx, None)
    with pytest.raises(RuntimeError, match="divisible"):
        OPS.replace(x, torch.rand(1, 3, 7, 7), idx, None)
    with pytest.raises(RuntimeError, match="valid"):
        OPS.replace(x, torch.rand(1, 3, 4, 4), idx, torch.ones(2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="src"):
        OPS.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, [20, 24], torch.rand(2, 3, 20, 20))
    with pytest.raises(RuntimeError, match="size"):
        OPS.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, [22, 24], None)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_public_ops_check_metadata(backend):
    x = torch.rand(2, 3, 20, 24)
    idx = idx_rows((0, 1, 1))
    cases = [
        (lambda: pm.crop([x], idx.int(), 4, 2, (20, 24), backend=backend), "idx"),
        (lambda: pm.crop([x, x.double()], idx, 4, 2, (20, 24), backend=backend), r"inputs\[1\]"),
        (lambda: pm.crop([x, x[:1]], idx, 4, 2, (20, 24), backend=backend), r"inputs\[1\]"),
        (lambda: pm.crop([x[0]], idx, 4, 2, (20, 24), backend=backend), r"inputs\[0\]"),
        (lambda: pm.crop([], idx, 4, 2, (20, 24), backend=backend), "inputs"),
        (lambda: pm.crop([x], idx, 4, 2, (20, 0), backend=backend), "image_size"),
        (lambda: pm.crop([x], idx, 0, 2, (20, 24), backend=backend), "stride"),
        (lambda: pm.replace(x, torch.rand(1, 2, 4, 4), idx, backend=backend), "patches"),
        (lambda: pm.replace(x, torch.rand(1, 3, 4, 4), idx, torch.ones(3, dtype=torch.bool), backend=backend),
         "valid"),
        (lambda: pm.replace(x, torch.rand(2, 3, 4, 4), idx, backend=backend), "idx"),
        (lambda: pm.replace(x, torch.rand(1, 3, 4, 4).double(), idx, backend=backend), "patches"),
        (lambda: pm.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, (20, 24),
                            torch.rand(2, 4, 20, 24), backend=backend), "src"),
        (lambda: pm.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, (21, 24),
                            backend=backend), "size"),
        (lambda: pm.compose(torch.rand(2, 4, 5, 6).to(torch.complex64), torch.rand(1, 4, 4, 4), idx, None,
                            (20, 24), backend=backend), "coarse"),
    ]
    for call, match in cases:
        with pytest.raises(ERRORS, match=match):
            call()
