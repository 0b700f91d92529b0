"""Peak memory of one eval forward of the refiner, ours beside upstream's.

    python bench_memory.py [--device cpu|cuda] [--dtype float32|float16] [--out DIR] [--settings HD 4K]

Cases: HD and 4K (the settings of bench_refiner.py), 'thresholding' with
threshold 0.0 (every cell refined: 129,600 patches at HD, 518,400 at 4K) and
'sampling' (upstream's speed-test setting), for upstream and for ours with
each backend that runs on the device ('reference' included).

Each case runs in a fresh child process, so that one case's allocations do
not hide another's. Measured there, around one forward under
torch.inference_mode():
  CPU   peak resident memory (getrusage's ru_maxrss) minus the resident
        memory just before the forward (the interpreter, torch, the model and
        the inputs), minus the outputs' bytes: the transient memory the
        forward needed beyond its inputs and outputs;
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
        minus memory_allocated() before the forward and the outputs' bytes.
Ours processes the patches of one call in chunks (Refiner.max_patches; by
default as many as fit in min(1 GiB, a quarter of the free memory); 1536
on the C++ CPU kernels); upstream materialises every patch at once.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import SETTINGS, Printer, device_info, make_inputs, random_bn_, write_results  # noqa: E402

MODES = {"thresholding 0.0": ("thresholding", 0.0), "sampling": ("sampling", 0.1)}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(provider, setting, mode, device, dtype):
    """One forward; prints a JSON line with the measurements."""
    import pymatting_ext
    from BackgroundMattingV2.model.refiner import Refiner as Upstream

    s = SETTINGS[setting]
    kind, threshold = MODES[mode]
    dtype = getattr(torch, dtype)
    up = random_bn_(Upstream(kind, s["sample_pixels"], threshold, 3, False)).eval()
    if provider == "upstream":
        model = up
    else:
        model = pymatting_ext.Refiner(kind, s["sample_pixels"], threshold, 3, False, backend=provider).eval()
        model.load_state_dict(up.state_dict())
    model = model.to(device=device, dtype=dtype)
    x = make_inputs(s, device, dtype)
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss_bytes()
        t0 = time.perf_counter()
        out = model(*x)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        # pha and fgr may be views of one tensor: count each storage once.
        out_bytes = sum(o.untyped_storage().nbytes() for o in
                        {o.untyped_storage().data_ptr(): o for o in out}.values())
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    in_bytes = sum(t.numel() * t.element_size() for t in x)
    print(json.dumps({"peak_beyond_inputs_outputs_bytes": peak - before - out_bytes, "peak_bytes": peak,
                      "before_bytes": before, "inputs_bytes": in_bytes, "outputs_bytes": out_bytes,
                      "patches": int(out[2].sum()) if kind != "full" else None, "seconds": seconds}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default=None, help="folder for the JSON and text (default results/<device>/)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--providers", nargs="+", default=None, help="default: upstream and every backend here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from pymatting_ext._backend import compiled_backends

    providers = args.providers or ["upstream"] + compiled_backends(device, getattr(torch, args.dtype)) + ["reference"]
    info = device_info(device)
    out = Printer()
    out(f"device: {info['device_name']} ({device}), torch {info['torch']}, {args.dtype}; one eval forward per "
        f"case, each in a fresh process")
    rows, results = [], {}
    for setting in args.settings:
        for mode in MODES:
            for provider in providers:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", provider, setting, mode, str(device),
                       args.dtype]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() \
                        else None
                    r = json.loads(line) if line else {"error": (proc.stderr or proc.stdout).strip()[-300:]}
                except subprocess.TimeoutExpired:
                    r = {"error": f"timed out after {args.timeout} s"}
                results.setdefault(setting, {}).setdefault(mode, {})[provider] = r
                if "error" in r:
                    rows.append([setting, mode, provider, "failed", "", "", r["error"].splitlines()[-1][:60]])
                    continue
                mib = lambda b: f"{b / 2 ** 20:.0f}"
                rows.append([setting, mode, provider, mib(r["peak_beyond_inputs_outputs_bytes"]),
                             mib(r["inputs_bytes"]), mib(r["outputs_bytes"]), f"{r['seconds']:.2f}"])
                print(" ".join(rows[-1]), flush=True)
    out.table("Peak memory of one eval forward beyond its inputs and outputs (MiB; "
              + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS") + ")",
              ["setting", "mode", "provider", "peak beyond in/out MiB", "inputs MiB", "outputs MiB", "first call s"],
              rows)
    payload = {"info": info, "settings": {"dtype": args.dtype, "modes": {k: list(v) for k, v in MODES.items()},
                                          "settings": {k: SETTINGS[k] for k in args.settings}},
               "results": results}
    path = write_results(f"memory_{args.dtype}", payload, out.text(), out=args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
