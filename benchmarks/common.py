"""Timing, device description and result files shared by the benchmarks."""
import datetime
import json
import os
import platform
import re
import statistics
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


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup=2, repeat=7):
    """Median and interquartile range (q3 - q1) of fn's wall time in ms, over
    ``repeat`` calls after ``warmup`` untimed ones; on CUDA the device is
    synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "repeat": repeat}


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_info(device):
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        # PyTorch's default lets cuDNN run fp32 convolutions in TF32.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pymatting_ext": pymatting_ext.__version__,
        "build": pymatting_ext.build_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_slug(info):
    """results/ folder name: device type and name, e.g. cpu-intel-r-xeon-r-processor."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device_name"]).strip("-").lower()
    return f"{torch.device(info['device']).type}-{name}"


def write_json(name, payload):
    """Writes payload (which holds device_info's dict under "info") to
    benchmarks/results/<device slug>/<name>.json; returns the path."""
    folder = os.path.join(HERE, "results", device_slug(payload["info"]))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def print_table(title, header, rows):
    """Prints rows (lists of str) under a header, columns padded to width."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def make_inputs(setting, device, dtype, batch=1, seed=0):
    """Random inputs as MattingRefine hands them to its refiner."""
    g = torch.Generator().manual_seed(seed)
    H, W, scale = setting["H"], setting["W"], setting["scale"]
    Hc, Wc = int(H * scale), int(W * scale)
    r = lambda *s: torch.rand(*s, generator=g)
    x = (r(batch, 3, H, W), r(batch, 3, H, W), r(batch, 1, Hc, Wc),
         torch.randn(batch, 3, Hc, Wc, generator=g) * 0.1, r(batch, 1, Hc, Wc), r(batch, 32, Hc, Wc))
    return tuple(t.to(device=device, dtype=dtype) for t in x)


def random_bn_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module
