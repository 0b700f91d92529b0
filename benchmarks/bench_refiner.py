"""Upstream's Refiner against ours, side by side in one process.

    python bench_refiner.py [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--repeat N] [--quick]

Eval mode, torch.no_grad(), mode='sampling', kernel_size=3,
prevent_oversampling=False (upstream's speed-test setting), batch 1, random
inputs, at HD (1080 x 1920, backbone_scale 0.25, sample_pixels 80,000) and 4K
(2160 x 3840, 0.125, 320,000); the coarse maps are 270 x 480 in both. Our
refiners load upstream's state_dict (its BatchNorm layers hold random running
statistics, so that folding them is exercised).

Providers: upstream; ours with each compiled backend that runs on the
device (the C++ kernels on the CPU; the CUDA and the Triton kernels on a
GPU), the one 'auto' picks first; ours with backend='reference' (the
pure-PyTorch ops). Each is timed in its steady state, one after the other
(see common.timeit), with its minor page faults per call (CPU: fresh
full-resolution tensors beyond malloc's mmap threshold come as new pages at
every call).

Then where ours (with the backend 'auto' picks) spends its time: one forward
pass re-enacted step by step with a stopwatch between the steps (see
breakdown), so that the steps add up to the whole refiner. Prints both
tables and writes
results/<device>/refiner_<dtype>.{json,txt}.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from BackgroundMattingV2.model.refiner import Refiner as UpstreamRefiner

import pymatting_ext
from pymatting_ext import ops
from pymatting_ext._backend import compiled_backends, resolve

from common import (SETTINGS, Contention, Laps, Printer, device_info, header, make_inputs,
                    minor_faults, parse_common, random_bn_, timeit, write_results)

STEPS = ("select", "crop", "convolutions", "compose")
STEP_LABELS = {
    "select": "select (err resize + select_sampling)",
    "crop": "crop (half-res + full-res)",
    "convolutions": "convolutions (4 convs, relu, upsample, cat)",
    "compose": "compose (cat(pha, fgr) + compose)",
}


def build(setting, device, dtype):
    """The providers, eval mode, the same weights."""
    up = random_bn_(UpstreamRefiner("sampling", setting["sample_pixels"], 0.1, 3, False)).eval()
    providers = {"upstream": up}
    for backend in compiled_backends(device, dtype) + ["reference"]:
        ours = pymatting_ext.Refiner("sampling", setting["sample_pixels"], 0.1, 3, False, backend=backend).eval()
        ours.load_state_dict(up.state_dict())
        providers[f"ours ({backend})"] = ours
    return {label: m.to(device=device, dtype=dtype) for label, m in providers.items()}


def conv_flops_per_patch(refiner):
    """Multiply-adds x 2 of the four convolutions for one patch (kernel 3:
    8x8 -> 6x6 -> 4x4, upsample to 8x8, 8x8 -> 6x6 -> 4x4)."""
    k = refiner.kernel_size
    side = 4 + 2 * (k - 1)  # input side of conv1 and of conv3
    flops = 0
    for first, second in ((refiner.conv1, refiner.conv2), (refiner.conv3, refiner.conv4)):
        s = side
        for conv in (first, second):
            s -= k - 1
            flops += 2 * conv.in_channels * conv.out_channels * k * k * s * s
    return flops


def breakdown(refiner, x, device, warmup, repeat):
    """Median ms of each step of our refiner's forward pass, re-enacted here
    as Refiner.forward runs it (eval mode, BatchNorm folded by
    Refiner._folded, on the CPU crop and convolutions in chunks
    of Refiner.cpu_chunk_patches), with a stopwatch lap after each step
    (on CUDA the lap synchronises the device):

      select        bilinear resize of err to H/4 x W/4 + select_sampling
      crop          crop of [hid, pha, fgr, src, bgr] at half resolution
                    (stride 2, padding 3) + crop of [src, bgr] at full
                    resolution (stride 4, padding 2)
      convolutions  conv1 + relu, conv2 + relu, nearest upsample to 8x8,
                    cat with the full-res crop, conv3 + relu, conv4, on the
                    crop outputs as crop returns them (channels-last);
                    and the cat of the chunks' results
      compose       cat(pha, fgr) and compose: the full-res output

    Timed in place, each chunk's crop output is still in cache when its
    convolutions read it, as in forward; timing each step alone over all
    patches would not be. Returns ({step: summary}, total summary, P)."""
    src, bgr, pha, fgr, err, hid = x
    H, W = src.shape[2:]
    backend = resolve(refiner.backend, src.device, src.dtype)
    k = min(refiner.sample_pixels // 16, (H // 4) * (W // 4))
    w1, b1, w2, b2, w3, b3, w4, b4 = refiner._folded()
    chunk = refiner._chunk_size(backend, True)

    def convolutions(half, full):
        y = F.conv2d(half, w1, b1).relu_()
        y = F.conv2d(y, w2, b2).relu_()
        y = torch.cat([F.interpolate(y, 8, mode="nearest"), full], 1)
        y = F.conv2d(y, w3, b3).relu_()
        return F.conv2d(y, w4, b4)

    def one_pass():
        ms = dict.fromkeys(STEPS, 0.0)
        laps = Laps(device)
        err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
        _, idx, valid = ops.run_select_sampling(backend, err_q, k, bool(refiner.prevent_oversampling))
        ms["select"] += laps.lap()
        P = idx.shape[0]
        pieces = [idx] if chunk is None or P <= chunk else [idx[i:i + chunk] for i in range(0, P, chunk)]
        outs = []
        for rows in pieces:
            half = ops.run_crop(backend, [hid, pha, fgr, src, bgr], rows, 2, 3, (H // 2, W // 2))
            full = ops.run_crop(backend, [src, bgr], rows, 4, 2, (H, W))
            ms["crop"] += laps.lap()
            outs.append(convolutions(half, full))
            ms["convolutions"] += laps.lap()
        patches = outs[0] if len(outs) == 1 else torch.cat(outs)
        ms["convolutions"] += laps.lap()
        ops.run_compose(backend, torch.cat([pha, fgr], 1), patches, idx, valid, (H, W))
        ms["compose"] += laps.lap()
        return ms, P

    with torch.no_grad():
        for _ in range(warmup):
            one_pass()
        runs = []
        for _ in range(repeat):
            ms, P = one_pass()
            runs.append(ms)
    median = {s: statistics.median(r[s] for r in runs) for s in STEPS}
    total = statistics.median(sum(r.values()) for r in runs)
    return median, total, P


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, device, dtype, repeat, warmup = parse_common(parser, cpu_repeat=7, cuda_repeat=20)
    info = device_info(device)
    out = Printer()
    out(header(info, args.dtype, repeat, warmup))
    contention = Contention()

    results, rows, brows = {}, [], []
    for name, setting in SETTINGS.items():
        providers = build(setting, device, dtype)
        x = make_inputs(setting, device, dtype)
        with torch.no_grad():
            outputs = {label: model(*x) for label, model in providers.items()}
            timings = {}
            for label, model in providers.items():
                before = minor_faults()
                timings[label] = timeit(lambda: model(*x), device, warmup=warmup, repeat=repeat)
                timings[label]["page_faults_per_call"] = (None if before is None
                                                          else (minor_faults() - before) / (warmup + repeat))
        base = timings["upstream"]["median_ms"]
        for label in providers:
            t = timings[label]
            # pha and fgr; upstream's in the same dtype is the yardstick.
            t["max_abs_diff_vs_upstream"] = max(float((a.double() - b.double()).abs().max())
                                                for a, b in zip(outputs["upstream"][:2], outputs[label][:2]))
            t["speedup_vs_upstream"] = base / t["median_ms"]
            faults = t["page_faults_per_call"]
            rows.append([name, label, f"{t['median_ms']:.1f}", f"{t['iqr_ms']:.1f}",
                         f"{t['speedup_vs_upstream']:.2f}x", f"{t['max_abs_diff_vs_upstream']:.1e}",
                         "" if faults is None else f"{faults:.0f}"])
        del outputs

        auto = f"ours ({resolve('auto', device, dtype)})"
        ours = providers[auto]
        parts, total, P = breakdown(ours, x, device, warmup, repeat)
        gflops = conv_flops_per_patch(ours) * P / 1e9
        for step in STEPS:
            rate = f"{gflops / parts[step] * 1e3:.1f} GFLOP/s" if step == "convolutions" else ""
            brows.append([name, STEP_LABELS[step], f"{parts[step]:.1f}", f"{100 * parts[step] / total:.0f}%", rate])
        conv = parts["convolutions"]
        brows.append([name, "convolutions | everything else", f"{conv:.1f} | {total - conv:.1f}",
                      f"{100 * conv / total:.0f}% | {100 * (total - conv) / total:.0f}%", ""])
        brows.append([name, "sum of the steps", f"{total:.1f}", "100%", ""])
        brows.append([name, "(whole refiner, forward, table above)", f"{timings[auto]['median_ms']:.1f}",
                      "", ""])
        results[name] = {"setting": {**setting, "patches": P}, "timings": timings,
                         "breakdown_ms": parts, "breakdown_total_ms": total,
                         "conv_gflop": gflops, "conv_gflops_per_s": gflops / conv * 1e3}
        del providers, x

    out.table("Refiner (eval, no_grad, sampling, prevent_oversampling=False, kernel 3, batch 1)",
              ["setting", "provider", "median ms", "IQR ms", "speed-up", "max |diff|", "page faults"], rows)
    out.table(f"Where ours spends its time (backend {resolve('auto', device, dtype)}, as 'auto' picks, "
              f"median of {repeat} passes)",
              ["setting", "step", "ms", "share", "rate"], brows)
    line, info["other_processes_cpu_share"] = contention.report()
    if line:
        out(line)
    settings = {"mode": "sampling", "kernel_size": 3, "prevent_oversampling": False, "batch": 1,
                "dtype": args.dtype, "repeat": repeat, "warmup": warmup, "settings": SETTINGS,
                "cpu_chunk_patches": pymatting_ext.Refiner.cpu_chunk_patches}
    path = write_results(f"refiner_{args.dtype}", {"info": info, "settings": settings, "results": results},
                         out.text())
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
