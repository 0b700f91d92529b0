"""Triton kernels of select_sampling and select_thresholding.

Sampling: a radix select of the k-th largest order key, 8 bits a pass (4
histogram launches over chunks of every image; each program re-derives the
digits chosen so far from the earlier histograms), a count launch (keys
above the k-th and ties with it, per chunk), and a write launch that takes,
in row-major order, every key above it and the first (k - above) keys equal
to it, writing idx, valid and ref with running prefix counts. No sort, no
host synchronisation. Thresholding: per-tile compare and count, a scan of the tile
counts, one host read of the total, and an order-preserving write.
"""
import torch
import triton
import triton.language as tl

from .common import block_size, check_dtype, wrap


@triton.jit
def _order_key(v):
    """int32 keys in the order of the float32 values v: NaN largest, -0 equal
    to +0 (csrc/index_math.h's order_key, in signed form)."""
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(v == 0.0, 0, key)
    return tl.where(v != v, 0x7FFFFFFF, key)


_BINS = 256  # 8-bit digits, 4 passes over the 32-bit keys


@triton.jit
def _digit(key, PASS: tl.constexpr):
    """Byte PASS (0: the most significant) of the int32 order key, as a
    digit that orders like the key: the top byte's sign bit is flipped, so
    negative keys get the small digits."""
    d = (key >> (24 - 8 * PASS)) & 255
    if PASS == 0:
        d = d ^ 128
    return d


@triton.jit
def _radix_state(hist_b, k, PASSES: tl.constexpr):
    """(prefix, rank) after PASSES digit passes, from image b's digit
    histograms hist_b[pass][digit]: the bits of the k-th largest key chosen
    so far (the whole key after 4 passes), and the rank (1-based, from the
    largest) of that key among the keys with this prefix."""
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
        if d == 0:
            digit = digit ^ 128
        prefix = prefix | (digit << (24 - 8 * d))
    return prefix, rank


@triton.jit
def _radix_histogram_kernel(err_ptr, hist_ptr, n, chunk, k, PASS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hist_b = hist_ptr + b * 4 * 256
    prefix, _ = _radix_state(hist_b, k, PASS)
    # The bits of the digits chosen so far.
    high: tl.constexpr = (-1 << (32 - 8 * PASS)) if PASS > 0 else 0
    row = err_ptr + b * n
    begin = g.to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, n)
    total = tl.zeros((512,), dtype=tl.int32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < end
        key = _order_key(tl.load(row + offs, mask=m, other=0.0).to(tl.float32))
        digit = _digit(key, PASS)
        # NB: keys outside the chunk or the prefix go to bins 256.. (dropped).
        total += tl.histogram(tl.where(m & ((key & high) == prefix), digit, 256 + digit), 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(hist_b + PASS * 256 + bins, total.to(tl.int64), mask=bins < 256)


@triton.jit
def _radix_count_kernel(err_ptr, hist_ptr, counts_ptr, n, chunk, k, BLOCK: tl.constexpr):
    """counts[b][g] = (keys above the k-th largest, keys equal to it) in
    program g's chunk."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kth, _ = _radix_state(hist_ptr + b * 4 * 256, k, 4)
    row = err_ptr + b * n
    begin = g.to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, n)
    above = 0
    ties = 0
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < end
        key = _order_key(tl.load(row + offs, mask=m, other=0.0).to(tl.float32))
        above += tl.sum(((key > kth) & m).to(tl.int32), axis=0)
        ties += tl.sum(((key == kth) & m).to(tl.int32), axis=0)
    out = counts_ptr + (b * tl.num_programs(0) + g) * 2
    tl.store(out, above.to(tl.int64))
    tl.store(out + 1, ties.to(tl.int64))


@triton.jit
def _radix_write_kernel(err_ptr, hist_ptr, counts_ptr, ref_ptr, idx_ptr, valid_ptr, n, width, chunk, k,
                        PREVENT: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """Row j of image b is its j-th selected cell in row-major order: keys
    above the k-th largest, and the first (k - above) keys equal to it."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kth, ties_needed = _radix_state(hist_ptr + b * 4 * 256, k, 4)
    # Keys above and ties in the chunks before this one.
    before = tl.arange(0, GROUPS)
    counts_b = counts_ptr + b * tl.num_programs(0) * 2
    above = tl.sum(tl.load(counts_b + before * 2, mask=before < g, other=0), axis=0)
    tied = tl.sum(tl.load(counts_b + before * 2 + 1, mask=before < g, other=0), axis=0)
    row = err_ptr + b * n
    begin = g.to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, n)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < end
        v = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        key = _order_key(v)
        gt = ((key > kth) & m).to(tl.int64)
        eq = ((key == kth) & m).to(tl.int64)
        above_before = above + tl.cumsum(gt, axis=0) - gt
        tie_rank = tied + tl.cumsum(eq, axis=0) - eq
        take = (gt != 0) | ((eq != 0) & (tie_rank < ties_needed))
        # Selected cells before: all keys above, the first ties_needed ties.
        pos = above_before + tl.minimum(tie_rank, ties_needed)
        if PREVENT:
            ok = v > 0.0
        else:
            ok = offs >= 0
        out = b * k + pos
        offs64 = offs.to(tl.int64)
        tl.store(idx_ptr + out * 3, b + offs64 * 0, mask=take)
        tl.store(idx_ptr + out * 3 + 1, offs64 // width, mask=take)
        tl.store(idx_ptr + out * 3 + 2, offs64 % width, mask=take)
        tl.store(valid_ptr + out, ok.to(tl.int1), mask=take)
        # NB: via float32: the interpreter turns bool straight into bfloat16
        # bit patterns.
        tl.store(ref_ptr + b * n + offs, (take & ok).to(tl.float32).to(ref_ptr.dtype.element_ty), mask=m)
        above += tl.sum(gt, axis=0)
        tied += tl.sum(eq, axis=0)


def select_sampling(err: torch.Tensor, k: int, prevent_oversampling: bool):
    check_dtype("select_sampling", "err", err)
    e = err.contiguous()
    B, _, H, W = e.shape
    N = H * W
    k = min(k, N)
    ref = torch.zeros_like(e)
    idx = torch.empty((B * k, 3), dtype=torch.int64, device=e.device)
    valid = torch.empty((B * k,), dtype=torch.bool, device=e.device)
    if B * k == 0:
        return ref, idx, valid
    block = block_size(1024, 8192)
    # Chunks of 16 blocks (HD: 8 programs an image, 4K: 32), at most 1024
    # chunks an image.
    chunk = max(16 * block, triton.cdiv(triton.cdiv(N, 1024), block) * block)
    groups = triton.cdiv(N, chunk)
    hist = torch.zeros((B, 4, _BINS), dtype=torch.int64, device=e.device)
    counts = torch.empty((B, groups, 2), dtype=torch.int64, device=e.device)
    grid = (groups, B)
    for d in range(4):
        wrap(_radix_histogram_kernel)[grid](e, hist, N, chunk, k, PASS=d, BLOCK=block)
    wrap(_radix_count_kernel)[grid](e, hist, counts, N, chunk, k, BLOCK=block)
    wrap(_radix_write_kernel)[grid](e, hist, counts, ref, idx, valid, N, W, chunk, k,
                                    PREVENT=bool(prevent_oversampling), BLOCK=block,
                                    GROUPS=triton.next_power_of_2(groups))
    return ref, idx, valid


@triton.jit
def _threshold_count_kernel(err_ptr, ref_ptr, counts_ptr, total, threshold, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    sel = (tl.load(err_ptr + offs, mask=m, other=0.0).to(tl.float32) > threshold) & m
    tl.store(ref_ptr + offs, sel.to(tl.float32), mask=m)
    tl.store(counts_ptr + tile, tl.sum(sel.to(tl.int32), axis=0))


@triton.jit
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
    thr = float(torch.tensor(threshold, dtype=e.dtype))
    if total == 0:
        return ref, torch.empty((0, 3), dtype=torch.int64, device=e.device)
    block = block_size(1024, 8192)
    tiles = triton.cdiv(total, block)
    counts = torch.empty((tiles,), dtype=torch.int32, device=e.device)
    wrap(_threshold_count_kernel)[(tiles,)](e, ref, counts, total, thr, BLOCK=block)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    # NB: the one host synchronisation: the number of selected cells.
    count = int(ends[-1])
    idx = torch.empty((count, 3), dtype=torch.int64, device=e.device)
    if count > 0:
        wrap(_threshold_write_kernel)[(tiles,)](ref, ends, idx, total, H * W, W, BLOCK=block)
    return ref, idx
