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
(see common.timeit), in --rounds round-robin rounds (default 3 on the CPU,
where a shared machine's speed drifts within a minute: see
common.timeit_rounds), with its minor page faults per call (CPU: fresh
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

Ours with the backend 'auto' picks also runs with reuse_output=True (the
full-resolution output kept across calls: no fresh pages, hence no page
faults, per call).

Then where those two spend their time: Refiner.forward itself with a
stopwatch around each step's calls (see breakdown), the remainder itemised
as "other", so that the steps add up to the whole forward timed in the same
pass; beside it, the forward without the stopwatch timed in alternation
with those passes (what the stopwatch adds), and the forward as the table
above timed it alone, earlier (that adds the machine's drift). Prints the
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
from common import (ERR_KINDS, SETTINGS, Contention, Printer, device_info, header, is_cuda, make_inputs,
                    parse_common, random_bn_, results_folder, selected_neighbours, sync,
                    timeit, timeit_rounds, try_capture, write_results)

STEPS = ("select", "crop", "convolutions", "fused", "compose", "other")
STEP_LABELS = {
    "select": "select (select_sampling)",
    "crop": "crop (half-res crop + full-res crop_into)",
    "convolutions": "convolutions (4 convs + relu)",
    "fused": "fused patch kernel (Triton)",
    "compose": "compose (compose or compose_into)",
    "other": "other (err resize, cats, upsample copy, allocations, checks, Python)",
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
        if backend == resolve("auto", torch.device(device), dtype):
            # The output kept across calls (no fresh full-resolution pages).
            kept = pymatting_ext.Refiner("sampling", setting["sample_pixels"], 0.1, 3, False, backend=backend,
                                         reuse_output=True).eval()
            kept.load_state_dict(up.state_dict())
            providers[f"ours ({backend}, reuse_output)"] = kept
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
    """Where one forward pass of our refiner goes: Refiner.forward itself,
    run with a stopwatch around each call it makes to the steps below (on
    CUDA the stopwatch synchronises the device before and after each), and
    around the whole call; "other" is the whole minus the steps, so that
    the steps add up to the whole forward exactly:

      select        _select_sampling / _select_thresholding
      crop          _crop (half resolution) and _crop_into (full resolution,
                    into conv3's input), per chunk of patches
      convolutions  _stage1 (conv1, conv2) and _stage2 (conv3, conv4)
      fused         the fused Triton patch kernel, where it runs
      compose       _compose or, with reuse_output, compose_into
      other         the rest: the err resize, cat(pha, fgr), conv3's input
                    allocated and the nearest upsample copied into it, the
                    chunks' cat, argument checks, Python

    Page faults (minor, CPU) are counted per step the same way.

    NB: each instrumented pass follows a pass without the stopwatch, timed
    alone: the two alternate call by call, so that they see the same state
    of the machine (on a shared virtual machine its speed drifts by 10-30%
    over a minute, more than the stopwatch costs), and the medians of the
    two compare what the stopwatch itself adds. Returns ({step: median ms},
    median total ms, {step: median faults}, P, median ms of the passes
    without the stopwatch)."""
    import resource

    from pymatting_ext import refiner as module

    src, bgr, pha, fgr, err, hid = x
    H, W = src.shape[2:]
    P = x[0].shape[0] * min(refiner.sample_pixels // 16, (H // 4) * (W // 4))
    ms = dict.fromkeys(STEPS, 0.0)
    faults = dict.fromkeys(STEPS, 0)

    def faults_now():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def timed(fn, step):
        def call(*args, **kwargs):
            sync(device)
            f0, t0 = faults_now(), time.perf_counter()
            result = fn(*args, **kwargs)
            sync(device)
            ms[step] += (time.perf_counter() - t0) * 1e3
            faults[step] += faults_now() - f0
            return result
        return call

    # (module, name): step. The Refiner calls the ops as ops.run_* and the
    # fused kernel as refiner.refine_sparse, looked up at each call.
    patched = {(ops, "run_select_sampling"): "select", (ops, "run_select_thresholding"): "select",
               (ops, "run_crop"): "crop", (ops, "run_crop_into"): "crop", (module, "refine_sparse"): "fused",
               (ops, "run_compose"): "compose", (ops, "run_compose_into"): "compose"}
    saved = {key: getattr(*key) for key in patched}

    def stopwatch(on):
        for (where, name), step in patched.items():
            setattr(where, name, timed(saved[where, name], step) if on else saved[where, name])
        if on:
            refiner._stage1 = timed(type(refiner)._stage1.__get__(refiner), "convolutions")
            refiner._stage2 = timed(type(refiner)._stage2.__get__(refiner), "convolutions")
        else:
            refiner.__dict__.pop("_stage1", None)
            refiner.__dict__.pop("_stage2", None)

    runs, plain = [], []
    try:
        with torch.no_grad():
            for i in range(warmup + repeat):
                stopwatch(False)
                sync(device)
                t0 = time.perf_counter()
                refiner(*x)
                sync(device)
                alone = (time.perf_counter() - t0) * 1e3
                stopwatch(True)
                for step in STEPS:
                    ms[step], faults[step] = 0.0, 0
                sync(device)
                f0, t0 = faults_now(), time.perf_counter()
                refiner(*x)
                sync(device)
                whole, whole_faults = (time.perf_counter() - t0) * 1e3, faults_now() - f0
                ms["other"] = whole - sum(ms[s] for s in STEPS if s != "other")
                faults["other"] = whole_faults - sum(faults[s] for s in STEPS if s != "other")
                if i >= warmup:
                    runs.append((dict(ms), whole, dict(faults)))
                    plain.append(alone)
    finally:
        stopwatch(False)
    median = {s: statistics.median(r[0][s] for r in runs) for s in STEPS}
    total = statistics.median(r[1] for r in runs)
    fault_median = {s: statistics.median(r[2][s] for r in runs) for s in STEPS}
    return median, total, fault_median, P, statistics.median(plain)


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
    rounds = args.rounds or (1 if cuda else 3)
    t0 = time.monotonic()
    info = device_info(device)
    info["rounds"] = rounds
    out = Printer()
    timed = rounds * -(-repeat // rounds)
    out(header(info, dtype_name, timed, warmup) +
        (f" in each of {rounds} round-robin rounds (see common.timeit_rounds)" if rounds > 1 else ""))
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
                timings = timeit_rounds({label: (lambda model=model: model(*x)) for label, model in providers.items()},
                                        device, warmup=warmup, repeat=repeat, rounds=rounds)
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
            entry = {"selected_cells": selected, "selected_neighbours": nbrs, "timings": timings, "breakdown": {}}
            # Ours as 'auto' picks it, and with the output kept across calls.
            for label in (auto, f"{auto[:-1]}, reuse_output)"):
                if label not in providers:
                    continue
                ours = providers[label]
                parts, total, faults, P, paired = breakdown(ours, x, device, warmup, repeat)
                gflops = conv_flops_per_patch(ours) * P / 1e9
                for step in STEPS:
                    if step == "fused" and parts[step] == 0:
                        continue
                    rate = (f"{gflops / parts[step] * 1e3:.1f} GFLOP/s" if step == "convolutions" and parts[step]
                            else "")
                    brows.append([name, kind, label, STEP_LABELS[step], f"{parts[step]:.2f}",
                                  f"{100 * parts[step] / total:.0f}%", f"{faults[step]:.0f}", rate])
                conv = parts["convolutions"]
                brows.append([name, kind, label, "convolutions | everything else", f"{conv:.2f} | {total - conv:.2f}",
                              f"{100 * conv / total:.0f}% | {100 * (total - conv) / total:.0f}%", "", ""])
                brows.append([name, kind, label, "sum of the steps = the whole forward, timed here", f"{total:.2f}",
                              "100%", f"{sum(faults.values()):.0f}", ""])
                brows.append([name, kind, label, "(the whole forward without the stopwatch, in alternation)",
                              f"{paired:.2f}", f"{100 * (paired - total) / total:+.0f}%", "", ""])
                table = timings[label]["median_ms"]
                brows.append([name, kind, label, "(the whole forward in the table above, timed alone)",
                              f"{table:.2f}", f"{100 * (table - total) / total:+.0f}%", "", ""])
                results[name]["setting"]["patches"] = P
                entry["breakdown"][label] = {"ms": parts, "total_ms": total, "page_faults": faults,
                                             "forward_alone_ms": table, "forward_paired_ms": paired,
                                             "conv_gflop": gflops,
                                             "conv_gflops_per_s": gflops / conv * 1e3 if conv else None}
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
    out.table(f"Where ours spends its time: Refiner.forward with a stopwatch around each step's calls (median of "
              f"{repeat} passes; 'other' = the whole forward minus the steps). The last rows of each block: the "
              f"forward without the stopwatch, timed in alternation with those passes (what the stopwatch adds), "
              f"and the forward as the table above timed it, earlier (that adds the machine's drift between the "
              f"two)",
              ["setting", "err", "provider", "step", "ms", "share", "page faults", "rate"], brows)
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
    parser.add_argument("--rounds", type=int, default=None,
                        help="round-robin blocks the providers' timed calls are spread over (default 3 on the "
                             "CPU, where a shared machine's speed drifts, 1 on CUDA; see common.timeit_rounds)")
    args, device, dtypes, repeat, warmup = parse_common(parser, cpu_repeat=7, cuda_repeat=20)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    err = args.err or "both"
    err_kinds = list(ERR_KINDS) if err == "both" else [err]
    for dtype_name in dtypes:
        run(args, device, dtype_name, err_kinds, repeat, warmup)
    verdict.summarize(results_folder(device_info(device), args.out))


if __name__ == "__main__":
    main()
