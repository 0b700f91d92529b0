"""The CUDA kernels (kernels/cuda/*.cu) through torch.ops.pymatting_ext on
CUDA tensors, against the reference (and, for the selections, the CPU
kernels) on the same data: dtypes, odd shapes, batches, ties, NaN, signed
zeros, empty selections, duplicate cells, valid masks, layouts; no host
synchronisation where none is allowed; a Refiner captured in a CUDA graph.

Everything here skips without a GPU or without the CUDA half of the
extension."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import DTYPES
from helpers import (assert_close, check_refiner_in_a_cuda_graph, cpu, layouts, random_bn_, refiner_inputs,
                     subprocess_env)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not pm._extension.cuda_compiled(), reason="the extension was built without CUDA kernels"),
]

ops = torch.ops.pymatting_ext
# The compiled bilinear against F.interpolate (the reference): the same
# formula, rounded differently in the last bit (FMA contraction).
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The CUDA kernels against the CPU kernel. The CUDA kernels keep the bilinear
# weights in float, as PyTorch's CUDA upsample does; the CPU kernel rounds
# them to float16/bfloat16, as PyTorch's CPU upsample does: up to four
# weights off by half an ulp each (of values up to ~1.2 here), plus one
# rounding of the result. In float32, nvcc fuses scale * (x + 0.5) - 0.5
# into one FMA where the host compiler rounds twice: a source coordinate
# (below 64 here) one ulp apart moves a weight by up to 4e-6, per axis.
CROSS_ATOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def assert_equal(got, want, name=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    assert torch.equal(got.cpu(), want.cpu()), name


def assert_matches_cuda_reference(got, want, msg="", cancellation=False):
    """got against the reference run on CUDA tensors, whose F.interpolate
    computes the kernels' arithmetic (weights in float for 16-bit types): in
    16-bit types the two differ by at most one rounding of the result, an
    eps relative to it (also absolute where sums can cancel: compose's
    signed values and its + src)."""
    dtype = got.dtype
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        assert_close(got.cpu(), want.cpu(), eps if cancellation else 1e-6, rtol=eps, msg=msg)
    else:
        assert_close(got.cpu(), want.cpu(), ATOL[dtype], msg=msg)


def assert_matches_cpu_kernel(got, want, msg=""):
    dtype = got.dtype
    assert_close(got.cpu(), want.cpu(), CROSS_ATOL[dtype], rtol=CROSS_ATOL[dtype], msg=msg)


# -- select_sampling ---------------------------------------------------------

def sampling_err(shape, dtype, kind):
    B, _, H, W = shape
    if kind == "random":
        err = torch.rand(shape) - 0.2
    elif kind == "ties":
        # Few distinct values: the k-th largest is shared by many cells,
        # spread over every block of the selection.
        err = torch.randint(-1, 3, shape).float() / 4
    else:  # "special": NaN, signed zeros, infinities, negative values
        err = torch.rand(shape) - 0.5
        flat = err.view(B, -1)
        n = flat.shape[1]
        flat[:, torch.randperm(n)[: max(1, n // 50)]] = float("nan")
        flat[:, torch.randperm(n)[: max(1, n // 10)]] = 0.0
        flat[:, torch.randperm(n)[: max(1, n // 10)]] = -0.0
        flat[:, torch.randperm(n)[: max(1, n // 100)]] = float("inf")
        flat[:, torch.randperm(n)[: max(1, n // 100)]] = float("-inf")
    return err.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((1, 1, 7, 9), 5), ((3, 1, 13, 11), 40), ((2, 1, 5, 6), 30), ((2, 1, 5, 6), 31),
                                     ((2, 1, 5, 6), 0), ((2, 1, 4, 4), 100), ((1, 1, 1, 1), 1),
                                     ((2, 1, 67, 129), 777), ((3, 1, 100, 251), 4000)])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("prevent", [True, False])
def test_select_sampling_matches_reference(dtype, shape, k, kind, prevent):
    err = sampling_err(shape, dtype, kind)
    got = ops.select_sampling(err.cuda(), k, prevent)
    want = reference.select_sampling(err, k, prevent)
    for g, w, name in zip(got, want, ("ref", "idx", "valid")):
        assert g.device.type == "cuda", name
        assert_equal(g, w, name)
    n = min(k, shape[2] * shape[3])
    assert got[1].shape == (shape[0] * n, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_select_sampling_at_refiner_sizes_equals_cpu_kernel(dtype, kind):
    # HD (N = 129,600, k = 5,000) and 4K (N = 518,400, k = 20,000): many
    # cooperating blocks per image; the CPU kernel is the oracle, bit for bit.
    for shape, k in [((1, 1, 270, 480), 5000), ((2, 1, 270, 480), 5000), ((2, 1, 540, 960), 20000)]:
        err = sampling_err(shape, dtype, kind)
        for prevent in (True, False):
            got = ops.select_sampling(err.cuda(), k, prevent)
            want = ops.select_sampling(err, k, prevent)
            for g, w, name in zip(got, want, ("ref", "idx", "valid")):
                assert_equal(g, w, f"{shape} {name}")


def test_select_sampling_all_ties_takes_the_first_cells():
    err = torch.full((2, 1, 300, 301), 0.5, device="cuda")
    _, idx, valid = ops.select_sampling(err, 1000, True)
    flat = (idx[:, 1] * 301 + idx[:, 2]).view(2, 1000).cpu()
    assert torch.equal(flat, torch.arange(1000).expand(2, 1000))
    assert bool(valid.all())


def test_select_sampling_signed_zero_ties_and_nan():
    for e in ([0.0, -0.0, 0.0, -0.0], [-0.0, 0.0, -0.0, 0.0]):
        err = torch.tensor(e, device="cuda").view(1, 1, 1, 4)
        _, idx, _ = ops.select_sampling(err, 2, False)
        assert idx[:, 2].tolist() == [0, 1]
    err = torch.rand(1, 1, 9, 10, device="cuda")
    err[0, 0, 2, 3] = float("nan")
    ref, idx, valid = ops.select_sampling(err, 1, True)
    assert idx.tolist() == [[0, 2, 3]] and not bool(valid[0]) and float(ref.sum()) == 0


def test_select_sampling_empty_and_sliced():
    for shape, k in [((0, 1, 5, 5), 3), ((2, 1, 0, 5), 3), ((2, 1, 5, 5), 0)]:
        err = torch.rand(shape, device="cuda")
        ref, idx, valid = ops.select_sampling(err, k, True)
        want = reference.select_sampling(err.cpu(), k, True)
        for g, w in zip((ref, idx, valid), want):
            assert_equal(g, w)
    # A non-contiguous err (a channel of a larger tensor).
    big = torch.rand(3, 2, 31, 45, device="cuda")
    err = big[:, 1:]
    for g, w in zip(ops.select_sampling(err, 99, True), reference.select_sampling(err.cpu(), 99, True)):
        assert_equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 77, 2048, 30000, 65535, 65536])
def test_select_sampling_16_bit_keys_order_every_bit_pattern(dtype, k):
    # float16/bfloat16 are keyed on their 16 bits (two radix passes): every
    # bit pattern once (NaNs of both signs, infinities, signed zeros,
    # subnormals), shuffled, must select exactly what the CPU kernel's 32-bit
    # keys of the widened values select, ties and all.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    err = bits[torch.randperm(65536)].view(dtype).view(1, 1, 256, 256)
    err = torch.cat([err, err.flip(3)])  # a second image, other positions
    for prevent in (True, False):
        got = ops.select_sampling(err.cuda(), k, prevent)
        want = ops.select_sampling(err, k, prevent)
        for g, w, name in zip(got, want, ("ref", "idx", "valid")):
            assert_equal(g, w, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_sampling_writes_all_of_ref(dtype):
    # ref is not zeroed before the kernels run: leave NaN where it will be
    # allocated, and every cell, selected or not, must still come out 0/1.
    for shape, k in [((2, 1, 270, 480), 5000), ((3, 1, 7, 9), 5), ((2, 1, 5, 6), 0)]:
        junk = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        del junk
        err = sampling_err(shape, dtype, "random")
        got = ops.select_sampling(err.cuda(), k, True)
        want = ops.select_sampling(err, k, True)
        for g, w, name in zip(got, want, ("ref", "idx", "valid")):
            assert_equal(g, w, f"{shape} {name}")


def test_select_sampling_batch_beyond_grid_y_limit():
    # More images than a grid's y dimension holds (65535), and than one slice
    # of the scratch: launched in slices that reuse it.
    err = sampling_err((70000, 1, 2, 3), torch.float32, "ties")
    got = ops.select_sampling(err.cuda(), 2, True)
    want = ops.select_sampling(err, 2, True)
    for g, w in zip(got, want):
        assert_equal(g, w)


def test_select_sampling_is_deterministic():
    err = sampling_err((2, 1, 270, 480), torch.float32, "ties").cuda()
    first = ops.select_sampling(err, 5000, True)
    for _ in range(3):
        for a, b in zip(first, ops.select_sampling(err, 5000, True)):
            assert torch.equal(a, b)


def test_select_sampling_never_synchronises():
    err = torch.rand(2, 1, 270, 480, device="cuda")
    ops.select_sampling(err, 5000, True)  # warm up (allocator, module load)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.select_sampling(err, 5000, True)
        ops.select_sampling(err.double(), 5000, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- select_thresholding -----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (3, 1, 31, 17), (2, 1, 64, 300), (3, 1, 270, 480), (0, 1, 4, 4)])
@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.999, 2.0, -1.0])
def test_select_thresholding_matches_reference(dtype, shape, threshold):
    err = torch.rand(shape).to(dtype)
    ref, idx = ops.select_thresholding(err.cuda(), threshold)
    want_ref, want_idx = reference.select_thresholding(err, threshold)
    assert_equal(ref, want_ref, "ref")
    assert_equal(idx, want_idx, "idx")
    cpu_ref, cpu_idx = ops.select_thresholding(err, threshold)
    assert_equal(ref, cpu_ref, "ref vs cpu kernel")
    assert_equal(idx, cpu_idx, "idx vs cpu kernel")


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_thresholding_rounds_threshold_to_dtype_and_keeps_nan_out(dtype):
    err = torch.full((1, 1, 2, 2), 0.1, dtype=dtype, device="cuda")
    err[0, 0, 0, 0] = float("nan")
    ref, idx = ops.select_thresholding(err, 0.1)
    assert float(ref.sum()) == float(err.gt(0.1).sum()) == 0 and idx.shape == (0, 3)


def test_select_thresholding_sliced_input():
    big = torch.rand(2, 3, 40, 70, device="cuda")
    err = big[:, 2:, :, ::2]
    for g, w in zip(ops.select_thresholding(err, 0.3), reference.select_thresholding(err.cpu(), 0.3)):
        assert_equal(g, w)


# -- crop --------------------------------------------------------------------

def crop_case(B, dtype, layout, stride=2):
    H, W = 44, 60
    hid = torch.rand(B, 5, 11, 15)          # resampled x4
    pha = torch.rand(B, 1, 11, 15)
    half = torch.rand(B, 2, 23, 29)         # resampled by an odd ratio
    src = torch.rand(B, 3, 88, 120)         # resampled /2
    same = torch.rand(B, 2, H, W)           # read directly
    inputs = [layouts(t.to(dtype).cuda(), layout) for t in (hid, pha, half, src, same)]
    hc, wc = -(-H // stride), -(-W // stride)
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, hc, wc), 37, False)
    idx = torch.cat([idx, torch.tensor([[0, 0, 0], [B - 1, hc - 1, wc - 1], [0, 3, wc - 1], [0, 3, wc - 1]])])
    return inputs, idx.cuda(), (H, W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("stride,padding,patch", [(2, 3, None), (2, 0, None), (4, 2, None), (2, 1, (5, 9)), (3, 4, (7, 2))])
def test_crop_matches_reference(dtype, layout, B, stride, padding, patch):
    inputs, idx, size = crop_case(B, dtype, layout, stride)
    ph, pw = patch or (stride + 2 * padding,) * 2
    got = ops.crop(inputs, idx, stride, padding, list(size), [ph, pw])
    want = reference.crop(inputs, idx, stride, padding, size, (ph, pw))
    assert got.shape == (idx.shape[0], 13, ph, pw) and got.dtype == dtype and got.is_cuda
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_matches_cuda_reference(got, want, "crop")
    # Channels read without resampling are copied exactly, zeros outside too.
    assert torch.equal(got[:, 11:], want[:, 11:])
    # And the CPU kernel computes the same arithmetic (shared index_math.h),
    # but for its weights' rounding in 16-bit types.
    assert_matches_cpu_kernel(got, ops.crop(cpu(*inputs), idx.cpu(), stride, padding, list(size), [ph, pw]),
                              "crop vs cpu kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crop_more_inputs_than_one_launch_holds(dtype):
    # 11 inputs (more than the 8 of one launch), one of them with no channels.
    B, H, W = 2, 20, 28
    inputs = [torch.rand(B, 1 + i % 3, 10 if i % 2 else H, 14 if i % 2 else W).to(dtype).cuda() for i in range(11)]
    inputs.insert(4, torch.rand(B, 0, H, W).to(dtype).cuda())
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, H // 2, W // 2), 20, False)
    idx = idx.cuda()
    got = ops.crop(inputs, idx, 2, 3, [H, W], [8, 8])
    want = reference.crop(inputs, idx, 2, 3, (H, W), (8, 8))
    assert_matches_cuda_reference(got, want, "crop")
    # 20 one-channel inputs of alternating sizes: three launches.
    inputs = [torch.rand(B, 1, 10 if i % 2 else H, 14 if i % 2 else W).to(dtype).cuda() for i in range(20)]
    got = ops.crop(inputs, idx, 2, 3, [H, W], [8, 8])
    want = reference.crop(inputs, idx, 2, 3, (H, W), (8, 8))
    assert_matches_cuda_reference(got, want, "crop of 20 inputs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_wide_inputs_split_over_launches(dtype):
    # A launch takes at most 384 bytes of channels a pixel: an input of 200
    # channels is cut into several launches, each writing its channel range.
    B, H, W = 2, 24, 32
    wide = torch.rand(B, 200, H // 2, W // 2).to(dtype).cuda()
    narrow = torch.rand(B, 3, H, W).to(dtype).cuda()
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, H // 2, W // 2), 30, False)
    idx = idx.cuda()
    for inputs in ([wide], [narrow, wide, narrow], [layouts(wide, "channels_last"), narrow]):
        got = ops.crop(inputs, idx, 2, 3, [H, W], [8, 8])
        want = reference.crop(inputs, idx, 2, 3, (H, W), (8, 8))
        assert_matches_cuda_reference(got, want, "crop")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W", [(64, 96), (36, 610), (130, 20)])
def test_crop_whole_image_patches(dtype, H, W):
    # The full mode's crops: one patch per image, far larger than a block's
    # tile (its rows too, for W = 610), at half resolution from the coarse
    # inputs and at full resolution from src and bgr.
    B, Hc, Wc = 2, H // 4, W // 4
    hid, pha, fgr = (torch.rand(B, c, Hc, Wc).to(dtype).cuda() for c in (32, 1, 3))
    src, bgr = (torch.rand(B, 3, H, W).to(dtype).cuda() for _ in range(2))
    whole = torch.tensor([[0, 0, 0], [1, 0, 0]], device="cuda")
    size = (H // 2 + 6, W // 2 + 6)
    got = ops.crop([hid, pha, fgr, src, bgr], whole, 1, 3, [H // 2, W // 2], list(size))
    want = reference.crop([hid, pha, fgr, src, bgr], whole, 1, 3, (H // 2, W // 2), size)
    assert got.shape == (2, 42) + size
    assert_matches_cuda_reference(got, want, "half-resolution crop")
    got = ops.crop([src, bgr], whole, 1, 2, [H, W], [H + 4, W + 4])
    want = reference.crop([src, bgr], whole, 1, 2, (H, W), (H + 4, W + 4))
    assert torch.equal(got, want)


def test_crop_empty_whole_image_and_no_channels():
    x = torch.rand(2, 3, 10, 14, device="cuda")
    empty = torch.zeros((0, 3), dtype=torch.long, device="cuda")
    out = ops.crop([x], empty, 2, 3, [20, 28], [8, 8])
    assert out.shape == (0, 3, 8, 8) and out.is_cuda
    whole = torch.tensor([[0, 0, 0], [1, 0, 0]], device="cuda")
    out = ops.crop([x], whole, 1, 3, [20, 28], [26, 34])
    want = F.pad(F.interpolate(x, (20, 28), mode="bilinear", align_corners=False), (3, 3, 3, 3))
    assert_close(out.cpu(), want.cpu(), 1e-6)
    out = ops.crop([x[:, :0]], whole, 1, 3, [20, 28], [26, 34])
    assert out.shape == (2, 0, 26, 34)


# -- crop_into ---------------------------------------------------------------

def nan_channels_last(P, C, ph, pw, dtype, offset=0):
    """A NaN-filled channels-last (P, C, ph, pw) tensor starting `offset`
    elements into its storage (so that its address need not be 16-byte
    aligned)."""
    flat = torch.full((offset + P * C * ph * pw,), float("nan"), dtype=dtype, device="cuda")
    out = flat.as_strided((P, C, ph, pw), (C * ph * pw, 1, pw * C, C), offset)
    assert out.is_contiguous(memory_format=torch.channels_last)
    return out


def crop_into_case(case, src, bgr, coarse):
    """(inputs, channels of out, channel offset, storage offset of out) of a
    crop_into case (also run on the host execution harness)."""
    return {
        # conv3's input: conv2's 16 channels, then [src, bgr] at [16, 22).
        "refiner": ([src, bgr], 22, 16, 0),
        "sixteen-byte runs": ([coarse, bgr[:, :2], src[:, 1:3]], 16, 8, 0),
        "odd runs": ([src, coarse], 12, 1, 0),
        "whole, aligned": ([coarse, src], 7, 0, 0),
        "whole, unaligned": ([coarse, src], 7, 0, 1),
        "refiner, unaligned": ([src, bgr], 22, 16, 1),
    }[case]


CROP_INTO_CASES = ["refiner", "sixteen-byte runs", "odd runs", "whole, aligned", "whole, unaligned",
                   "refiner, unaligned"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CROP_INTO_CASES)
def test_crop_into_matches_reference(dtype, case):
    B, H, W = 2, 48, 64
    src, bgr = (torch.rand(B, 3, H, W).to(dtype).cuda() for _ in range(2))
    coarse = torch.rand(B, 4, H // 4, W // 4).to(dtype).cuda()
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, H // 4, W // 4), 40, False)
    idx = torch.cat([idx, torch.tensor([[0, 0, 0], [B - 1, H // 4 - 1, W // 4 - 1]])]).cuda()
    inputs, c_out, offset, storage_offset = crop_into_case(case, src, bgr, coarse)
    C = sum(t.shape[1] for t in inputs)
    out = nan_channels_last(idx.shape[0], c_out, 8, 8, dtype, storage_offset)
    assert ops.crop_into(inputs, idx, 4, 2, [H, W], offset, out) is None
    want = reference.crop(inputs, idx, 4, 2, (H, W), (8, 8))
    assert_matches_cuda_reference(out[:, offset:offset + C], want, case)
    # Nothing written outside the channels asked for.
    assert bool(out[:, :offset].isnan().all()) and bool(out[:, offset + C:].isnan().all())
    # The same patches as crop's.
    assert torch.equal(out[:, offset:offset + C], ops.crop(inputs, idx, 4, 2, [H, W], [8, 8]))


def test_crop_into_writes_nothing_without_patches_or_channels():
    x = torch.rand(2, 3, 16, 16, device="cuda")
    out = nan_channels_last(0, 5, 8, 8, torch.float32)
    ops.crop_into([x], torch.zeros((0, 3), dtype=torch.long, device="cuda"), 4, 2, [16, 16], 1, out)
    out = nan_channels_last(2, 5, 8, 8, torch.float32)
    ops.crop_into([x[:, :0]], torch.zeros((2, 3), dtype=torch.long, device="cuda"), 4, 2, [16, 16], 5, out)
    assert bool(out.isnan().all())


# -- replace -----------------------------------------------------------------

def replace_case(B, C, H, W, P, s, dtype):
    x = torch.rand(B, C, H, W).to(dtype).cuda()
    patches = torch.rand(P, C, s, s).to(dtype).cuda()
    idx = torch.stack([torch.randint(0, B, (P,)), torch.randint(0, H // s, (P,)),
                       torch.randint(0, W // s, (P,))], 1)
    if P >= 3:
        idx[1] = idx[0]  # duplicate cells: the last valid patch wins
        idx[P - 1] = idx[0]
    valid = torch.rand(P) > 0.3
    if P >= 3:
        valid[P - 1] = False  # ... so here patch 1, unless it is invalid too
    return x, patches, idx.cuda(), valid.cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,P,s", [(1, 4, 8, 12, 5, 4), (3, 2, 20, 16, 40, 4), (2, 3, 9, 6, 7, 3),
                                         (2, 4, 8, 8, 0, 4), (2, 4, 64, 96, 700, 4), (1, 1, 6, 10, 9, 2),
                                         (2, 3, 16, 24, 9, 8), (1, 2, 5, 7, 20, 1), (1, 5, 300, 8, 50, 4)])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_replace_matches_reference(dtype, B, C, H, W, P, s, with_valid, layout):
    x, patches, idx, valid = replace_case(B, C, H, W, P, s, dtype)
    x = layouts(x, layout)
    patches = layouts(patches, layout)
    valid = valid if with_valid else None
    before = x.clone()
    got = ops.replace(x, patches, idx, valid)
    want = reference.replace(*cpu(x, patches, idx, valid))
    assert_equal(got, want)
    assert got.stride() == x.clone().stride()  # the layout clone() gives
    assert torch.equal(x, before)  # out of place
    assert_equal(got, ops.replace(*cpu(x, patches, idx, valid)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_replace_more_images_than_a_grid_holds(layout):
    # 70,000 images: more than a grid's z dimension (65535) takes.
    x, patches, idx, valid = replace_case(70000, 2, 4, 8, 3000, 4, torch.float32)
    x = layouts(x, layout)
    got = ops.replace(x, patches, idx, valid)
    assert_equal(got, ops.replace(*cpu(x, patches, idx, valid)))


def test_replace_last_valid_patch_wins():
    x = torch.zeros(1, 1, 4, 4, device="cuda")
    patches = torch.arange(1, 6, dtype=torch.float32, device="cuda").view(5, 1, 1, 1).expand(5, 1, 4, 4)
    idx = torch.zeros(5, 3, dtype=torch.long, device="cuda")
    valid = torch.tensor([True, True, True, False, False], device="cuda")
    assert float(ops.replace(x, patches, idx, valid).max()) == 3.0
    assert float(ops.replace(x, patches, idx, None).max()) == 5.0
    assert float(ops.replace(x, patches, idx, torch.zeros(5, dtype=torch.bool, device="cuda")).max()) == 0.0


# -- compose -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hc,Wc,H,W,s,P", [(1, 5, 7, 20, 28, 4, 9), (3, 11, 6, 44, 24, 4, 50), (2, 9, 13, 20, 28, 4, 0),
                                              (2, 30, 41, 120, 164, 4, 200), (2, 7, 9, 27, 15, 3, 12),
                                              (1, 5, 5, 10, 18, 2, 20), (2, 6, 5, 24, 40, 8, 15),
                                              (1, 4, 6, 7, 9, 1, 30), (1, 3, 4, 12, 20, 2, 25),
                                              (1, 70, 3, 280, 12, 4, 40)])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("epilogue", [False, True])
def test_compose_matches_reference(dtype, B, Hc, Wc, H, W, s, P, with_valid, epilogue):
    # s = 4 (the refiner's, its own kernel) and other patch sizes; widths
    # that take 4-wide vectors and widths that do not.
    coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype).cuda()
    _, patches, idx, valid = replace_case(B, 4, H, W, P, s, dtype)
    patches = patches * 1.4 - 0.2
    src = torch.rand(B, 3, H, W).to(dtype).cuda() if epilogue else None
    valid = valid if with_valid else None
    got = ops.compose(coarse, patches, idx, valid, [H, W], src)
    want = reference.compose(coarse, patches, idx, valid, (H, W), src)
    assert got.shape == (B, 4, H, W) and got.dtype == dtype and got.is_contiguous() and got.is_cuda
    assert_matches_cuda_reference(got, want, "compose", cancellation=True)
    assert_matches_cpu_kernel(got, ops.compose(*cpu(coarse, patches, idx, valid), [H, W], *cpu(src)),
                              "compose vs cpu kernel")
    if epilogue:
        assert float(got.min()) >= 0 and float(got.max()) <= 1
    # Refined cells are their patches' values exactly (before the epilogue).
    if not epilogue and P > 0:
        owner = reference.cell_owner(idx, valid, B, H // s, W // s)
        b, cy, cx = torch.nonzero(owner >= 0, as_tuple=True)
        if b.numel():
            p = owner[b, cy, cx]
            cells = got.view(B, 4, H // s, s, W // s, s)[b, :, cy, :, cx, :]
            assert torch.equal(cells, patches[p])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compose_strided_inputs(layout, dtype):
    coarse = layouts(torch.rand(2, 4, 30, 41, device="cuda").to(dtype), layout)
    _, patches, idx, valid = replace_case(2, 4, 120, 164, 60, 4, dtype)
    patches = layouts(patches, layout)
    src = layouts(torch.rand(2, 3, 120, 164, device="cuda").to(dtype), layout)
    got = ops.compose(coarse, patches, idx, valid, [120, 164], src)
    want = reference.compose(coarse, patches, idx, valid, (120, 164), src)
    assert_matches_cuda_reference(got, want, "compose", cancellation=True)


def test_compose_more_planes_than_a_grid_holds():
    # B * C = 68,000 planes: more than a grid's z dimension (65535) takes.
    B = 17000
    coarse = torch.rand(B, 4, 1, 2, device="cuda")
    _, patches, idx, valid = replace_case(B, 4, 4, 8, 500, 4, torch.float32)
    src = torch.rand(B, 3, 4, 8, device="cuda")
    got = ops.compose(coarse, patches, idx, valid, [4, 8], src)
    want = reference.compose(coarse, patches, idx, valid, (4, 8), src)
    assert_matches_cuda_reference(got, want, "compose")


def test_compose_keeps_nan_and_rounds_like_matting_refine():
    coarse = torch.rand(1, 4, 4, 4, device="cuda")
    coarse[0, 0, 1, 1] = float("nan")
    coarse[0, 2, 2, 2] = float("nan")
    src = torch.rand(1, 3, 16, 16, device="cuda")
    empty = torch.zeros((0, 3), dtype=torch.long, device="cuda")
    got = ops.compose(coarse, torch.zeros(0, 4, 4, 4, device="cuda"), empty, None, [16, 16], src)
    want = reference.compose(coarse.cpu(), torch.zeros(0, 4, 4, 4), empty.cpu(), None, (16, 16), src.cpu())
    assert bool(torch.isnan(got).any())
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want))
    # A refined cell over NaN in the coarse map is its patch's value.
    patch = torch.rand(1, 4, 4, 4, device="cuda")
    cell = torch.tensor([[0, 1, 1]], device="cuda")
    got = ops.compose(coarse, patch, cell, None, [16, 16], None)
    assert torch.equal(got[0, :, 4:8, 4:8], patch[0])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        coarse = (torch.randn(2, 4, 6, 7, device="cuda") * 2).to(dtype)
        src = torch.rand(2, 3, 24, 28, device="cuda").to(dtype)
        e = torch.zeros((0, 3), dtype=torch.long, device="cuda")
        got = ops.compose(coarse, torch.zeros(0, 4, 4, 4, dtype=dtype, device="cuda"), e, None, [24, 28], src)
        up = F.interpolate(coarse, (24, 28), mode="bilinear", align_corners=False)
        want = torch.cat([up[:, :1].clamp(0, 1), up[:, 1:].add(src).clamp(0, 1)], 1)
        assert_matches_cuda_reference(got, want, str(dtype), cancellation=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage_offset", [0, 1, 2])
@pytest.mark.parametrize("s", [4, 3])
def test_compose_into_writes_what_compose_returns(dtype, storage_offset, s):
    # out may start anywhere in its storage: the vector stores then give way.
    B, H, W = 2, 12 * s, 10 * s
    coarse = torch.rand(B, 4, 7, 9).to(dtype).cuda()
    _, patches, idx, valid = replace_case(B, 4, H, W, 30, s, dtype)
    src = torch.rand(B, 3, H, W).to(dtype).cuda()
    want = ops.compose(coarse, patches, idx, valid, [H, W], src)
    flat = torch.full((storage_offset + B * 4 * H * W,), float("nan"), dtype=dtype, device="cuda")
    out = flat[storage_offset:].view(B, 4, H, W)
    assert ops.compose_into(coarse, patches, idx, valid, src, out) is None
    assert torch.equal(out, want)
    assert bool(flat[:storage_offset].isnan().all())


def test_patch_ops_never_synchronise():
    x = torch.rand(2, 4, 64, 96, device="cuda")
    _, patches, idx, valid = replace_case(2, 4, 64, 96, 100, 4, torch.float32)
    coarse = torch.rand(2, 4, 16, 24, device="cuda")
    src = torch.rand(2, 3, 64, 96, device="cuda")

    out = torch.empty(100, 12, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)

    def run():
        ops.crop([coarse, x], idx, 4, 2, [64, 96], [8, 8])
        ops.crop_into([x], idx, 4, 2, [64, 96], 8, out)
        ops.replace(x, patches, idx, valid)
        ops.compose(coarse, patches, idx, valid, [64, 96], src)
        ops.compose_into(coarse, patches, idx, valid, src, composed)

    composed = torch.empty(2, 4, 64, 96, device="cuda")
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- argument checks and bad idx ---------------------------------------------

def error_of(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    # The message up to the C++ backtrace/location that follows it.
    return str(info.value).splitlines()[0]


def test_argument_checks_match_the_cpu_kernels():
    def both(make):
        a = error_of(lambda: make("cpu"))
        b = error_of(lambda: make("cuda"))
        assert a == b, (a, b)

    e = torch.zeros((0, 3), dtype=torch.long)
    both(lambda d: ops.select_sampling(torch.rand(2, 2, 4, 4, device=d), 3, True))
    both(lambda d: ops.select_sampling(torch.rand(2, 1, 4, 4, device=d), -1, True))
    both(lambda d: ops.select_thresholding(torch.rand(2, 1, 4, device=d), 0.5))
    both(lambda d: ops.crop([torch.rand(2, 3, 4, 4, device=d), torch.rand(3, 3, 4, 4, device=d)],
                            e.to(d), 2, 0, [4, 4], [2, 2]))
    both(lambda d: ops.crop([torch.rand(2, 3, 4, 4, device=d)], e.to(d), 0, 0, [4, 4], [2, 2]))
    both(lambda d: ops.replace(torch.rand(2, 3, 8, 8, device=d), torch.rand(1, 2, 4, 4, device=d),
                               torch.zeros((1, 3), dtype=torch.long, device=d), None))
    both(lambda d: ops.replace(torch.rand(2, 3, 8, 8, device=d), torch.rand(1, 3, 4, 4, device=d),
                               torch.zeros((1, 3), dtype=torch.long, device=d), torch.ones(2, dtype=torch.bool,
                                                                                          device=d)))
    both(lambda d: ops.compose(torch.rand(2, 4, 2, 2, device=d), torch.rand(0, 4, 4, 4, device=d), e.to(d), None,
                               [8, 8], torch.rand(2, 4, 8, 8, device=d)))
    both(lambda d: ops.compose(torch.rand(2, 4, 2, 2, device=d), torch.rand(0, 4, 4, 4, device=d), e.to(d), None,
                               [8, 6], None))

    # A batch of no images with idx rows: every row is out of range, which
    # the CUDA kernels know without their device-side check.
    one = torch.zeros((1, 3), dtype=torch.long)
    both(lambda d: ops.replace(torch.rand(0, 3, 8, 8, device=d), torch.rand(1, 3, 4, 4, device=d), one.to(d), None))
    both(lambda d: ops.compose(torch.rand(0, 4, 2, 2, device=d), torch.rand(1, 4, 4, 4, device=d), one.to(d), None,
                               [8, 8], None))
    both(lambda d: ops.crop([torch.rand(0, 3, 4, 4, device=d)], one.to(d), 2, 0, [4, 4], [2, 2]))
    both(lambda d: ops.crop_into([torch.rand(0, 3, 4, 4, device=d)], one.to(d), 2, 0, [4, 4], 0,
                                 torch.empty(1, 3, 2, 2, device=d).contiguous(memory_format=torch.channels_last)))

    # compose_into's out.
    def compose_into(d, out):
        return ops.compose_into(torch.rand(2, 4, 2, 2, device=d), torch.rand(1, 4, 4, 4, device=d),
                                torch.zeros((1, 3), dtype=torch.long, device=d), None, None, out)

    both(lambda d: compose_into(d, torch.empty(2, 4, 8, device=d)))
    both(lambda d: compose_into(d, torch.empty(2, 3, 8, 8, device=d)))
    both(lambda d: compose_into(d, torch.empty(2, 4, 8, 8, device=d, dtype=torch.float64)))
    both(lambda d: compose_into(d, torch.empty(2, 4, 8, 8, device=d).contiguous(memory_format=torch.channels_last)))
    both(lambda d: compose_into(d, torch.empty(2, 4, 8, 6, device=d)))

    # crop_into's out.
    two = torch.zeros((2, 3), dtype=torch.long)

    def crop_into(d, out, offset=0, inputs=None):
        x = torch.rand(2, 3, 16, 16, device=d)
        return ops.crop_into(inputs or [x], two.to(d), 4, 2, [16, 16], offset, out)

    def cl(*shape, d, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=d).contiguous(memory_format=torch.channels_last)

    both(lambda d: crop_into(d, torch.empty(2, 3, 8, device=d)))
    both(lambda d: crop_into(d, cl(2, 3, 8, 8, d=d, dtype=torch.float64)))
    both(lambda d: crop_into(d, cl(3, 3, 8, 8, d=d)))
    both(lambda d: crop_into(d, cl(2, 5, 8, 8, d=d), offset=3))
    both(lambda d: crop_into(d, cl(2, 5, 8, 8, d=d), offset=-1))
    both(lambda d: crop_into(d, torch.empty(2, 5, 8, 8, device=d), offset=1))
    both(lambda d: crop_into(d, cl(2, 5, 8, 8, d=d), inputs=[torch.rand(2, 3, 16, 16, device=d),
                                                              torch.rand(3, 3, 16, 16, device=d)]))


@pytest.mark.parametrize("op", ["crop", "crop_into", "replace", "compose"])
def test_out_of_range_idx_is_a_device_assertion_not_a_silent_write(op):
    # A device-side assertion poisons the CUDA context, so it runs in a child
    # process; it must surface as an error, never as silently wrong output.
    code = textwrap.dedent(f"""
        import torch
        import pymatting_ext
        ops = torch.ops.pymatting_ext
        bad = torch.tensor([[0, 0, 0], [0, 99, 0]], device="cuda")
        x = torch.rand(1, 2, 8, 8, device="cuda")
        p = torch.rand(2, 2, 4, 4, device="cuda")
        try:
            if "{op}" == "crop":
                ops.crop([x], bad, 4, 0, [8, 8], [4, 4])
            elif "{op}" == "crop_into":
                out = torch.empty(2, 3, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last)
                ops.crop_into([x], bad, 4, 0, [8, 8], 1, out)
            elif "{op}" == "replace":
                ops.replace(x, p, bad, None)
            else:
                ops.compose(x, p, bad, None, [8, 8], None)
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0])
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert "RAISED" in proc.stdout or proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "NO ERROR" not in proc.stdout, (proc.stdout, proc.stderr)


# -- the Refiner in a CUDA graph ---------------------------------------------

@pytest.mark.parametrize("prevent", [True, False])
def test_refiner_sampling_captured_in_a_cuda_graph(prevent):
    check_refiner_in_a_cuda_graph("cuda", prevent)
