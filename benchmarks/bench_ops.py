"""Each op against upstream's way of doing the same step, on the same inputs.

    python bench_ops.py [--device cpu|cuda] [--dtype float32|float16] [--repeat N] [--quick]

Steps (HD and 4K settings of bench_refiner.py, k = sample_pixels // 16):
  select   ours: select_sampling            upstream: topk + zeros + scatter + mul(gt 0) + nonzero
  crop/2   ours: crop of [hid,pha,fgr,src,bgr] at half resolution (stride 2, padding 3)
           upstream: interpolate(cat(hid,pha,fgr)), interpolate(cat(src,bgr)), pad, unfold, index, cat
  crop/1   ours: crop of [src,bgr] at full resolution (stride 4, padding 2)
           upstream: cat, pad, unfold, index
  compose  ours: compose(cat(pha,fgr), patches, idx)   upstream: interpolate + scatter_nd-style replace
  replace  ours: replace(x, patches, idx)               upstream: clone + scatter_nd-style replace
           (ours is out of place, so upstream's way is timed on a copy too)

Bytes counted (the least any implementation must move): crop, the patches
written plus the input elements the patches read (each once); compose, the
output written plus the coarse map and the patches read; replace, a copy of x
(read + write) plus the patches. Achieved GB/s is that over the median time,
beside the device's copy bandwidth (a large tensor copied, read + write).
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


def copy_bandwidth(device, dtype):
    # 512 MiB, well beyond any cache.
    a = torch.empty(512 * 2 ** 20 // (torch.finfo(dtype).bits // 8), device=device, dtype=dtype)
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), device, repeat=9)["median_ms"]
    return 2 * a.numel() * a.element_size() / t / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat
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

            half_in = P * 42 * 5 * 5 // 4 + P * 6 * 17 * 17  # coarse 5x5 and full-res 17x17 windows
            steps = [
                ("select", lambda: pm.select_sampling(err_q, k, True), lambda: upstream_select(err_q, k), None),
                ("crop/2", lambda: pm.crop([hid, pha, fgr, src, bgr], idx, 2, 3, (H // 2, W // 2)), up_crop_half,
                 (P * 42 * 64 + half_in) * esize),
                ("crop/1", lambda: pm.crop([src, bgr], idx, 4, 2, (H, W)),
                 lambda: upstream_crop(torch.cat([src, bgr], 1), idx, 4, 2), 2 * P * 6 * 64 * esize),
                ("compose", lambda: pm.compose(coarse, patches, idx, None, (H, W)), up_compose,
                 (full.numel() + coarse.numel() + patches.numel()) * esize),
                ("replace", lambda: pm.replace(full, patches, idx), lambda: upstream_replace_(full.clone(), patches, idx),
                 (2 * full.numel() + patches.numel()) * esize),
            ]
            for step, ours, theirs, nbytes in steps:
                t_ours = timeit(ours, dev, repeat)
                t_up = timeit(theirs, dev, repeat)
                gbs = nbytes / t_ours["median_ms"] / 1e6 if nbytes else None
                rows.append([name, step, f"{t_up['median_ms']:.2f}", f"{t_ours['median_ms']:.2f}",
                             f"{t_up['median_ms'] / t_ours['median_ms']:.2f}x",
                             "" if gbs is None else f"{gbs:.1f}",
                             "" if gbs is None else f"{100 * gbs / copy_gbs:.0f}%"])
                results.setdefault(name, {})[step] = {"upstream": t_up, "ours": t_ours, "bytes": nbytes,
                                                      "ours_GBps": gbs}
    print_table(f"Ops vs upstream's way (ms; copy bandwidth {copy_gbs:.1f} GB/s)",
                ["setting", "op", "upstream", "ours", "speed-up", "ours GB/s", "of copy"], rows)
    path = write_json(f"ops_{args.dtype}", dev, {"info": info, "dtype": args.dtype, "copy_GBps": copy_gbs,
                                                 "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
