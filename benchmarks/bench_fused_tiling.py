"""The fused patch kernel's tiling: BLOCK_P (patches a program) x num_warps,
timed on one GPU run, so that the run picks the launcher's defaults.

    python bench_fused_tiling.py [--dtype float32 float16 ...] [--settings HD 4K]
                                 [--kernel-size 3 1] [--err random|boundary]
                                 [--time-limit S] [--repeat N] [--quick] [--out DIR]

Eval sampling as the Refiner runs it (prevent_oversampling True, random
BatchNorm statistics folded in): the cells are selected once per setting,
then kernels/triton/fused.refine_sparse (the fused kernel and the coarse
pass) is timed for each tiling with CUDA events (common.timeit), fp32 in
PyTorch's TF32 setting (recorded). Per tiling it records the compiled
kernel's registers, spills and shared memory (Triton's own metadata, from
the GPU's driver), the first call's time (compilation), and the largest
difference from the default tiling's output (each row's arithmetic is the
same whatever the tiling; the tensor cores' instruction shapes may differ
with it).

Why: each program reloads the weights of all four convolutions (61 KB in
float32, 31 KB in float16; the compiled code stages them through shared
memory tap by tap), so BLOCK_P patches a program divide that traffic by
BLOCK_P, at the cost of registers and shared memory (fewer programs
resident on an SM to hide the gathers' latency). Which wins can only be
timed: `python tests/build_checks/test_triton_compile.py --fused` prints the registers
and shared memory of the defaults.

Writes <out>/fused_tiling_<dtype>.json (and .txt) after every tiling, so a
run stopped at its limit keeps what it finished; "best" holds, per setting
and kernel size, the fastest tiling beside the default. --time-limit (default
100 s, shared equally by the dtypes) stops before a tiling that would not
finish within it, judged by the slowest one so far (a tiling's first call
compiles it: a few seconds).

Needs CUDA. On a CPU only --quick runs: a smoke pass through Triton's
interpreter on a small frame with a few tilings (the timings mean nothing
there; the run checks that the script and every tiling work).
"""
import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    # Chosen before the kernels are defined (first use): the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pymatting_ext  # noqa: E402
from pymatting_ext import _backend  # noqa: E402

from common import (SETTINGS, Printer, device_info, header, make_inputs, parse_common, random_bn_,  # noqa: E402
                    timeit, write_results)

#: (BLOCK_P, num_warps) per kernel size: the default first, then the ones
#: that share the weights among more patches without spilling (2 and 4
#: patches on 16 warps: 128 registers or fewer compiled for sm_90), then the
#: rest, those that spill last (BLOCK_P 4 on 4 warps): a run cut short has
#: answered whether the weights' traffic matters.
TILINGS = {
    3: [(1, 8), (2, 16), (4, 16), (1, 16), (2, 8), (1, 4), (4, 8), (2, 4), (4, 4)],
    1: [(4, 8), (2, 8), (8, 8), (4, 16), (8, 16), (2, 4), (4, 4), (2, 16), (8, 4)],
}

#: The CPU's smoke pass: a small frame and a few tilings.
QUICK_CPU = dict(H=64, W=96, scale=0.25, sample_pixels=16 * 6)
QUICK_CPU_TILINGS = {3: [(1, 8), (2, 4)], 1: [(2, 8), (4, 4)]}


def fused_kernels():
    from pymatting_ext.triton_kernels import fused
    return fused


def compiled_resources(kernel, before):
    """{n_regs, n_spills, shared} of the variant of `kernel` compiled since
    `before` (a set of cache keys), or {} (interpreter, or nothing new)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        return {}
    for cache in (entry[0] for entry in caches.values()):
        for key, compiled in cache.items():
            if key in before:
                continue
            try:  # Triton's own attributes, loaded with the kernel
                compiled._init_handles()
                return {"n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                        "shared": compiled.metadata.shared}
            except (AttributeError, RuntimeError) as exc:  # another Triton: the timing still stands
                return {"resources_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {}


def cache_keys(kernel):
    caches = getattr(kernel, "device_caches", None) or {}
    return {key for entry in caches.values() for key in entry[0]}


def run_dtype(args, device, dtype_name, repeat, warmup, deadline):
    dtype = getattr(torch, dtype_name)
    cuda = device.type == "cuda"
    fused = fused_kernels()
    info = device_info(device)
    out = Printer()
    out(header(info, dtype_name, repeat, warmup))
    if not cuda:
        out("Triton's interpreter: a smoke pass, the times say nothing of a GPU")
    rows, best = [], {}
    payload = {"info": info, "dtype": dtype_name, "err": args.err, "rows": rows, "best": best,
               "allow_tf32": torch.backends.cudnn.allow_tf32, "interpreter": not cuda, "stopped": None}
    settings = {"quick-cpu": QUICK_CPU} if not cuda else {s: SETTINGS[s] for s in args.settings}
    slowest = 0.0
    # A tiling compiles once per kernel size (the sizes are not specialised):
    # its resources, kept for the next settings.
    known = {}
    for setting_name, setting in settings.items():
        x = make_inputs(setting, device, dtype, err=args.err)
        src, bgr, pha, fgr, err, hid = x
        H, W = src.shape[2:]
        err_q = torch.nn.functional.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
        k = min(setting["sample_pixels"] // 16, (H // 4) * (W // 4))
        _, idx, valid = pymatting_ext.select_sampling(err_q, k, True)
        for ks in args.kernel_size:
            model = random_bn_(pymatting_ext.Refiner("sampling", setting["sample_pixels"], 0.1, ks, True,
                                                     backend="reference")).eval().to(device, dtype)
            with torch.no_grad():
                weights = [w.contiguous() for w in model._folded()]

            def call(bp, nw):
                return fused.refine_sparse(src, bgr, pha, fgr, hid, idx, valid, weights, ks,
                                           torch.backends.cudnn.allow_tf32, False, block_p=bp, num_warps=nw)

            tilings = QUICK_CPU_TILINGS[ks] if not cuda else TILINGS[ks]
            precision = "tf32" if (dtype != torch.float32 or torch.backends.cudnn.allow_tf32) else "ieee"
            default = fused.launch_config(ks, gpu=cuda, precision=precision) if cuda else tilings[0]
            if default not in tilings:
                tilings = [default] + tilings
            reference_out = None
            key = f"{setting_name} k{ks}"
            for bp, nw in tilings:
                if time.monotonic() + slowest > deadline:
                    payload["stopped"] = f"time limit before {key} BLOCK_P={bp} num_warps={nw}"
                    out(f"stopped: {payload['stopped']}")
                    return payload, out
                t0 = time.monotonic()
                before = cache_keys(fused._refine_kernel)
                try:
                    with torch.no_grad():
                        first = call(bp, nw)
                        if cuda:
                            torch.cuda.synchronize(device)
                except Exception as exc:  # a tiling Triton cannot compile is a finding, not the end
                    rows.append({"setting": setting_name, "kernel_size": ks, "block_p": bp, "num_warps": nw,
                                 "error": f"{type(exc).__name__}: {exc}"[:500]})
                    out(f"{key} BLOCK_P={bp} num_warps={nw}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                first_s = time.monotonic() - t0
                resources = compiled_resources(fused._refine_kernel, before) or known.get((ks, bp, nw), {})
                known[(ks, bp, nw)] = resources
                if reference_out is None:
                    reference_out = first
                diff = float((first.float() - reference_out.float()).abs().max())
                with torch.no_grad():
                    timing = timeit(lambda: call(bp, nw), device, warmup=warmup, repeat=repeat)
                row = {"setting": setting_name, "kernel_size": ks, "block_p": bp, "num_warps": nw,
                       "default": (bp, nw) == tuple(default), "cells": int(idx.shape[0]),
                       "first_call_s": round(first_s, 3), "max_abs_diff_vs_default": diff,
                       **resources, **timing}
                rows.append(row)
                slowest = max(slowest, time.monotonic() - t0)
                regs = f", {resources['n_regs']} registers, {resources['n_spills']} spilled, " \
                       f"{resources['shared']} B shared" if "n_regs" in resources else ""
                out(f"{key} BLOCK_P={bp} num_warps={nw}: {timing['median_ms']:.4f} ms "
                    f"(IQR {timing['iqr_ms']:.4f}){regs}, first call {first_s:.1f} s, "
                    f"max |diff| vs default {diff:.2e}")
                timed = [r for r in rows if r.get("setting") == setting_name and r.get("kernel_size") == ks
                         and "median_ms" in r]
                fastest = min(timed, key=lambda r: r["median_ms"])
                base = next((r for r in timed if r["default"]), None)
                best[key] = {"block_p": fastest["block_p"], "num_warps": fastest["num_warps"],
                             "median_ms": fastest["median_ms"],
                             "default_median_ms": base["median_ms"] if base else None,
                             "speedup_vs_default": base["median_ms"] / fastest["median_ms"] if base else None}
                write_results(f"fused_tiling_{dtype_name}", payload, "\n".join(out.lines), args.out)
    for key, b in best.items():
        out(f"best {key}: BLOCK_P={b['block_p']} num_warps={b['num_warps']} {b['median_ms']:.4f} ms"
            + (f" ({b['speedup_vs_default']:.2f}x the default)" if b["speedup_vs_default"] else ""))
    return payload, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-size", type=int, nargs="+", default=[3, 1], choices=[3, 1])
    parser.add_argument("--err", choices=["random", "boundary"], default="boundary",
                        help="error map (default boundary: the selected cells form a strip, as trained models' do)")
    parser.add_argument("--time-limit", type=float, default=100.0, metavar="S",
                        help="seconds for the whole run (default 100): no tiling is started that would end past it")
    args, device, dtypes, repeat, warmup = parse_common(parser, cpu_repeat=1, cuda_repeat=20)
    if device.type != "cuda" and not args.quick:
        parser.error("the tiling sweep needs CUDA (Triton's interpreter times nothing of the GPU); on a CPU "
                     "only --quick runs, a smoke pass through the interpreter")
    try:
        _backend.resolve("triton", device)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"the fused kernel cannot run here: {exc}")
    end = time.monotonic() + args.time_limit
    for i, dtype_name in enumerate(dtypes):
        # Each dtype an equal share of the time left.
        deadline = time.monotonic() + (end - time.monotonic()) / (len(dtypes) - i)
        payload, out = run_dtype(args, device, dtype_name, repeat, warmup, deadline)
        path = write_results(f"fused_tiling_{dtype_name}", payload, "\n".join(out.lines), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
