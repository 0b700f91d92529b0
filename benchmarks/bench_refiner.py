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
    """Our refiner's steps, timed one by one exactly as forward runs them."""
    src, bgr, pha, fgr, err, hid = x
    H, W = src.shape[2:]
    backend = pymatting_ext._backend.resolve(refiner.backend, src.device)
    stage1, stage2 = refiner._layers(True)
    k = min(refiner.sample_pixels // 16, (H // 4) * (W // 4))

    def select():
        err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
        return ops.run_select_sampling(backend, err_q, k, False)

    _, idx, valid = select()
    chunk = refiner._chunk_size(backend, True) or idx.shape[0]
    pieces = [idx[i:i + chunk] for i in range(0, idx.shape[0], chunk)]

    def crops():
        return [(ops.run_crop(backend, [hid, pha, fgr, src, bgr], rows, 2, 3, (H // 2, W // 2)),
                 ops.run_crop(backend, [src, bgr], rows, 4, 2, (H, W))) for rows in pieces]

    cropped = crops()

    def convs():
        return torch.cat([stage2(torch.cat([F.interpolate(stage1(a), 8, mode="nearest"), b], 1))
                          for a, b in cropped])

    patches = convs()
    coarse = torch.cat([pha, fgr], 1)

    def compose():
        return ops.run_compose(backend, coarse, patches, idx, valid, (H, W))

    steps = {"select (incl. err resize)": select, "crop (both)": crops,
             "convolutions (+relu, upsample, cat)": convs, "compose": compose}
    with torch.no_grad():
        return {name: timeit(fn, device, repeat)["median_ms"] for name, fn in steps.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat
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
                timings[label] = timeit(lambda: model(*x), args.device, repeat)
                outputs[label] = model(*x)
        base = timings["upstream"]["median_ms"]
        for label, t in timings.items():
            diff = max(float((a.float() - b.float()).abs().max())
                       for a, b in zip(outputs["upstream"][:2], outputs[label][:2]))
            rows.append([name, label, f"{t['median_ms']:.1f}", f"{t['iqr_ms']:.1f}",
                         f"{base / t['median_ms']:.2f}x", f"{diff:.1e}"])
            t["speedup_vs_upstream"] = base / t["median_ms"]
            t["max_abs_diff_vs_upstream"] = diff
        parts = breakdown(providers["ours (auto)"], x, args.device, repeat)
        total = sum(parts.values())
        for part, ms in parts.items():
            brows.append([name, part, f"{ms:.1f}", f"{100 * ms / total:.0f}%"])
        conv = parts["convolutions (+relu, upsample, cat)"]
        brows.append([name, "=> convolutions vs everything else", f"{conv:.1f} / {total - conv:.1f}", ""])
        results[name] = {"setting": setting, "timings": timings, "breakdown_ms": parts}

    print_table("Refiner (eval, sampling, prevent_oversampling=False, kernel 3, batch 1)",
                ["setting", "provider", "median ms", "IQR ms", "speed-up", "max |diff|"], rows)
    print_table("Where our time goes (backend auto)", ["setting", "step", "ms", "share"], brows)
    path = write_json(f"refiner_{args.dtype}", args.device, {"info": info, "dtype": args.dtype, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
