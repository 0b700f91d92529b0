"""The end-to-end check of `pymatting-ext matte` (issue 11): a generated
10-second 1080p clip and its background image matted into com, pha and fgr
videos, with the progress bar; the wall time of the whole run against the
model's own compute time for the same frames.

    python benchmarks/bench_matte.py [--seconds 10] [--fps 30] [--size 1920 1080]
                                     [--backbone resnet50] [--device cpu] [--out DIR]
                                     [--preprocess-alignment]

1. Writes the clip (a figure walking over a textured background, libx264)
   and the background (PNG) into a temporary folder (not timed).
2. Runs convert_video on them (what `pymatting-ext matte clip.mp4
   background.png -o DIR` runs): decode, model, encode, overlapped; wall time.
3. The model alone on the same frames, one at a time, each decoded and
   converted before its timer starts: the sum is the compute time.
Prints both and their ratio (the target: wall within 1.3x of compute on the
CPU, with --preprocess-alignment too: the background aligned to every frame in
the reader thread, beside the model), and writes
matte_<backbone>_<W>x<H>[_aligned].json into results/<device>/ (or --out).
Other processes' CPU use during the run is reported: on a shared machine the
ratio means little.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import Contention, device_info, results_folder  # noqa: E402

import pymatting_ext  # noqa: E402
from pymatting_ext.app.common import build_model, pick_device  # noqa: E402
from pymatting_ext.app.sources import load_still, open_frames  # noqa: E402
from pymatting_ext.app.synthetic import make_synthetic_inputs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--size", nargs=2, type=int, default=[1920, 1080], metavar=("W", "H"))
    p.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet101", "mobilenetv2"])
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--outputs", nargs="+", default=["com", "pha", "fgr"])
    p.add_argument("--preset", default=None, help="libx264 preset (default: convert_video's)")
    p.add_argument("--preprocess-alignment", action="store_true",
                   help="align the background to every frame (as pymatting-ext matte --preprocess-alignment)")
    p.add_argument("--work", default=None, help="folder for the clip and the outputs (default: a temporary one)")
    p.add_argument("--out", default=None, help="folder for the JSON (default results/<device>/)")
    args = p.parse_args()
    device = pick_device(args.device)
    W, H = args.size
    frames = int(round(args.seconds * args.fps))

    work = args.work or tempfile.mkdtemp(prefix="bench_matte_")
    t0 = time.perf_counter()
    source, background = make_synthetic_inputs(os.path.join(work, "inputs"), W, H, frames, args.fps)
    print(f"wrote a {W}x{H} clip of {frames} frames ({args.seconds:g} s at {args.fps} fps) and its background "
          f"in {time.perf_counter() - t0:.0f} s: {source}")
    model, _ = build_model(backbone=args.backbone)

    contention = Contention()
    result = pymatting_ext.convert_video(model, source, background, os.path.join(work, "out"),
                                         outputs=args.outputs, device=str(device), precision=args.precision,
                                         overwrite=True, preprocess_alignment=args.preprocess_alignment,
                                         **({"preset": args.preset} if args.preset else {}))
    pipeline_contention = contention.report()

    # The model alone on the same frames: decoding and conversion untimed.
    dtype = next(model.parameters()).dtype
    bgr = load_still(open_frames(background, "background"), device, dtype)
    src_frames = open_frames(source)
    compute = 0.0
    contention = Contention()
    with torch.inference_mode():
        for i, frame in enumerate(src_frames):
            x = torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].to(dtype).div_(255).contiguous()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x, bgr)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compute += time.perf_counter() - start
    src_frames.close()
    model_contention = contention.report()

    ratio = result["seconds"] / compute
    print(f"matte: {result['frames']} frames in {result['seconds']:.1f} s wall ({result['fps']:.2f} frames/s); "
          f"the model inside it {result['model_seconds']:.1f} s")
    print(f"the model alone on the same frames: {compute:.1f} s ({frames / compute:.2f} frames/s)")
    print(f"wall / compute = {ratio:.3f} (target <= 1.3)")
    for what, (line, _) in (("matte", pipeline_contention), ("the model alone", model_contention)):
        if line:
            print(f"{what}: {line}")
    info = device_info(device)
    folder = results_folder(info, args.out)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"matte_{args.backbone}_{W}x{H}{'_aligned' if args.preprocess_alignment else ''}.json")
    with open(path, "w") as f:
        json.dump({"info": info, "settings": vars(args), "frames": frames, "pipeline": result,
                   "model_alone_seconds": compute, "wall_over_compute": ratio,
                   "other_processes_cpu_share": {"pipeline": pipeline_contention[1],
                                                 "model_alone": model_contention[1]}}, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
