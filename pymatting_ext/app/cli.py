"""The ``pymatting-ext`` command (also ``python -m pymatting_ext``).

    pymatting-ext matte clip.mp4 background.png -o out/ --checkpoint pytorch_resnet50.pth
    pymatting-ext speed --backbone resnet50 --resolution 1920 1080 --plot speed.png
    pymatting-ext export --format onnx --checkpoint pytorch_resnet50.pth --output model.onnx
    pymatting-ext demo

Run ``pymatting-ext <command> --help`` for the options. The model options
take upstream's names and defaults (``--model-backbone`` etc. are accepted
as aliases). Bad input (a missing or unreadable file, a checkpoint that does
not fit the backbone, sizes that differ, an unknown codec, a GPU that is not
there) ends with one line on stderr and exit status 2, no traceback; an
interrupted ``matte`` closes its outputs with the frames done so far and
exits with status 130.
"""
import argparse
import json
import os
import sys
import time
from typing import List, Optional

from .common import UPSTREAM_DEFAULTS, UserError

PROG = "pymatting-ext"


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (and where to look for help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_options(p: argparse.ArgumentParser, *, refine_defaults: Optional[dict] = None,
                       precision_default: str = "fp32") -> None:
    from ..models import BACKBONES

    d = dict(UPSTREAM_DEFAULTS, **(refine_defaults or {}))
    g = p.add_argument_group("model (upstream's names and defaults)")
    g.add_argument("--model-type", choices=["mattingrefine", "mattingbase"], default="mattingrefine")
    g.add_argument("--checkpoint", "--model-checkpoint", metavar="PATH", default=None,
                   help="a state dict: upstream's official pytorch_*.pth or one saved from our models; "
                        "without it the model has random weights (timing and pipeline only)")
    g.add_argument("--backbone", "--model-backbone", choices=BACKBONES, default=None,
                   help="default: the checkpoint's (read from its keys), else resnet50")
    g.add_argument("--backbone-scale", "--model-backbone-scale", type=float, default=d["backbone_scale"],
                   metavar="S", help=f"coarse network's downsampling (default {d['backbone_scale']})")
    g.add_argument("--refine-mode", "--model-refine-mode", choices=["full", "sampling", "thresholding"],
                   default=d["refine_mode"], help=f"default {d['refine_mode']}")
    g.add_argument("--refine-sample-pixels", "--model-refine-sample-pixels", type=int, metavar="N",
                   default=d["refine_sample_pixels"], help=f"default {d['refine_sample_pixels']}")
    g.add_argument("--refine-threshold", "--model-refine-threshold", type=float, metavar="T",
                   default=d["refine_threshold"], help=f"default {d['refine_threshold']}")
    g.add_argument("--refine-kernel-size", "--model-refine-kernel-size", type=int, choices=[1, 3],
                   default=d["refine_kernel_size"], help=f"default {d['refine_kernel_size']}")
    g = p.add_argument_group("where and how it runs")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda where there is a GPU, else cpu)")
    # NB: upstream's scripts spell them float32 and float16.
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=precision_default,
                   type=lambda v: {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(v, v),
                   help=f"fp32 (float32), fp16 (float16) or bf16 (bfloat16); default {precision_default}")
    g.add_argument("--backend", choices=["auto", "cpu", "cuda", "triton", "reference"], default="auto",
                   help="the refiner's kernels (default auto: see the README)")


def _model_kwargs(args, prevent_oversampling: bool = True) -> dict:
    return dict(model_type=args.model_type, backbone=args.backbone, backbone_scale=args.backbone_scale,
                refine_mode=args.refine_mode, refine_sample_pixels=args.refine_sample_pixels,
                refine_threshold=args.refine_threshold, refine_kernel_size=args.refine_kernel_size,
                refine_prevent_oversampling=prevent_oversampling, checkpoint=args.checkpoint)


def _build(args, prevent_oversampling: bool = True):
    from .common import build_model

    model, info = build_model(**_model_kwargs(args, prevent_oversampling), backend=args.backend)
    if args.checkpoint is None:
        _note(f"no --checkpoint: the {info['backbone']} model has random weights, so its mattes are "
              f"meaningless (timing and pipeline only)")
    return model, info


def _note(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _resolution(values: List[str]):
    w, h = values
    return int(w), int(h)


# -- matte -------------------------------------------------------------------------

def _add_matte(sub) -> None:
    from .pipeline import OUTPUTS

    p = sub.add_parser("matte", help="matte a video, an image or a folder of images",
                       description="Mattes SOURCE (a video, an image or a folder of images) against BACKGROUND "
                                   "(an image, or a video/folder in step with the source) and writes the chosen "
                                   "outputs into --output-dir: <name>.mp4 (video) or <name>/00000.png ... (png).")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("background", metavar="BACKGROUND")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR")
    p.add_argument("--outputs", "--output-types", nargs="+", choices=OUTPUTS, default=["com", "pha", "fgr"],
                   metavar="NAME", help="any of com pha fgr err ref (default: com pha fgr)")
    p.add_argument("--output-format", choices=["video", "png", "image_sequences"], default=None,
                   help="default: video for a video source, png otherwise")
    p.add_argument("--target-bgr", "--video-target-bgr", default=None, metavar="COLOR|FILE",
                   help="what com composites over: 'R,G,B', '#rrggbb', or an image/video (default upstream's "
                        "green 120,255,155; RGBA when writing png)")
    g = p.add_argument_group("video encoding")
    g.add_argument("--codec", default="libx264", help="FFmpeg encoder (default libx264)")
    g.add_argument("--crf", type=int, default=None, help="libx264/libx265 quality (default 18)")
    g.add_argument("--preset", default="ultrafast",
                   help="libx264/libx265 preset (default ultrafast: the encodes take the least CPU from the model; "
                        "superfast, veryfast, medium ... make smaller files)")
    g.add_argument("--video-mbps", type=float, default=None, help="bit rate instead of --crf (Mbit/s)")
    g.add_argument("--fps", type=float, default=None, help="output frame rate (default: the source's, else 30)")
    p.add_argument("--video-resize", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="resize the source, background and target background to W x H first (as upstream)")
    p.add_argument("--preprocess-alignment", action="store_true",
                   help="align the background to each source frame by a homography of matched features (as "
                        "upstream; for hand-held shots; needs OpenCV: pip install 'pymatting_ext[cli]')")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, run the model as one CUDA graph per batch (sampling and full modes)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--overwrite", "-y", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the run's summary as JSON")
    _add_model_options(p)
    p.set_defaults(run=_run_matte)


def _run_matte(args) -> int:
    from .pipeline import ConversionInterrupted, convert_video
    from .sinks import check_codec
    from .sources import open_frames
    from .common import pick_device

    # The cheap checks first, before a model is built (convert_video makes
    # them again).
    pick_device(args.device)
    size = tuple(args.video_resize) if args.video_resize else None
    if size and min(size) < 4:
        raise UserError(f"--video-resize {size[0]} {size[1]}: width and height must be at least 4")
    if args.preprocess_alignment:
        from .common import require
        require("cv2", "--preprocess-alignment")
    src = open_frames(args.source, "source", size=size)
    src.close()
    bgr = open_frames(args.background, "background", size=size)
    bgr.close()
    if (src.width, src.height) != (bgr.width, bgr.height):
        raise UserError(f"the source is {src.size_text()} but the background {args.background!r} is "
                        f"{bgr.size_text()}; they must be the same size")
    fmt = "png" if args.output_format == "image_sequences" else args.output_format
    if (fmt or ("video" if src.kind == "video" else "png")) == "video":
        check_codec(args.codec)
    model, _ = _build(args)
    try:
        result = convert_video(model, args.source, args.background, args.output_dir, outputs=args.outputs,
                               output_format=fmt, target_background=args.target_bgr, device=args.device or "auto",
                               precision=args.precision, batch_size=args.batch_size, codec=args.codec,
                               crf=args.crf, preset=args.preset, video_mbps=args.video_mbps, fps=args.fps,
                               max_frames=args.max_frames, overwrite=args.overwrite,
                               progress=not args.no_progress, cuda_graph=args.cuda_graph, video_resize=size,
                               preprocess_alignment=args.preprocess_alignment)
    except ConversionInterrupted as stop:
        r = stop.result
        _note(f"interrupted: {r['frames']} frames written, every output closed and complete up to there: "
              + ", ".join(r["outputs"].values()))
        return 130
    ratio = result["seconds"] / max(result["model_seconds"], 1e-9)
    print(f"matted {result['frames']} frames of {result['width']}x{result['height']} in {result['seconds']:.1f} s "
          f"({result['fps']:.2f} frames/s) on {result['device']} ({result['dtype']}); the model's own time "
          f"{result['model_seconds']:.1f} s (wall / model {ratio:.2f})")
    print("wrote " + ", ".join(result["outputs"].values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


# -- speed -------------------------------------------------------------------------

def _add_speed(sub) -> None:
    p = sub.add_parser("speed", help="time the whole model: upstream beside our backends",
                       description="Times the whole model on random inputs (as upstream's "
                                   "inference_speed_test.py: refine_prevent_oversampling off), upstream's model "
                                   "(when installed) beside each of our backends with the same weights, eager and "
                                   "replayed from a CUDA graph (on a GPU); prints the median time per frame.")
    p.add_argument("--resolution", nargs="+", action="append", metavar="W H [SCALE [PIXELS]]", default=None,
                   help="repeatable; optionally with its own backbone scale and refine sample pixels, e.g. "
                        "--resolution 1920 1080 --resolution 3840 2160 0.125 320000 (default 1920 1080)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="any of upstream auto cpu cuda triton reference, and on the CPU onnxruntime-upstream "
                        "(upstream's model exported as its export_onnx.py does, run by onnxruntime) and "
                        "onnxruntime-ours (our ONNX export) (default: upstream and every compiled backend that "
                        "runs on the device)")
    p.add_argument("--modes", nargs="+", choices=["eager", "cuda-graph"], default=None,
                   help="default: eager, and cuda-graph on a GPU")
    p.add_argument("--iterations", type=int, default=None, help="timed calls (default 10 on the CPU, 100 on a GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 / 10)")
    p.add_argument("--refine-prevent-oversampling", action="store_true",
                   help="upstream's speed test turns it off (the default here too)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="plot time per frame by backend and resolution")
    _add_model_options(p)
    p.set_defaults(run=_run_speed)


def _run_speed(args) -> int:
    from . import speed
    from .common import pick_device

    pick_device(args.device)
    if args.plot:
        from .common import require
        require("matplotlib", "--plot")
    resolutions = []
    for values in args.resolution or [["1920", "1080"]]:
        if len(values) not in (2, 3, 4):
            raise UserError(f"--resolution takes W H [SCALE [PIXELS]], got {' '.join(values)}")
        try:
            resolutions.append((int(values[0]), int(values[1]),
                                float(values[2]) if len(values) > 2 else None,
                                int(values[3]) if len(values) > 3 else None))
        except ValueError:
            raise UserError(f"--resolution {' '.join(values)}: W and H (and PIXELS) must be integers, "
                            f"SCALE a number") from None
    if args.checkpoint is None:
        _note("no --checkpoint: random weights (the timing is the same; thresholding mode's work depends on them)")
    kwargs = _model_kwargs(args, prevent_oversampling=args.refine_prevent_oversampling)
    kwargs["backbone"] = kwargs["backbone"] or None
    report = speed.run_speed(**kwargs, resolutions=resolutions, precision=args.precision, device=args.device,
                             backends=args.backends, modes=args.modes, batch_size=args.batch_size,
                             iterations=args.iterations, warmup=args.warmup,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    print(speed.format_table(report))
    if args.json:
        speed.save_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        speed.plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


# -- export ------------------------------------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser("export", help="TorchScript, AOTInductor (.pt2) or ONNX",
                       description="Exports the model: torchscript (torch.jit.script; loads with the extension), "
                                   "aoti (torch.export + AOTInductor package with our custom ops, runs from C++), "
                                   "onnx (the refiner in standard ONNX operators, every refine mode). "
                                   "Checks the export against the eager model unless --no-validate.")
    p.add_argument("--format", choices=["torchscript", "aoti", "onnx"], required=True)
    p.add_argument("--output", "-o", required=True, metavar="FILE")
    p.add_argument("--resolution", nargs=2, metavar=("W", "H"), default=["1920", "1080"],
                   help="the example input's size (default 1920 1080, as upstream's exporter)")
    p.add_argument("--batch-size", type=int, default=2, help="the example input's batch (default 2)")
    p.add_argument("--opset", "--onnx-opset-version", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--dynamic", dest="dynamic", action="store_true", default=None,
                   help="dynamic batch, height and width (default for onnx; aoti compiles for the example's "
                        "shape otherwise)")
    p.add_argument("--no-dynamic", dest="dynamic", action="store_false")
    p.add_argument("--no-validate", action="store_true", help="skip running the export against the eager model")
    p.add_argument("--verbose", action="store_true")
    _add_model_options(p, refine_defaults={"refine_threshold": 0.1})
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from . import export
    from .common import dtype_of, pick_device

    w, h = _resolution(args.resolution)
    if w % 4 or h % 4 or w < 32 or h < 32:
        raise UserError(f"--resolution {w} {h}: width and height must be multiples of 4, at least 32")
    if args.format == "onnx":
        from .common import require
        require("onnx", "--format onnx")
        require("onnxscript", "--format onnx")
        if not args.no_validate:
            require("onnxruntime", "checking the ONNX export (--no-validate skips it)")
    device = pick_device(args.device or "cpu")
    model, _ = _build(args)
    model = model.to(device=device, dtype=dtype_of(args.precision))
    example = export.example_inputs(model, w, h, args.batch_size)
    dynamic = args.dynamic if args.dynamic is not None else args.format == "onnx"
    started = time.perf_counter()
    if args.format == "torchscript":
        if dynamic is False and args.dynamic is not None:
            _note("--no-dynamic has no effect on TorchScript (a scripted model takes any size)")
        result = export.export_torchscript(model, args.output, example=example, validate=not args.no_validate)
    elif args.format == "aoti":
        _note("compiling with AOTInductor (minutes on a CPU)")
        result = export.export_aoti(model, args.output, example=example, dynamic=dynamic,
                                    validate=not args.no_validate)
    else:
        result = export.export_onnx(model, args.output, example=example, opset=args.opset, dynamic=dynamic,
                                    validate=not args.no_validate, verbose=args.verbose)
    print(f"wrote {args.output} ({args.format}, {time.perf_counter() - started:.0f} s)")
    for shape, diffs in (result.get("max_abs_diff") or {}).items():
        worst = max(diffs.values()) if diffs else 0.0
        print(f"checked at {shape}: max |difference| from the eager model {worst:.3g} ("
              + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()) + ")")
    if args.format == "aoti":
        print("load it with torch._inductor.aoti_load_package in Python (after `import pymatting_ext`), or in C++ "
              "with torch::inductor::AOTIModelPackageLoader after dlopen of pymatting_ext.library_path() "
              "(see tests/cpp/run_aoti.cpp)")
    return 0


# -- demo ----------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on built-in synthetic inputs",
                       description="Writes a synthetic clip (a figure walking over a textured background) and its "
                                   "background, mattes it (decode -> model -> encode, with the progress bar), then "
                                   "times the whole model at the clip's size (upstream beside our backends). "
                                   "Random weights: it shows the pipeline and the speed, not matting quality.")
    p.add_argument("-o", "--output-dir", default="pymatting-ext-demo", metavar="DIR",
                   help="default ./pymatting-ext-demo")
    p.add_argument("--resolution", nargs=2, metavar=("W", "H"), default=["640", "360"])
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--backbone", choices=["resnet50", "resnet101", "mobilenetv2"], default="mobilenetv2")
    p.add_argument("--device", default=None)
    p.add_argument("--iterations", type=int, default=None, help="timed calls of the speed table")
    p.add_argument("--no-speed", action="store_true", help="skip the speed table")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from . import speed
    from .common import build_model, pick_device
    from .pipeline import convert_video
    from .synthetic import make_synthetic_inputs

    device = pick_device(args.device)
    w, h = _resolution(args.resolution)
    if w < 32 or h < 32 or args.frames < 1:
        raise UserError("--resolution must be at least 32 32 and --frames positive")
    inputs = os.path.join(args.output_dir, "inputs")
    print(f"writing a synthetic {w}x{h} clip of {args.frames} frames and its background into {inputs}/")
    source, background = make_synthetic_inputs(inputs, w, h, args.frames)
    model, _ = build_model(backbone=args.backbone)
    _note(f"random {args.backbone} weights: the pipeline and its speed, not matting quality")
    result = convert_video(model, source, background, args.output_dir, outputs=("com", "pha", "fgr"),
                           device=str(device), overwrite=True)
    print(f"matted {result['frames']} frames in {result['seconds']:.1f} s ({result['fps']:.2f} frames/s, the model "
          f"{result['model_seconds']:.1f} s of it); wrote " + ", ".join(result["outputs"].values()))
    if args.no_speed:
        return 0
    # The model at the clip's size rounded up to a multiple of 4.
    W4, H4 = -(-w // 4) * 4, -(-h // 4) * 4
    report = speed.run_speed(backbone=args.backbone, resolutions=[(W4, H4)], device=str(device),
                             iterations=args.iterations, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(speed.format_table(report))
    speed.save_json(report, os.path.join(args.output_dir, "speed.json"))
    try:
        speed.plot(report, os.path.join(args.output_dir, "speed.png"))
        print(f"wrote {os.path.join(args.output_dir, 'speed.json')} and speed.png")
    except UserError as exc:  # matplotlib missing: the table is enough
        _note(str(exc))
    return 0


# -- main ----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Background matting (BackgroundMattingV2) with pymatting_ext's kernels.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_matte(sub)
    _add_speed(sub)
    _add_export(sub)
    _add_demo(sub)
    return p


def _version() -> str:
    from .. import __version__
    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        return args.run(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
