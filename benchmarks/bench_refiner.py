"""Upstream's Refiner against ours, side by side in one process.

    python bench_refiner.py [--device cpu|cuda] [--dtype float32|float16] [--repeat N] [--quick]

Eval mode, no_grad, mode='sampling', kernel_size=3, prevent_oversampling=False
(upstream's speed-test setting), batch 1, at HD (1920x1080, backbone_scale
0.25, 80,000 pixels) and 4K (3840x2160, 0.125, 320,000). Prints medians and
the speed-up, then where our time goes (select / crop / convolutions /
compose), and writes JSON under results/.
"""
import argparse

import torch
import torch.nn.functional as F
from BackgroundMattingV2.model.refiner import Refiner as UpstreamRefiner

import pymatting_ext
from pymatting_ext import ops

from common import SETTINGS, device_info, make_inputs, print_table, random_bn_, timeit, write_json


def build(setting, device, dtype):
    up = random_bn_(UpstreamRefiner("sampling", setting["sample_pixels"], 0.1, 3, False)).eval()
    providers = {"upstream": up}
    for backend in ("auto", "reference"):
        ours = pymatting_ext.Refiner("sampling", setting["sample_pixels"], 0.1, 3, False, backend=backend).eval()
        ours.load_state_dict(up.state_dict())
        providers[f"ours ({backend})"] = ours
    return {k: m.to(device=device, dtype=dtype) for k, m in providers.items()}


def breakdown(refiner, x, device, repeat):
    """Our refiner's steps (backend as the refiner resolves it, BatchNorm
    folded), each timed on its own, run exactly as forward runs them (on the
    CPU, crop and convolutions go in chunks of Refiner.cpu_chunk_patches):

      select        bilinear resize of err to H/4 x W/4 + select_sampling
      crop          crop of [hid, pha, fgr, src, bgr] at half resolution
                    (stride 2, padding 3) + crop of [src, bgr] at full
                    resolution (stride 4, padding 2)
      convolutions  conv1 + relu, conv2 + relu, nearest upsample to 8x8,
                    cat with the full-res crop, conv3 + relu, conv4, on the
                    crop outputs as crop returns them (channels-last)
      compose       upsample of cat(pha, fgr) with the patches written in
    """
    src, bgr, pha, fgr, err, hid = x
    H, W = src.shape[2:]
    backend = pymatting_ext._backend.resolve(refiner.backend, src.device)
    k = min(refiner.sample_pixels // 16, (H // 4) * (W // 4))
    with torch.no_grad():
        stage1, stage2 = refiner._layers(True)  # conv weights folded with BN (_fold)

        def select():
            err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
            return ops.run_select_sampling(backend, err_q, k, refiner.prevent_oversampling)

        _, idx, valid = select()
        chunk = refiner._chunk_size(backend, True) or max(idx.shape[0], 1)
        pieces = [idx[i:i + chunk] for i in range(0, idx.shape[0], chunk)]

        def crops():
            return [(ops.run_crop(backend, [hid, pha, fgr, src, bgr], rows, 2, 3, (H // 2, W // 2)),
                     ops.run_crop(backend, [src, bgr], rows, 4, 2, (H, W))) for rows in pieces]

        cropped = crops()

        def convs():
            return torch.cat([stage2(torch.cat([F.interpolate(stage1(half), 8, mode="nearest"), full], 1))
                              for half, full in cropped])

        patches = convs()
        coarse = torch.cat([pha, fgr], 1)

        def compose():
            return ops.run_compose(backend, coarse, patches, idx, valid, (H, W))

        steps = {"err resize + select": select, "crop (half-res + full-res)": crops,
                 "convolutions (+relu, upsample, cat)": convs, "compose": compose}
        parts = {name: timeit(fn, device, repeat=repeat)["median_ms"] for name, fn in steps.items()}
    return parts, int(idx.shape[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement "
                        "(default 7 on CUDA, 5 on the CPU)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    args = parser.parse_args()
    if args.dtype != "float32" and torch.device(args.device).type != "cuda":
        parser.error(f"--dtype {args.dtype} is for CUDA only")
    repeat = 3 if args.quick else args.repeat or (7 if torch.device(args.device).type == "cuda" else 5)
    warmup = 1 if args.quick else 2
    dtype = getattr(torch, args.dtype)
    info = device_info(args.device)
    print(f"device: {info['device_name']} ({args.device}, {info['threads']} threads), torch {info['torch']}, "
          f"{args.dtype}, median of {repeat}")

    results = {}
    rows, brows = [], []
    for name, setting in SETTINGS.items():
        providers = build(setting, args.device, dtype)
        x = make_inputs(setting, args.device, dtype)
        timings, outputs = {}, {}
        with torch.no_grad():
            for label, model in providers.items():
                timings[label] = timeit(lambda: model(*x), args.device, warmup=warmup, repeat=repeat)
                outputs[label] = model(*x)
        base = timings["upstream"]["median_ms"]
        for label, t in timings.items():
            diff = max(float((a.float() - b.float()).abs().max())
                       for a, b in zip(outputs["upstream"][:2], outputs[label][:2]))
            rows.append([name, label, f"{t['median_ms']:.1f}", f"{t['iqr_ms']:.1f}",
                         f"{base / t['median_ms']:.2f}x", f"{diff:.1e}"])
            t["speedup_vs_upstream"] = base / t["median_ms"]
            t["max_abs_diff_vs_upstream"] = diff
        parts, P = breakdown(providers["ours (auto)"], x, args.device, repeat)
        total = sum(parts.values())
        for part, ms in parts.items():
            brows.append([name, part, f"{ms:.1f}", f"{100 * ms / total:.0f}%"])
        conv = parts["convolutions (+relu, upsample, cat)"]
        brows.append([name, "convolutions vs everything else", f"{conv:.1f} vs {total - conv:.1f}",
                      f"{100 * conv / total:.0f}% vs {100 * (total - conv) / total:.0f}%"])
        brows.append([name, "sum of the steps", f"{total:.1f}", ""])
        brows.append([name, "(whole refiner, forward)", f"{timings['ours (auto)']['median_ms']:.1f}", ""])
        results[name] = {"setting": {**setting, "patches": P}, "timings": timings, "breakdown_ms": parts}
        del providers, x

    print_table("Refiner (eval, sampling, prevent_oversampling=False, kernel 3, batch 1)",
                ["setting", "provider", "median ms", "IQR ms", "speed-up", "max |diff|"], rows)
    print_table("Where our time goes (backend auto)", ["setting", "step", "ms", "share"], brows)
    settings = {"mode": "sampling", "kernel_size": 3, "prevent_oversampling": False, "batch": 1,
                "dtype": args.dtype, "repeat": repeat, "warmup": warmup, "settings": SETTINGS}
    path = write_json(f"refiner_{args.dtype}", {"info": info, "dtype": args.dtype, "settings": settings,
                                                 "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
