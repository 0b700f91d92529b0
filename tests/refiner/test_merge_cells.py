"""merge_cells: the eval-mode Refiner on the CPU computing neighbouring
selected cells together, as tiles (pymatting_ext._tiles). The claim it rests
on (a refined cell equals the full-mode result at that cell, kernel_size 3
and 1, at the image's edges too), then merged against cell by cell and
upstream on random, boundary-concentrated, dense and isolated selections,
with tiles forced where the cost model would not take them (kernel_size 1,
tiles of one cell, edges and corners), chunks, dtypes, the reference
backend, and where it must not run (autograd, training, GPUs)."""
import importlib.util
import math
import os

import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import _tiles

from conftest import needs_cuda
from helpers import TESTS_DIR, check_outputs, check_tie_tolerant, random_bn_, refiner_inputs

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner

_spec = importlib.util.spec_from_file_location(
    "bench_common", os.path.join(TESTS_DIR, "..", "benchmarks", "common.py"))
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)

# (B, H, W, backbone scale): odd cell grids (9 x 13, 30 x 41), batch > 1.
SIZES = [(1, 36, 52, 0.25), (2, 120, 164, 0.25), (2, 96, 128, 0.125)]


def pair(mode, sample_pixels, threshold=0.4, kernel_size=3, prevent=False, **kw):
    up = random_bn_(Upstream(mode, sample_pixels, threshold, kernel_size, prevent)).eval()
    ours = pm.Refiner(mode, sample_pixels, threshold, kernel_size, prevent, **kw).eval()
    ours.load_state_dict(up.state_dict())
    return up, ours


def force_tiles(model, sizes):
    """Every tile of `sizes` with a selected cell taken, whatever it costs:
    the largest side wins."""
    model.merge_tile_sizes = tuple(sizes)
    model._merge_costs = lambda folded: {1: 1.0, **{t: 1e-3 for t in sizes}}
    model.merge_min_saving_cells = -math.inf
    model.merge_min_gain = 0.0
    return model


def tile_calls(monkeypatch):
    """The tile side of every _patches call (1: single cells)."""
    calls = []
    real = pm.Refiner._patches

    def spy(self, *args, **kw):
        tile = args[8] if len(args) > 8 else kw.get("tile", 1)
        calls.append(tile)
        return real(self, *args, **kw)

    monkeypatch.setattr(pm.Refiner, "_patches", spy)
    return calls


def make_err(kind, B, Hc, Wc):
    if kind == "random":
        return torch.rand(B, 1, Hc, Wc)
    if kind == "boundary":
        return bench_common.boundary_err(B, Hc, Wc, seed=3)
    if kind == "dense":
        return torch.rand(B, 1, Hc, Wc) + 0.5
    # Isolated cells: the four corners, an edge's middle and one inside.
    err = torch.zeros(B, 1, Hc, Wc)
    for y, x in ((0, 0), (0, Wc - 1), (Hc - 1, 0), (Hc - 1, Wc - 1), (0, Wc // 2), (Hc // 2, Wc // 3)):
        err[:, :, y, x] = 1.0
    return err


def run(model, x, merge):
    model.merge_cells = merge
    with torch.no_grad():
        return model(*x)


def close(a, b, atol=1e-5):
    check_outputs(a, b, atol)


# -- the claim: a cell's result is the full-mode result at the cell ------------

@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("B,H,W,scale", SIZES)
def test_every_cell_alone_equals_full_mode(kernel_size, B, H, W, scale):
    full = random_bn_(pm.Refiner("full", 0, 0.0, kernel_size)).eval()
    cells = pm.Refiner("thresholding", 0, -1.0, kernel_size, merge_cells=False).eval()
    cells.load_state_dict(full.state_dict())
    x = refiner_inputs(B, H, W, int(H * scale), int(W * scale))
    with torch.no_grad():
        want, got = full(*x), cells(*x)
    assert float(got[2].min()) == 1.0  # every cell refined, edges and corners included
    close(want, got)


# -- merged against cell by cell and upstream -----------------------------------

@pytest.mark.parametrize("kind", ["random", "boundary", "dense", "isolated"])
@pytest.mark.parametrize("mode", ["sampling", "thresholding"])
@pytest.mark.parametrize("B,H,W,scale", SIZES)
@pytest.mark.parametrize("forced", [False, True], ids=["cost-model", "forced"])
def test_merged_matches_cells_and_upstream(kind, mode, B, H, W, scale, forced, monkeypatch):
    Hc, Wc = int(H * scale), int(W * scale)
    cells = (H // 4) * (W // 4)
    sample_pixels = 16 * (cells if kind == "dense" else cells // 4)
    up, ours = pair(mode, sample_pixels, threshold=0.0 if kind == "isolated" else 0.3)
    if forced:
        force_tiles(ours, (2, 4))
    x = refiner_inputs(B, H, W, Hc, Wc, err=make_err(kind, B, Hc, Wc))
    per_cell = run(ours, x, False)
    calls = tile_calls(monkeypatch)
    merged = run(ours, x, True)
    close(per_cell, merged)
    with torch.no_grad():
        want = up(*x)
    if mode == "sampling":
        check_tie_tolerant(want, merged, x[4], sample_pixels // 16, atol=1e-5)
    else:
        close(want, merged)
    if forced or kind == "dense":
        assert any(t > 1 for t in calls), calls
    if kind == "isolated" and mode == "thresholding" and not forced and scale == 0.25:
        assert calls and set(calls) == {1}, "isolated cells stay single"


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("prevent", [True, False])
@pytest.mark.parametrize("sizes", [(2,), (4,), (8,), (2, 4, 8)])
def test_forced_tiles_at_edges_kernel_sizes_and_invalid_cells(kernel_size, prevent, sizes, monkeypatch):
    # Tiles that stick out of a 9 x 13 (and 30 x 41) cell grid, tiles of a
    # single selected cell, kernel_size 1 (the cost model never merges it),
    # and with prevent_oversampling zero-error cells that are not refined.
    for B, H, W, scale in SIZES[:2]:
        Hc, Wc = int(H * scale), int(W * scale)
        err = torch.rand(B, 1, Hc, Wc)
        err[:, :, : Hc // 3] = 0
        up, ours = pair("sampling", 16 * 60, kernel_size=kernel_size, prevent=prevent)
        force_tiles(ours, sizes)
        x = refiner_inputs(B, H, W, Hc, Wc, err=err)
        per_cell = run(ours, x, False)
        calls = tile_calls(monkeypatch)
        merged = run(ours, x, True)
        with torch.no_grad():
            want = up(*x)
        close(per_cell, merged)
        close(want, merged)
        assert max(calls) == max(sizes)


@pytest.mark.parametrize("max_patches", [1, 5, 37])
def test_merged_in_chunks(max_patches, monkeypatch):
    B, H, W, scale = SIZES[1]
    Hc, Wc = int(H * scale), int(W * scale)
    up, ours = pair("thresholding", 0, 0.3, max_patches=max_patches)
    force_tiles(ours, (2, 4, 8))
    x = refiner_inputs(B, H, W, Hc, Wc, err=bench_common.boundary_err(B, Hc, Wc, seed=1))
    per_cell = run(ours, x, False)
    calls = tile_calls(monkeypatch)
    merged = run(ours, x, True)
    close(per_cell, merged)
    with torch.no_grad():
        close(up(*x), merged)
    assert calls.count(8) > 1


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_merged_in_other_dtypes(dtype, atol):
    B, H, W, scale = SIZES[1]
    Hc, Wc = int(H * scale), int(W * scale)
    _, ours = pair("sampling", 16 * 600)
    force_tiles(ours, (2, 4, 8))
    ours.to(dtype)
    x = refiner_inputs(B, H, W, Hc, Wc, dtype=dtype, err=bench_common.boundary_err(B, Hc, Wc).to(dtype))
    per_cell, merged = run(ours, x, False), run(ours, x, True)
    assert merged[0].dtype == dtype
    close(per_cell, merged, atol)


def test_reference_backend_merges_too(monkeypatch):
    B, H, W, scale = SIZES[1]
    Hc, Wc = int(H * scale), int(W * scale)
    up, ours = pair("thresholding", 0, 0.3, backend="reference")
    x = refiner_inputs(B, H, W, Hc, Wc, err=bench_common.boundary_err(B, Hc, Wc, seed=2))
    per_cell = run(ours, x, False)
    calls = tile_calls(monkeypatch)
    merged = run(ours, x, True)
    assert any(t > 1 for t in calls)
    close(per_cell, merged)
    with torch.no_grad():
        close(up(*x), merged)


def test_on_by_default_where_it_is_valid(monkeypatch):
    _, ours = pair("thresholding", 0, 0.3)
    assert ours.merge_cells is True and pm.Refiner("sampling", 100, 0.1).merge_cells is True
    x = refiner_inputs(1, 64, 96, 16, 24, err=torch.ones(1, 1, 16, 24))
    calls = tile_calls(monkeypatch)
    with torch.no_grad():
        ours(*x)
    assert 8 in calls
    # Not with autograd (parameters requiring grad, grad enabled), nor in
    # training: the per-cell path, as upstream.
    calls.clear()
    ours(*x)
    ours.train()
    ours(*x)
    assert set(calls) == {1}


@needs_cuda
def test_never_on_a_gpu(monkeypatch):
    _, ours = pair("sampling", 16 * 384)
    ours.cuda()
    x = refiner_inputs(1, 64, 96, 16, 24, device="cuda", err=torch.ones(1, 1, 16, 24))
    calls = tile_calls(monkeypatch)
    with torch.no_grad():
        ours(*x)
    assert set(calls) <= {1}


def test_merge_cells_is_checked():
    for bad in (None, 0, 1, "yes"):
        with pytest.raises(ValueError, match="merge_cells must be True or False"):
            pm.Refiner("sampling", 100, 0.1, merge_cells=bad)


# -- the plan and its cost model ---------------------------------------------

def _costs(kernel_size):
    model = pm.Refiner("sampling", 100, 0.1, kernel_size).eval()
    return model._merge_costs(model._folded())


def test_cost_model_counts_multiply_adds_and_cropped_elements():
    costs = _costs(3)
    c = _tiles.CROP_ELEMENT_COST
    # One cell: conv1 6x6x24 outputs of 42x9 products, conv2 4x4x16 of 24x9,
    # conv3 6x6x12 of 22x9, conv4 4x4x4 of 12x9; crops of 8x8x42 and 8x8x6.
    assert costs[1] == (36 * 24 * 42 * 9 + 16 * 16 * 24 * 9 + 36 * 12 * 22 * 9 + 16 * 4 * 12 * 9
                        + c * (64 * 42 + 64 * 6))
    assert costs[4] == (12 * 12 * 24 * 42 * 9 + 10 * 10 * 16 * 24 * 9 + 18 * 18 * 12 * 22 * 9
                        + 16 * 16 * 4 * 12 * 9 + c * (14 * 14 * 42 + 20 * 20 * 6))
    # kernel_size 1 shares nothing: a tile costs its cells.
    ones = _costs(1)
    assert all(ones[t] == t * t * ones[1] for t in ones)


def _grid_idx(mask):
    return mask.nonzero()


def test_plan_picks_tiles_for_blocks_and_cells_for_scatter():
    costs, sizes = _costs(3), (2, 4, 8)
    mask = torch.zeros(2, 20, 27, dtype=torch.bool)
    mask[0, 8:16, 8:16] = True  # one whole 8 x 8 tile
    mask[1, ::3, ::3] = True  # a scatter: no tile pays
    mask[1, 19, 26] = True  # alone in the corner tile of a ragged grid
    idx = _grid_idx(mask)
    single, tiles = _tiles.plan_tiles(idx, 2, 20, 27, costs, sizes)
    got = {T: (t.tolist(), idx[rows].tolist(), where.tolist()) for T, t, rows, where in tiles}
    assert set(got) == {8}
    tile_rows, cells, where = got[8]
    assert tile_rows == [[0, 1, 1]] and len(cells) == 64 and set(where) == {0}
    assert all(c[0] == 0 for c in cells)
    assert sorted(idx[single].tolist()) == sorted(c for c in idx.tolist() if c[0] == 1)
    # Every row once, single or in a tile.
    rows = torch.cat([single] + [r for _, _, r, _ in tiles])
    assert sorted(rows.tolist()) == list(range(idx.shape[0]))


def test_plan_never_merges_kernel_size_1_nor_below_the_least_saving():
    mask = torch.ones(1, 16, 16, dtype=torch.bool)
    idx = _grid_idx(mask)
    single, tiles = _tiles.plan_tiles(idx, 1, 16, 16, _costs(1), (2, 4, 8))
    assert tiles == [] and single.shape[0] == 256
    costs = _costs(3)
    single, tiles = _tiles.plan_tiles(idx, 1, 16, 16, costs, (2, 4, 8), min_saving=256 * costs[1])
    assert tiles == [] and single.shape[0] == 256
    single, tiles = _tiles.plan_tiles(idx[:0], 1, 16, 16, costs, (2, 4, 8))
    assert tiles == [] and single.shape[0] == 0


def _refiner_plan(err, sample_pixels, H, W):
    model = pm.Refiner("sampling", sample_pixels, 0.1, 3, False).eval()
    costs = model._merge_costs(model._folded())
    err_q = torch.nn.functional.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
    _, idx, _ = pm.ops.select_sampling(err_q, sample_pixels // 16, False)
    return _tiles.plan_tiles(idx, err.shape[0], H // 4, W // 4, costs, model.merge_tile_sizes,
                             model.merge_min_saving_cells * costs[1], model.merge_min_gain)


def test_plan_at_hd_single_cells_for_uniform_err_tiles_for_a_boundary():
    # The benchmark's HD setting (coarse 270 x 480, 5,000 of 129,600 cells):
    # uniform err scatters them, nothing worth a tile; along a matte's edge
    # most cells go in tiles.
    torch.manual_seed(0)
    single, tiles = _refiner_plan(torch.rand(1, 1, 270, 480), 80_000, 1080, 1920)
    assert tiles == [] and single.shape[0] == 5000
    single, tiles = _refiner_plan(bench_common.boundary_err(1, 270, 480), 80_000, 1080, 1920)
    assert single.shape[0] < 500 and {T for T, *_ in tiles} == {2, 4, 8}
