"""The whole model on the CPU beside what a CPU user would pick instead
(issue 24): upstream eager, and onnxruntime running upstream's own ONNX
export and ours, side by side in one process with the same weights, inputs
and threads.

    python benchmarks/bench_cpu_model.py [--backbones resnet50 mobilenetv2] [--settings HD 4K]
                                         [--repeat N] [--rounds R] [--quick] [--no-onnx] [--out DIR]

Per backbone and setting (upstream's speed-test settings: sampling mode,
HD with backbone_scale 1/4 and 80,000 pixels, 4K with 1/8 and 320,000,
refine_prevent_oversampling off so every contender refines the same number
of cells), random weights and BatchNorm statistics shared by all:

- upstream eager: backgroundmattingv2==1.0's MattingRefine, fp32;
- onnxruntime, upstream's ONNX: that model exported as upstream's
  export_onnx.py does (crop 'roi_align', replace 'scatter_element', opset
  12, dynamic batch/height/width), run by onnxruntime's CPU provider with
  intra_op_num_threads = torch's threads;
- onnxruntime, our ONNX: `pymatting-ext export --format onnx` of ours;
- ours: pymatting_ext's MattingRefine in eval, default settings, fp32;
- ours bf16: the same under torch.autocast('cpu', torch.bfloat16), where the
  CPU has native bfloat16 (AVX-512 BF16 or AMX); beside it upstream under
  the same autocast.

Calls are timed in round-robin blocks (common.timeit_rounds). Then where
our time goes, each stage timed alone: the input's downsampling and the
coarse network (backbone, ASPP, decoder), the refiner, the rest; and the
coarse network's convolutions against their floor: its FLOPs (counted from
the modules) over the rate of one large 3x3 convolution (256 -> 256
channels, 68 x 120, channels-last, oneDNN with packed weights) measured
beside it in the same dtype, and each of its convolutions timed inside
the plan's calls against its own floor (the larger of its FLOPs at that
rate and its bytes at a copy's rate), per kind (3x3, 1x1, depthwise), with
the time outside them; and the peak memory (maximum RSS of a fresh
process making 3 calls) with the plan and with the modules. Writes
cpu_model_<backbone>.{json,txt} into results/<device>/ (or --out).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import SETTINGS, Contention, Printer, device_info, random_bn_, timeit_rounds, write_results  # noqa: E402

import pymatting_ext as pm  # noqa: E402
from pymatting_ext import _coarse  # noqa: E402
from pymatting_ext.app.speed import ORT_OURS, ORT_UPSTREAM, call_times, onnxruntime_call  # noqa: E402


def upstream_model(backbone, setting, **kw):
    from BackgroundMattingV2.model import MattingRefine

    model = MattingRefine(backbone, setting["scale"], "sampling", setting["sample_pixels"], 0.1, 3, False, **kw)
    return random_bn_(model).eval()


def conv_flops(model, x):
    """Multiply-adds x 2 of every convolution of model's coarse network for
    its 6-channel input x, counted by hooks on the modules."""
    total = [0]

    def hook(m, inputs, out):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total[0] += 2 * out.numel() * k

    handles = [m.register_forward_hook(hook) for part in (model.backbone, model.aspp, model.decoder)
               for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        os.environ[_coarse.ENV_VAR] = "0"
        with torch.no_grad():
            model._coarse_net(x)
    finally:
        del os.environ[_coarse.ENV_VAR]
        for h in handles:
            h.remove()
    return total[0]


def large_conv_rate(dtype, repeat):
    """GFLOP/s of one large 3x3 convolution (256 -> 256 channels on 68 x 120,
    channels-last, packed weights, as the plan runs them)."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    step = _coarse._Conv(conv, None, torch.nn.ReLU(), dtype)
    x = torch.rand(1, 256, 68, 120).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * 256 * 256 * 9 * 68 * 120
    with torch.no_grad():
        for _ in range(3):
            step(x)
        times = call_times(lambda: step(x), torch.device("cpu"), repeat)
    return flops / (sorted(times)[len(times) // 2] / 1e3) / 1e9


def copy_rate(nbytes, repeat):
    """GB/s of one copy moving nbytes in all (read half, write half): the
    memory floor's rate at a layer's own working-set size (in cache or not)."""
    a = torch.empty(max(1, nbytes // 8), dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    times = call_times(lambda: b.copy_(a), torch.device("cpu"), repeat)
    return 2 * a.numel() * 4 / (sorted(times)[len(times) // 2] / 1e3) / 1e9


def layer_times(ours, x, dtype, conv_rate, repeat):
    """Each convolution of the coarse network's plan timed inside the plan's
    own calls (x: the 6-channel input), against its floor: the larger of its
    FLOPs at the large convolution's rate and its bytes (input, residual,
    output, weights) at a copy's rate at that size. Returns per-layer rows,
    the plan's time and the time outside the convolutions (medians over the
    calls of each call's whole time and of its time outside them)."""
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        plan = _coarse.coarse_plan(ours, x)
    if plan is None:
        return None
    seen = {}
    call = _coarse._Conv.__call__

    def timed(layer, inp, residual=None):
        t0 = time.perf_counter()
        out = call(layer, inp, residual)
        dt = time.perf_counter() - t0
        entry = seen.setdefault(id(layer), {"layer": layer, "times": [], "shapes": None})
        entry["times"].append(dt)
        entry["shapes"] = (tuple(inp.shape), tuple(out.shape), residual is not None, out.element_size())
        return out

    whole, outside = [], []
    with torch.inference_mode():  # (the plan converts x to its dtype)
        plan(x)
        _coarse._Conv.__call__ = timed
        try:
            for i in range(repeat + 1):
                t0 = time.perf_counter()
                plan(x)
                dt = time.perf_counter() - t0
                if i == 0:  # (a warm-up with the timers in place)
                    seen.clear()
                    continue
                whole.append(dt)
                outside.append(dt - sum(e["times"][-1] for e in seen.values()))
        finally:
            _coarse._Conv.__call__ = call
    rows = []
    rates = {}  # working-set bytes -> copy_rate (layers of one shape share it)
    for entry in seen.values():
        layer, (shape_in, shape_out, residual, size) = entry["layer"], entry["shapes"]
        _, cin_g, kh, kw = layer.weight.size()
        groups = layer.args[3]
        kind = ("depthwise" if groups > 1 and groups == shape_in[1] else
                f"{kh}x{kw}" if groups == 1 else "grouped")
        pixels = shape_out[0] * shape_out[2] * shape_out[3]
        # (Useful FLOPs: without the zero output channels of pad_out.)
        flops = 2 * pixels * layer.out_channels * kh * kw * cin_g
        act = (math.prod(shape_in) + math.prod(shape_out) * (2 if residual else 1)) * size
        nbytes = act + torch.ops.mkldnn._nbytes(layer.weight)
        ms = sorted(entry["times"])[len(entry["times"]) // 2] * 1e3
        compute_ms = flops / (conv_rate * 1e9) * 1e3
        if act // 2 not in rates:
            rates[act // 2] = copy_rate(act // 2, max(5, repeat))
        memory_ms = nbytes / (rates[act // 2] * 1e9) * 1e3
        rows.append({"kind": kind, "in": shape_in, "out": shape_out, "ms": ms, "gflop": flops / 1e9,
                     "mb": nbytes / 2**20, "compute_floor_ms": compute_ms, "memory_floor_ms": memory_ms,
                     "floor_ms": max(compute_ms, memory_ms)})
    conv_ms = sum(r["ms"] for r in rows)
    return {"layers": rows, "plan_ms": sorted(whole)[len(whole) // 2] * 1e3,
            "outside_convolutions_ms": sorted(outside)[len(outside) // 2] * 1e3,
            "convolutions_ms": conv_ms, "large_conv_gflops_per_s": conv_rate,
            "convolutions_share_of_large_conv_rate": sum(r["gflop"] for r in rows) / (conv_ms / 1e3) / conv_rate}


def print_layers(out, label, result):
    """The per-kind summary of layer_times, and the layers furthest above
    their floor."""
    rows = []
    kinds = sorted({r["kind"] for r in result["layers"]})
    for kind in kinds:
        sel = [r for r in result["layers"] if r["kind"] == kind]
        ms, floor = sum(r["ms"] for r in sel), sum(r["floor_ms"] for r in sel)
        bound = sum(r["memory_floor_ms"] > r["compute_floor_ms"] for r in sel)
        rows.append([kind, str(len(sel)), f"{ms:.1f}", f"{floor:.1f}", f"{100 * floor / ms:.0f}%",
                     f"{sum(r['gflop'] for r in sel) / (ms / 1e3):.0f}", f"{bound}/{len(sel)}"])
    ms = sum(r["ms"] for r in result["layers"])
    floor = sum(r["floor_ms"] for r in result["layers"])
    rows.append(["all convolutions", str(len(result["layers"])), f"{ms:.1f}", f"{floor:.1f}",
                 f"{100 * floor / ms:.0f}%", f"{sum(r['gflop'] for r in result['layers']) / (ms / 1e3):.0f}", "-"])
    rows.append(["outside them", "-", f"{result['outside_convolutions_ms']:.1f}", "-", "-", "-", "-"])
    out.table(f"  {label}: the coarse network's plan ({result['plan_ms']:.1f} ms; its convolutions alone at "
              f"{100 * result['convolutions_share_of_large_conv_rate']:.0f}% of the large convolution's "
              f"{result['large_conv_gflops_per_s']:.0f} GFLOP/s) per kind of convolution against its floor (the "
              f"larger of its FLOPs at that rate and its bytes at a copy's rate)",
              ["kind", "layers", "ms", "floor ms", "floor/time", "GFLOP/s", "memory-bound"], rows)
    worst = sorted(result["layers"], key=lambda r: r["floor_ms"] - r["ms"])[:5]
    out.table(f"  {label}: the five layers furthest above their floor",
              ["kind", "in", "out", "ms", "floor ms", "GFLOP", "MB"],
              [[r["kind"], "x".join(map(str, r["in"][1:])), "x".join(map(str, r["out"][1:])), f"{r['ms']:.1f}",
                f"{r['floor_ms']:.1f}", f"{r['gflop']:.2f}", f"{r['mb']:.1f}"] for r in worst])


def stage_times(ours, src, bgr, autocast, repeat):
    """ms (median) of the stages of ours' forward, each timed alone: the
    downsampling of src and bgr, the coarse network, the refiner."""
    scale = ours.backbone_scale
    ctx = (lambda: torch.autocast("cpu", torch.bfloat16)) if autocast else (lambda: torch.autocast("cpu",
                                                                                                    enabled=False))
    with torch.inference_mode(), ctx():
        def down():
            return [F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False,
                                  recompute_scale_factor=True) for t in (src, bgr)]
        src_sm, bgr_sm = down()
        x = torch.cat([src_sm, bgr_sm], 1)
        pha, fgr, err, hid = ours._coarse(src_sm, bgr_sm)
        fns = {"downsample": down, "coarse network": lambda: ours._coarse_net(x),
               "refiner": lambda: ours.refiner.forward_matting(src, bgr, pha, fgr, err, hid)}
        out = {}
        for name, fn in fns.items():
            fn()
            t = call_times(fn, torch.device("cpu"), repeat)
            out[name] = sorted(t)[len(t) // 2]
    return out


def _vm_hwm_mb():
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not
    inherited from the process that started this one)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss_child(backbone, name, autocast):
    """In a child process: ours at the setting, 3 calls; prints the peak RSS
    (MB) before the calls and after them, and the MB the coarse network's
    plan holds (its packed weights; 0 without it)."""
    setting = SETTINGS[name]
    ours = pm.MattingRefine(backbone, setting["scale"], "sampling", setting["sample_pixels"], 0.1, 3,
                            False).eval()
    src = torch.rand(1, 3, setting["H"], setting["W"])
    bgr = torch.rand(1, 3, setting["H"], setting["W"])
    before = _vm_hwm_mb()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for _ in range(3):
            ours(src, bgr)
    cached = _coarse._PLANS.get(ours)
    packed = cached[1].nbytes() / 2**20 if cached is not None and cached[1] is not None else 0.0
    print(f"{before:.1f} {_vm_hwm_mb():.1f} {packed:.1f}")


def peak_rss(backbone, name, autocast, plan):
    """(MB before the calls, peak MB, packed MB) of peak_rss_child in a fresh process,
    with the coarse network's plan on or off (the modules, as before it)."""
    import subprocess

    env = dict(os.environ, **{_coarse.ENV_VAR: "1" if plan else "0"})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-memory", backbone, name,
                          str(int(autocast))], capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    before, peak, packed = map(float, out.stdout.split()[-3:])
    return before, peak, packed


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--child-memory":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        return peak_rss_child(sys.argv[2], sys.argv[3], bool(int(sys.argv[4])))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenetv2"],
                   choices=["resnet50", "resnet101", "mobilenetv2"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--repeat", type=int, default=9, help="timed calls per contender (default 9)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin blocks (default 3)")
    p.add_argument("--quick", action="store_true", help="3 timed calls in 1 round after 1 warm-up")
    p.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime rows")
    p.add_argument("--no-bf16", action="store_true", help="leave out the bfloat16 rows")
    p.add_argument("--out", default=None, metavar="DIR")
    args = p.parse_args()
    repeat, rounds, warmup = (3, 1, 1) if args.quick else (args.repeat, args.rounds, 2)
    device = torch.device("cpu")
    info = device_info(device)
    bf16 = not args.no_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    onnx = not args.no_onnx
    if onnx:
        try:
            import onnxruntime
            info["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            print("onnxruntime is not installed: no onnxruntime rows (`pip install onnxruntime onnx onnxscript`)")
            onnx = False
    info["native_bf16"] = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for backbone in args.backbones:
        out = Printer()
        contention = Contention()
        out(f"device: {info['device_name']} ({info['threads']} threads), torch {info['torch']}, "
            f"onnxruntime {info.get('onnxruntime', '-')}, native bfloat16: {info['native_bf16']}; "
            f"median of {repeat} in {rounds} round(s) after {warmup} warm-up")
        results = {}
        for name in args.settings:
            setting = SETTINGS[name]
            torch.manual_seed(0)
            up = upstream_model(backbone, setting)
            ours = pm.MattingRefine(backbone, setting["scale"], "sampling", setting["sample_pixels"], 0.1, 3,
                                    False).eval()
            ours.load_state_dict(up.state_dict())
            g = torch.Generator().manual_seed(0)
            src = torch.rand(1, 3, setting["H"], setting["W"], generator=g)
            bgr = torch.rand(1, 3, setting["H"], setting["W"], generator=g)
            fns = {"upstream eager": lambda m=up: m(src, bgr)}
            exports = {}
            if onnx:
                # (Exported, as upstream's export_onnx.py and our export do it, and
                # loaded into onnxruntime with torch's threads: not timed.)
                for label, row, which, model in (("upstream", "onnxruntime, upstream's ONNX", ORT_UPSTREAM, up),
                                                 ("ours", "onnxruntime, our ONNX", ORT_OURS, ours)):
                    t0 = time.perf_counter()
                    fns[row] = onnxruntime_call(which, model, src, bgr)
                    exports[label] = time.perf_counter() - t0
            fns["ours"] = lambda m=ours: m(src, bgr)
            if bf16:
                def autocast(model):
                    def call():
                        with torch.autocast("cpu", torch.bfloat16):
                            return model(src, bgr)
                    return call
                fns["upstream eager, bf16 autocast"] = autocast(up)
                fns["ours, bf16 autocast"] = autocast(ours)

            def run_all():
                with torch.inference_mode():
                    return timeit_rounds(fns, device, warmup, repeat, rounds)
            timing = run_all()
            ort_ms = timing.get("onnxruntime, upstream's ONNX", {}).get("median_ms")
            up_ms = timing["upstream eager"]["median_ms"]
            rows = []
            for label, t in timing.items():
                ms = t["median_ms"]
                rows.append([label, f"{ms:.1f}", f"{t['iqr_ms']:.1f}", f"{up_ms / ms:.2f}x",
                             f"{ort_ms / ms:.2f}x" if ort_ms else "-"])
            out.table(f"{backbone}, {name} ({setting['W']}x{setting['H']}, backbone_scale {setting['scale']}, "
                      f"{setting['sample_pixels']:,} px), ms per frame",
                      ["contender", "median", "IQR", "vs upstream eager", "vs onnxruntime (upstream's ONNX)"], rows)

            # Where our time goes, and the coarse network against its floor.
            Hc, Wc = int(setting["H"] * setting["scale"]), int(setting["W"] * setting["scale"])
            x_coarse = torch.rand(1, 6, Hc, Wc)
            flops = conv_flops(ours, x_coarse)
            breakdown = {}
            for dtype, autocast_on in [(torch.float32, False)] + ([(torch.bfloat16, True)] if bf16 else []):
                stages = stage_times(ours, src, bgr, autocast_on, max(3, repeat))
                rate = large_conv_rate(dtype, max(5, repeat))
                label = "fp32" if dtype == torch.float32 else "bf16 autocast"
                coarse_rate = flops / (stages["coarse network"] / 1e3) / 1e9
                breakdown[label] = {"stages_ms": stages, "coarse_gflop": flops / 1e9,
                                    "coarse_gflops_per_s": coarse_rate, "large_conv_gflops_per_s": rate,
                                    "coarse_share_of_large_conv_rate": coarse_rate / rate,
                                    "coarse_floor_ms": flops / (rate * 1e9) * 1e3}
                total = (timing["ours"] if not autocast_on else timing["ours, bf16 autocast"])["median_ms"]
                out(f"\nours, {label}: {total:.1f} ms per frame = downsample {stages['downsample']:.1f} + coarse "
                    f"network {stages['coarse network']:.1f} + refiner {stages['refiner']:.1f} + the rest "
                    f"{total - sum(stages.values()):.1f} (each stage timed alone)")
                out(f"  coarse network: {flops / 1e9:.1f} GFLOP at {coarse_rate:.0f} GFLOP/s = "
                    f"{100 * coarse_rate / rate:.0f}% of one large 3x3 convolution's {rate:.0f} GFLOP/s "
                    f"(floor {flops / (rate * 1e9) * 1e3:.0f} ms)")
                layers = layer_times(ours, x_coarse, dtype, rate, max(3, repeat))
                if layers is not None:
                    breakdown[label]["layers"] = layers
                    print_layers(out, label, layers)
            results[name] = {"setting": setting, "timing": timing, "breakdown": breakdown,
                             "onnx_export_and_load_seconds": exports}
            del up, ours
        line, share = contention.report()
        if line:
            out(line)
        info["other_processes_cpu_share"] = share
        # Peak memory (each in a fresh process, after the timings): the plan
        # against the modules.
        for name in args.settings:
            memory = {}
            for label, autocast_on in [("fp32", False)] + ([("bf16 autocast", True)] if bf16 else []):
                (b0, with_plan, packed), (b1, modules, _) = (peak_rss(backbone, name, autocast_on, True),
                                                             peak_rss(backbone, name, autocast_on, False))
                memory[label] = {"peak_rss_mb_plan": with_plan, "peak_rss_mb_modules": modules,
                                 "rss_mb_before_calls": [b0, b1], "plan_packed_weights_mb": packed}
                out(f"peak memory, {backbone} {name} {label}: {with_plan:.0f} MB with the plan, {modules:.0f} MB "
                    f"with the modules ({with_plan - modules:+.0f} MB, of which the plan's packed weights "
                    f"{packed:.0f} MB; {b0:.0f} MB before the first call), 3 calls in a fresh process")
            results[name]["peak_memory"] = memory
        path = write_results(f"cpu_model_{backbone}", {"info": info, "backbone": backbone, "results": results},
                             out.text(), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
