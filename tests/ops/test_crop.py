"""crop and crop_into on every backend: the CPU, CUDA and Triton kernels
(Triton through its interpreter without a GPU) against the reference (itself
checked against F.interpolate + F.pad + slicing) over dtypes, layouts,
batches, strides, paddings and patch shapes, resampled inputs and inputs
read directly, empty selections and whole-image patches; crop_into writing
its channels only, and its checks of out; Triton's raw crop on rows out of
range and crop_into with more inputs and sizes than a launch takes; the CUDA
kernels beyond that (TestCUDAKernels: odd ratios, more inputs or channels
than a launch takes, whole-image patches, crop_into's cases against the CPU
kernel); and the CPU kernels' AVX2 paths (TestCPUVector: bit for bit the
portable loops, and nothing read past an input).

(The resample's scale: test_resample.py; properties: test_properties.py;
bad arguments: test_bad_input.py; gradients: test_autograd.py; past 2^31
elements: test_int64.py.)"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import BACKEND_CASES, CPU_BACKENDS, CPU_VECTOR, CUDA_KERNELS, DTYPES, TRITON_CASES, skip_unsupported
from helpers import (BILINEAR_ATOL, CROP_INTO_CASES, assert_close, assert_matches_cpu_kernel,
                     assert_matches_cuda_reference, check_vector_paths_match_portable_loops, cpu, crop_into_case,
                     cuda_crop_case, layouts, subprocess_env, vector_crop_cases, vector_crop_results)

ops = torch.ops.pymatting_ext


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
    assert_close(got.cpu(), want, BILINEAR_ATOL[dtype], msg="crop")
    # Cells read without resampling are copied exactly, zeros outside too.
    assert torch.equal(got.cpu()[:, 9:], want[:, 9:])


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


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_raw_crop_writes_zeros_for_rows_out_of_range(device, backend):
    # The public ops reject such rows; the raw op must still neither read
    # outside its inputs nor leave the patch unwritten.
    x = torch.rand(2, 3, 10, 14, device=device) + 1
    src = torch.rand(2, 3, 20, 28, device=device) + 1
    idx = torch.tensor([[0, 1, 1], [2, 1, 1], [-1, 0, 0], [1, 10, 0], [1, 0, 14], [1, -1, 3], [1, 9, 13]],
                       device=device)
    out = torch.ops.pymatting_ext_triton.crop([x, src], idx, 2, 3, [20, 28], [8, 8])
    good = reference.crop([x.cpu(), src.cpu()], idx[[0, 6]].cpu(), 2, 3, (20, 28), (8, 8))
    torch.testing.assert_close(out[[0, 6]].cpu(), good, atol=1e-6, rtol=0)
    assert bool((out[1:6] == 0).all())


# -- crop_into ---------------------------------------------------------------

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
    assert_close(out[:, offset:offset + 11].cpu(), want, BILINEAR_ATOL[dtype], msg="crop_into")
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


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crop_into_with_many_inputs_and_sizes(device, backend, dtype):
    # More inputs of one size than a launch takes (3), more sizes than it
    # takes (2), channel counts that are not powers of two or exceed a tile's
    # 8: several launches, each writing only its channels of out.
    g = torch.Generator().manual_seed(0)
    shapes = [(11, 9, 13), (1, 9, 13), (3, 36, 52), (2, 9, 13), (5, 18, 26), (9, 9, 13), (3, 36, 52),
              (1, 7, 5)]
    inputs = [torch.rand((2,) + s, generator=g).to(device, dtype) for s in shapes]
    C = sum(s[0] for s in shapes)
    _, idx, _ = reference.select_sampling(torch.rand(2, 1, 9, 13, generator=g), 20, False)
    idx = idx.to(device)
    out = torch.full((idx.shape[0], C + 7, 8, 8), float("nan"), dtype=dtype, device=device)
    out = out.contiguous(memory_format=torch.channels_last)
    torch.ops.pymatting_ext_triton.crop_into(inputs, idx, 2, 3, [18, 26], 4, out)
    want = reference.crop([t.cpu() for t in inputs], idx.cpu(), 2, 3, (18, 26), (8, 8))
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out[:, 4:4 + C].cpu(), want, atol=atol, rtol=0)
    assert bool(out[:, :4].isnan().all()) and bool(out[:, 4 + C:].isnan().all())


# -- the CUDA kernels -----------------------------------------------------------

def nan_channels_last(P, C, ph, pw, dtype, offset=0):
    """A NaN-filled channels-last (P, C, ph, pw) tensor starting `offset`
    elements into its storage (so that its address need not be 16-byte
    aligned)."""
    flat = torch.full((offset + P * C * ph * pw,), float("nan"), dtype=dtype, device="cuda")
    out = flat.as_strided((P, C, ph, pw), (C * ph * pw, 1, pw * C, C), offset)
    assert out.is_contiguous(memory_format=torch.channels_last)
    return out


class TestCUDAKernels:
    """The CUDA kernels (kernels/cuda) through torch.ops.pymatting_ext on CUDA
    tensors, against the reference and the CPU kernels on the same data."""

    pytestmark = CUDA_KERNELS

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
    @pytest.mark.parametrize("B", [1, 3])
    @pytest.mark.parametrize("stride,padding,patch", [(2, 3, None), (2, 0, None), (4, 2, None), (2, 1, (5, 9)),
                                                      (3, 4, (7, 2))])
    def test_crop_matches_reference(self, dtype, layout, B, stride, padding, patch):
        inputs, idx, size = cuda_crop_case(B, dtype, layout, stride)
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
    def test_crop_more_inputs_than_one_launch_holds(self, dtype):
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
    def test_crop_wide_inputs_split_over_launches(self, dtype):
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
    def test_crop_whole_image_patches(self, dtype, H, W):
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

    def test_crop_empty_whole_image_and_no_channels(self):
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

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("case", CROP_INTO_CASES)
    def test_crop_into_matches_reference(self, dtype, case):
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

    def test_crop_into_writes_nothing_without_patches_or_channels(self):
        x = torch.rand(2, 3, 16, 16, device="cuda")
        out = nan_channels_last(0, 5, 8, 8, torch.float32)
        ops.crop_into([x], torch.zeros((0, 3), dtype=torch.long, device="cuda"), 4, 2, [16, 16], 1, out)
        out = nan_channels_last(2, 5, 8, 8, torch.float32)
        ops.crop_into([x[:, :0]], torch.zeros((2, 3), dtype=torch.long, device="cuda"), 4, 2, [16, 16], 5, out)
        assert bool(out.isnan().all())


# -- the CPU kernels' AVX2 paths ----------------------------------------------------

GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap
import torch
import pymatting_ext as pm
from pymatting_ext import reference

page = mmap.PAGESIZE
buf = mmap.mmap(-1, 3 * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# The third page neither readable nor writable: a read past the tensors
# below faults.
assert libc.mprotect(base + 2 * page, page, 0) == 0, ctypes.get_errno()

def at_the_end(c, h, w):
    # A channels-last (1, c, h, w) tensor whose last element ends the second page.
    n = c * h * w
    t = torch.frombuffer(buf, dtype=torch.float32, count=n, offset=2 * page - 4 * n)
    t.copy_(torch.rand(n, generator=torch.Generator().manual_seed(c)))
    return t.view(1, h, w, c).permute(0, 3, 1, 2)

H, W = 22, 30
src = at_the_end(3, H, W)
assert src.is_contiguous(memory_format=torch.channels_last)
# Patches whose last 8-column block reads the last pixel (and others).
cases = [([src], torch.tensor([[0, 3, 5], [0, 0, 0], [0, 5, 7]]), 2, 3, (H // 2, W // 2)),  # resampled (/2)
         ([src], torch.tensor([[0, 4, 6], [0, 0, 0], [0, 5, 7]]), 4, 2, (H, W))]            # the image's own size
for inputs, idx, stride, padding, size in cases:
    got = pm.crop(inputs, idx, stride, padding, size, backend="cpu")
    want = reference.crop(inputs, idx, stride, padding, size)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
print("ok")
"""


class TestCPUVector:
    """The CPU kernels' AVX2 path of crop against its portable loops, bit for
    bit. The vector paths run wherever the CPU has AVX2 (float32 only), so
    every other CPU test already checks them against the reference within
    tolerance; here the same cases run twice, once in this process and once
    with the portable loops only, and must give the same bits."""

    pytestmark = CPU_VECTOR

    def test_crop_vector_paths_match_portable_loops_bitwise(self):
        check_vector_paths_match_portable_loops(vector_crop_results)

    def test_crop_vector_cases_match_reference(self):
        # The cases above exercise the vector path's edges (remainder columns,
        # sliced and channels-last inputs, streaming): against the reference too.
        for name, inputs, idx, stride, padding, size, patch, offset, channels in vector_crop_cases():
            got = pm.crop(inputs, idx, stride, padding, size, patch, backend="cpu")
            want = reference.crop(inputs, idx, stride, padding, size, patch)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)

    def test_channels_last_crop_reads_nothing_past_its_inputs(self):
        # The vector path loads a pixel's channels 8 lanes wide where that stays
        # inside the input tensor: here a 3-channel channels-last input ends at
        # a page that cannot be read, with patches at its last pixels. A read
        # past it would kill the process.
        done = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT], env=subprocess_env(), capture_output=True,
                              timeout=300)
        assert done.returncode == 0, (done.returncode, done.stderr.decode()[-2000:])
        assert done.stdout.decode().strip() == "ok"
