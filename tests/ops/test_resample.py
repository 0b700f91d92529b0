"""The bilinear resample that crop and compose share, in the Triton kernels:
the scale computed in the kernels from the integer sizes, bit for bit
ATen's float32 division (no size specialised under torch.compile), and
crop's and compose's resampled values bit for bit the formula of
csrc/index_math.h with that scale (F.interpolate itself where the scale is
dyadic). F.interpolate's own use of that scale is checked first."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pymatting_ext import reference

from conftest import TRITON_CASES

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
# NB: imported after conftest, which chooses the interpreter where there is
# no GPU (the package's __init__ exports functions named like its modules).
common = importlib.import_module("pymatting_ext.triton_kernels.common")
resize_scale = common.resize_scale

#: (input size, output size) pairs: the refiner's x2 and /2 at odd sizes,
#: odd ratios both ways, and sizes past 2^24, which float32 rounds before
#: the division (as ATen does: static_cast<float>(input_size) / output_size).
SCALE_PAIRS = [(9, 18), (27, 54), (135, 270), (13, 52), (7, 20), (30, 41), (41, 164), (5, 8), (20, 7),
               (121, 3), (1, 4), (3, 1), (2 ** 24 + 1, 3), (2 ** 24 + 3, 8), (2 ** 24 + 1, 20), (2 ** 24 + 1, 5),
               (2 ** 24 + 1, 2 ** 24 - 1),
               (2 ** 31 - 1, 7), (2 ** 31 - 1, 2 ** 31 - 3)]


def _aten_scale(in_size, out_size):
    return np.float32(in_size) / np.float32(out_size)


@triton.jit
def _scale_probe(in_ptr, out_ptr, scale_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(scale_ptr + i, resize_scale(tl.load(in_ptr + i), tl.load(out_ptr + i)))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_resize_scale_is_atens_float32_division(device, backend):
    n = triton.next_power_of_2(len(SCALE_PAIRS))
    pairs = SCALE_PAIRS + [(1, 1)] * (n - len(SCALE_PAIRS))
    sizes = torch.tensor(pairs, dtype=torch.int64, device=device)
    got = torch.empty(n, dtype=torch.float32, device=device)
    _scale_probe[(1,)](sizes[:, 0].contiguous(), sizes[:, 1].contiguous(), got, BLOCK=n)
    want = np.array([_aten_scale(a, b) for a, b in pairs], dtype=np.float32)
    assert np.array_equal(got.cpu().numpy().view(np.int32), want.view(np.int32))
    # The pairs tell the formulas apart: the exact ratio rounded once is
    # another float for the sizes past 2^24.
    exact = np.array([np.float32(a / b) for a, b in pairs], dtype=np.float32)
    assert not np.array_equal(exact, want)


def _alternating(n, axis, other=4):
    """A (1, 1, ., .) tensor of n values 0, 1, 0, 1, ... along `axis` (2 or
    3), repeated `other` times along the other axis (a stride-0 view). A
    bilinear mix of two neighbours is then one weight times 1 plus 0, exact
    whatever the order of the operations, so a resize of it shows its
    weights and taps bit for bit."""
    row = (torch.arange(n) % 2).float()
    return row.view(1, 1, n, 1).expand(1, 1, n, other) if axis == 2 else row.view(1, 1, 1, n).expand(1, 1, other, n)


def _resize_alternating(n_in, n_out, scale, fma):
    """One axis of PyTorch's bilinear resize (align_corners=False) of the
    alternating values, in float32, step by step as csrc/index_math.h's
    linear_tap and linear_mix. fma: the source coordinate
    scale * (dst + 0.5) - 0.5 rounded once, as a fused multiply-add does
    (computed in float64, where it is exact for these sizes, then rounded)."""
    f32 = np.float32
    dst = np.arange(n_out, dtype=f32)
    if fma:
        src = f32(np.float64(scale) * (np.float64(dst) + 0.5) - 0.5)
    else:
        src = f32(scale) * (dst + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    i1 = i0 + (i0 < n_in - 1)
    return (f32(1) - lam) * (i0 % 2).astype(f32) + lam * (i1 % 2).astype(f32)


#: (input size, output size) along one axis: the refiner's x4 up and /2 down
#: at odd sizes (dyadic scales: every product exact), non-dyadic ratios both
#: ways, and a size past 2^24 whose float32 rounding changes the result.
#: Outputs are multiples of compose's cell size, 4.
RESIZE_PAIRS = [(9, 36), (27, 108), (72, 36), (7, 20), (30, 164), (13, 8), (2 ** 24 + 1, 20)]
DYADIC = {(9, 36), (27, 108), (72, 36)}


def _as_axis(values, axis, other=4):
    t = torch.from_numpy(values)
    n = t.numel()
    return t.view(1, 1, n, 1).expand(1, 1, n, other) if axis == 2 else t.view(1, 1, 1, n).expand(1, 1, other, n)


def test_interpolate_uses_the_float32_scale_of_the_sizes():
    # What the kernels must reproduce: F.interpolate's weights at these
    # sizes are those of scale = float32(in) / float32(out) (ATen's
    # area_pixel_compute_scale), not of the exact ratio. NB: this torch's
    # CPU upsample computes the source coordinate with a fused multiply-add
    # (so do nvcc's CUDA builds by default), where csrc/index_math.h and the
    # Triton kernels (FP_FUSION) round twice: either rounding is accepted
    # here, the scale is what is tested.
    for axis in (3, 2):
        for n_in, n_out in RESIZE_PAIRS:
            size = [4, 4]
            size[axis - 2] = n_out
            got = F.interpolate(_alternating(n_in, axis), size, mode="bilinear", align_corners=False)
            line = (got[0, 0, :, 0] if axis == 2 else got[0, 0, 0]).numpy()
            scale = _aten_scale(n_in, n_out)
            assert any(np.array_equal(line, _resize_alternating(n_in, n_out, scale, fma)) for fma in (True, False)), \
                (n_in, n_out, axis)
            if n_in > 2 ** 24:
                exact = np.float32(n_in / n_out)
                assert exact != scale
                assert not any(np.array_equal(line, _resize_alternating(n_in, n_out, exact, fma))
                               for fma in (True, False))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("axis", [2, 3])
def test_compose_resizes_with_the_scale_of_the_sizes(device, backend, axis):
    # compose without refined cells is the bilinear upsample of coarse, with
    # the scale computed in the kernel from the sizes: bit for bit the
    # formula of csrc/index_math.h with ATen's scale, and F.interpolate
    # itself where the scale is dyadic (no rounding for an FMA to skip).
    empty = torch.zeros((0, 3), dtype=torch.int64, device=device)
    for n_in, n_out in RESIZE_PAIRS:
        size = [4, 4]
        size[axis - 2] = n_out
        coarse = _alternating(n_in, axis).to(device)
        got = torch.ops.pymatting_ext_triton.compose(coarse, torch.zeros(0, 1, 4, 4, device=device), empty, None,
                                                     size, None).cpu()
        want = _as_axis(_resize_alternating(n_in, n_out, _aten_scale(n_in, n_out), False), axis)
        assert torch.equal(got, want), (n_in, n_out, axis)
        if (n_in, n_out) in DYADIC:
            assert torch.equal(got, F.interpolate(coarse.cpu(), size, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("axis", [2, 3])
def test_crop_resamples_with_the_scale_of_the_sizes(device, backend, axis):
    # The same through crop: its patches of the resized input equal those
    # of the resized image built by the formula (read without resampling).
    for n_in, n_out in [(9, 18), (27, 54), (26, 13), (7, 20), (30, 41), (13, 8)]:
        x = _alternating(n_in, axis, 12).to(device)
        image = [12, 12]
        image[axis - 2] = n_out
        resized = _as_axis(_resize_alternating(n_in, n_out, _aten_scale(n_in, n_out), False), axis, 12)
        cells = [-(-s // 2) for s in image]
        idx = torch.tensor([[0, y, x] for y in range(cells[0]) for x in range(cells[1])])
        got = torch.ops.pymatting_ext_triton.crop([x], idx.to(device), 2, 3, image, [8, 8])
        want = reference.crop([resized.contiguous()], idx, 2, 3, tuple(image), (8, 8))
        assert torch.equal(got.cpu(), want), (n_in, n_out, axis)
