"""Each op against upstream's way of doing the same step, on the same inputs.

    python bench_ops.py [--device cpu|cuda] [--dtype float32|float16|bfloat16 ...] [--settings HD 4K]
                        [--repeat N] [--quick] [--out DIR]

At the HD and 4K settings of bench_refiner.py (k = P = sample_pixels // 16
patches, idx from select_sampling on a random err), these providers per step,
each timed in its steady state, one after the other (see common.timeit):
  upstream   upstream's way of the step, written here with plain torch calls
  reference  our pure-PyTorch op (pymatting_ext.ops.run_*('reference', ...))
  cpu        our C++ kernels (CPU tensors)
  cuda       our CUDA kernels (GPU, when the extension has them)
  triton     our Triton kernels (GPU, when Triton is installed)
The compiled providers call the unchecked ops.run_* entry points, as the
Refiner does (the public ops add a host-side check of idx on the GPU).

Steps:
  select         ours: select_sampling(err_q, k, prevent_oversampling=True)
                 upstream: topk + zeros_like + scatter_ + mul_(gt 0) + nonzero,
                 on the same quarter-resolution err_q
  crop/2         ours: one crop of [hid, pha, fgr, src, bgr] sampled from their
                 bilinear resize to H/2 x W/2 (stride 2, padding 3, 8x8)
                 upstream: interpolate(cat(hid, pha, fgr)), interpolate(cat(src,
                 bgr)), each padded, unfolded and advanced-indexed, then cat
  crop/1         ours: crop of [src, bgr] at full resolution (stride 4, padding 2)
                 upstream: cat, pad, unfold, advanced index
  crop/2 into,   ours: the same crops written by crop_into into an output
  crop/1 into    allocated once (as the Refiner assembles conv3's input, and
                 as its chunks of patches reuse malloc's memory): the
                 kernel's own speed, without the page faults of a fresh
                 output beyond malloc's mmap threshold (crop/2's 54 MB at HD)
                 upstream: as in crop/2 and crop/1 (it has no such form)
  crop/2 into,   crop/2 into with every patch at one cell (the first whose
    one window   window lies wholly inside the image): the inputs it reads
                 then stay in cache, so this row is the kernel's own speed
                 at writing its output (its computing, its prefetches and
                 its stores) without the scattered reads of the windows
                 upstream: as in crop/2 (its work does not depend on idx).
                 CPU only (the GPU check has tight time limits)
  crop/2 into,   crop/2 into with hid, pha and fgr as a channels-last base
    channels-    network gives them: views of its one (B, 37, h, w)
    last         channels-last output (src and bgr as before)
                 upstream: as in crop/2, on the same inputs. CPU only
  compose        ours: compose(cat(pha, fgr), patches, idx, valid, (H, W))
                 upstream: interpolate(cat(pha, fgr)) to H x W, then the
                 scatter_nd replace (view/permute/index-assign)
  compose into   ours: compose_into an output allocated once (what
                 Refiner(reuse_output=True) does every call)
                 upstream: as in compose
  replace        ours: replace(x, patches, idx) (a new tensor)
                 upstream: the scatter_nd replace into x itself (in place)
  replace+clone  upstream's scatter_nd replace into x.clone(): ours' semantics

Bytes (for the GB/s columns) are the minimum any implementation of the step
must move, in the benchmark dtype: the bytes it writes (its output) plus the
distinct input elements it must read, each counted once however many patches
overlap it, plus idx (P x 3 int64):
  crop/2   output P x 42 x 8 x 8; inputs: the coarse pixels of hid, pha, fgr
           (36 channels) and the full-resolution pixels of src, bgr (6
           channels) that the bilinear resize to H/2 x W/2 reads for the
           union of the 8x8 windows (clipped to the image)
  crop/1   output P x 6 x 8 x 8; inputs: the src, bgr pixels in the union of
           the 8x8 windows (clipped to the image)
  compose  output B x 4 x H x W; inputs: the coarse pixels (4 channels) that
           the bilinear upsample reads for the pixels outside the refined
           cells, the valid patches (P x 4 x 4 x 4) and valid (P bools)
  replace  output B x 4 x H x W (ours returns a new tensor); inputs: the
           pixels of x outside the replaced cells and the patches.
           (Upstream's in-place replace need only write the patches: it
           has less to move, hence its lead in that row.)
"Which pixels a bilinear resize reads" is found exactly, once per setting, as
the non-zeros of the resize's adjoint applied to the mask of pixels wanted.
The summary adds, for the crops on the CPU, the 64-byte cache lines their
windows span, summed over the patches (a line that two patches read counts
twice), plus the output and idx: what a kernel that cuts one patch at a
time asks of the memory system when nothing stays cached between patches.
Planar (NCHW) inputs span about twice the minimum bytes: a 5-pixel row of a
coarse plane is 20 bytes of a 64-byte line, a 16-pixel row of src straddles
two lines.
"faults" = minor page faults per call (CPU; see the last table).
GB/s = bytes / median time; "of copy" compares a provider's GB/s with the
device's copy bandwidth (a 512 MiB tensor .copy_'d into another: read + write
bytes / time), timed again right after each step's providers: a shared
machine's memory bandwidth drifts.

On CUDA, every provider's call is also captured once in a CUDA graph
(common.capture_graph) and graph.replay() timed the same way ("graph"
columns: ms, speed-up = upstream's eager median / the replay's, GB/s and of
copy for the same bytes): the replay drops the host's launch overheads,
which at these sizes (tens of microseconds) are much of an eager call.
Upstream's select cannot be captured (nonzero synchronises with the host);
a capture that fails for another reason is recorded, not fatal. On the CPU
there are no graph columns.

A last table times writing a B x 4 x H x W tensor once, freshly allocated
(torch.empty_like(x).fill_(0)) and existing (fill_ of a tensor kept across
calls), with the minor page faults per call: on the CPU a fresh tensor
beyond glibc malloc's mmap threshold (at most 32 MiB) comes as new pages from
the OS at every call, and their page faults then cost compose, replace and
upstream's interpolate alike, whatever the kernel.

Prints the tables and writes <out>/ops_<dtype>.{json,txt} (--out, default
results/<device>/), and a verdict over the folder (verdict.py).
"""
import argparse
import time

import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import ops
from pymatting_ext._backend import compiled_backends

import verdict
from common import (SETTINGS, Contention, Printer, device_info, header, is_cuda, make_inputs,
                    minor_faults, parse_common, results_folder, timeit, try_capture, write_results)


# -- upstream's way of each step (plain torch, in the order upstream runs it) --

def upstream_select(err_q, k):
    """Top k per image, as a 0/1 map gated by err > 0, then its nonzero rows."""
    B, _, h, w = err_q.shape
    flat = err_q.view(B, h * w)
    top = flat.topk(k, dim=1, sorted=False).indices
    ref = torch.zeros_like(flat).scatter_(1, top, 1.0)
    ref.mul_(flat.gt(0).float())
    return torch.nonzero(ref.view(B, h, w))


def upstream_crop(image, idx, stride, padding):
    """(P, C, s, s) windows, s = stride + 2 * padding: zero-pad the image, view
    it as overlapping windows (channels last, then unfold rows and columns),
    pick the windows of idx by advanced indexing."""
    if padding:
        image = F.pad(image, (padding, padding, padding, padding))
    s = stride + 2 * padding
    windows = image.permute(0, 2, 3, 1).unfold(1, s, stride).unfold(2, s, stride)
    return windows[idx[:, 0], idx[:, 1], idx[:, 2]]


def upstream_replace_(x, patches, idx):
    """scatter_nd: view x as (B, H/s, W/s, C, s, s) cells and assign."""
    B, C, H, W = x.shape
    s = patches.shape[-1]
    cells = x.view(B, C, H // s, s, W // s, s).permute(0, 2, 4, 1, 3, 5)
    cells[idx[:, 0], idx[:, 1], idx[:, 2]] = patches
    return x


# -- byte counts ----------------------------------------------------------------

def window_mask(idx, batch, size, stride, padding, device):
    """(B, 1, h, w) 0/1 float mask of the union of the windows at resolution
    size = (h, w): cell (y, x) of the stride grid dilated by padding, clipped."""
    h, w = size
    cells = torch.zeros(batch, 1, -(-h // stride), -(-w // stride), device=device)
    cells[idx[:, 0], 0, idx[:, 1], idx[:, 2]] = 1.0
    m = F.interpolate(cells, scale_factor=stride, mode="nearest")[:, :, :h, :w]
    if padding:
        m = F.max_pool2d(m, 2 * padding + 1, stride=1, padding=padding)
    return m


def pixels_read(in_size, mask):
    """How many pixels (per channel) of an input of in_size a bilinear resize
    (align_corners=False) to mask's size reads for mask's non-zero pixels."""
    if tuple(in_size) == tuple(mask.shape[2:]):
        return int(mask.count_nonzero())
    with torch.enable_grad():
        x = torch.ones(mask.shape[0], 1, *in_size, device=mask.device, requires_grad=True)
        (F.interpolate(x, mask.shape[2:], mode="bilinear", align_corners=False) * mask).sum().backward()
    return int(x.grad.count_nonzero())


def linear_taps(n_in, n_out):
    """(i0, i1) per output index of a bilinear resize (align_corners=False)
    from n_in to n_out, as the kernels compute them (identity if equal)."""
    dst = torch.arange(n_out, dtype=torch.float64)
    if n_in == n_out:
        return dst.long(), dst.long()
    x = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = x.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1)


def lines_spanned(inputs, idx, stride, padding, size):
    """Bytes of the 64-byte lines that the crop's windows span in inputs'
    memory, summed over the patches (see the module's docstring): per input
    row a window reads, the lines from its first to its last element, per
    plane (stride along the width 1) or across a pixel's channels
    (channels-last; views of one tensor's pixels together, as the kernel
    reads them)."""
    H, W = size
    ph = pw = stride + 2 * padding
    oy, ox = idx[:, 1] * stride - padding, idx[:, 2] * stride - padding
    ylo, yhi = oy.clamp(0, H), (oy + ph).clamp(0, H)
    xlo, xhi = ox.clamp(0, W), (ox + pw).clamp(0, W)
    inside = (ylo < yhi) & (xlo < xhi)
    b, ylo, yhi, xlo, xhi = (t[inside] for t in (idx[:, 0], ylo, yhi, xlo, xhi))
    # Spans: [shape, strides, first element's address, elements per pixel].
    spans = []
    for t in inputs:
        sb, sc, sh, sw = t.stride()
        e = t.element_size()
        if sw == 1:
            spans += [[t.shape, t.stride(), t.data_ptr() + c * sc * e, 1] for c in range(t.shape[1])]
            continue
        lo, hi = t.data_ptr(), t.data_ptr() + ((t.shape[1] - 1) * sc + 1) * e
        for sp in spans:
            s_lo, s_hi = sp[2], sp[2] + sp[3] * e
            if (sp[0][2:] == t.shape[2:] and sp[1][0] == sb and sp[1][2:] == (sh, sw)
                    and max(s_hi, hi) - min(s_lo, lo) <= sw * e):
                sp[2], sp[3] = min(s_lo, lo), (max(s_hi, hi) - min(s_lo, lo)) // e
                break
        else:
            spans.append([t.shape, t.stride(), lo, (hi - lo) // e])
    total = 0
    e = inputs[0].element_size()
    for shape, (sb, _, sh, sw), lo, extent in spans:
        r0, r1 = linear_taps(shape[2], H)
        q0, q1 = linear_taps(shape[3], W)
        r_lo, r_hi, q_lo, q_hi = r0[ylo], r1[yhi - 1], q0[xlo], q1[xhi - 1]
        for r in range(int((r_hi - r_lo).max()) + 1):
            row = r_lo + r
            first = lo + (b * sb + row * sh + q_lo * sw) * e
            last = lo + (b * sb + row * sh + q_hi * sw + extent - 1) * e + e - 1
            total += int(((last // 64 - first // 64 + 1) * (row <= r_hi)).sum()) * 64
    return total


def copy_bandwidth(device, dtype):
    """A function that returns the read + write GB/s of copying a 512 MiB
    tensor (well beyond any cache) into another, timed when it is called."""
    a = torch.empty(512 * 2 ** 20 // torch.empty((), dtype=dtype).element_size(), device=device, dtype=dtype)
    b = torch.empty_like(a)

    def measure():
        t = timeit(lambda: b.copy_(a), device, warmup=2, repeat=9)["median_ms"]
        return 2 * a.numel() * a.element_size() / t / 1e6
    return measure


#: Providers of a step that cannot be captured in a CUDA graph, and why.
NOT_CAPTURABLE = {("select", "upstream"): "nonzero synchronises with the host"}


def graph_timing(fn, dev, warmup, repeat):
    """fn captured in a CUDA graph and graph.replay() timed, or {"error": why}."""
    graph, _, why = try_capture(fn, dev)
    if graph is None:
        return {"error": why}
    t = timeit(graph.replay, dev, warmup=warmup, repeat=repeat)
    del graph
    return t


def run(args, dev, dtype_name, repeat, warmup):
    """One dtype: the tables, the result files; returns the JSON's path."""
    dtype = getattr(torch, dtype_name)
    cuda = is_cuda(dev)
    t0 = time.monotonic()
    info = device_info(dev)
    out = Printer()
    out(header(info, dtype_name, repeat, warmup))
    contention = Contention()
    copy_now = copy_bandwidth(dev, dtype)
    copy_gbs = copy_now()
    out(f"copy bandwidth: {copy_gbs:.1f} GB/s at the start; each step's 'of copy' compares the copy bandwidth "
        f"timed again right after that step's providers")
    ours = compiled_backends(dev, dtype)
    providers = ["upstream", "reference"] + ours
    esize = torch.empty((), dtype=dtype).element_size()

    rows, frows, results = [], [], {}
    with torch.no_grad():
        for name in args.settings:
            s = SETTINGS[name]
            src, bgr, pha, fgr, err, hid = make_inputs(s, dev, dtype)
            B, H, W = src.shape[0], s["H"], s["W"]
            Hc, Wc = pha.shape[2:]
            k = s["sample_pixels"] // 16
            err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
            _, idx, valid = pm.select_sampling(err_q, k, False)
            P = idx.shape[0]
            patches = torch.randn(P, 4, 4, 4, device=dev, dtype=dtype)
            x = torch.rand(B, 4, H, W, device=dev, dtype=dtype)
            half, full = (H // 2, W // 2), (H, W)

            def up_crop_half(hid=hid, pha=pha, fgr=fgr):
                a = F.interpolate(torch.cat([hid, pha, fgr], 1), half, mode="bilinear", align_corners=False)
                b = F.interpolate(torch.cat([src, bgr], 1), half, mode="bilinear", align_corners=False)
                return torch.cat([upstream_crop(a, idx, 2, 3), upstream_crop(b, idx, 2, 3)], 1)

            def up_compose():
                y = F.interpolate(torch.cat([pha, fgr], 1), full, mode="bilinear", align_corners=False)
                return upstream_replace_(y, patches, idx)

            # Minimum bytes (see the module's docstring).
            idx_bytes = idx.numel() * idx.element_size()
            half_mask = window_mask(idx, B, half, 2, 3, dev)
            crop2_bytes = (P * 42 * 8 * 8 + 36 * pixels_read((Hc, Wc), half_mask)
                           + 6 * pixels_read(full, half_mask)) * esize + idx_bytes
            del half_mask
            # Every patch at one cell: crop/2 into with its inputs in cache.
            # NB: a cell whose window lies wholly inside the image, so the
            # patch is cut as an interior one is (the first cells selected
            # are often at the top edge, where part of the patch is zeros).
            # hid, pha, fgr as a channels-last base network gives them.
            # Both only on the CPU, as the steps that use them.
            idx_one = one_bytes = cl_inputs = None
            if not cuda:
                oy, ox = 2 * idx[:, 1] - 3, 2 * idx[:, 2] - 3
                inside = (oy >= 0) & (ox >= 0) & (oy + 8 <= half[0]) & (ox + 8 <= half[1])
                idx_one = idx[inside.nonzero()[0]].expand(P, 3).contiguous()
                one_mask = window_mask(idx_one, B, half, 2, 3, dev)
                one_bytes = (P * 42 * 8 * 8 + 36 * pixels_read((Hc, Wc), one_mask)
                             + 6 * pixels_read(full, one_mask)) * esize + idx_bytes
                del one_mask
                base_out = torch.cat([pha, fgr, err, hid], 1).contiguous(memory_format=torch.channels_last)
                cl_inputs = [base_out[:, 5:], base_out[:, 0:1], base_out[:, 1:4], src, bgr]
                del base_out
            crop1_bytes = (P * 6 * 8 * 8 + 6 * pixels_read(full, window_mask(idx, B, full, 4, 2, dev))) * esize \
                + idx_bytes
            outside = 1.0 - window_mask(idx, B, full, 4, 0, dev)
            compose_bytes = (x.numel() + 4 * pixels_read((Hc, Wc), outside) + patches.numel()) * esize \
                + idx_bytes + valid.numel()
            replace_bytes = (x.numel() + 4 * int(outside.count_nonzero()) + patches.numel()) * esize + idx_bytes
            del outside

            def each(fn):
                """fn(backend) for the reference and every compiled backend."""
                return {b: (lambda b=b: fn(b)) for b in ["reference"] + ours}

            cat_coarse = torch.cat([pha, fgr], 1)
            # Outputs allocated once, for the 'into' steps (written before
            # timing, so that their pages are resident).
            half_out = torch.zeros(P, 42, 8, 8, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            full_out = torch.zeros(P, 6, 8, 8, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            composed = torch.zeros_like(x)
            steps = {
                "select": (None, {"upstream": lambda: upstream_select(err_q, k),
                                  **each(lambda b: ops.run_select_sampling(b, err_q, k, True))}),
                "crop/2": (crop2_bytes, {"upstream": up_crop_half,
                                         **each(lambda b: ops.run_crop(b, [hid, pha, fgr, src, bgr], idx, 2, 3,
                                                                       half))}),
                "crop/1": (crop1_bytes, {"upstream": lambda: upstream_crop(torch.cat([src, bgr], 1), idx, 4, 2),
                                         **each(lambda b: ops.run_crop(b, [src, bgr], idx, 4, 2, full))}),
                "crop/2 into": (crop2_bytes, {"upstream": up_crop_half,
                                              **each(lambda b: ops.run_crop_into(b, [hid, pha, fgr, src, bgr], idx,
                                                                                 2, 3, half, 0, half_out))}),
                # NB: CPU only, to spare the GPU check's time limits.
                **({} if cuda else {"crop/2 into, one window": (one_bytes, {
                    "upstream": up_crop_half,
                    **each(lambda b: ops.run_crop_into(b, [hid, pha, fgr, src, bgr], idx_one, 2, 3, half, 0,
                                                       half_out))}),
                    "crop/2 into, channels-last": (crop2_bytes, {
                        "upstream": lambda: up_crop_half(*cl_inputs[:3]),
                        **each(lambda b: ops.run_crop_into(b, cl_inputs, idx, 2, 3, half, 0, half_out))})}),
                "crop/1 into": (crop1_bytes, {"upstream": lambda: upstream_crop(torch.cat([src, bgr], 1), idx, 4, 2),
                                              **each(lambda b: ops.run_crop_into(b, [src, bgr], idx, 4, 2, full, 0,
                                                                                 full_out))}),
                "compose": (compose_bytes, {"upstream": up_compose,
                                            **each(lambda b: ops.run_compose(b, cat_coarse, patches, idx, valid,
                                                                             full))}),
                "compose into": (compose_bytes, {"upstream": up_compose,
                                                 **each(lambda b: ops.run_compose_into(b, cat_coarse, patches, idx,
                                                                                       valid, None, composed))}),
                "replace": (replace_bytes, {"upstream": lambda: upstream_replace_(x, patches, idx),
                                            **each(lambda b: ops.run_replace(b, x, patches, idx, None))}),
                "replace+clone": (replace_bytes, {"upstream": lambda: upstream_replace_(x.clone(), patches, idx),
                                                  **each(lambda b: ops.run_replace(b, x, patches, idx, None))}),
            }
            results[name] = {"patches": P}
            # Lines the crops' windows span (CPU: see the module's docstring).
            # With the output and idx, as the byte counts above.
            out2, out1 = P * 42 * 8 * 8 * esize + idx_bytes, P * 6 * 8 * 8 * esize + idx_bytes
            lines = {} if cuda else {
                "crop/2 into": lines_spanned([hid, pha, fgr, src, bgr], idx, 2, 3, half) + out2,
                "crop/2 into, channels-last": lines_spanned(cl_inputs, idx, 2, 3, half) + out2,
                "crop/1 into": lines_spanned([src, bgr], idx, 4, 2, full) + out1}
            lines["crop/2"], lines["crop/1"] = lines.get("crop/2 into"), lines.get("crop/1 into")
            # The floor of every step that returns a new full-resolution
            # tensor (compose, replace, upstream's interpolate): a fresh
            # allocation written once, against writing an existing one.
            faults = minor_faults()
            fresh = timeit(lambda: torch.empty_like(x).fill_(0), dev, warmup=warmup, repeat=repeat)
            faults = None if faults is None else (minor_faults() - faults) / (warmup + repeat)
            existing = torch.empty_like(x)
            reuse = timeit(lambda: existing.fill_(0), dev, warmup=warmup, repeat=repeat)
            del existing
            results[name]["fill_output"] = {"fresh": fresh, "existing": reuse, "fresh_page_faults_per_call": faults}
            frows.append([name, f"{tuple(x.shape)}", f"{x.numel() * esize / 1e6:.1f}", f"{fresh['median_ms']:.2f}",
                          "" if faults is None else f"{faults:.0f}", f"{reuse['median_ms']:.2f}"])
            for step, (nbytes, fns) in steps.items():
                t = {}
                for p, fn in fns.items():
                    before = minor_faults()
                    t[p] = timeit(fn, dev, warmup=warmup, repeat=repeat)
                    t[p]["page_faults_per_call"] = (None if before is None
                                                    else (minor_faults() - before) / (warmup + repeat))
                up = t["upstream"]["median_ms"]
                # In place, upstream's replace has less to move: the byte count is not its.
                moves = lambda p: nbytes and not (step == "replace" and p == "upstream")
                gbs = {p: nbytes / t[p]["median_ms"] / 1e6 if moves(p) else None for p in providers} \
                    if nbytes else None
                graph = None
                if cuda:
                    graph = {}
                    for p, fn in fns.items():
                        why = NOT_CAPTURABLE.get((step, p))
                        g = {"error": why} if why else graph_timing(fn, dev, warmup, repeat)
                        if "error" not in g:
                            g["speedup_vs_upstream_eager"] = up / g["median_ms"]
                            g["GBps"] = nbytes / g["median_ms"] / 1e6 if moves(p) else None
                        graph[p] = g
                # NB: timed beside the step, not once for the run: a shared
                # machine's memory bandwidth drifts (30-47 GB/s in a day here).
                step_copy = copy_now() if nbytes else None
                fmt = lambda v: "" if v is None else f"{v:.1f}"
                for p in providers:
                    faults = t[p]["page_faults_per_call"]
                    speedup = up / t[p]["median_ms"]
                    row = [name, step, p, f"{t[p]['median_ms']:.3f}", "" if p == "upstream" else f"{speedup:.2f}x",
                           "" if faults is None else f"{faults:.0f}", f"{nbytes / 1e6:.1f}" if nbytes else ""]
                    row += (["", ""] if gbs is None or gbs[p] is None else
                            [fmt(gbs[p]), f"{100 * gbs[p] / step_copy:.0f}%"])
                    if cuda:
                        g = graph[p]
                        if "error" in g:
                            row += ["not capturable" if (step, p) in NOT_CAPTURABLE else "capture failed",
                                    "", "", ""]
                        else:
                            row += [f"{g['median_ms']:.3f}", f"{g['speedup_vs_upstream_eager']:.2f}x"]
                            row += (["", ""] if g["GBps"] is None else
                                    [fmt(g["GBps"]), f"{100 * g['GBps'] / step_copy:.0f}%"])
                    rows.append(row)
                    t[p]["speedup_vs_upstream"] = speedup
                results[name][step] = {"timings": t, "bytes": nbytes, "GBps": gbs, "copy_GBps": step_copy}
                if lines.get(step) is not None:
                    results[name][step]["lines_bytes"] = lines[step]
                if cuda:
                    results[name][step]["graph"] = graph
            del src, bgr, pha, fgr, err, hid, x, patches, steps, cat_coarse, half_out, full_out, composed, cl_inputs
            if cuda:
                torch.cuda.empty_cache()

    title = f"Ops vs upstream's way (median ms; 'auto' picks {pm._backend.resolve('auto', dev, dtype)} here)"
    columns = ["setting", "op", "provider", "median ms", "speed-up", "faults", "MB moved", "GB/s", "of copy"]
    if cuda:
        title += ("\ngraph: one call captured in a CUDA graph, graph.replay() timed; graph speed-up = upstream's "
                  "eager median / the replay's")
        columns += ["graph ms", "graph speed-up", "graph GB/s", "graph of copy"]
    out.table(title, columns, rows)
    auto = pm._backend.resolve("auto", dev, dtype)
    shares = []
    for name in args.settings:
        for step in ("crop/2", "crop/2 into", "crop/2 into, one window", "crop/2 into, channels-last", "crop/1",
                     "crop/1 into", "compose", "compose into"):
            if step not in results[name]:
                continue
            r = results[name][step]
            gbs = (r["GBps"] or {}).get(auto)
            if gbs is not None:
                faults = r["timings"][auto]["page_faults_per_call"]
                copy_step = r["copy_GBps"]
                line = (f"{name} {step}: {gbs:.1f} GB/s = {100 * gbs / copy_step:.0f}% of copy "
                        f"({copy_step:.1f} GB/s beside it)"
                        + ("" if faults is None else f", {faults:.0f} page faults / call"))
                if "lines_bytes" in r:
                    lines_gbs = r["lines_bytes"] / r["timings"][auto]["median_ms"] / 1e6
                    line += (f"\n    counting the lines the windows span: {r['lines_bytes'] / 1e6:.1f} MB "
                             f"({r['lines_bytes'] / r['bytes']:.2f}x the minimum), {lines_gbs:.1f} GB/s "
                             f"= {100 * lines_gbs / copy_step:.0f}% of copy")
                shares.append(line)
    out(f"\nOurs ({auto}) against the copy bandwidth:\n  " + "\n  ".join(shares))
    out.table("Writing a full-resolution output (median ms): torch.empty_like(x).fill_(0) vs x.fill_(0)",
              ["setting", "shape", "MB", "new tensor ms", "page faults / call", "existing tensor ms"], frows)
    line, info["other_processes_cpu_share"] = contention.report()
    if line:
        out(line)
    info["elapsed_s"] = round(time.monotonic() - t0, 1)
    settings = {"dtype": dtype_name, "repeat": repeat, "warmup": warmup,
                "settings": {name: SETTINGS[name] for name in args.settings}, "tf32": info["tf32"],
                "bytes": "minimum bytes: output + distinct input elements read + idx (see bench_ops.py's docstring)"}
    if cuda:
        settings["graph"] = ("one call of each provider captured in a CUDA graph (warm-up on a side stream); "
                             "graph.replay() timed with CUDA events; speedup_vs_upstream_eager = upstream's "
                             "eager median / replay median")
    path = write_results(f"ops_{dtype_name}", {"info": info, "settings": settings, "copy_GBps": copy_gbs,
                                               "results": results}, out.text(), args.out)
    print(f"\nwrote {path} ({info['elapsed_s']:.0f} s)")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, dev, dtypes, repeat, warmup = parse_common(parser, cpu_repeat=7, cuda_repeat=20)
    for dtype_name in dtypes:
        run(args, dev, dtype_name, repeat, warmup)
    verdict.summarize(results_folder(device_info(dev), args.out))


if __name__ == "__main__":
    main()
