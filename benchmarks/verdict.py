"""The GPU targets of the first GPU run (issue 9), judged from the result
files of one folder.

    python verdict.py [DIR]

DIR holds the JSON that bench_refiner.py and bench_ops.py wrote there
(refiner_<dtype>.json, ops_<dtype>.json; default: this machine's
results/<device>/ folder, as the scripts choose it without --out). Prints
one line per target, setting, dtype and backend, and writes verdict.json
and verdict.txt into DIR. The bench scripts call summarize() at their end.

Targets, each against upstream measured in the same process, on CUDA, for
our compiled backends ('cuda', 'triton'), at HD and 4K, float32 and float16:
  select             ours (select_sampling) >= 10x upstream's selection steps
                     (topk + scatter + mul + nonzero), eager (upstream's
                     cannot be captured in a graph; our replay is shown)
  crop/2, crop/1,    >= 50% of the measured copy bandwidth for the bytes they
  compose, replace   must move; judged twice: eager and CUDA-graph replay
  refiner eager      our Refiner >= 2x upstream's, eager, per error map
  refiner graph      our Refiner replayed as a CUDA graph >= 3x upstream's
                     eager time, per error map; the replay's outputs must
                     equal an eager call's on the same inputs

Status: PASS / FAIL with the measured numbers; NOT MEASURED where the
folder has no number for it (a missing file, backend, setting, dtype or err
kind, or a result file older than these columns). Nothing is claimed from
CPU results: CPU rows are printed as CPU (not a target), with their numbers.
"""
import glob
import json
import os
import sys

#: (name, kind, threshold); kind says where the number comes from.
TARGETS = (
    ("select", "speedup", 10.0),
    ("crop/2", "bandwidth", 0.5),
    ("crop/1", "bandwidth", 0.5),
    ("compose", "bandwidth", 0.5),
    ("replace", "bandwidth", 0.5),
    ("refiner eager", "refiner", 2.0),
    ("refiner graph", "refiner", 3.0),
)
GPU_BACKENDS = ("cuda", "triton")
GPU_DTYPES = ("float32", "float16")
SETTINGS = ("HD", "4K")
ERR_KINDS = ("random", "boundary")
MODES = ("eager", "graph")

PASS, FAIL, MISSING, CPU = "PASS", "FAIL", "NOT MEASURED", "(CPU: not judged)"


def _load(folder):
    """{(kind, device type, dtype): payload} of the folder's result files."""
    found = {}
    for kind in ("refiner", "ops"):
        for path in sorted(glob.glob(os.path.join(folder, f"{kind}_*.json"))):
            try:
                with open(path) as f:
                    payload = json.load(f)
                device = payload["info"]["device"].split(":")[0]
                dtype = payload["settings"]["dtype"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                print(f"verdict: skipping {path}: {exc!r}", file=sys.stderr)
                continue
            payload["_path"] = path
            found[(kind, device, dtype)] = payload
    return found


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _refiner_runs(result):
    """{err kind: entry} of one setting; result files from before --err hold
    one random-err run under "timings"."""
    if isinstance(result.get("err"), dict):
        return result["err"]
    if "timings" in result:
        return {"random": {"timings": result["timings"]}}
    return {}


def _row(target, setting, dtype, backend, variant, device, status, value, threshold, text):
    head = " ".join(x for x in (target, setting, dtype, backend, variant) if x)
    return {"target": target, "setting": setting, "dtype": dtype, "backend": backend, "variant": variant,
            "device": device, "status": status, "value": value, "threshold": threshold,
            "line": f"{head}: {text} {status}" if text else f"{head}: {status}"}


def _judge(value, threshold, device):
    if device != "cuda":
        return CPU
    return PASS if value >= threshold else FAIL


def _select(payload, setting, backend, device, dtype):
    r = _get(payload, "results", setting, "select")
    t = _get(r, "timings", backend)
    if not t or t.get("speedup_vs_upstream") is None:
        return None
    x = t["speedup_vs_upstream"]
    g = _get(r, "graph", backend)
    replay = f"; our graph replay {g['speedup_vs_upstream_eager']:.1f}x" if g and "error" not in g else ""
    text = (f"{x:.1f}x upstream's selection steps, eager ({t['median_ms'] * 1e3:.0f} vs "
            f"{_get(r, 'timings', 'upstream', 'median_ms') * 1e3:.0f} us{replay}) (target 10x)")
    return _row("select", setting, dtype, backend, "", device, _judge(x, 10.0, device), x, 10.0, text)


def _bandwidth(payload, op, setting, backend, mode, device, dtype):
    r = _get(payload, "results", setting, op)
    # The copy bandwidth timed beside the step where the file has it (newer
    # bench_ops.py), else the one timed at the start.
    copy = (r or {}).get("copy_GBps") or payload.get("copy_GBps")
    if not r or not copy or not r.get("bytes"):
        return None
    if mode == "eager":
        gbs, t = _get(r, "GBps", backend), _get(r, "timings", backend)
    else:
        t = _get(r, "graph", backend)
        if t and "error" in t:
            return _row(op, setting, dtype, backend, mode, device, FAIL if device == "cuda" else CPU, None, 0.5,
                        f"capture failed ({t['error']}) (target 50% of copy)")
        gbs = _get(t, "GBps")
    if gbs is None or not t:
        return None
    share = gbs / copy
    text = (f"{gbs:.0f} GB/s = {100 * share:.0f}% of copy {copy:.0f} GB/s "
            f"({r['bytes'] / 1e6:.1f} MB in {t['median_ms'] * 1e3:.0f} us) (target 50%)")
    return _row(op, setting, dtype, backend, mode, device, _judge(share, 0.5, device), share, 0.5, text)


def _refiner(payload, target, setting, backend, kind, device, dtype):
    run = _refiner_runs(_get(payload, "results", setting) or {}).get(kind)
    label = f"ours ({backend})"
    t = _get(run, "timings", label)
    up = _get(run, "timings", "upstream", "median_ms")
    if not t or up is None:
        return None
    variant = f"err={kind}"
    if target == "refiner eager":
        x = up / t["median_ms"]
        text = (f"{x:.2f}x upstream ({t['median_ms']:.3f} vs {up:.3f} ms) (target 2x), "
                f"max |diff| vs upstream {t.get('max_abs_diff_vs_upstream', float('nan')):.1e}")
        return _row(target, setting, dtype, backend, variant, device, _judge(x, 2.0, device), x, 2.0, text)
    g = _get(run, "graph", label)
    if g is None:
        return None
    if "error" in g:
        return _row(target, setting, dtype, backend, variant, device, FAIL, None, 3.0,
                    f"capture failed ({g['error']}) (target 3x)")
    x = up / g["median_ms"]
    check = g.get("replay_vs_eager")
    text = (f"{x:.2f}x upstream's eager ({g['median_ms']:.3f} vs {up:.3f} ms) (target 3x), "
            f"replay = eager: {check}")
    status = _judge(x, 3.0, device)
    if check not in ("equal", "close"):
        status, text = FAIL, text + f" (max |diff| {g.get('max_abs_diff_vs_eager', float('nan')):.1e})"
    return _row(target, setting, dtype, backend, variant, device, status, x, 3.0, text)


def evaluate(folder):
    """(rows, files): a row per target x setting x dtype x backend (x mode or
    err kind) of the GPU grid, NOT MEASURED where the folder lacks it; plus
    the CPU rows of CPU result files."""
    files = _load(folder)
    rows = []
    devices = ["cuda"] + sorted({d for (_, d, _) in files if d != "cuda"})
    for device in devices:
        backends = GPU_BACKENDS if device == "cuda" else (device,)
        dtypes = GPU_DTYPES if device == "cuda" else sorted(
            {dt for (_, d, dt) in files if d == device})
        for target, kind, threshold in TARGETS:
            source = "refiner" if kind == "refiner" else "ops"
            for dtype in dtypes:
                payload = files.get((source, device, dtype))
                for setting in SETTINGS:
                    for backend in backends:
                        variants = ERR_KINDS if kind == "refiner" else MODES if kind == "bandwidth" else ("",)
                        if device != "cuda" and target == "refiner graph":
                            continue  # no graphs on the CPU: nothing to print
                        for variant in variants:
                            row = None
                            if payload is not None:
                                if kind == "speedup":
                                    row = _select(payload, setting, backend, device, dtype)
                                elif kind == "bandwidth":
                                    row = _bandwidth(payload, target, setting, backend, variant, device, dtype)
                                else:
                                    row = _refiner(payload, target, setting, backend, variant, device, dtype)
                            if row is None:
                                if device != "cuda":
                                    continue  # CPU: print only what was measured
                                row = _row(target, setting, dtype, backend,
                                           f"err={variant}" if kind == "refiner" else variant, device,
                                           MISSING, None, threshold, "")
                            rows.append(row)
    return rows, files


def counts(rows):
    c = {PASS: 0, FAIL: 0, MISSING: 0, CPU: 0}
    for r in rows:
        c[r["status"]] += 1
    return c


def write(folder, rows, files):
    """verdict.json and verdict.txt in folder; returns the text."""
    c = counts(rows)
    lines = [f"Verdict over {os.path.abspath(folder)}: the GPU targets of issue 9 (CUDA results only; "
             "CPU rows are not judged)"]
    for path in sorted(p["_path"] for p in files.values()):
        info = next(p["info"] for p in files.values() if p["_path"] == path)
        lines.append(f"  {os.path.basename(path)}: {info.get('device_name')} ({info.get('device')}), "
                     f"torch {info.get('torch')}, {info.get('date')}")
    if not files:
        lines.append("  (no result files)")
    gpu = [r for r in rows if r["device"] == "cuda"]
    cpu = [r for r in rows if r["device"] != "cuda"]
    lines += [""] + [r["line"] for r in gpu]
    if cpu:
        lines += ["", "CPU results (the targets are for the GPU; printed for information)"]
        lines += [r["line"] for r in cpu]
    lines += ["", "Per target (GPU): PASS / FAIL / NOT MEASURED"]
    for target, _, _ in TARGETS:
        t = counts([r for r in gpu if r["target"] == target])
        lines.append(f"  {target:14s} {t[PASS]} / {t[FAIL]} / {t[MISSING]}")
    lines.append(f"GPU targets: {c[PASS]} PASS, {c[FAIL]} FAIL, {c[MISSING]} NOT MEASURED"
                 + (f"; {c[CPU]} CPU rows" if c[CPU] else ""))
    text = "\n".join(lines)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "verdict.json"), "w") as f:
        json.dump({"folder": os.path.abspath(folder), "counts": c,
                   "files": sorted(os.path.basename(p["_path"]) for p in files.values()),
                   "targets": [{"target": t, "threshold": th, "of": k} for t, k, th in TARGETS],
                   "rows": rows}, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "verdict.txt"), "w") as f:
        f.write(text + "\n")
    return text


def summarize(folder):
    """For the end of a bench script: writes the folder's verdict and prints
    its counts (never raises: the results are written already)."""
    try:
        rows, files = evaluate(folder)
        write(folder, rows, files)
        c = counts(rows)
        print(f"verdict so far: GPU targets {c[PASS]} PASS, {c[FAIL]} FAIL, {c[MISSING]} NOT MEASURED"
              + (f" ({c[CPU]} CPU rows, not judged)" if c[CPU] else "")
              + f"; each line: python verdict.py {folder}")
    except Exception as exc:  # noqa: BLE001
        print(f"verdict failed: {exc!r}", file=sys.stderr)


def default_folder():
    import torch

    from common import device_info, results_folder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return results_folder(device_info(device))


def main():
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    folder = sys.argv[1] if len(sys.argv) == 2 else default_folder()
    rows, files = evaluate(folder)
    print(write(folder, rows, files))


if __name__ == "__main__":
    main()
