"""Triton kernels of select_sampling and select_thresholding.

Sampling: a radix select of the k-th largest order key, 8 bits a pass (4
histogram launches for float32 keys, 2 for float16/bfloat16's 16-bit keys,
over chunks of every image; each program re-derives the digits chosen so far
from the earlier histograms), a count launch (keys above the k-th and ties
with it, per chunk), and a write launch that takes, in row-major order,
every key above it and the first (k - above) keys equal to it, writing idx,
valid and ref with running prefix counts. No sort, no host synchronisation.
The launches cover the batch slice by slice (at most _SLICE_IMAGES images,
a grid axis of CUDA's 65,535 at most), with one slice's scratch reused.
Thresholding: per-tile compare and count, a scan of the tile counts, one
host read of the total, and an order-preserving write.
"""
import torch
import triton
import triton.language as tl

from .common import FP_FUSION, block_size, check_dtype, device_guard, known_empty, wrap_triton


@triton.jit
def _order_key(v, KEY_BITS: tl.constexpr):
    """Keys in the order of the values v (as loaded, err's dtype): NaN
    largest, -0 equal to +0 (csrc/index_math.h's order_key).

    KEY_BITS 32 (float32): signed int32 keys. KEY_BITS 16 (float16,
    bfloat16): the 16-bit patterns, made unsigned in [0, 65536), so that two
    8-bit passes decide them."""
    # NB: integer tests only, no float compare: the interpreter's bfloat16
    # subnormals do not compare as the GPU's.
    if KEY_BITS == 32:
        bits = v.to(tl.int32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(magnitude == 0, 0, key)
        key = tl.where(magnitude > 0x7F800000, 0x7FFFFFFF, key)
    else:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32)
        magnitude = bits & 0x7FFF
        inf_bits: tl.constexpr = 0x7C00 if v.dtype == tl.float16 else 0x7F80
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFF)
        key = tl.where(magnitude == 0, 0, key)
        key = tl.where(magnitude > inf_bits, 0x7FFF, key) + 0x8000
    return key


@triton.jit
def _positive(key, KEY_BITS: tl.constexpr):
    """value > 0 (so false for NaN), from its order key."""
    if KEY_BITS == 32:
        return (key > 0) & (key < 0x7FFFFFFF)
    else:
        return (key > 0x8000) & (key < 0xFFFF)


_BINS = 256  # 8-bit digits: 4 passes over float32 keys, 2 over 16-bit ones


def _key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


@triton.jit
def _digit(key, PASS: tl.constexpr, KEY_BITS: tl.constexpr):
    """Digit PASS (0: the most significant) of the key, ordered like the key:
    for signed 32-bit keys the top byte's sign bit is flipped, so negative
    keys get the small digits."""
    d = (key >> (KEY_BITS - 8 - 8 * PASS)) & 255
    if KEY_BITS == 32 and PASS == 0:
        d = d ^ 128
    return d


@triton.jit
def _radix_state(hist_b, k, PASSES: tl.constexpr, KEY_BITS: tl.constexpr):
    """(prefix, rank) after PASSES digit passes, from image b's digit
    histograms hist_b[pass][digit]: the bits of the k-th largest key chosen
    so far (the whole key after KEY_BITS / 8 passes), and the rank (1-based,
    from the largest) of that key among the keys with this prefix."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), dtype=tl.int32)
    rank = tl.zeros((), dtype=tl.int64) + k
    for d in tl.static_range(PASSES):
        count = tl.load(hist_b + d * 256 + bins)
        # Keys with a larger digit: the total minus the inclusive scan.
        above = tl.sum(count, axis=0) - tl.cumsum(count, axis=0)
        hit = (above < rank) & (rank <= above + count)
        digit = tl.max(tl.where(hit, bins, -1), axis=0)
        rank = rank - tl.sum(tl.where(hit, above, 0), axis=0)
        if KEY_BITS == 32 and d == 0:
            digit = digit ^ 128
        prefix = prefix | (digit << (KEY_BITS - 8 - 8 * d))
    return prefix, rank


@triton.jit(do_not_specialize=["first", "n", "chunk", "k"])
def _radix_histogram_kernel(err_ptr, hist_ptr, first, n, chunk, k, PASS: tl.constexpr, KEY_BITS: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Program (g, i): chunk g of image first + i, into the slice's
    histograms hist[i][PASS]."""
    g = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    b = i + first
    hist_b = hist_ptr + i * 4 * 256
    prefix, _ = _radix_state(hist_b, k, PASS, KEY_BITS)
    # The bits of the digits chosen so far.
    high: tl.constexpr = (-1 << (KEY_BITS - 8 * PASS)) if PASS > 0 else 0
    row = err_ptr + b * n
    begin = g.to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, n)
    total = tl.zeros((512,), dtype=tl.int32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < end
        key = _order_key(tl.load(row + offs, mask=m, other=0.0), KEY_BITS)
        digit = _digit(key, PASS, KEY_BITS)
        # NB: keys outside the chunk or the prefix go to bins 256.. (dropped).
        total += tl.histogram(tl.where(m & ((key & high) == prefix), digit, 256 + digit), 512)
    bins = tl.arange(0, 512)
    # Empty bins (most, after the first pass) cost no atomic.
    tl.atomic_add(hist_b + PASS * 256 + bins, total.to(tl.int64), mask=(bins < 256) & (total != 0))


@triton.jit(do_not_specialize=["first", "n", "chunk", "k"])
def _radix_count_kernel(err_ptr, hist_ptr, counts_ptr, first, n, chunk, k, KEY_BITS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """counts[i][g] = (keys above the k-th largest, keys equal to it) in
    chunk g of image first + i (int32: a chunk's cells)."""
    g = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    b = i + first
    kth, _ = _radix_state(hist_ptr + i * 4 * 256, k, KEY_BITS // 8, KEY_BITS)
    row = err_ptr + b * n
    # NB: cell indices within an image in int32 (the launcher checks that
    # n + chunk fits).
    begin = g * chunk
    end = tl.minimum(begin + chunk, n)
    above = 0
    ties = 0
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < end
        key = _order_key(tl.load(row + offs, mask=m, other=0.0), KEY_BITS)
        above += tl.sum(((key > kth) & m).to(tl.int32), axis=0)
        ties += tl.sum(((key == kth) & m).to(tl.int32), axis=0)
    out = counts_ptr + (i * tl.num_programs(0) + g) * 2
    tl.store(out, above)
    tl.store(out + 1, ties)


@triton.jit(do_not_specialize=["first", "n", "width", "chunk", "k"])
def _radix_write_kernel(err_ptr, hist_ptr, counts_ptr, ref_ptr, idx_ptr, valid_ptr, first, n, width, chunk, k,
                        PREVENT: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr,
                        GROUPS: tl.constexpr):
    """Row j of image b = first + i is its j-th selected cell in row-major
    order: keys above the k-th largest, and the first (k - above) keys
    equal to it. Writes every element of ref (the caller does not clear it).

    Counts and positions within an image are int32 (they are at most n)."""
    g = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    b = i + first
    kth, rank = _radix_state(hist_ptr + i * 4 * 256, k, KEY_BITS // 8, KEY_BITS)
    ties_needed = rank.to(tl.int32)
    # Keys above and ties in the chunks before this one.
    before = tl.arange(0, GROUPS)
    counts_b = counts_ptr + i * tl.num_programs(0) * 2
    above = tl.sum(tl.load(counts_b + before * 2, mask=before < g, other=0), axis=0)
    tied = tl.sum(tl.load(counts_b + before * 2 + 1, mask=before < g, other=0), axis=0)
    row = err_ptr + b * n
    begin = g * chunk
    end = tl.minimum(begin + chunk, n)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < end
        v = tl.load(row + offs, mask=m, other=0.0)
        key = _order_key(v, KEY_BITS)
        gt = ((key > kth) & m).to(tl.int32)
        eq = ((key == kth) & m).to(tl.int32)
        above_before = above + tl.cumsum(gt, axis=0) - gt
        tie_rank = tied + tl.cumsum(eq, axis=0) - eq
        take = (gt != 0) | ((eq != 0) & (tie_rank < ties_needed))
        # Selected cells before: all keys above, the first ties_needed ties.
        pos = above_before + tl.minimum(tie_rank, ties_needed)
        if PREVENT:
            ok = _positive(key, KEY_BITS)
        else:
            ok = offs >= 0
        out = (b * k + pos) * 3
        y = offs // width
        tl.store(idx_ptr + out, b, mask=take)
        tl.store(idx_ptr + out + 1, y.to(tl.int64), mask=take)
        tl.store(idx_ptr + out + 2, (offs - y * width).to(tl.int64), mask=take)
        tl.store(valid_ptr + out // 3, ok.to(tl.int1), mask=take)
        # NB: via float32: the interpreter turns bool straight into bfloat16
        # bit patterns.
        tl.store(ref_ptr + b * n + offs, (take & ok).to(tl.float32).to(ref_ptr.dtype.element_ty), mask=m)
        above += tl.sum(gt, axis=0)
        tied += tl.sum(eq, axis=0)


#: Chunks (programs) an image is split into at most, and about how many
#: programs a launch aims at: several per SM of a large GPU (132 on an H100).
_MAX_GROUPS = 1024
_TARGET_PROGRAMS = 1024
#: Images a launch covers at most: its grid's axis 1, which CUDA limits to
#: 65,535. The scratch is sized for one slice (8 KiB of histograms an
#: image: 32 MiB) and reused by the next.
_SLICE_IMAGES = 4096


def _chunking(B, N, block: int):
    """(chunk, groups): each image's N cells in `groups` chunks of `chunk`
    (a multiple of block), for launches of B images. HD (N = 129,600) gets
    127 programs of one block an image on the GPU, 4K 507.

    NB: sym_max and sym_min, not max and min: B and N may be symbolic
    under torch.compile, and max would guard on their values."""
    per_image = torch.sym_max(1, torch.sym_min(_MAX_GROUPS, triton.cdiv(_TARGET_PROGRAMS, torch.sym_max(B, 1))))
    chunk = torch.sym_max(1, triton.cdiv(triton.cdiv(N, per_image), block)) * block
    return chunk, triton.cdiv(N, chunk)


def launch_plan(B: int, N, block: int):
    """(slice, chunk, groups): select_sampling's launches for B images of N
    cells take the batch `slice` images at a time, on a (groups, images of
    the slice) grid, with scratch for `slice` images. Every grid axis stays
    in CUDA's limits (axis 0: 2^31 - 1, axis 1: 65,535) and the scratch is
    the same for any B beyond a slice."""
    images = torch.sym_min(B, _SLICE_IMAGES)
    chunk, groups = _chunking(images, N, block)
    return images, chunk, groups


def select_sampling(err: torch.Tensor, k: int, prevent_oversampling: bool):
    check_dtype("select_sampling", "err", err)
    e = err.contiguous()
    B, _, H, W = e.shape
    N = H * W
    k = torch.sym_min(k, N)
    idx = torch.empty((B * k, 3), dtype=torch.int64, device=e.device)
    valid = torch.empty((B * k,), dtype=torch.bool, device=e.device)
    if known_empty(B * k):
        return torch.zeros_like(e), idx, valid
    # The write kernel writes every element of ref.
    ref = torch.empty_like(e)
    block = block_size(1024, 8192)
    images, chunk, groups = launch_plan(B, N, block)
    if N + chunk >= 2 ** 31:
        raise ValueError(f"select_sampling: backend='triton' takes at most 2^31 cells an image, got {N}")
    key_bits = _key_bits(e.dtype)
    with device_guard(e.device):
        hist = torch.empty((images, 4, _BINS), dtype=torch.int64, device=e.device)
        counts = torch.empty((images, groups, 2), dtype=torch.int32, device=e.device)
        # NB: one slice without a loop: a loop over a symbolic B would fix
        # its value (a recompile per batch size); this guards B <= a slice.
        firsts = [0] if B <= _SLICE_IMAGES else range(0, B, images)
        for first in firsts:
            grid = (groups, torch.sym_min(images, B - first))
            # Each slice's histograms start from zero (atomic adds).
            hist.zero_()
            for d in range(key_bits // 8):
                wrap_triton(_radix_histogram_kernel)[grid](e, hist, first, N, chunk, k, PASS=d, KEY_BITS=key_bits,
                                                           BLOCK=block, enable_fp_fusion=FP_FUSION)
            wrap_triton(_radix_count_kernel)[grid](e, hist, counts, first, N, chunk, k, KEY_BITS=key_bits,
                                                   BLOCK=block, enable_fp_fusion=FP_FUSION)
            wrap_triton(_radix_write_kernel)[grid](e, hist, counts, ref, idx, valid, first, N, W, chunk, k,
                                                   PREVENT=bool(prevent_oversampling), KEY_BITS=key_bits,
                                                   BLOCK=block, GROUPS=_MAX_GROUPS, enable_fp_fusion=FP_FUSION)
    return ref, idx, valid


@triton.jit(do_not_specialize=["total", "thr_key"])
def _threshold_count_kernel(err_ptr, ref_ptr, counts_ptr, total, thr_key, KEY_BITS: tl.constexpr,
                            BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    # NB: compared as order keys (exact, NaN never above): the interpreter's
    # bfloat16 subnormals do not compare as the GPU's, and no flush of
    # subnormals to zero can touch an integer compare.
    key = _order_key(tl.load(err_ptr + offs, mask=m, other=0.0), KEY_BITS)
    nan_key: tl.constexpr = 0x7FFFFFFF if KEY_BITS == 32 else 0xFFFF
    sel = (key > thr_key) & (key != nan_key) & m
    tl.store(ref_ptr + offs, sel.to(tl.float32), mask=m)
    tl.store(counts_ptr + tile, tl.sum(sel.to(tl.int32), axis=0))


def _host_order_key(value: float, dtype: torch.dtype) -> int:
    """_order_key of `value` rounded to dtype, computed on the host."""
    t = torch.tensor([value], dtype=dtype)
    if dtype == torch.float32:
        bits = int(t.view(torch.int32))
        magnitude = bits & 0x7FFFFFFF
        if magnitude > 0x7F800000:
            return 0x7FFFFFFF
        return 0 if magnitude == 0 else (bits if bits >= 0 else bits ^ 0x7FFFFFFF)
    bits = int(t.view(torch.int16))
    magnitude = bits & 0x7FFF
    inf_bits = 0x7C00 if dtype == torch.float16 else 0x7F80
    if magnitude > inf_bits:
        return 0xFFFF
    return (0 if magnitude == 0 else (bits if bits >= 0 else bits ^ 0x7FFF)) + 0x8000


@triton.jit(do_not_specialize=["total", "n", "width"])
def _threshold_write_kernel(ref_ptr, ends_ptr, idx_ptr, total, n, width, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    sel = (tl.load(ref_ptr + offs, mask=m, other=0.0) != 0.0) & m
    sel_i = sel.to(tl.int32)
    # ends holds the inclusive scan of the tile counts.
    start = tl.load(ends_ptr + tile) - tl.sum(sel_i, axis=0)
    out = (start + tl.cumsum(sel_i, axis=0) - sel_i).to(tl.int64)
    cell = offs % n
    tl.store(idx_ptr + out * 3, offs // n, mask=sel)
    tl.store(idx_ptr + out * 3 + 1, cell // width, mask=sel)
    tl.store(idx_ptr + out * 3 + 2, cell % width, mask=sel)


def select_thresholding(err: torch.Tensor, threshold: float):
    check_dtype("select_thresholding", "err", err)
    e = err.contiguous()
    B, _, H, W = e.shape
    total = e.numel()
    ref = torch.empty((B, 1, H, W), dtype=torch.float32, device=e.device)
    # As torch.gt with a Python scalar: the threshold is rounded to err's
    # dtype first (exact in float32 afterwards).
    thr_key = _host_order_key(threshold, e.dtype)
    if total == 0:
        return ref, torch.empty((0, 3), dtype=torch.int64, device=e.device)
    block = block_size(1024, 8192)
    tiles = triton.cdiv(total, block)
    with device_guard(e.device):
        counts = torch.empty((tiles,), dtype=torch.int32, device=e.device)
        wrap_triton(_threshold_count_kernel)[(tiles,)](e, ref, counts, total, thr_key,
                                                       KEY_BITS=_key_bits(e.dtype), BLOCK=block,
                                                       enable_fp_fusion=FP_FUSION)
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        # NB: the one host synchronisation: the number of selected cells.
        count = int(ends[-1])
        idx = torch.empty((count, 3), dtype=torch.int64, device=e.device)
        if count > 0:
            wrap_triton(_threshold_write_kernel)[(tiles,)](ref, ends, idx, total, H * W, W, BLOCK=block,
                                                           enable_fp_fusion=FP_FUSION)
    return ref, idx
