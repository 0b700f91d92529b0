"""The CPU kernels' AVX2 paths (crop, compose) against their portable loops,
bit for bit.

The vector paths run wherever the CPU has AVX2 (float32 only), so every
other CPU test already checks them against the reference within tolerance;
here the same cases run twice, once in this process and once in a
subprocess with PYMATTING_EXT_CPU_CAPABILITY=default (the portable loops
only, read once per process like ATen's ATEN_CPU_CAPABILITY), and must give
the same bits: both paths do the same operations in the same order."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import reference

from helpers import subprocess_env

pytestmark = [
    pytest.mark.skipif(not pm.extension_available(), reason="the C++ extension is not built"),
    pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                       reason="no AVX2 on this CPU: there is only the portable path"),
]


def cases():
    """(name, inputs, idx, stride, padding, image_size, patch_size, channel_offset, out_channels):
    the refiner's crops at HD's and 4K's scales (x2 and x4 up, /2 down, the
    image's own size), odd sizes and patch shapes, patches across every edge,
    batch 2, channels-last and sliced inputs, and outputs large enough to
    be streamed (>= 4 MiB)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g)

    def idx_for(B, hc, wc, n):
        cells = torch.stack([torch.randint(0, B, (n,), generator=g), torch.randint(0, hc, (n,), generator=g),
                             torch.randint(0, wc, (n,), generator=g)], 1)
        corners = torch.tensor([[0, 0, 0], [B - 1, hc - 1, wc - 1], [0, 0, wc - 1], [B - 1, hc - 1, 0]])
        return torch.cat([cells, corners])

    out = []
    # The refiner at HD's scale: coarse at 1/4 (x2 up to 1/2), src at 1/1 (/2).
    B, H, W = 2, 68, 124
    hid, pha, src = r(B, 32, H // 4, W // 4), r(B, 1, H // 4, W // 4), r(B, 3, H, W)
    idx = idx_for(B, H // 4, W // 4, 60)
    out.append(("hd half", [hid, pha, src], idx, 2, 3, (H // 2, W // 2), None, 0, 36))
    out.append(("hd full into", [src], idx, 4, 2, (H, W), None, 5, 11))
    # 4K's scale: coarse at 1/8 (x4 up to 1/2).
    hid8 = r(B, 7, H // 8 + 1, W // 8 + 1)
    out.append(("x4 up", [hid8, src], idx, 2, 3, (H // 2, W // 2), None, 0, 10))
    # Odd sizes (not exact scales), wide patches with a remainder of columns,
    # channels-last and sliced inputs.
    a = r(B, 5, 13, 21).contiguous(memory_format=torch.channels_last)
    c = r(B, 9, 50, 70)[:, 1:8, 3:47, 5:66]
    d = r(B, 3, 44, 61)
    idx2 = idx_for(B, 11, 16, 40)
    out.append(("odd", [a, c, d], idx2, 4, 3, (44, 61), (11, 21), 0, 15))
    out.append(("odd into", [c, d], idx2, 4, 1, (44, 61), (6, 17), 2, 13))
    # A whole-image patch (full mode): tiles of 16 x 64 over it.
    out.append(("whole", [r(1, 4, 30, 40), r(1, 2, 120, 160)], torch.tensor([[0, 0, 0]]), 1, 3, (60, 80),
                (66, 86), 0, 6))
    # Many patches: 500 x 42 x 8 x 8 floats is over 4 MiB (streamed out); the
    # cases above are under it.
    H, W = 120, 200
    big = [r(1, 32, H // 4, W // 4), r(1, 1, H // 4, W // 4), r(1, 3, H // 4, W // 4), r(1, 3, H, W),
           r(1, 3, H, W)]
    out.append(("streamed", big, idx_for(1, H // 4, W // 4, 500), 2, 3, (H // 2, W // 2), None, 0, 42))
    # Channels-last inputs (read a pixel's channels at a time): the coarse
    # inputs as a channels-last base network gives them (views of one
    # 37-channel output: hid's runs of 8 channels, pha and fgr one run of 4),
    # src and bgr planar or channels-last (a run of 3 channels each), the
    # full-resolution crop (no resampling), x4 up, and a source mixing
    # planar and channels-last planes.
    B, H, W = 2, 68, 124
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    x37 = cl(r(B, 37, H // 4, W // 4))
    coarse = [x37[:, 5:], x37[:, 0:1], x37[:, 1:4]]
    src, bgr = r(B, 3, H, W), r(B, 3, H, W)
    idx = idx_for(B, H // 4, W // 4, 60)
    out.append(("cl coarse", coarse + [src, bgr], idx, 2, 3, (H // 2, W // 2), None, 0, 42))
    out.append(("cl all", coarse + [cl(src), cl(bgr)], idx, 2, 3, (H // 2, W // 2), None, 0, 42))
    out.append(("cl full into", [cl(src), cl(bgr)], idx, 4, 2, (H, W), None, 3, 11))
    out.append(("cl x4 up", [cl(r(B, 11, H // 8 + 1, W // 8 + 1)), cl(src)], idx, 2, 3, (H // 2, W // 2), None,
                0, 14))
    # merge_cells' tiles of 4 x 4 cells: 14 x 14 patches (a block of 8 and
    # the portable loops' 6 columns), stride 8.
    out.append(("cl tiles", coarse + [src, bgr], idx_for(B, H // 16, W // 16, 20), 8, 3, (H // 2, W // 2), None, 0,
                42))
    out.append(("cl mixed", [cl(r(B, 5, H // 4, W // 4)), r(B, 2, H // 4, W // 4), x37[:, 30:], src], idx, 2, 3,
                (H // 2, W // 2), None, 0, 17))
    # Many patches with channels-last coarse inputs: streamed out.
    H, W = 120, 200
    x37 = cl(r(1, 37, H // 4, W // 4))
    big = [x37[:, 5:], x37[:, 0:1], x37[:, 1:4], r(1, 3, H, W), r(1, 3, H, W)]
    out.append(("cl streamed", big, idx_for(1, H // 4, W // 4, 500), 2, 3, (H // 2, W // 2), None, 0, 42))
    return out


def compose_cases():
    """(name, coarse, patches, idx, valid, size, src, out_offset): compose's
    upsample at HD's and 4K's scales (x4, x8), odd sizes and scales (blocks
    of 8 columns reading more than 8 coarse columns, remainder columns), a
    strided coarse map and src, the epilogue with values outside [0, 1] and
    NaN, invalid patches, batch 2, and outputs large enough to be streamed
    (>= 4 MiB), one of them at an unaligned address (out_offset elements
    into its storage)."""
    g = torch.Generator().manual_seed(1)

    def case(name, B, C, hc, wc, H, W, s, n, *, src=False, strided=False, offset=0):
        coarse = torch.randn(B, C, hc, wc, generator=g)
        if strided:
            coarse = torch.randn(B, C, hc, 2 * wc, generator=g)[..., ::2]
        cells = torch.stack([torch.randint(0, B, (n,), generator=g), torch.randint(0, H // s, (n,), generator=g),
                             torch.randint(0, W // s, (n,), generator=g)], 1)
        patches = torch.randn(n, C, s, s, generator=g) * 2
        patches[0, 0, 0, 0] = float("nan")
        valid = torch.rand(n, generator=g) > 0.2
        image = None
        if src:
            image = torch.rand(B, C - 1, H, 2 * W if strided else W, generator=g)
            image = image[..., ::2] if strided else image
        return (name, coarse, patches, cells, valid, (H, W), image, offset)

    return [
        case("x4", 2, 4, 17, 30, 68, 120, 4, 50),
        case("x4 matting", 2, 4, 17, 30, 68, 120, 4, 50, src=True),
        case("x8 odd", 1, 3, 9, 14, 72, 108, 4, 30, src=True),
        case("odd scale", 1, 2, 23, 41, 30, 52, 2, 40),
        case("near 1:1", 1, 2, 23, 56, 30, 52, 2, 40),
        case("down", 2, 3, 40, 90, 30, 52, 2, 40, src=True),
        case("strided", 2, 4, 17, 30, 68, 120, 4, 50, src=True, strided=True),
        case("streamed", 1, 4, 136, 121, 544, 484, 4, 900, src=True),
        case("streamed unaligned", 2, 4, 68, 123, 272, 492, 4, 400, offset=3),
    ]


def run_cases():
    results = {}
    for name, inputs, idx, stride, padding, size, patch, offset, channels in cases():
        ph, pw = patch or (stride + 2 * padding,) * 2
        results[name + " crop"] = pm.crop(inputs, idx, stride, padding, size, patch, backend="cpu")
        into = torch.full((idx.shape[0], channels, ph, pw), float("nan"))
        into = into.contiguous(memory_format=torch.channels_last)
        pm.crop_into(inputs, idx, stride, padding, size, offset, into, backend="cpu")
        results[name + " crop_into"] = into
    for name, coarse, patches, idx, valid, size, src, offset in compose_cases():
        results[name + " compose"] = pm.compose(coarse, patches, idx, valid, size, src, backend="cpu")
        shape = (coarse.shape[0], coarse.shape[1]) + tuple(size)
        storage = torch.full((offset + torch.Size(shape).numel(),), float("nan"))
        into = storage[offset:].view(shape)
        pm.compose_into(coarse, patches, idx, valid, src, into, backend="cpu")
        results[name + " compose_into"] = into.clone()
    return results


def test_vector_paths_match_portable_loops_bitwise():
    here = run_cases()
    env = subprocess_env(PYMATTING_EXT_CPU_CAPABILITY="default")
    code = ("import pickle, sys, test_cpu_vector as t; "
            "sys.stdout.buffer.write(pickle.dumps({k: v.numpy() for k, v in t.run_cases().items()}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    there = pickle.loads(done.stdout)
    assert set(here) == set(there)
    for name, got in here.items():
        want = torch.from_numpy(there[name])
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), name


def test_compose_vector_cases_match_reference():
    for name, coarse, patches, idx, valid, size, src, _ in compose_cases():
        got = pm.compose(coarse, patches, idx, valid, size, src, backend="cpu")
        want = reference.compose(coarse, patches, idx, valid, size, src)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6, equal_nan=True, msg=name)


def test_crop_vector_cases_match_reference():
    # The cases above exercise the vector path's edges (remainder columns,
    # sliced and channels-last inputs, streaming): against the reference too.
    for name, inputs, idx, stride, padding, size, patch, offset, channels in cases():
        got = pm.crop(inputs, idx, stride, padding, size, patch, backend="cpu")
        want = reference.crop(inputs, idx, stride, padding, size, patch)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


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


def test_channels_last_crop_reads_nothing_past_its_inputs():
    # The vector path loads a pixel's channels 8 lanes wide where that stays
    # inside the input tensor: here a 3-channel channels-last input ends at
    # a page that cannot be read, with patches at its last pixels. A read
    # past it would kill the process.
    done = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT], env=subprocess_env(), capture_output=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-2000:])
    assert done.stdout.decode().strip() == "ok"
