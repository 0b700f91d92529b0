"""Where the eval-mode Refiner computes selected cells together.

In eval mode (BatchNorm folded) a refined cell's result is the `full`-mode
result at that cell: every intermediate value is a function of its position
in the (resized, zero-padded) images only. So a T-by-T tile of cells can run
through the four convolutions as one larger patch (the crops at stride 2T and
4T, the same padding), and its selected cells read out of the result; for a
dense block this computes conv1 ~9x, conv2 ~4x and conv3 ~2.25x less than
cell by cell (kernel_size 3; with kernel_size 1 nothing is shared).

plan_tiles chooses, by a cost model, a set of disjoint tiles of a quadtree
(tile sides `sizes`, each dividing the next) over the cell grid, and which
selected cells stay single. The decision reads idx on the host, so the
Refiner only plans on the CPU.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["tile_cost", "plan_tiles"]


#: What one element of the crops costs, in multiply-adds. Fitted to the
#: eval Refiner's patches on a 2-core AMD EPYC (fp32, one thread), where
#: tiles of 2, 4 and 8 cells a side took 1.93, 4.38 and 14.7 cells' time,
#: and rounded down: the model then puts each tile at 1.95, 4.9 and 14.9
#: cells, never below what it measured, leaning to single cells.
CROP_ELEMENT_COST = 48


def tile_cost(folded: Sequence[Tensor], kernel_size: int, tile: int) -> int:
    """The cost of one tile of tile x tile cells (tile=1: one cell's patch)
    through the crops and the four convolutions: each conv's output positions
    times in-channels times out-channels times k^2 (multiply-adds), plus
    CROP_ELEMENT_COST for every element the two crops write."""
    w1, w2, w3, w4 = folded[0], folded[2], folded[4], folded[6]
    k = kernel_size
    p, q = (3, 2) if k == 3 else (0, 0)
    s1 = 2 * tile + 2 * p - (k - 1)  # conv1's output side (half resolution)
    s2 = s1 - (k - 1)
    s3 = 2 * s2 - (k - 1)  # conv3's, after the 2x nearest upsample
    s4 = s3 - (k - 1)  # = 4 * tile
    per_position = [w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3] for w in (w1, w2, w3, w4)]
    macs = sum(s * s * m for s, m in zip((s1, s2, s3, s4), per_position))
    # The half-resolution crop feeds conv1; the full-resolution one the
    # channels of conv3's input that the upsample does not fill.
    crops = (2 * tile + 2 * p) ** 2 * w1.shape[1] + (4 * tile + 2 * q) ** 2 * (w3.shape[1] - w2.shape[0])
    return macs + CROP_ELEMENT_COST * crops


def plan_tiles(idx: Tensor, batch: int, cells_h: int, cells_w: int, costs: Dict[int, float],
               sizes: Sequence[int], min_saving: float = 0.0, min_gain: float = 0.0
               ) -> Tuple[Tensor, List[Tuple[int, Tensor, Tensor, Tensor]]]:
    """How to compute the cells idx (P, 3) names (unique rows (b, y, x) of a
    batch x cells_h x cells_w grid, on the CPU) at the least cost.

    costs[1] is one cell's cost, costs[T] one T x T tile's, whatever its
    selected count. Bottom-up over the quadtree of tiles that hold selected
    cells, a tile is taken where it costs less than the best plan of its
    quarters by more than the fraction min_gain of that; top-down, the largest taken tiles win, one side at a time, and
    a side's tiles are all given up (their cells left to smaller tiles or
    single) unless together they save more than min_saving over computing
    their cells single: each side costs a pass of its own. Returns (single, tiles):
    the rows of idx computed alone, and per tile side T with a tile taken,
    (T, tile_idx (N, 3) rows (b, ty, tx) of the grid of T x T tiles, rows
    (R,) of idx in those tiles, where (R,) the row of tile_idx each is in).

    Works on idx's rows only (the quadtree's nodes with selected cells), so
    it costs little next to the patches whatever the image size."""
    P = idx.shape[0]
    if len(sizes) == 0 or P == 0:
        return torch.arange(P), []
    for small, big in zip(sizes, sizes[1:]):
        assert big % small == 0, "tile sides must each divide the next"
    del batch  # (the keys below number tiles within the batch)
    b, y, x = idx.unbind(1)
    # Bottom-up. Level 0: each row is its own node.
    best = torch.full((P,), float(costs[1]), dtype=torch.float64)
    node = torch.arange(P)  # row -> its node at the level below
    levels: List[Tuple[int, Tensor, Tensor, Tensor]] = []
    for T in sizes:
        tiles_w = -(-cells_w // T)
        key = (b * -(-cells_h // T) + torch.div(y, T, rounding_mode="floor")) * tiles_w \
            + torch.div(x, T, rounding_mode="floor")
        keys, inverse = torch.unique(key, return_inverse=True)
        # Each node below lies in one tile: its parent, read off any of its rows.
        parent = torch.empty(best.shape[0], dtype=torch.long).scatter_(0, node, inverse)
        quarters = torch.zeros(keys.shape[0], dtype=torch.float64).index_add_(0, parent, best)
        taken = quarters * (1.0 - min_gain) > costs[T]
        best = torch.where(taken, torch.full_like(quarters, float(costs[T])), quarters)
        node = inverse
        levels.append((T, keys, inverse, taken))
    # Top-down: the rows of a taken tile not inside a larger taken tile.
    alone = torch.ones(P, dtype=torch.bool)
    tiles: List[Tuple[int, Tensor, Tensor, Tensor]] = []
    for T, keys, inverse, taken in reversed(levels):
        rows = (alone & taken[inverse]).nonzero()[:, 0]
        if rows.shape[0] == 0:
            continue
        used, where = torch.unique(inverse[rows], return_inverse=True)
        if rows.shape[0] * costs[1] - used.shape[0] * costs[T] <= min_saving:
            continue
        alone[rows] = False
        tiles_h, tiles_w = -(-cells_h // T), -(-cells_w // T)
        k = keys[used]
        tile_idx = torch.stack([k // (tiles_h * tiles_w), k // tiles_w % tiles_h, k % tiles_w], 1)
        tiles.append((T, tile_idx, rows, where))
    return alone.nonzero()[:, 0], tiles
