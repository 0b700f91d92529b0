"""The speed test of the whole model (upstream's inference_speed_test.py,
done properly): MattingRefine (or MattingBase) at given resolutions,
backbone and precision, upstream's model (when installed) beside each of
our backends with the same weights, eagerly and replayed from a CUDA graph
(on a GPU), median time per call over many calls after a warm-up, as a
table, JSON and a plot.

As upstream's speed test: random inputs, and refine_prevent_oversampling
off, so that sampling mode always refines sample_pixels pixels (the same work
for every backend whatever the random weights predict).

On the CPU, the backends 'onnxruntime-upstream' and 'onnxruntime-ours' add
what a CPU user would otherwise pick: onnxruntime (CPU provider, torch's
thread count) running upstream's model exported as upstream's
export_onnx.py does (crop 'roi_align', replace 'scatter_element', opset 12),
and our `export --format onnx` of ours; float32, the same weights and
inputs. The export (per resolution: the backbone scale and sample pixels
are fixed in the file) is not timed.

    from pymatting_ext.app.speed import run_speed, format_table
    report = run_speed(backbone="resnet50", resolutions=[(1920, 1080)])
    print(format_table(report))
"""
import json
import os
import platform
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .common import UserError, build_model, dtype_of, pick_device, require

__all__ = ["run_speed", "format_table", "save_json", "plot", "default_backends", "onnxruntime_call"]

UPSTREAM = "upstream"
ORT_UPSTREAM = "onnxruntime-upstream"
ORT_OURS = "onnxruntime-ours"
ONNXRUNTIME = (ORT_UPSTREAM, ORT_OURS)
MODES = ("eager", "cuda-graph")


def _upstream_class(model_type: str):
    try:
        from BackgroundMattingV2.model import MattingBase, MattingRefine
    except ImportError:
        return None
    return MattingRefine if model_type == "mattingrefine" else MattingBase


def default_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    """upstream (if installed), then every compiled backend that runs on
    device (the reference where there is none)."""
    from .._backend import compiled_backends

    ours = compiled_backends(device, dtype) or ["reference"]
    return ([UPSTREAM] if _upstream_class("mattingrefine") is not None else []) + ours


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times(fn: Callable[[], object], device: torch.device, iterations: int) -> List[float]:
    """ms of each of `iterations` calls of fn: CUDA events around each call
    on a GPU (the device idle before each), the wall clock on a CPU. The
    benchmarks time with this too."""
    times = []
    for _ in range(iterations):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _times(fn: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> List[float]:
    """ms of each of `iterations` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return call_times(fn, device, iterations)


def _capture(model: torch.nn.Module, src: torch.Tensor, bgr: torch.Tensor, warmup: int):
    """The model captured in a CUDA graph (pymatting_ext.cuda_graph: its
    calls copy the inputs into the graph's and replay it), or raises if the
    model synchronises or cannot be captured."""
    from ..graphs import cuda_graph

    return cuda_graph(model, src, bgr, warmup=max(warmup, 2))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def run_speed(*, backbone: str = "resnet50", resolutions: Sequence[Tuple] = ((1920, 1080),),
              model_type: str = "mattingrefine", backbone_scale: float = 0.25, refine_mode: str = "sampling",
              refine_sample_pixels: int = 80_000, refine_threshold: float = 0.7, refine_kernel_size: int = 3,
              refine_prevent_oversampling: bool = False, checkpoint: Optional[str] = None,
              precision: str = "fp32", device: Optional[str] = None, backends: Optional[Sequence[str]] = None,
              modes: Optional[Sequence[str]] = None, batch_size: int = 1, iterations: Optional[int] = None,
              warmup: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Times the whole model; returns a report (settings, environment and one
    row per resolution x backend x mode) for format_table, save_json and
    plot. Backends: 'upstream' and any of pymatting_ext's; modes: 'eager',
    'cuda-graph' (CUDA only; a model that synchronises, as upstream's does,
    gets a row saying why it cannot be captured).

    resolutions: (W, H), or (W, H, backbone_scale), or (W, H,
    backbone_scale, refine_sample_pixels) to set those per resolution (as
    upstream's 4K setting: 0.125 and 320,000)."""
    from .._backend import BACKENDS, resolve

    dev = pick_device(device)
    dtype = dtype_of(precision)
    cuda = dev.type == "cuda"
    iterations = iterations or (100 if cuda else 10)
    warmup = warmup if warmup is not None else (10 if cuda else 2)
    if iterations < 1 or warmup < 0 or batch_size < 1:
        raise UserError("iterations and batch size must be positive and warmup non-negative")
    modes = list(modes) if modes else (["eager", "cuda-graph"] if cuda else ["eager"])
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if "cuda-graph" in modes and not cuda:
        raise UserError("mode 'cuda-graph' needs a CUDA device (--device cuda)")
    backends = list(backends) if backends else default_backends(dev, dtype)
    for name in backends:
        if name not in (UPSTREAM,) + ONNXRUNTIME and name not in BACKENDS:
            raise UserError(f"unknown backend {name!r}; choose from {UPSTREAM}, {', '.join(BACKENDS)}, "
                            f"{', '.join(ONNXRUNTIME)}")
        if name in (UPSTREAM, ORT_UPSTREAM) and _upstream_class(model_type) is None:
            raise UserError(f"backend {name!r} needs BackgroundMattingV2 (`pip install backgroundmattingv2==1.0`)")
        if name in ONNXRUNTIME:
            if cuda:
                raise UserError(f"backend {name!r} runs on the CPU (--device cpu)")
            require("onnxruntime", f"backend {name!r}")
            require("onnx", f"backend {name!r}")
        if name not in (UPSTREAM, "auto") + ONNXRUNTIME:
            try:
                resolve(name, dev, dtype)
            except (ValueError, RuntimeError) as exc:
                raise UserError(f"backend {name!r} cannot run here: {exc}") from None
    cases = []
    for entry in resolutions:
        W, H = int(entry[0]), int(entry[1])
        scale = float(entry[2]) if len(entry) > 2 and entry[2] is not None else backbone_scale
        pixels = int(entry[3]) if len(entry) > 3 and entry[3] is not None else refine_sample_pixels
        if W < 4 or H < 4 or W % 4 or H % 4:
            raise UserError(f"resolution {W}x{H}: width and height must be positive multiples of 4")
        if not 0 < scale <= 0.5 or int(W * scale) < 1 or int(H * scale) < 1:
            raise UserError(f"resolution {W}x{H}: backbone scale {scale} must be in (0, 1/2] and leave a "
                            f"coarse image of at least 1 pixel")
        if pixels < 0:
            raise UserError(f"refine sample pixels must be non-negative, got {pixels}")
        cases.append((W, H, scale, pixels))
    say = log or (lambda line: None)

    ours, info = build_model(model_type, backbone, backbone_scale, refine_mode, refine_sample_pixels,
                             refine_threshold, refine_kernel_size, refine_prevent_oversampling,
                             checkpoint=checkpoint)
    ours = ours.to(device=dev, dtype=dtype)
    state = ours.state_dict()

    def make(name: str) -> torch.nn.Module:
        if name in (UPSTREAM, ORT_UPSTREAM):
            cls = _upstream_class(model_type)
            if model_type == "mattingbase":
                model = cls(info["backbone"])
            else:
                model = cls(info["backbone"], backbone_scale, refine_mode, refine_sample_pixels, refine_threshold,
                            refine_kernel_size, refine_prevent_oversampling)
            model.load_state_dict(state)
            return model.to(device=dev, dtype=dtype).eval()
        if model_type == "mattingrefine" and name != ORT_OURS:
            ours.refiner.backend = name
        return ours

    rows = []
    jiffies, started = _cpu_jiffies(), time.monotonic()
    for W, H, scale, pixels in cases:
        g = torch.Generator().manual_seed(0)
        src = torch.rand(batch_size, 3, H, W, generator=g).to(dev, dtype)
        bgr = torch.rand(batch_size, 3, H, W, generator=g).to(dev, dtype)
        # Graph capture of upstream's model fails (it synchronises): try it
        # last, after ours.
        order = [(name, mode) for mode in modes for name in backends if mode == "eager" or name not in ONNXRUNTIME]
        order.sort(key=lambda nm: (nm[1] == "cuda-graph" and nm[0] == UPSTREAM))
        for name, mode in order:
            row = {"resolution": f"{W}x{H}", "width": W, "height": H, "backend": name, "mode": mode,
                   "batch_size": batch_size, "backbone_scale": scale, "refine_sample_pixels": pixels}
            say(f"{W}x{H} {name} {mode} ...")
            try:
                model = make(name)
                if model_type == "mattingrefine":
                    model.backbone_scale = scale
                    model.refiner.sample_pixels = pixels

                def call(model=model):
                    return model(src, bgr)

                if name in ONNXRUNTIME:
                    say(f"{W}x{H} {name}: exporting ...")
                    call = onnxruntime_call(name, model, src, bgr)

                with torch.inference_mode():
                    if mode == "eager":
                        times = _times(call, dev, warmup, iterations)
                    else:
                        try:
                            graphed = _capture(model, src, bgr, warmup)
                        except Exception as exc:  # noqa: BLE001 - reported in the row
                            _recover(dev)
                            raise _NotCapturable(_first_line(exc)) from None
                        times = _times(lambda: graphed(src, bgr), dev, warmup, iterations)
                        del graphed
            except _NotCapturable as exc:
                row.update(status=f"not capturable ({exc})")
            except torch.cuda.OutOfMemoryError as exc:
                _recover(dev)
                row.update(status=f"out of memory ({_first_line(exc)})")
            except (RuntimeError, ValueError) as exc:
                _recover(dev)
                row.update(status=f"failed ({_first_line(exc)})")
            else:
                median = statistics.median(times)
                q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
                row.update(status="ok", median_ms=median, fps=1000 * batch_size / median, iqr_ms=q[2] - q[0],
                           min_ms=min(times), iterations=len(times))
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["resolution"] == row["resolution"] and r["backend"] == UPSTREAM
                     and r["mode"] == "eager" and r["status"] == "ok"), None)
        if base is not None and row["status"] == "ok":
            row["speedup_vs_upstream_eager"] = base["median_ms"] / row["median_ms"]
    return {"settings": {"model_type": model_type, "backbone": info["backbone"], "backbone_scale": backbone_scale,
                         "refine_mode": refine_mode, "refine_sample_pixels": refine_sample_pixels,
                         "refine_threshold": refine_threshold, "refine_kernel_size": refine_kernel_size,
                         "refine_prevent_oversampling": refine_prevent_oversampling, "precision": precision,
                         "batch_size": batch_size, "iterations": iterations, "warmup": warmup,
                         "checkpoint": checkpoint,
                         "resolutions": [{"resolution": f"{W}x{H}", "backbone_scale": scale,
                                          "refine_sample_pixels": pixels} for W, H, scale, pixels in cases]},
            "environment": _environment(dev, _other_cpu_share(jiffies, time.monotonic() - started)), "rows": rows}


class _NotCapturable(Exception):
    pass


def onnxruntime_call(name: str, model: torch.nn.Module, src: torch.Tensor, bgr: torch.Tensor) -> Callable:
    """A call of onnxruntime (CPU provider, torch's thread count) on model
    exported to ONNX: upstream's (ORT_UPSTREAM) as its export_onnx.py
    exports it (crop 'roi_align', replace 'scatter_element', opset 12,
    dynamic batch and size, TorchScript-based exporter), ours (ORT_OURS) by
    export_onnx (see .export; dynamic too). The call runs src and bgr
    (float32); benchmarks/bench_cpu_model.py times it too."""
    import copy
    import io
    import warnings

    import onnxruntime as ort

    model = copy.deepcopy(model).float().eval()
    example = (src.float(), bgr.float())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == ORT_UPSTREAM:
            if hasattr(model, "refiner"):
                model.refiner.patch_crop_method = "roi_align"
                model.refiner.patch_replace_method = "scatter_element"
            names = ["pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm"] if hasattr(model, "refiner") else \
                ["pha", "fgr", "err", "hid"]
            axes = {n: {0: "batch", 2: "height", 3: "width"} for n in ["src", "bgr"] + names}
            torch.onnx.export(model, example, buffer, opset_version=12, input_names=["src", "bgr"],
                              output_names=names, dynamic_axes=axes, dynamo=False)
            data = buffer.getvalue()
        else:
            import tempfile

            from .export import export_onnx

            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model.onnx")
                export_onnx(model, path, example=example, validate=False)
                with open(path, "rb") as f:
                    data = f.read()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = {"src": example[0].numpy(), "bgr": example[1].numpy()}
    return lambda: session.run(None, feed)


def _recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        torch.cuda.empty_cache()


def _cpu_jiffies() -> Optional[Tuple[int, int]]:
    """(busy jiffies of the whole machine, of this process), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(fields[:8]) - fields[3] - fields[4], int(own[11]) + int(own[12])
    except (OSError, IndexError, ValueError):
        return None


def _other_cpu_share(start: Optional[Tuple[int, int]], seconds: float) -> Optional[float]:
    """The share of the machine's cores that other processes used since
    start: CPU timings taken while it is more than a few percent are not to
    be trusted (the kernels' threads wait on each other at every barrier)."""
    end = _cpu_jiffies()
    if start is None or end is None or seconds <= 0:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, other / os.sysconf("SC_CLK_TCK") / (seconds * (os.cpu_count() or 1)))


def device_name(device) -> str:
    """torch.cuda.get_device_name, or the CPU's model name from /proc/cpuinfo
    (the benchmarks name their result folders with it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _environment(device: torch.device, other_share: Optional[float]) -> dict:
    import pymatting_ext

    return {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "pymatting_ext": pymatting_ext.__version__,
            "extension_loaded": pymatting_ext.extension_available(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "other_processes_cpu_share": other_share,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _label(backend: str) -> str:
    if backend == ORT_UPSTREAM:
        return "onnxruntime, upstream's ONNX (fp32)"
    if backend == ORT_OURS:
        return "onnxruntime, our ONNX (fp32)"
    return backend if backend == UPSTREAM else f"ours ({backend})"


def format_table(report: dict) -> str:
    """The rows as a fixed-width table."""
    s = report["settings"]
    env = report["environment"]
    head = (f"{s['model_type']} {s['backbone']}, {s['refine_mode']}, "
            + "; ".join(f"{r['resolution']}: backbone_scale {r['backbone_scale']}"
                        + (f", {r['refine_sample_pixels']} px" if s["refine_mode"] == "sampling" else "")
                        for r in s["resolutions"])
            + f", {s['precision']}, batch {s['batch_size']}; {env['device_name']} ({env['device']}"
            + (f", {env['threads']} threads" if env["device"] == "cpu" else "") + f"), torch {env['torch']}; "
            + f"median of {s['iterations']} after {s['warmup']} warm-up")
    lines = [head]
    cols = ("resolution", "backend", "mode", "ms/frame", "frames/s", "vs upstream")
    table = []
    for r in report["rows"]:
        if r["status"] == "ok":
            per_frame = r["median_ms"] / r["batch_size"]
            speed = r.get("speedup_vs_upstream_eager")
            table.append((r["resolution"], _label(r["backend"]), r["mode"], f"{per_frame:.2f}", f"{r['fps']:.2f}",
                          f"{speed:.2f}x" if speed else "-"))
        else:
            table.append((r["resolution"], _label(r["backend"]), r["mode"], "-", "-", r["status"]))
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for t in table:
        lines.append("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    share = env.get("other_processes_cpu_share")
    if env["device"] == "cpu" and share is not None and share > 0.05:
        lines.append(f"WARNING: other processes used {100 * share:.0f}% of the {env['cpu_count']} cores during the "
                     f"run: these CPU times are not reliable; run again on a quiet machine")
    return "\n".join(lines)


def save_json(report: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def plot(report: dict, path: str) -> None:
    """Time per frame by backend (and mode), grouped by resolution, as a PNG."""
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        raise UserError("nothing to plot: no configuration ran")
    resolutions = list(dict.fromkeys(r["resolution"] for r in report["rows"]))
    series = list(dict.fromkeys((r["backend"], r["mode"]) for r in report["rows"]))
    width = 0.8 / max(len(series), 1)
    s, env = report["settings"], report["environment"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 1.6 * len(resolutions) * max(1, len(series) / 3)), 4.2),
                           dpi=120)
    colors = plt.get_cmap("tab10")
    for i, (backend, mode) in enumerate(series):
        xs, ys, labels = [], [], []
        for j, res in enumerate(resolutions):
            r = next((r for r in rows if r["resolution"] == res and r["backend"] == backend and r["mode"] == mode),
                     None)
            if r is None:
                continue
            xs.append(j + (i - (len(series) - 1) / 2) * width)
            ys.append(r["median_ms"] / r["batch_size"])
            labels.append(f"{ys[-1]:.1f}")
        name = _label(backend) + ("" if mode == "eager" else f", {mode}")
        bars = ax.bar(xs, ys, width * 0.92, label=name, color=colors(i % 10),
                      hatch="//" if mode != "eager" else None, edgecolor="white")
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    s, env = report["settings"], report["environment"]
    per_res = {r["resolution"]: r for r in s["resolutions"]}
    varies = len({(r["backbone_scale"], r["refine_sample_pixels"]) for r in s["resolutions"]}) > 1
    ax.set_xticks(range(len(resolutions)), [
        res + (f"\nscale {per_res[res]['backbone_scale']}, {per_res[res]['refine_sample_pixels']:,} px"
               if varies and res in per_res else "") for res in resolutions])
    ax.set_ylabel("time per frame (ms, median; lower is better)")
    ax.set_title(f"whole {s['model_type']}, {s['backbone']}, {s['refine_mode']}, {s['precision']}, "
                 f"batch {s['batch_size']}"
                 f" - {env['device_name']}" + (f", {env['threads']} threads" if env["device"] == "cpu" else ""),
                 fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
