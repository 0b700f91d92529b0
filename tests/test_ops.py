"""Every op against the reference: devices x dtypes x odd shapes x layouts,
empty selections, ties and NaN. The reference itself is checked against
independent constructions (torch.topk, F.interpolate + F.pad + slicing)."""
import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import BACKEND_CASES, DTYPES, compiled_backends, skip_unsupported

#: The compiled backends that take CPU tensors here (Triton through its
#: interpreter when there is no GPU).
CPU_BACKENDS = compiled_backends("cpu")
from helpers import assert_close, cpu, layouts

# Tolerance of the compiled bilinear against F.interpolate's: the same
# formula, but PyTorch's own kernel may contract to FMA.
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# -- select_sampling ---------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((1, 1, 7, 9), 5), ((3, 1, 13, 11), 40), ((2, 1, 5, 6), 30),
                                     ((2, 1, 5, 6), 0), ((2, 1, 4, 4), 100)])
@pytest.mark.parametrize("prevent", [True, False])
def test_select_sampling_matches_reference(device, backend, dtype, shape, k, prevent):
    skip_unsupported(backend, dtype)
    err = (torch.rand(shape) - 0.2).to(dtype).to(device)
    got = pm.select_sampling(err, k, prevent, backend=backend)
    want = reference.select_sampling(err.cpu(), k, prevent)
    for g, w, name in zip(got, want, ("ref", "idx", "valid")):
        assert g.device.type == device
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), name
    ref, idx, valid = got
    n = min(k, shape[2] * shape[3])
    assert ref.dtype == dtype and idx.dtype == torch.int64 and valid.dtype == torch.bool
    assert idx.shape == (shape[0] * n, 3)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_sampling_ties_nan_and_signed_zero(device, backend, dtype):
    skip_unsupported(backend, dtype)
    # Few distinct values: most of the choice is tie-breaking.
    err = torch.randint(0, 4, (3, 1, 9, 10)).to(dtype) / 4
    err[0, 0, 2, 3] = float("nan")
    err[1, 0, 0, :] = -0.0
    err[1, 0, 1, :] = 0.0
    err[2] = 0.5
    err = err.to(device)
    for k in (1, 17, 45, 89, 90):
        got = pm.select_sampling(err, k, True, backend=backend)
        want = reference.select_sampling(err.cpu(), k, True)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w)
    # Image 2 is all ties: the first k cells in row-major order.
    _, idx, _ = pm.select_sampling(err, 7, False, backend=backend)
    rows = idx.cpu()[idx.cpu()[:, 0] == 2]
    assert rows[:, 1:].tolist() == [[0, x] for x in range(7)]
    # NaN counts as the largest (picked first) but is not valid (not > 0).
    ref, idx, valid = pm.select_sampling(err, 1, True, backend=backend)
    assert idx.cpu()[0].tolist() == [0, 2, 3] and not bool(valid.cpu()[0]) and ref.cpu()[0].sum() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_select_sampling_signed_zero_ties(backend):
    # -0.0 == +0.0, so they tie and the lower index wins, whatever the sign.
    err = torch.tensor([[[[0.0, -0.0, 0.0, -0.0]]]])
    err2 = torch.tensor([[[[-0.0, 0.0, -0.0, 0.0]]]])
    for e in (err, err2):
        _, idx, _ = pm.select_sampling(e, 2, False, backend=backend)
        assert idx[:, 2].tolist() == [0, 1]


def test_reference_select_matches_topk_without_ties():
    err = torch.rand(4, 1, 17, 23)
    k = 50
    ref, idx, valid = reference.select_sampling(err, k, True)
    top = err.view(4, -1).topk(k, dim=1).indices.sort(dim=1).values
    flat = idx[:, 1] * 23 + idx[:, 2]
    assert torch.equal(flat.view(4, k), top)
    assert torch.equal(idx[:, 0], torch.arange(4).repeat_interleave(k))
    expect = torch.zeros(4, 17 * 23).scatter_(1, top, 1.0).view(4, 1, 17, 23)
    assert torch.equal(ref, expect) and bool(valid.all())


# -- select_thresholding -----------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (3, 1, 31, 17), (2, 1, 64, 300)])
@pytest.mark.parametrize("threshold", [0.1, 0.5, 2.0, -1.0])
def test_select_thresholding_matches_reference(device, backend, dtype, shape, threshold):
    skip_unsupported(backend, dtype)
    err = torch.rand(shape).to(dtype).to(device)
    ref, idx = pm.select_thresholding(err, threshold, backend=backend)
    want_ref, want_idx = reference.select_thresholding(err.cpu(), threshold)
    assert ref.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(ref.cpu(), want_ref) and torch.equal(idx.cpu(), want_idx)
    assert torch.equal(want_idx, torch.nonzero(err.cpu()[:, 0] > threshold))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_thresholding_rounds_threshold_to_dtype(backend, dtype):
    skip_unsupported(backend, dtype)
    # As torch.gt: 0.1 is first rounded to err's dtype, so err == round(0.1)
    # is not selected.
    err = torch.full((1, 1, 2, 2), 0.1, dtype=dtype)
    ref, idx = pm.select_thresholding(err, 0.1, backend=backend)
    assert ref.sum() == 0 and idx.shape == (0, 3)
    assert ref.sum() == err.gt(0.1).sum()


# -- crop --------------------------------------------------------------------

def crop_independent(inputs, idx, stride, padding, image_size, patch_size):
    """The crop built another way: dense resize, cat, pad, slice per patch."""
    H, W = image_size
    image = torch.cat([F.interpolate(t, (H, W), mode="bilinear", align_corners=False)
                       if tuple(t.shape[2:]) != (H, W) else t for t in inputs], 1)
    ph, pw = patch_size
    pad = max(ph, pw) + stride + padding
    padded = F.pad(image, (pad, pad, pad, pad))
    out = []
    for b, y, x in idx.tolist():
        oy, ox = y * stride - padding + pad, x * stride - padding + pad
        out.append(padded[b, :, oy:oy + ph, ox:ox + pw])
    return torch.stack(out) if out else image.new_zeros((0, image.shape[1], ph, pw))


def crop_case(B, device, dtype, layout, stride=2):
    H, W = 44, 60
    hid = torch.rand(B, 5, 11, 15)          # resampled x2
    pha = torch.rand(B, 1, 11, 15)
    src = torch.rand(B, 3, 88, 120)         # resampled /2
    same = torch.rand(B, 2, H, W)           # read directly
    inputs = [layouts(t.to(dtype).to(device), layout) for t in (hid, pha, src, same)]
    hc, wc = -(-H // stride), -(-W // stride)
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, hc, wc), 37, False)
    idx = torch.cat([idx, torch.tensor([[0, 0, 0], [B - 1, hc - 1, wc - 1], [0, 3, wc - 1]])])
    return inputs, idx.to(device), (H, W)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("stride,padding,patch", [(2, 3, None), (2, 0, None), (4, 2, None), (2, 1, (5, 9))])
def test_crop_matches_reference(device, backend, dtype, layout, B, stride, padding, patch):
    skip_unsupported(backend, dtype)
    inputs, idx, size = crop_case(B, device, dtype, layout, stride)
    got = pm.crop(inputs, idx, stride, padding, size, patch, backend=backend)
    want = reference.crop(cpu(*inputs), idx.cpu(), stride, padding, size, patch)
    ph, pw = patch or (stride + 2 * padding,) * 2
    assert got.shape == (idx.shape[0], 11, ph, pw) and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got.cpu(), want, ATOL[dtype], msg="crop")
    # Cells read without resampling are copied exactly, zeros outside too.
    assert torch.equal(got.cpu()[:, 9:], want[:, 9:])


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("stride,padding,offset,extra", [(2, 3, 0, 0), (4, 2, 5, 3), (2, 1, 2, 0)])
def test_crop_into_writes_its_channels_only(device, backend, dtype, layout, stride, padding, offset, extra):
    skip_unsupported(backend, dtype)
    inputs, idx, size = crop_case(2, device, dtype, layout, stride)
    ph = pw = stride + 2 * padding
    out = torch.full((idx.shape[0], offset + 11 + extra, ph, pw), float("nan"), dtype=dtype, device=device)
    out = out.contiguous(memory_format=torch.channels_last)
    assert pm.crop_into(inputs, idx, stride, padding, size, offset, out, backend=backend) is None
    want = reference.crop(cpu(*inputs), idx.cpu(), stride, padding, size)
    assert_close(out[:, offset:offset + 11].cpu(), want, ATOL[dtype], msg="crop_into")
    # The other channels are untouched (still NaN), and crop gives the same.
    assert bool(out[:, :offset].isnan().all()) and bool(out[:, offset + 11:].isnan().all())
    same = pm.crop(inputs, idx, stride, padding, size, backend=backend)
    assert torch.equal(out[:, offset:offset + 11], same)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_crop_into_rejects_bad_out(device, backend):
    x = torch.rand(2, 3, 10, 14, device=device)
    idx = torch.tensor([[0, 1, 1], [1, 2, 3]], device=device)

    def run(out, offset=0):
        pm.crop_into([x], idx, 2, 3, (20, 28), offset, out, backend=backend)

    good = torch.empty(2, 5, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="crop_into: out has 3 patches but idx has 2 rows"):
        run(torch.empty(3, 5, 8, 8, device=device).contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"channel_offset \(3\) plus the inputs' 3 channels"):
        run(good, 3)
    with pytest.raises(ValueError, match="channel_offset must be"):
        run(good, -1)
    with pytest.raises(ValueError, match="out must be channels-last contiguous"):
        run(torch.empty(2, 5, 8, 8, device=device))
    with pytest.raises(ValueError, match="out has dtype torch.float64"):
        run(good.double())
    with pytest.raises(ValueError, match="out must"):
        run(torch.empty(2, 5, 8, device=device))
    run(good, 2)  # fits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_crop_matches_independent_construction(dtype):
    for stride, padding, patch in [(2, 3, (8, 8)), (4, 2, (8, 8)), (2, 1, (5, 9))]:
        inputs, idx, size = crop_case(2, "cpu", dtype, "contiguous", stride)
        want = crop_independent(inputs, idx, stride, padding, size, patch)
        assert torch.equal(reference.crop(inputs, idx, stride, padding, size, patch), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_crop_bilinear_within_an_ulp_of_interpolate_at_refiner_scales(backend):
    # The Refiner's resamples: x2 up (coarse at 1/4) and /2 down (full res).
    # PyTorch's vectorised kernel rounds differently in the last bit.
    hid = torch.rand(2, 32, 27, 48)
    src = torch.rand(2, 3, 108, 192)
    _, idx, _ = reference.select_sampling(torch.rand(2, 1, 27, 48), 100, False)
    got = pm.crop([hid, src], idx, 2, 3, (54, 96), backend=backend)
    assert_close(got, crop_independent([hid, src], idx, 2, 3, (54, 96), (8, 8)), 1.2e-7)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_crop_empty_and_whole_image(device, backend):
    x = torch.rand(2, 3, 10, 14, device=device)
    empty = torch.zeros((0, 3), dtype=torch.long, device=device)
    out = pm.crop([x], empty, 2, 3, (20, 28), backend=backend)
    assert out.shape == (0, 3, 8, 8)
    whole = torch.tensor([[0, 0, 0], [1, 0, 0]], device=device)
    out = pm.crop([x], whole, 1, 3, (20, 28), (26, 34), backend=backend)
    want = F.pad(F.interpolate(x.cpu(), (20, 28), mode="bilinear", align_corners=False), (3, 3, 3, 3))
    assert_close(out.cpu(), want, 1e-6)


# -- replace -----------------------------------------------------------------

def replace_case(B, C, H, W, P, s, device, dtype):
    x = torch.rand(B, C, H, W).to(dtype).to(device)
    patches = torch.rand(P, C, s, s).to(dtype).to(device)
    idx = torch.stack([torch.randint(0, B, (P,)), torch.randint(0, H // s, (P,)),
                       torch.randint(0, W // s, (P,))], 1).to(device)
    if P >= 2:
        idx[1] = idx[0]  # a duplicate cell: the later patch wins
    valid = (torch.rand(P) > 0.3).to(device)
    return x, patches, idx, valid


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,P,s", [(1, 4, 8, 12, 5, 4), (3, 2, 20, 16, 40, 4), (2, 3, 9, 6, 7, 3),
                                         (2, 4, 8, 8, 0, 4)])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_replace_matches_reference(device, backend, dtype, B, C, H, W, P, s, with_valid, layout):
    skip_unsupported(backend, dtype)
    x, patches, idx, valid = replace_case(B, C, H, W, P, s, device, dtype)
    x = layouts(x, layout)
    patches = layouts(patches, layout)
    valid = valid if with_valid else None
    got = pm.replace(x, patches, idx, valid, backend=backend)
    want = reference.replace(*cpu(x, patches, idx, valid))
    assert torch.equal(got.cpu(), want)
    assert torch.equal(x.cpu(), cpu(x)[0])  # out of place


def test_reference_replace_by_sequential_loop():
    x, patches, idx, valid = replace_case(2, 3, 12, 16, 30, 4, "cpu", torch.float32)
    want = x.clone()
    for p, (b, y, xx) in enumerate(idx.tolist()):
        if valid[p]:
            want[b, :, 4 * y:4 * y + 4, 4 * xx:4 * xx + 4] = patches[p]
    assert torch.equal(reference.replace(x, patches, idx, valid), want)


# -- compose -----------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hc,Wc,H,W,P", [(1, 5, 7, 20, 28, 9), (3, 11, 6, 44, 24, 50), (2, 9, 13, 20, 28, 0),
                                            (2, 30, 41, 120, 164, 200)])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("epilogue", [False, True])
def test_compose_matches_reference(device, backend, dtype, B, Hc, Wc, H, W, P, with_valid, epilogue):
    skip_unsupported(backend, dtype)
    coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype).to(device)
    _, patches, idx, valid = replace_case(B, 4, H, W, P, 4, device, dtype)
    patches = patches * 1.4 - 0.2
    src = torch.rand(B, 3, H, W).to(dtype).to(device) if epilogue else None
    valid = valid if with_valid else None
    got = pm.compose(coarse, patches, idx, valid, (H, W), src, backend=backend)
    want = reference.compose(*cpu(coarse, patches, idx, valid), (H, W), *cpu(src))
    assert got.shape == (B, 4, H, W) and got.dtype == dtype and got.is_contiguous()
    assert_close(got.cpu(), want, ATOL[dtype], msg="compose")
    if epilogue:
        assert float(got.min()) >= 0 and float(got.max()) <= 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_compose_within_an_ulp_of_interpolate_with_strided_inputs(backend, layout):
    coarse = layouts(torch.rand(2, 4, 30, 41), layout)
    patches = torch.rand(0, 4, 4, 4)
    got = pm.compose(coarse, patches, torch.zeros((0, 3), dtype=torch.long), None, (120, 164), backend=backend)
    assert_close(got, F.interpolate(coarse, (120, 164), mode="bilinear", align_corners=False), 1.2e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compose_epilogue_rounds_like_matting_refine(backend):
    # MattingRefine: pha.clamp_(0, 1); fgr.add_(src).clamp_(0, 1), in the dtype.
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        coarse = (torch.randn(2, 4, 6, 7) * 2).to(dtype)
        src = torch.rand(2, 3, 24, 28).to(dtype)
        empty = torch.zeros((0, 3), dtype=torch.long)
        got = pm.compose(coarse, torch.zeros(0, 4, 4, 4, dtype=dtype), empty, None, (24, 28), src, backend=backend)
        up = F.interpolate(coarse, (24, 28), mode="bilinear", align_corners=False)
        want = torch.cat([up[:, :1].clamp(0, 1), up[:, 1:].add(src).clamp(0, 1)], 1)
        assert_close(got, want, ATOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compose_keeps_nan(backend):
    coarse = torch.rand(1, 4, 4, 4)
    coarse[0, 0, 1, 1] = float("nan")
    src = torch.rand(1, 3, 16, 16)
    got = pm.compose(coarse, torch.zeros(0, 4, 4, 4), torch.zeros((0, 3), dtype=torch.long), None, (16, 16), src,
                     backend=backend)
    want = reference.compose(coarse, torch.zeros(0, 4, 4, 4), torch.zeros((0, 3), dtype=torch.long), None,
                             (16, 16), src)
    assert bool(torch.isnan(got).any())
    assert torch.equal(torch.isnan(got), torch.isnan(want))


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hc,Wc,H,W,P", [(1, 5, 7, 20, 28, 9), (2, 30, 41, 120, 164, 200)])
@pytest.mark.parametrize("epilogue", [False, True])
def test_compose_into_writes_what_compose_returns(device, backend, dtype, B, Hc, Wc, H, W, P, epilogue):
    skip_unsupported(backend, dtype)
    coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype).to(device)
    _, patches, idx, valid = replace_case(B, 4, H, W, P, 4, device, dtype)
    src = torch.rand(B, 3, H, W).to(dtype).to(device) if epilogue else None
    want = pm.compose(coarse, patches, idx, valid, (H, W), src, backend=backend)
    # Every element written, also into an out that starts one element into
    # its storage (not 16-byte aligned), and again into a used one.
    for offset in (0, 1):
        out = torch.full((offset + B * 4 * H * W,), float("nan"), dtype=dtype, device=device)[offset:]
        out = out.view(B, 4, H, W)
        assert pm.compose_into(coarse, patches, idx, valid, src, out, backend=backend) is None
        assert torch.equal(out, want)
    other = pm.compose(coarse, patches.flip(0), idx, None, (H, W), src, backend=backend)
    pm.compose_into(coarse, patches.flip(0), idx, None, src, out, backend=backend)
    assert torch.equal(out, other)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_compose_into_rejects_bad_out(device, backend):
    coarse = torch.rand(2, 4, 5, 7, device=device)
    patches = torch.rand(2, 4, 4, 4, device=device)
    idx = torch.tensor([[0, 1, 1], [1, 4, 6]], device=device)

    def run(out, src=None):
        pm.compose_into(coarse, patches, idx, None, src, out, backend=backend)

    with pytest.raises(ValueError, match="compose_into: out must have shape"):
        run(torch.empty(2, 4, 20, device=device))
    with pytest.raises(ValueError, match="compose_into: out must have coarse's batch size and channels"):
        run(torch.empty(3, 4, 20, 28, device=device))
    with pytest.raises(ValueError, match="compose_into: out must have coarse's batch size and channels"):
        run(torch.empty(2, 3, 20, 28, device=device))
    with pytest.raises(ValueError, match="compose_into: out must be contiguous"):
        run(torch.empty(2, 4, 28, 20, device=device).transpose(2, 3))
    with pytest.raises(ValueError, match="compose_into: out has dtype torch.float64"):
        run(torch.empty(2, 4, 20, 28, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"compose_into: size \(22, 28\) must be divisible"):
        run(torch.empty(2, 4, 22, 28, device=device))
    # out's size sets the cell grid that idx is checked against.
    with pytest.raises((ValueError, RuntimeError), match="compose_into: idx row 1"):
        run(torch.empty(2, 4, 20, 24, device=device))
    with pytest.raises(ValueError, match="compose_into: src must have shape"):
        run(torch.empty(2, 4, 20, 28, device=device), torch.rand(2, 3, 20, 24, device=device))
    run(torch.empty(2, 4, 20, 28, device=device))  # fits


def test_compose_into_op_checks_out_itself():
    # The raw C++ op, without pymatting_ext.ops' checks.
    op = torch.ops.pymatting_ext.compose_into
    coarse, patches = torch.rand(2, 4, 5, 7), torch.rand(1, 4, 4, 4)
    idx = torch.tensor([[1, 4, 6]])
    for out, message in [(torch.empty(2, 4, 20), "compose_into: out must have shape"),
                         (torch.empty(2, 5, 20, 28), "compose_into: out must have coarse's batch size"),
                         (torch.empty(2, 4, 28, 20).transpose(2, 3), "compose_into: out must be contiguous"),
                         (torch.empty(2, 4, 20, 28, dtype=torch.float64), "compose_into: out has dtype"),
                         (torch.empty(2, 4, 20, 24), "compose_into: idx row 0")]:
        with pytest.raises(RuntimeError, match=message):
            op(coarse, patches, idx, None, None, out)
