"""Timing, device description and result files shared by the benchmarks."""
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pymatting_ext
from pymatting_ext.app.speed import call_times, device_name

HERE = os.path.dirname(os.path.abspath(__file__))

#: The two settings of the issue: HD with the default backbone scale, and 4K
#: with backbone_scale 0.125 (the coarse maps are 270 x 480 in both).
SETTINGS = {
    "HD": dict(H=1080, W=1920, scale=0.25, sample_pixels=80_000),
    "4K": dict(H=2160, W=3840, scale=0.125, sample_pixels=320_000),
}


def is_cuda(device):
    return torch.device(device).type == "cuda"


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize(device)


class Laps:
    """Stopwatch for timing consecutive steps of one run: ``lap()`` returns the
    ms since the previous lap (synchronising the device first on CUDA)."""

    def __init__(self, device):
        self.device = device
        sync(device)
        self.last = time.perf_counter()

    def lap(self):
        sync(self.device)
        now = time.perf_counter()
        ms, self.last = (now - self.last) * 1e3, now
        return ms


def summarize(times):
    """Median and interquartile range (q3 - q1) of a list of ms."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "min_ms": min(times),
            "repeat": len(times), "times_ms": [round(t, 4) for t in times]}


def timeit(fn, device, warmup=2, repeat=7):
    """Median, IQR (q3 - q1) and minimum of fn's time in ms over ``repeat``
    calls after ``warmup`` untimed ones.

    CPU: wall time of each call (time.perf_counter). CUDA: the device is
    synchronised before each call, and the call is timed by CUDA events
    recorded around it on the current stream, so the time covers the work the
    call launches and any host time the device waits on, not what came
    before it.

    NB: the benchmarks time their providers one after the other, each in
    its steady state, not interleaved call by call: a call that follows
    another provider's finds the caches and malloc's free lists in that
    provider's state (upstream's full-resolution temporaries), which measured
    ours ~15% slower at HD on the CPU. Contention reports load that changed
    underneath."""
    for _ in range(warmup):
        fn()
    sync(device)
    return summarize(call_times(fn, device, repeat))


def timeit_rounds(fns, device, warmup=2, repeat=7, rounds=1):
    """timeit for several providers ({label: fn}) in ``rounds`` round-robin
    blocks: each block times every provider in turn, warmup untimed calls
    then its share of the ``repeat`` timed calls (at least one), each
    provider in its steady state as timeit's note asks; the times of a
    provider's blocks are summarised together ({label: summary}).

    NB: a shared virtual machine's speed drifts by 10-30% within a minute
    (its neighbours' load): timed one after the other in a single block, the
    providers each see a different machine and their ratio carries that
    drift; spread over rounds, every provider samples the same stretches of
    time."""
    times = {label: [] for label in fns}
    faults = dict.fromkeys(fns, 0)
    per_round = max(1, -(-repeat // rounds))
    for _ in range(rounds):
        for label, fn in fns.items():
            for _ in range(warmup):
                fn()
            sync(device)
            before = minor_faults()
            times[label] += call_times(fn, device, per_round)
            if before is not None:
                faults[label] += minor_faults() - before
    out = {label: summarize(t) for label, t in times.items()}
    for label, summary in out.items():
        # Minor page faults per timed call (CPU; None where unknown).
        summary["page_faults_per_call"] = None if minor_faults() is None else faults[label] / len(times[label])
    return out


def load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_jiffies():
    """(busy jiffies of the whole machine, of this process) or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        # user nice system idle iowait irq softirq steal: all but idle and iowait.
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return busy, int(own[11]) + int(own[12])  # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return None


class Contention:
    """How much CPU other processes used while the benchmark ran: the
    machine's busy time minus this process's, over wall time x cores. CPU
    timings taken while this is more than a few percent are not to be
    trusted (the kernels' threads wait on each other at every barrier)."""

    def __init__(self):
        self.start = _cpu_jiffies()
        self.t0 = time.monotonic()

    def share(self):
        end = _cpu_jiffies()
        if self.start is None or end is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.monotonic() - self.t0
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / hz / (wall * (os.cpu_count() or 1)))

    def report(self):
        """A line for the printed output, and the share."""
        share = self.share()
        if share is None:
            return "", None
        line = f"other processes used {100 * share:.0f}% of the {os.cpu_count()} cores during the run"
        if share > 0.05:
            line = "WARNING: " + line + "; the CPU timings are not reliable, run again on a quiet machine"
        return line, share


def minor_faults():
    """Minor page faults of this process so far (None where unknown)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def device_info(device):
    """What the numbers depend on: device, threads, versions, build, load."""
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # PyTorch's default lets cuDNN run fp32 convolutions in TF32.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "tf32": tf32_settings(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pymatting_ext": pymatting_ext.__version__,
        "extension_loaded": pymatting_ext.extension_available(),
        "build": pymatting_ext.build_info(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "load_average_1min_at_start": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if is_cuda(device):
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(torch.device(device))))
    return info


def tf32_settings():
    """PyTorch's TF32 switches as they stand (the benchmarks keep PyTorch's
    defaults: cuDNN convolutions in TF32 on, float32 matmuls off)."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_conv_fp32_precision": conv,  # torch >= 2.9; None before
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def tf32_line(info):
    """One printed line saying what float32 convolutions and matmuls run in."""
    t = info["tf32"]
    conv = "TF32" if t["cudnn_allow_tf32"] else "full float32"
    matmul = "TF32" if t["cuda_matmul_allow_tf32"] else "full float32"
    return (f"TF32 (left as found; PyTorch's default: convolutions TF32, matmuls not): float32 convolutions in {conv} "
            f"(torch.backends.cudnn.allow_tf32={t['cudnn_allow_tf32']}), matmuls in {matmul} "
            f"(float32_matmul_precision={t['float32_matmul_precision']!r})")


def header(info, dtype, repeat, warmup):
    """The first printed lines: device, threads, versions, timing (and TF32
    on CUDA)."""
    line = (f"device: {info['device_name']} ({info['device']}, {info['threads']} threads), "
            f"torch {info['torch']}, pymatting_ext {info['pymatting_ext']}, python {info['python']}, "
            f"{dtype}, median of {repeat} after {warmup} warm-up")
    if is_cuda(info["device"]):
        line += "\n" + tf32_line(info)
    if not info["extension_loaded"]:
        line += "\nWARNING: the compiled extension is not loaded; 'auto' runs the reference ops"
    return line


def device_slug(info):
    """results/ folder name: device type and name, e.g. cpu-intel-r-xeon-r-processor."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device_name"]).strip("-").lower()
    return f"{torch.device(info['device']).type}-{name}"


def results_folder(info, out=None):
    """Where the result files go: out (--out) if given, else
    benchmarks/results/<device slug>/."""
    return out if out else os.path.join(HERE, "results", device_slug(info))


def write_results(name, payload, text, out=None):
    """Writes payload (which holds device_info's dict under "info") to
    <folder>/<name>.json and the printed text beside it as <name>.txt, folder
    as results_folder(info, out); returns the JSON's path."""
    folder = results_folder(payload["info"], out)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
        f.write(text.rstrip("\n") + "\n")
    return path


class Printer:
    """print(), keeping a copy of the text for the results' .txt file."""

    def __init__(self):
        self.lines = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def table(self, title, header_row, rows):
        """Rows (lists of str) under a header, columns padded to width."""
        widths = [max(len(str(x)) for x in col) for col in zip(header_row, *rows)]
        self(f"\n{title}")
        self("  ".join(str(h).ljust(w) for h, w in zip(header_row, widths)).rstrip())
        self("  ".join("-" * w for w in widths))
        for row in rows:
            self("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())

    def text(self):
        return "\n".join(self.lines)


#: The error maps bench_refiner.py times with (--err).
ERR_KINDS = ("random", "boundary")


def make_inputs(setting, device, dtype, batch=1, seed=0, err="random"):
    """Random inputs as MattingRefine hands them to its refiner: src, bgr,
    pha, hid uniform in [0, 1), fgr (a residual) normal * 0.1; err uniform
    (err='random') or as boundary_err makes it (err='boundary'). The other
    inputs are the same for both kinds of err."""
    g = torch.Generator().manual_seed(seed)
    H, W, scale = setting["H"], setting["W"], setting["scale"]
    Hc, Wc = int(H * scale), int(W * scale)
    r = lambda *s: torch.rand(*s, generator=g)
    x = [r(batch, 3, H, W), r(batch, 3, H, W), r(batch, 1, Hc, Wc),
         torch.randn(batch, 3, Hc, Wc, generator=g) * 0.1, r(batch, 1, Hc, Wc), r(batch, 32, Hc, Wc)]
    if err == "boundary":
        x[4] = boundary_err(batch, Hc, Wc, seed)
    elif err != "random":
        raise ValueError(f"err must be one of {ERR_KINDS}, got {err!r}")
    return tuple(t.to(device=device, dtype=dtype) for t in x)


def boundary_err(batch, Hc, Wc, seed=0, width=4.0, noise=0.05):
    """(B, 1, Hc, Wc) coarse error maps as trained models produce them: high
    in a band along the edge of a matte, small noise elsewhere. The matte is
    a smooth random blob (an upright ellipse, a person's proportions, its
    radius wobbled by a few low harmonics); err = exp(-(d / width)^2) times
    a factor in [0.5, 1), plus noise * U[0, 1), d the distance (coarse
    pixels, approximately) from the blob's edge. At the HD and 4K settings
    sampling then picks a solid strip along the edge (a selected cell has
    7.3 (HD) and 7.7 (4K) of its 8 neighbours selected, against 0.3 and
    2.7 with uniform err): neighbouring cells share most of their windows."""
    g = torch.Generator().manual_seed(seed + 1)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    y = (torch.arange(Hc, dtype=torch.float64) + 0.5).view(Hc, 1)
    x = (torch.arange(Wc, dtype=torch.float64) + 0.5).view(1, Wc)
    maps = []
    for _ in range(batch):
        cy, cx = Hc * (0.45 + 0.1 * u(())), Wc * (0.4 + 0.2 * u(()))
        ry, rx = Hc * (0.30 + 0.06 * u(())), Wc * (0.16 + 0.05 * u(()))
        dy, dx = (y - cy) / ry, (x - cx) / rx
        rho, theta = torch.sqrt(dy * dy + dx * dx), torch.atan2(dy, dx)
        edge = torch.ones_like(theta)
        for n in range(2, 7):
            edge = edge + 0.3 / n * u(()) * torch.cos(n * theta + 2 * torch.pi * u(()))
        d = (rho - edge) * torch.minimum(ry, rx)
        band = torch.exp(-(d / width) ** 2) * (0.5 + 0.5 * u(Hc, Wc))
        maps.append((band + noise * u(Hc, Wc)).clamp(0, 1))
    return torch.stack(maps)[:, None].float()


def selected_neighbours(ref):
    """How clustered the selected cells of a (B, 1, h, w) 0/1 map are: the
    mean number of a selected cell's 8 neighbours that are selected too (0
    for isolated cells, 8 inside a solid block; 0.3 (HD) and 2.7 (4K, where
    err_q is a 2x upsample of the coarse err) for uniform random err)."""
    ref = (ref.float() > 0).float()
    if not bool(ref.any()):
        return 0.0
    n = F.conv2d(ref, torch.ones(1, 1, 3, 3, device=ref.device), padding=1) - ref
    return float(n[ref > 0].mean())


def random_bn_(module, seed=0):
    """Random BatchNorm running statistics, so that folding them is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def capture_graph(fn, device, warmup=3):
    """(graph, output): one call of fn captured in a CUDA graph, after
    `warmup` calls on a side stream (as PyTorch's CUDA-graph notes ask: lazy
    initialisation, Triton's compilation and cuDNN's workspaces happen
    there, not under capture). fn must neither synchronise with the host nor
    depend on data for its shapes; graph.replay() then reruns it on whatever
    its input tensors hold, into the same output tensors."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def try_capture(fn, device, warmup=3):
    """capture_graph, or (None, None, why) when capturing fails (something
    in fn synchronises, say): a benchmark row is then left without its
    graph time instead of ending the run. Returns (graph, output, None) on
    success."""
    try:
        graph, out = capture_graph(fn, device, warmup)
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        lines = str(exc).strip().splitlines()
        return None, None, f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    return graph, out, None


def parse_common(parser, cpu_repeat, cuda_repeat):
    """Adds --device, --dtype, --settings, --repeat, --quick and --out;
    returns (args, device, dtypes, repeat, warmup), dtypes a list of dtype
    names (--dtype takes several: one process runs them one after the
    other, writing one result file each). Half precision is for CUDA only
    (upstream's CPU convolutions are not meant for it)."""
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"],
                        help="one or more (default float32); float16 and bfloat16 on CUDA only")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="image sizes to run (default: all)")
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"timed calls per measurement (default {cpu_repeat} on the CPU, {cuda_repeat} on CUDA)")
    parser.add_argument("--quick", action="store_true", help="3 timed calls after 1 warm-up")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the JSON and text results (default: benchmarks/results/<device>/)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    half = [d for d in args.dtype if d != "float32"]
    if half and device.type != "cuda":
        parser.error(f"--dtype {half[0]} is for CUDA only; on the CPU the benchmarks run float32")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    repeat = 3 if args.quick else args.repeat or (cuda_repeat if device.type == "cuda" else cpu_repeat)
    warmup = 1 if args.quick else 2
    dtypes = list(dict.fromkeys(args.dtype))
    return args, device, dtypes, repeat, warmup
