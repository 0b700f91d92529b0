"""Upstream's Refiner against ours, side by side in one process.

    python bench_refiner.py [--device cpu|cuda] [--dtype float32|float16|bfloat16 ...]
                            [--err random|boundary|both] [--settings HD 4K] [--repeat N] [--quick]
                            [--out DIR]

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

On CUDA, each of our compiled backends' Refiner is also captured once per
setting in a CUDA graph (static inputs; warm-up on a side stream, see
common.capture_graph) and graph.replay() is timed the same way; before
timing, the replayed outputs are compared with an eager call on the same
inputs. Upstream's Refiner cannot be captured (its nonzero synchronises
with the host): its eager time is the baseline of the graph speed-up. fp32
timings keep PyTorch's TF32 defaults (cuDNN convolutions in TF32), which
are recorded.

Error maps (--err): 'random' is uniform err; 'boundary' is err concentrated
in a band along the edge of a smooth random blob, small noise elsewhere
(common.boundary_err), as trained models produce: the selected cells form a
strip, not a scatter. Default: both. The other inputs are the same for
both. On the CPU 'ours (cpu)' computes neighbouring selected cells together
where that saves work (Refiner.merge_cells, the default there) and 'ours
(cpu, per-cell)' every cell alone: the boundary rows show what merging
saves, the random rows that it costs nothing where cells are scattered.

Then where ours (with the backend 'auto' picks, cell by cell) spends its
time: one forward pass re-enacted step by step with a stopwatch between the steps (see
breakdown), so that the steps add up to the whole refiner. Prints the
tables and writes <out>/refiner_<dtype>.{json,txt} (--out, default
results/<device>/), and a verdict over the folder (verdict.py).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from BackgroundMattingV2.model.refiner import Refiner as UpstreamRefiner

import pymatting_ext
from pymatting_ext import ops
from pymatting_ext._backend import compiled_backends, resolve

import verdict
from common import (ERR_KINDS, SETTINGS, Contention, Laps, Printer, device_info, header, is_cuda, make_inputs,
                    minor_faults, parse_common, random_bn_, results_folder, selected_neighbours, timeit,
                    try_capture, write_results)

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
        if backend == "cpu":
            # Every cell alone: what merge_cells (on by default here) saves.
            cells = pymatting_ext.Refiner("sampling", setting["sample_pixels"], 0.1, 3, False, backend=backend,
                                          merge_cells=False).eval()
            cells.load_state_dict(up.state_dict())
            providers["ours (cpu, per-cell)"] = cells
        if backend == "triton" and torch.device(device).type == "cuda":
            # On a GPU 'triton' runs the fused patch kernel; the op set too.
            unfused = pymatting_ext.Refiner("sampling", setting["sample_pixels"], 0.1, 3, False, backend=backend,
                                            fused=False).eval()
            unfused.load_state_dict(up.state_dict())
            providers["ours (triton, unfused)"] = unfused
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


def compare_outputs(captured, eager, dtype):
    """('equal' | 'close' | 'differs', max |diff| of pha and fgr) of a graph
    replay's outputs against an eager call's on the same inputs. The same
    kernels run in both, so 'equal' (bit for bit, ref too) is expected;
    'close' allows 1e-3 (float32) or 1e-2 (half) of the outputs' magnitude
    and an identical ref."""
    diff = max(float((c.double() - e.double()).abs().max()) for c, e in zip(captured[:2], eager[:2]))
    ref_equal = torch.equal(captured[2], eager[2])
    if ref_equal and diff == 0 and all(torch.equal(c, e) for c, e in zip(captured[:2], eager[:2])):
        return "equal", diff
    scale = max(1.0, max(float(e.double().abs().max()) for e in eager[:2]))
    tol = (1e-3 if dtype == torch.float32 else 1e-2) * scale
    return ("close" if ref_equal and diff <= tol else "differs"), diff


def graph_timings(providers, graphs, x, outputs, base, device, dtype, warmup, repeat):
    """{label: replay timing} for our compiled backends on CUDA: each
    Refiner captured once per setting (in graphs, reused for every err
    kind), its static inputs overwritten with x, replayed, compared with the
    eager outputs on x, then graph.replay() timed. A capture that fails is
    recorded as {"error": why}."""
    result = {}
    for label, model in providers.items():
        if label == "upstream" or label == "ours (reference)":
            continue
        if label not in graphs:
            static = [t.clone() for t in x]
            with torch.no_grad():
                graph, captured, why = try_capture(lambda: model(*static), device)
            graphs[label] = (graph, static, captured, why)
        graph, static, captured, why = graphs[label]
        if graph is None:
            result[label] = {"error": why}
            continue
        for s, t in zip(static, x):
            s.copy_(t)
        graph.replay()
        torch.cuda.synchronize(device)
        check, diff = compare_outputs(captured, outputs[label], dtype)
        t = timeit(graph.replay, device, warmup=warmup, repeat=repeat)
        t["speedup_vs_upstream_eager"] = base / t["median_ms"]
        t["replay_vs_eager"] = check
        t["max_abs_diff_vs_eager"] = diff
        result[label] = t
    return result


def run(args, device, dtype_name, err_kinds, repeat, warmup):
    """One dtype: the tables, the result files; returns the JSON's path."""
    dtype = getattr(torch, dtype_name)
    cuda = is_cuda(device)
    t0 = time.monotonic()
    info = device_info(device)
    out = Printer()
    out(header(info, dtype_name, repeat, warmup))
    contention = Contention()

    results, rows, brows, erows = {}, [], [], []
    for name in args.settings:
        setting = SETTINGS[name]
        providers = build(setting, device, dtype)
        graphs = {}
        results[name] = {"setting": dict(setting), "err": {}}
        for kind in err_kinds:
            x = make_inputs(setting, device, dtype, err=kind)
            with torch.no_grad():
                outputs = {label: model(*x) for label, model in providers.items()}
                timings = {}
                for label, model in providers.items():
                    before = minor_faults()
                    timings[label] = timeit(lambda: model(*x), device, warmup=warmup, repeat=repeat)
                    timings[label]["page_faults_per_call"] = (None if before is None
                                                              else (minor_faults() - before) / (warmup + repeat))
            base = timings["upstream"]["median_ms"]
            graph = graph_timings(providers, graphs, x, outputs, base, device, dtype, warmup, repeat) if cuda else None
            ref = outputs["upstream"][2]
            selected, nbrs = int((ref > 0).sum()), selected_neighbours(ref)
            erows.append([name, kind, f"{selected}", f"{100 * selected / ref[:, 0].numel():.1f}%", f"{nbrs:.2f} of 8"])
            for label in providers:
                t = timings[label]
                # pha and fgr; upstream's in the same dtype is the yardstick.
                t["max_abs_diff_vs_upstream"] = max(float((a.double() - b.double()).abs().max())
                                                    for a, b in zip(outputs["upstream"][:2], outputs[label][:2]))
                t["speedup_vs_upstream"] = base / t["median_ms"]
                faults = t["page_faults_per_call"]
                row = [name, kind, label, f"{t['median_ms']:.2f}", f"{t['iqr_ms']:.2f}",
                       f"{t['speedup_vs_upstream']:.2f}x"]
                if cuda:
                    g = graph.get(label)
                    if g is None:
                        row += ["", "", ""]
                    elif "error" in g:
                        row += ["capture failed", "", ""]
                    else:
                        row += [f"{g['median_ms']:.2f}", f"{g['speedup_vs_upstream_eager']:.2f}x",
                                g["replay_vs_eager"] if g["replay_vs_eager"] == "equal"
                                else f"{g['replay_vs_eager']} ({g['max_abs_diff_vs_eager']:.1e})"]
                rows.append(row + [f"{t['max_abs_diff_vs_upstream']:.1e}", "" if faults is None else f"{faults:.0f}"])
            del outputs

            auto = f"ours ({resolve('auto', device, dtype)})"
            ours = providers[auto]
            parts, total, P = breakdown(ours, x, device, warmup, repeat)
            gflops = conv_flops_per_patch(ours) * P / 1e9
            for step in STEPS:
                rate = f"{gflops / parts[step] * 1e3:.1f} GFLOP/s" if step == "convolutions" else ""
                brows.append([name, kind, STEP_LABELS[step], f"{parts[step]:.2f}",
                              f"{100 * parts[step] / total:.0f}%", rate])
            conv = parts["convolutions"]
            brows.append([name, kind, "convolutions | everything else", f"{conv:.2f} | {total - conv:.2f}",
                          f"{100 * conv / total:.0f}% | {100 * (total - conv) / total:.0f}%", ""])
            brows.append([name, kind, "sum of the steps", f"{total:.2f}", "100%", ""])
            # The steps are the per-cell path's: its forward is their yardstick.
            whole = f"{auto[:-1]}, per-cell)" if f"{auto[:-1]}, per-cell)" in timings else auto
            brows.append([name, kind, f"(whole refiner, forward, table above: {whole})",
                          f"{timings[whole]['median_ms']:.2f}", "", ""])
            results[name]["setting"]["patches"] = P
            entry = {"selected_cells": selected, "selected_neighbours": nbrs, "timings": timings,
                     "breakdown_ms": parts, "breakdown_total_ms": total,
                     "conv_gflop": gflops, "conv_gflops_per_s": gflops / conv * 1e3}
            if cuda:
                entry["graph"] = graph
            results[name]["err"][kind] = entry
            del x
        del providers, graphs
        if cuda:
            torch.cuda.empty_cache()

    out.table("Error maps: cells selected (by upstream) and how clustered they are (mean of a selected cell's 8 "
              "neighbours selected too)", ["setting", "err", "selected", "of cells", "neighbours"], erows)
    title = "Refiner (eval, no_grad, sampling, prevent_oversampling=False, kernel 3, batch 1)"
    columns = ["setting", "err", "provider", "median ms", "IQR ms", "speed-up"]
    if cuda:
        title += ("\ngraph: ours captured in a CUDA graph, graph.replay() timed; graph speed-up = upstream's eager "
                  "median / the replay's (upstream's nonzero synchronises: it cannot be captured); "
                  "replay = eager: the replay's outputs against an eager call on the same inputs")
        columns += ["graph ms", "graph speed-up", "replay = eager"]
    out.table(title, columns + ["max |diff|", "page faults"], rows)
    out.table(f"Where ours spends its time (backend {resolve('auto', device, dtype)}, as 'auto' picks, "
              f"median of {repeat} passes)",
              ["setting", "err", "step", "ms", "share", "rate"], brows)
    line, info["other_processes_cpu_share"] = contention.report()
    if line:
        out(line)
    info["elapsed_s"] = round(time.monotonic() - t0, 1)
    settings = {"mode": "sampling", "kernel_size": 3, "prevent_oversampling": False, "batch": 1,
                "dtype": dtype_name, "repeat": repeat, "warmup": warmup,
                "settings": {name: SETTINGS[name] for name in args.settings}, "err": list(err_kinds),
                "tf32": info["tf32"], "cpu_chunk_patches": pymatting_ext.Refiner.cpu_chunk_patches}
    if cuda:
        settings["graph"] = ("each compiled backend's Refiner captured once per setting (warm-up on a side "
                             "stream), static inputs overwritten per err kind; graph.replay() timed with CUDA "
                             "events; speedup_vs_upstream_eager = upstream's eager median / replay median")
    path = write_results(f"refiner_{dtype_name}", {"info": info, "settings": settings, "results": results},
                         out.text(), args.out)
    print(f"\nwrote {path} ({info['elapsed_s']:.0f} s)")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--err", choices=list(ERR_KINDS) + ["both"], default=None,
                        help="error map: uniform random, concentrated along a matte boundary, or both "
                             "(default: both)")
    args, device, dtypes, repeat, warmup = parse_common(parser, cpu_repeat=7, cuda_repeat=20)
    err = args.err or "both"
    err_kinds = list(ERR_KINDS) if err == "both" else [err]
    for dtype_name in dtypes:
        run(args, device, dtype_name, err_kinds, repeat, warmup)
    verdict.summarize(results_folder(device_info(device), args.out))


if __name__ == "__main__":
    main()
