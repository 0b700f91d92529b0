"""The int64 index paths of the CPU kernels: crop, replace and compose on
float16 tensors of more than 2^31 elements, where 32-bit offsets would wrap
(tests/test_gpu.py does the same on CUDA). About 9 GB of memory; skipped
where less is available."""
import os

import pytest
import torch

import pymatting_ext as pm

H, W = 32768, 16392  # 4 * H * W > 2^31


def available_bytes():
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


pytestmark = pytest.mark.skipif(available_bytes() < 14 * 2 ** 30, reason="needs 14 GiB of free memory")


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


def test_replace_past_2_to_the_31(big):
    x, idx, patches = big
    check_written(pm.replace(x, patches, idx, backend="cpu"), x, idx, patches)


def test_compose_past_2_to_the_31(big):
    x, idx, patches = big
    # coarse of the output's size: compose copies it (no resampling) and
    # writes the patches, over every element of a > 2^31 output.
    check_written(pm.compose(x, patches, idx, None, (H, W), backend="cpu"), x, idx, patches)


def test_crop_past_2_to_the_31(big):
    x, idx, _ = big
    got = pm.crop([x], idx, 4, 2, (H, W), backend="cpu")
    region = torch.nn.functional.pad(x[0, :, H - 40:], (2, 2, 2, 2))  # row r: image row H - 40 + r - 2
    for p, (_, y, xc) in enumerate(idx.tolist()):
        r0, c0 = 4 * y - 2 - (H - 40) + 2, 4 * xc - 2 + 2
        assert torch.equal(got[p], region[:, r0:r0 + 8, c0:c0 + 8]), p
