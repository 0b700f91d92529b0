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

import pymatting_ext

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


def _call_times(fn, device, repeat):
    """ms of each of ``repeat`` calls of fn (see timeit)."""
    times = []
    if is_cuda(device):
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


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
    return summarize(_call_times(fn, device, repeat))


def device_name(device):
    """torch.cuda.get_device_name, or the CPU's model name from /proc/cpuinfo."""
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


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


def header(info, dtype, repeat, warmup):
    """The first printed line: device, threads, versions, timing."""
    line = (f"device: {info['device_name']} ({info['device']}, {info['threads']} threads), "
            f"torch {info['torch']}, pymatting_ext {info['pymatting_ext']}, python {info['python']}, "
            f"{dtype}, median of {repeat} after {warmup} warm-up")
    if not info["extension_loaded"]:
        line += "\nWARNING: the compiled extension is not loaded; 'auto' runs the reference ops"
    return line


def device_slug(info):
    """results/ folder name: device type and name, e.g. cpu-intel-r-xeon-r-processor."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device_name"]).strip("-").lower()
    return f"{torch.device(info['device']).type}-{name}"


def write_results(name, payload, text):
    """Writes payload (which holds device_info's dict under "info") to
    benchmarks/results/<device slug>/<name>.json and the printed text beside
    it as <name>.txt; returns the JSON's path."""
    folder = os.path.join(HERE, "results", device_slug(payload["info"]))
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


def make_inputs(setting, device, dtype, batch=1, seed=0):
    """Random inputs as MattingRefine hands them to its refiner: src, bgr,
    pha, err, hid uniform in [0, 1), fgr (a residual) normal * 0.1."""
    g = torch.Generator().manual_seed(seed)
    H, W, scale = setting["H"], setting["W"], setting["scale"]
    Hc, Wc = int(H * scale), int(W * scale)
    r = lambda *s: torch.rand(*s, generator=g)
    x = (r(batch, 3, H, W), r(batch, 3, H, W), r(batch, 1, Hc, Wc),
         torch.randn(batch, 3, Hc, Wc, generator=g) * 0.1, r(batch, 1, Hc, Wc), r(batch, 32, Hc, Wc))
    return tuple(t.to(device=device, dtype=dtype) for t in x)


def random_bn_(module, seed=0):
    """Random BatchNorm running statistics, so that folding them is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def parse_common(parser, cpu_repeat, cuda_repeat):
    """Adds --device, --dtype, --repeat, --quick; returns (args, device,
    dtype, repeat, warmup). Half precision is for CUDA only (upstream's CPU
    convolutions are not meant for it)."""
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"timed calls per measurement (default {cpu_repeat} on the CPU, {cuda_repeat} on CUDA)")
    parser.add_argument("--quick", action="store_true", help="3 timed calls after 1 warm-up")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.dtype != "float32" and device.type != "cuda":
        parser.error(f"--dtype {args.dtype} is for CUDA only; on the CPU the benchmarks run float32")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    repeat = 3 if args.quick else args.repeat or (cuda_repeat if device.type == "cuda" else cpu_repeat)
    warmup = 1 if args.quick else 2
    return args, device, getattr(torch, args.dtype), repeat, warmup
