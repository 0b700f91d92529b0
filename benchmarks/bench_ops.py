"""Each op against upstream's way of doing the same step, on the same inputs.

    python bench_ops.py [--device cpu|cuda] [--dtype float32|float16] [--repeat N] [--quick]

Steps (HD and 4K settings of bench_refiner.py, k = sample_pixels // 16):
  select   ours: select_sampling(err_q, k, True)
           upstream: topk + zeros_like + scatter_ + mul_(gt 0) + nonzero, on the same err_q
  crop/2   ours: crop of [hid,pha,fgr,src,bgr] at half resolution (stride 2, padding 3)
           upstream: interpolate(cat(hid,pha,fgr)), interpolate(cat(src,bgr)), pad, unfold, index, cat
  crop/1   ours: crop of [src,bgr] at full resolution (stride 4, padding 2)
           upstream: cat, pad, unfold, index
  compose  ours: compose(cat(pha,fgr), patches, idx)   upstream: interpolate + scatter_nd-style replace
  replace  ours: replace(x, patches, idx) (returns a new tensor)
           upstream: view/permute/index-assign into the preexisting full-res x (in place)
  replace+clone  the same, upstream's way on x.clone() (the same semantics as ours)

Bytes moved (a floor for any implementation, in the benchmark dtype):
  bytes = bytes of ours' output + bytes of the distinct input elements it
          must read (each counted once, however many patches overlap it).
  crop/2   output P x 42 x 8 x 8; inputs: the coarse pixels of hid, pha, fgr
           (36 channels) and the full-res pixels of src, bgr (6 channels)
           that the bilinear resize to H/2 x W/2 uses for the union of the
           8x8 windows (clipped to the image; found once, exactly, as the
           non-zero adjoint of the resize applied to the window mask)
  crop/1   output P x 6 x 8 x 8; inputs: the src, bgr pixels in the union of
           the 8x8 windows
  compose  output B x 4 x H x W; inputs: the whole coarse map (B x 4 x Hc x Wc)
           and the patches
  replace  output B x 4 x H x W (ours returns a new tensor); inputs: all of x
           and the patches
Achieved GB/s = bytes / ours' median time, printed beside the device's copy
bandwidth (a 512 MiB tensor .copy_'d, read + write bytes over the time).
Upstream's in-place replace (the row "replace") writes only the patch cells,
so it has less to move than ours; "replace+clone" gives it ours' semantics.
"""
import argparse

import torch
import torch.nn.functional as F

import pymatting_ext as pm

from common import SETTINGS, device_info, make_inputs, print_table, timeit, write_json


def upstream_select(err_q, k):
    b, _, h, w = err_q.shape
    e = err_q.view(b, -1)
    top = e.topk(k, dim=1, sorted=False).indices
    ref = torch.zeros_like(e).scatter_(1, top, 1.0)
    ref.mul_(e.gt(0).float())
    return torch.nonzero(ref.view(b, h, w))


def upstream_crop(image, idx, size, padding):
    if padding:
        image = F.pad(image, (padding,) * 4)
    win = size + 2 * padding
    windows = image.permute(0, 2, 3, 1).unfold(1, win, size).unfold(2, win, size)
    return windows[idx[:, 0], idx[:, 1], idx[:, 2]]


def upstream_replace_(x, patches, idx):
    B, C, H, W = x.shape
    s = patches.shape[-1]
    x.view(B, C, H // s, s, W // s, s).permute(0, 2, 4, 1, 3, 5)[idx[:, 0], idx[:, 1], idx[:, 2]] = patches
    return x


def window_mask(idx, batch, size, stride, padding, device):
    """(B, 1, h, w) float mask of the union of the patch windows at resolution
    size = (h, w): cell (y, x) dilated by padding, clipped to the image."""
    h, w = size
    cells = torch.zeros(batch, 1, -(-h // stride), -(-w // stride), device=device)
    cells[idx[:, 0], 0, idx[:, 1], idx[:, 2]] = 1.0
    m = F.interpolate(cells, scale_factor=stride, mode="nearest")[:, :, :h, :w]
    if padding:
        m = F.max_pool2d(m, 2 * padding + 1, stride=1, padding=padding)
    return m


def pixels_read(in_size, mask):
    """How many pixels (per channel) of an input of in_size the bilinear
    resize (align_corners=False) to mask's size reads for mask's pixels."""
    if tuple(in_size) == tuple(mask.shape[2:]):
        return int(mask.count_nonzero())
    with torch.enable_grad():
        x = torch.ones(mask.shape[0], 1, *in_size, device=mask.device, requires_grad=True)
        (F.interpolate(x, mask.shape[2:], mode="bilinear", align_corners=False) * mask).sum().backward()
    return int(x.grad.count_nonzero())


def copy_bandwidth(device, dtype):
    # 512 MiB, well beyond any cache.
    a = torch.empty(512 * 2 ** 20 // (torch.finfo(dtype).bits // 8), device=device, dtype=dtype)
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), device, warmup=2, repeat=9)["median_ms"]
    return 2 * a.numel() * a.element_size() / t / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    args = parser.parse_args()
    if args.dtype != "float32" and torch.device(args.device).type != "cuda":
        parser.error(f"--dtype {args.dtype} is for CUDA only")
    repeat = 3 if args.quick else args.repeat
    warmup = 1 if args.quick else 2
    dtype = getattr(torch, args.dtype)
    dev = args.device
    info = device_info(dev)
    copy_gbs = copy_bandwidth(dev, dtype)
    print(f"device: {info['device_name']} ({dev}, {info['threads']} threads), torch {info['torch']}, "
          f"{args.dtype}, median of {repeat}; copy bandwidth {copy_gbs:.1f} GB/s")

    rows, results = [], {}
    esize = torch.finfo(dtype).bits // 8
    with torch.no_grad():
        for name, s in SETTINGS.items():
            src, bgr, pha, fgr, err, hid = make_inputs(s, dev, dtype)
            H, W = s["H"], s["W"]
            k = s["sample_pixels"] // 16
            err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
            _, idx, valid = pm.select_sampling(err_q, k, False)
            P = idx.shape[0]
            patches = torch.randn(P, 4, 4, 4, device=dev, dtype=dtype)
            coarse = torch.cat([pha, fgr], 1)
            full = torch.rand(1, 4, H, W, device=dev, dtype=dtype)

            def up_crop_half():
                a = F.interpolate(torch.cat([hid, pha, fgr], 1), (H // 2, W // 2), mode="bilinear",
                                  align_corners=False)
                b = F.interpolate(torch.cat([src, bgr], 1), (H // 2, W // 2), mode="bilinear", align_corners=False)
                return torch.cat([upstream_crop(a, idx, 2, 3), upstream_crop(b, idx, 2, 3)], 1)

            def up_compose():
                out = F.interpolate(coarse, (H, W), mode="bilinear", align_corners=False)
                return upstream_replace_(out, patches, idx)

            B, Hc, Wc = src.shape[0], pha.shape[2], pha.shape[3]
            half_mask = window_mask(idx, B, (H // 2, W // 2), 2, 3, dev)
            half_in = 36 * pixels_read((Hc, Wc), half_mask) + 6 * pixels_read((H, W), half_mask)
            full_in = 6 * pixels_read((H, W), window_mask(idx, B, (H, W), 4, 2, dev))
            del half_mask
            steps = [
                ("select", lambda: pm.select_sampling(err_q, k, True), lambda: upstream_select(err_q, k), None),
                ("crop/2", lambda: pm.crop([hid, pha, fgr, src, bgr], idx, 2, 3, (H // 2, W // 2)), up_crop_half,
                 (P * 42 * 8 * 8 + half_in) * esize),
                ("crop/1", lambda: pm.crop([src, bgr], idx, 4, 2, (H, W)),
                 lambda: upstream_crop(torch.cat([src, bgr], 1), idx, 4, 2), (P * 6 * 8 * 8 + full_in) * esize),
                ("compose", lambda: pm.compose(coarse, patches, idx, None, (H, W)), up_compose,
                 (full.numel() + coarse.numel() + patches.numel()) * esize),
                ("replace", lambda: pm.replace(full, patches, idx), lambda: upstream_replace_(full, patches, idx),
                 (2 * full.numel() + patches.numel()) * esize),
                ("replace+clone", lambda: pm.replace(full, patches, idx),
                 lambda: upstream_replace_(full.clone(), patches, idx), (2 * full.numel() + patches.numel()) * esize),
            ]
            for step, ours, theirs, nbytes in steps:
                t_ours = timeit(ours, dev, warmup=warmup, repeat=repeat)
                t_up = timeit(theirs, dev, warmup=warmup, repeat=repeat)
                gbs = nbytes / t_ours["median_ms"] / 1e6 if nbytes else None
                rows.append([name, step, f"{t_up['median_ms']:.2f}", f"{t_ours['median_ms']:.2f}",
                             f"{t_up['median_ms'] / t_ours['median_ms']:.2f}x",
                             "" if gbs is None else f"{gbs:.1f}",
                             "" if gbs is None else f"{100 * gbs / copy_gbs:.0f}%"])
                results.setdefault(name, {"patches": P})[step] = {
                    "upstream": t_up, "ours": t_ours, "speedup": t_up["median_ms"] / t_ours["median_ms"],
                    "bytes": nbytes, "ours_GBps": gbs}
    print_table(f"Ops vs upstream's way (ms; copy bandwidth {copy_gbs:.1f} GB/s)",
                ["setting", "op", "upstream", "ours", "speed-up", "ours GB/s", "of copy"], rows)
    settings = {"dtype": args.dtype, "repeat": repeat, "warmup": warmup, "settings": SETTINGS,
                "bytes": "ours' output bytes + distinct input elements read (see bench_ops.py's docstring)"}
    path = write_json(f"ops_{args.dtype}", {"info": info, "dtype": args.dtype, "settings": settings,
                                            "copy_GBps": copy_gbs, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
