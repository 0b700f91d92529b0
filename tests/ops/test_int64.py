"""The int64 index paths: crop, replace and compose on float16 tensors of
more than 2^31 elements, where 32-bit offsets would wrap: the CPU kernels
(about 9 GB of memory; skipped where less is available) and every GPU
backend (24 GiB of GPU memory)."""
import os

import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import GPU_CASES

H, W = 32768, 16392  # 4 * H * W > 2^31


def available_bytes():
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


needs_14_gib = pytest.mark.skipif(available_bytes() < 14 * 2 ** 30, reason="needs 14 GiB of free memory")


# -- the CPU kernels -------------------------------------------------------------

@pytest.fixture(scope="module")
def big():
    """(1, 4, H, W) float16, 0.25 everywhere but random in its last 64 rows,
    and 64 idx rows in the last 8 rows of 4x4 cells."""
    assert 4 * H * W > 2 ** 31
    x = torch.full((1, 4, H, W), 0.25, dtype=torch.float16)
    x[:, :, -64:] = torch.rand(1, 4, 64, W).half()
    g = torch.Generator().manual_seed(0)
    P = 64
    idx = torch.stack([torch.zeros(P, dtype=torch.long), torch.randint(H // 4 - 8, H // 4, (P,), generator=g),
                       torch.randint(0, W // 4, (P,), generator=g)], 1)
    idx = idx[torch.randperm(P, generator=g)]
    idx = torch.unique(idx, dim=0)  # one patch a cell: each is checked where it lands
    patches = torch.rand(idx.shape[0], 4, 4, 4, generator=g).half()
    return x, idx, patches


def check_written(out, x, idx, patches):
    """out is x with each patch in its cell: the rows above the cells exactly
    x, each cell its patch, the rest of the last rows x."""
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool((out[:, :, :H - 64] == 0.25).all()), "rows before the cells changed"
    assert torch.equal(out[:, :, H - 64:H - 32], x[:, :, H - 64:H - 32]), "rows before the cells changed"
    tail, want = out[:, :, H - 32:].clone(), x[:, :, H - 32:].clone()
    for p, (_, y, xc) in enumerate(idx.tolist()):
        r = 4 * y - (H - 32)
        want[0, :, r:r + 4, 4 * xc:4 * xc + 4] = patches[p]
    assert torch.equal(tail, want), "rows past 2^31 elements wrong"


@needs_14_gib
def test_replace_past_2_to_the_31(big):
    x, idx, patches = big
    check_written(pm.replace(x, patches, idx, backend="cpu"), x, idx, patches)


@needs_14_gib
def test_compose_past_2_to_the_31(big):
    x, idx, patches = big
    # coarse of the output's size: compose copies it (no resampling) and
    # writes the patches, over every element of a > 2^31 output.
    check_written(pm.compose(x, patches, idx, None, (H, W), backend="cpu"), x, idx, patches)


@needs_14_gib
def test_crop_past_2_to_the_31(big):
    x, idx, _ = big
    got = pm.crop([x], idx, 4, 2, (H, W), backend="cpu")
    region = torch.nn.functional.pad(x[0, :, H - 40:], (2, 2, 2, 2))  # row r: image row H - 40 + r - 2
    for p, (_, y, xc) in enumerate(idx.tolist()):
        r0, c0 = 4 * y - 2 - (H - 40) + 2, 4 * xc - 2 + 2
        assert torch.equal(got[p], region[:, r0:r0 + 8, c0:c0 + 8]), p


# -- every GPU backend ---------------------------------------------------------------

def big_free_memory(gib):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2 ** 30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2 ** 30:.1f} free")


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_ops_past_2_to_the_31_elements(device, backend):
    # fp16 tensors of more than 2^31 elements: 32-bit offsets would wrap.
    big_free_memory(24)
    H, W = 32768, 16392  # 4 * H * W > 2^31
    coarse = torch.rand(1, 4, H // 64, W // 64, device="cuda", dtype=torch.float16)
    P = 64
    cells = torch.stack([torch.zeros(P, dtype=torch.long), torch.randint(H // 4 - 8, H // 4, (P,)),
                         torch.randint(0, W // 4, (P,))], 1).cuda()
    patches = torch.rand(P, 4, 4, 4, device="cuda", dtype=torch.float16)
    out = pm.ops.run_compose(backend, coarse, patches, cells, None, (H, W))
    assert out.numel() > 2 ** 31
    # The last rows (all past 2^31) against the reference on those rows.
    rows = slice(H - 64, H)
    want = F.interpolate(coarse.float(), (H, W), mode="bilinear", align_corners=False)[:, :, rows].half()
    got = out[:, :, rows].clone()
    del out
    owner = reference.cell_owner(cells, None, 1, H // 4, W // 4)[:, (H - 64) // 4:]
    for p in range(P):
        y, x = int(cells[p, 1]) - (H - 64) // 4, int(cells[p, 2])
        if int(owner[0, y, x]) == p:
            want[0, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4] = patches[p]
    assert float((got.float() - want.float()).abs().max()) <= 2e-3
    del got, want

    x = torch.rand(1, 4, H, W, device="cuda", dtype=torch.float16)
    out = pm.ops.run_replace(backend, x, patches, cells, None)
    for p in range(P):
        y, xc = int(cells[p, 1]), int(cells[p, 2])
        block = out[0, :, 4 * y:4 * y + 4, 4 * xc:4 * xc + 4]
        assert torch.equal(block, patches[p]) == (int(owner[0, y - (H - 64) // 4, xc]) == p), p
    # The cells are in the last 32 rows: everything above is x's.
    assert torch.equal(out[:, :, :H - 32], x[:, :, :H - 32])
    del out

    # crop reading past 2^31 (no resampling: a plain copy of each window,
    # zeros outside the image).
    got = pm.ops.run_crop(backend, [x], cells, 4, 2, (H, W))
    region = F.pad(x[0, :, H - 40:], (2, 2, 2, 2))  # region row r = image row H - 40 + r - 2
    for p in range(P):
        y0, x0 = 4 * int(cells[p, 1]) - 2, 4 * int(cells[p, 2]) - 2
        r0 = y0 - (H - 40) + 2
        assert torch.equal(got[p], region[:, r0:r0 + 8, x0 + 2:x0 + 10]), p
