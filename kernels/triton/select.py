"""Triton kernels of select_sampling and select_thresholding.

Sampling: one program per image finds the k-th largest order key by
bisection over the 32-bit key range (32 counting passes over the row, no
sort), then one pass in row-major order takes every key above it and the
first (k - above) keys equal to it, writing idx, valid and ref with running
prefix counts. Thresholding: per-tile compare and count, a scan of the tile
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


@triton.jit
def _count_at_least(err_row, n, threshold, BLOCK: tl.constexpr):
    count = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        key = _order_key(tl.load(err_row + offs, mask=m, other=0.0).to(tl.float32))
        count += tl.sum(((key.to(tl.int64) >= threshold) & m).to(tl.int32), axis=0)
    return count


@triton.jit
def _select_sampling_kernel(err_ptr, ref_ptr, idx_ptr, valid_ptr, n, width, k,
                            PREVENT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    err_row = err_ptr + b * n
    # The k-th largest key: the largest t with count(key >= t) >= k.
    lo = -2147483648
    hi = 2147483647
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        if _count_at_least(err_row, n, mid, BLOCK) >= k:
            lo = mid
        else:
            hi = mid - 1
    kth = lo
    ties = k - _count_at_least(err_row, n, kth + 1, BLOCK)
    taken = 0
    tied = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(err_row + offs, mask=m, other=0.0).to(tl.float32)
        key = _order_key(v).to(tl.int64)
        eq = ((key == kth) & m).to(tl.int32)
        tie_rank = tied + tl.cumsum(eq, axis=0) - eq
        take = ((key > kth) & m) | ((eq != 0) & (tie_rank < ties))
        take_i = take.to(tl.int32)
        pos = taken + tl.cumsum(take_i, axis=0) - take_i
        if PREVENT:
            ok = v > 0.0
        else:
            ok = offs >= 0
        out = (b * k + pos).to(tl.int64)
        offs64 = offs.to(tl.int64)
        tl.store(idx_ptr + out * 3, b + offs64 * 0, mask=take)
        tl.store(idx_ptr + out * 3 + 1, offs64 // width, mask=take)
        tl.store(idx_ptr + out * 3 + 2, offs64 % width, mask=take)
        tl.store(valid_ptr + out, ok.to(tl.int1), mask=take)
        # NB: via float32: the interpreter turns bool straight into bfloat16
        # bit patterns.
        tl.store(ref_ptr + b * n + offs, (take & ok).to(tl.float32).to(ref_ptr.dtype.element_ty), mask=m)
        taken += tl.sum(take_i, axis=0)
        tied += tl.sum(eq, axis=0)


def select_sampling(err: torch.Tensor, k: int, prevent_oversampling: bool):
    check_dtype("select_sampling", "err", err)
    e = err.contiguous()
    B, _, H, W = e.shape
    k = min(k, H * W)
    ref = torch.zeros_like(e)
    idx = torch.empty((B * k, 3), dtype=torch.int64, device=e.device)
    valid = torch.empty((B * k,), dtype=torch.bool, device=e.device)
    if B * k > 0:
        wrap(_select_sampling_kernel)[(B,)](e, ref, idx, valid, H * W, W, k,
                                            PREVENT=bool(prevent_oversampling), BLOCK=block_size(1024, 8192))
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
