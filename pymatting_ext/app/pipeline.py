"""Matting videos and images in one call: decode, matte, encode, overlapped.

    import torch
    import pymatting_ext as pm

    model = pm.MattingRefine("resnet50").eval()
    model.load_state_dict(torch.load("pytorch_resnet50.pth"))
    pm.convert_video(model, "clip.mp4", "background.png", "out/",
                     outputs=("com", "pha", "fgr"))

Sources: a video file (anything FFmpeg decodes, through PyAV), an image, or a
folder of images (sorted by name). Backgrounds: an image, or a video/folder
read in step with the source (its last frame repeats if it is shorter).
Outputs, as videos (PyAV) or PNG sequences:

- ``com``: the foreground composited over ``target_background`` (a colour,
  default upstream's green (120, 255, 155), or an image/video); as PNG with
  no target background, RGBA (fgr where pha > 0, alpha = pha) as upstream.
- ``pha``: alpha; ``fgr``: foreground; ``err``: the predicted error,
  upsampled bilinearly to full size; ``ref``: the 4x4 cells the refiner
  refined (MattingRefine only), upsampled nearest.

Values are written as round(255 * x). Frames whose height or width is not a
multiple of 4 are padded (edge pixels repeated) before the model and the
outputs cropped back.

The pipeline: a reader thread decodes (and on CUDA pins) batches of frames;
the main thread copies them to the device (on a side CUDA stream, so the copy
of the next batch overlaps the model on the current one) and runs the model;
one writer thread per output encodes. On a GPU the main thread also converts
every output to 8 bits on the device and copies it back (non-blocking, into
pinned memory), and the writer waits for its copy; on a CPU each writer
converts its own output (numpy, one thread) while the model works on the next
frame, and FFmpeg runs one thread per stream (the model has the cores).
Planar RGB goes to the encoder as it is (FFmpeg's gbrp), without an
interleaving pass. Queues between the stages are bounded, so memory stays
flat. An interrupted run (Ctrl-C) stops reading, lets the writers finish the
frames already computed and closes every file properly: the outputs hold
complete frames up to there.

Needs the ``cli`` extra: ``pip install 'pymatting_ext[cli]'`` (PyAV, tqdm,
Pillow).
"""
import os
import re
import time
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .common import UserError, dtype_of, pick_device, require
from .sinks import END, PngWriter, VideoWriter, WriterThread, check_codec, prepare_outputs, raise_writer_error, to_u8
from .sources import FrameReader, Frames, load_still

__all__ = ["convert_video", "ConversionInterrupted", "OUTPUTS", "DEFAULT_TARGET", "parse_color"]

#: Output names, in the order they are written.
OUTPUTS = ("com", "pha", "fgr", "err", "ref")

#: Upstream's composite colour (inference_video.py).
DEFAULT_TARGET = (120, 255, 155)


class ConversionInterrupted(KeyboardInterrupt):
    """Raised by convert_video when interrupted (Ctrl-C), after every output
    file was closed with the frames computed so far. ``result`` is
    convert_video's summary of those frames."""

    def __init__(self, result: dict):
        super().__init__(f"interrupted after {result['frames']} frames")
        self.result = result


def parse_color(text: str) -> Optional[Tuple[int, int, int]]:
    """'R,G,B' (0-255), '#rrggbb' or a few names as an RGB triple; None if
    text is none of these (then it is a file)."""
    names = {"green": DEFAULT_TARGET, "white": (255, 255, 255), "black": (0, 0, 0), "blue": (0, 0, 255),
             "red": (255, 0, 0)}
    if text.lower() in names:
        return names[text.lower()]
    match = re.fullmatch(r"#?([0-9a-fA-F]{6})", text)
    if match and (text.startswith("#") or not os.path.exists(text)):
        h = match.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match:
        rgb = tuple(int(v) for v in match.groups())
        if any(v > 255 for v in rgb):
            raise UserError(f"colour {text!r} has a component above 255")
        return rgb
    return None


def _is_refine(model: torch.nn.Module) -> bool:
    return hasattr(model, "refiner")


def _prepare(model: torch.nn.Module, size: Tuple[int, ...], dtype: torch.dtype, bar) -> None:
    """The model's one-off set-up before the first frame (on the CPU, its
    coarse network's oneDNN plan: BatchNorm folded, weights packed), shown
    in the progress bar rather than hidden in the first frame's time."""
    from .._coarse import prepare

    if bar is not None:
        bar.set_postfix_str("preparing the model", refresh=True)
    prepare(model, size, dtype)
    if bar is not None:
        bar.set_postfix_str("", refresh=True)


def convert_video(model: torch.nn.Module, source: str, background: str, output_dir: str, *,
                  outputs: Sequence[str] = ("com", "pha", "fgr"), output_format: Optional[str] = None,
                  target_background: Union[None, str, Tuple[int, int, int]] = None,
                  device: Union[None, str, torch.device] = None, precision: Optional[str] = None,
                  batch_size: int = 1, codec: str = "libx264", crf: Optional[int] = None,
                  preset: Optional[str] = "ultrafast", video_mbps: Optional[float] = None,
                  fps: Optional[float] = None, max_frames: Optional[int] = None, overwrite: bool = False,
                  progress: bool = True, cuda_graph: bool = False, video_resize: Optional[Tuple[int, int]] = None,
                  preprocess_alignment: bool = False) -> dict:
    """Mattes every frame of `source` against `background` with `model` and
    writes the chosen outputs into `output_dir`.

    Args:
        model: a MattingRefine or MattingBase (pymatting_ext's or upstream's).
            Moved to `device`/`precision` when these are given (as
            ``model.to``), and put in eval mode.
        source: a video file, an image, or a folder of images.
        background: an image, or a video/folder read in step with the source.
        output_dir: created if missing; holds ``<output>.mp4`` (video) or
            ``<output>/00000.png ...`` (png) for each output.
        outputs: any of 'com', 'pha', 'fgr', 'err', 'ref' (see the module).
        output_format: 'video' or 'png'; default: video for a video source,
            png otherwise.
        target_background: what 'com' composites over: an (R, G, B) colour
            (0-255), a colour string ('#rrggbb', 'R,G,B'), or an image/video
            path; default upstream's green (and RGBA for png output).
        device: 'cpu', 'cuda', 'cuda:1', ...; default the model's device.
        precision: 'fp32', 'fp16' or 'bf16'; default the model's dtype.
        batch_size: frames per model call.
        codec, crf, preset, video_mbps: the encoder (FFmpeg's name), with the
            constant rate factor and preset of libx264/libx265 (default crf 18,
            preset 'ultrafast'), or a bit rate in Mbit/s for the others
            (default 16).
        fps: frame rate of the output videos; default the source's (30 for
            images).
        max_frames: stop after this many frames.
        overwrite: replace existing outputs instead of raising.
        progress: show a progress bar (tqdm) with frames/s.
        cuda_graph: on a GPU, run the model as a CUDA graph
            (pymatting_ext.cuda_graph; sampling and full modes), one launch
            per batch instead of hundreds.
        video_resize: (W, H): the source, background and target background
            resized to it first (upstream's --video-resize); the outputs
            have that size.
        preprocess_alignment: align the background to each source frame by
            a homography (upstream's --preprocess-alignment, for hand-held
            shots; see align.py); needs OpenCV.

    Returns a summary: frames, seconds (wall), model_seconds (the model's
    own time, measured with CUDA events on a GPU), fps, the output paths and
    the settings used.

    Raises UserError (a ValueError) for missing or unreadable files, sizes
    that do not match, unknown codecs or settings; ConversionInterrupted
    (a KeyboardInterrupt) after closing every file when interrupted.
    """
    outputs = list(dict.fromkeys(outputs))
    if not outputs:
        raise UserError("no outputs chosen (any of com, pha, fgr, err, ref)")
    for name in outputs:
        if name not in OUTPUTS:
            raise UserError(f"unknown output {name!r}; choose from {', '.join(OUTPUTS)}")
    if "ref" in outputs and not _is_refine(model):
        raise UserError("output 'ref' needs a MattingRefine model (MattingBase does not refine)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_frames is not None and max_frames < 1:
        raise UserError(f"max frames must be positive, got {max_frames!r}")
    if video_resize is not None:
        if (len(video_resize) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in video_resize)
                or min(video_resize) < 4):
            raise UserError(f"video resize must be a width and a height of at least 4, got {video_resize!r}")
        video_resize = (int(video_resize[0]), int(video_resize[1]))
    param = next(model.parameters(), None)
    dev = pick_device(str(device)) if device is not None else (param.device if param is not None else
                                                               torch.device("cpu"))
    dtype = dtype_of(precision) if precision is not None else (param.dtype if param is not None else
                                                               torch.float32)
    model = model.to(device=dev, dtype=dtype).eval()
    cuda = dev.type == "cuda"
    if cuda_graph and not cuda:
        raise UserError("CUDA graphs need a CUDA device (--device cuda)")

    # NB: on a CPU the model takes every core and FFmpeg's own thread pools
    # would only preempt its threads: one thread per stream keeps up there.
    io_threads = None if cuda else 1
    aligner = None
    if preprocess_alignment:  # OpenCV threads as FFmpeg's (see align.py)
        from .align import BackgroundAligner
        aligner = BackgroundAligner(threads=io_threads)
    src = Frames(source, "source", io_threads, video_resize)
    opened = [src]
    try:
        return _convert(model, src, background, output_dir, opened, outputs=outputs,
                        output_format=output_format, target_background=target_background, dev=dev, dtype=dtype,
                        cuda=cuda, batch_size=batch_size, codec=codec, crf=crf, preset=preset,
                        video_mbps=video_mbps, fps=fps, max_frames=max_frames, overwrite=overwrite,
                        progress=progress, use_graph=cuda_graph, io_threads=io_threads, video_resize=video_resize,
                        aligner=aligner)
    finally:
        for frames in opened:
            frames.close()


def _convert(model, src: Frames, background, output_dir, opened, *, outputs, output_format, target_background,
             dev, dtype, cuda, batch_size, codec, crf, preset, video_mbps, fps, max_frames, overwrite,
             progress, use_graph, io_threads, video_resize, aligner) -> dict:
    if output_format is None:
        output_format = "video" if src.kind == "video" else "png"
    if output_format not in ("video", "png"):
        raise UserError(f"output format must be 'video' or 'png', got {output_format!r}")
    if output_format == "video":
        check_codec(codec)
    H, W = src.height, src.width

    bgr = Frames(background, "background", io_threads, video_resize)
    opened.append(bgr)
    if (bgr.height, bgr.width) != (H, W):
        raise UserError(f"the source is {src.size_text()} but the background {background!r} is "
                        f"{bgr.size_text()}; they must be the same size")
    streamed = {"src": src}
    still = {}
    if bgr.kind == "image" and aligner is None:
        still["bgr"] = load_still(bgr, dev, dtype)
    else:  # a video, or a still aligned anew to every frame (by the reader)
        streamed["bgr"] = bgr

    # What 'com' composites over: a colour, an image or a video; RGBA for png
    # output when nothing was chosen.
    rgba = output_format == "png" and target_background is None
    color = None
    if "com" in outputs and not rgba:
        target = DEFAULT_TARGET if target_background is None else target_background
        if isinstance(target, str):
            parsed = parse_color(target)
            target = parsed if parsed is not None else target
        if isinstance(target, str):
            tgt = Frames(target, "target background", io_threads, video_resize)
            opened.append(tgt)
            if (tgt.height, tgt.width) != (H, W):
                raise UserError(f"the source is {src.size_text()} but the target background {target!r} is "
                                f"{tgt.size_text()}; they must be the same size")
            if tgt.kind == "image":
                still["tgt"] = load_still(tgt, dev, torch.float32)
            else:
                streamed["tgt"] = tgt
        else:
            if len(target) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in target):
                raise UserError(f"target background colour must be three integers in 0..255, got {target!r}")
            color = torch.tensor(target, dtype=torch.float32, device=dev).div_(255).view(1, 3, 1, 1)

    rate = Fraction(fps).limit_denominator(1001) if fps else (src.fps or Fraction(30))
    tqdm = require("tqdm", "the progress bar").tqdm if progress else None
    paths = prepare_outputs(output_dir, outputs, output_format, codec, overwrite)
    writers: Dict[str, WriterThread] = {}
    try:
        for name in outputs:
            if output_format == "video":
                writer = VideoWriter(paths[name], W, H, rate, codec, crf, preset, video_mbps, io_threads)
            else:
                writer = PngWriter(paths[name])
            writers[name] = WriterThread(name, writer)
    except BaseException:
        for thread in writers.values():
            thread.writer.close()
        raise
    for thread in writers.values():
        thread.start()

    total = src.count if max_frames is None else min(max_frames, src.count or max_frames)
    bar = tqdm(total=total, unit="frame", desc="matte", dynamic_ncols=True, smoothing=0.1) if tqdm else None
    reader = FrameReader(streamed, batch_size, max_frames, pin=cuda, align=aligner)
    reader.start()

    pad_h, pad_w = (-H) % 4, (-W) % 4
    _prepare(model, (batch_size, 3, H + pad_h, W + pad_w), dtype, bar)
    refine = _is_refine(model)
    copy_stream = torch.cuda.Stream(dev) if cuda else None
    model_events: List[Tuple] = []
    model_seconds = 0.0
    frames_done = 0
    interrupted = False
    started = time.perf_counter()

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x

    def to_model(t: torch.Tensor) -> torch.Tensor:
        # NB: transposed while still 8-bit (a quarter of the bytes).
        return t.permute(0, 3, 1, 2).contiguous().to(dtype).div_(255)

    still_bgr: Dict[int, torch.Tensor] = {}
    graphs: Dict[Tuple[int, ...], object] = {}

    def run_model(src_p: torch.Tensor, bgr_p: torch.Tensor):
        if not use_graph:
            return model(src_p, bgr_p)
        from ..graphs import cuda_graph

        graphed = graphs.get(tuple(src_p.shape))
        if graphed is None:  # one graph per batch shape (the last batch may be smaller)
            try:
                graphed = graphs[tuple(src_p.shape)] = cuda_graph(model, src_p, bgr_p)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        # NB: the graph's outputs are overwritten by its next replay, which the
        # stream orders after this batch's conversions below.
        return graphed(src_p, bgr_p)
    try:
        with torch.inference_mode():
            while True:
                item = reader.queue.get()
                if item is END:
                    break
                if isinstance(item, BaseException):
                    raise item
                raise_writer_error(writers, paths)
                B = item["src"].shape[0]
                if cuda:
                    # The copy of this batch runs on its own stream while the
                    # model still works on the previous one.
                    with torch.cuda.stream(copy_stream):
                        on_dev = {k: v.to(dev, non_blocking=True) for k, v in item.items()}
                    current = torch.cuda.current_stream(dev)
                    current.wait_stream(copy_stream)
                    for t in on_dev.values():
                        t.record_stream(current)
                else:
                    on_dev = item
                src_t = to_model(on_dev["src"])
                if "bgr" in on_dev:
                    bgr_t = to_model(on_dev["bgr"])
                else:
                    if B not in still_bgr:
                        still_bgr[B] = still["bgr"].expand(B, -1, -1, -1).contiguous()
                    bgr_t = still_bgr[B]
                src_p, bgr_p = pad(src_t), pad(bgr_t)

                if cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                else:
                    t0 = time.perf_counter()
                try:
                    out = run_model(src_p, bgr_p)
                except UserError:
                    raise
                except ValueError as exc:
                    raise UserError(f"the model rejected a {W}x{H} frame: {exc}") from None
                if cuda:
                    end.record()
                    model_events.append((begin, end))
                else:
                    model_seconds += time.perf_counter() - t0

                if refine:
                    pha, fgr, _, _, err, ref = out
                else:
                    pha, fgr, err, _ = out
                Hp, Wp = H + pad_h, W + pad_w
                results = {}
                if "com" in outputs or "pha" in outputs or "fgr" in outputs:
                    pha_f = pha[:, :, :H, :W].float()
                    fgr_f = fgr[:, :, :H, :W].float()
                if "com" in outputs:
                    if rgba:
                        com = torch.cat([fgr_f * (pha_f > 0), pha_f], 1)
                    else:
                        if color is not None:
                            tgt = color
                        elif "tgt" in on_dev:
                            tgt = on_dev["tgt"].permute(0, 3, 1, 2).float().div_(255)
                        else:
                            tgt = still["tgt"]
                        # fgr * pha + tgt * (1 - pha), in one pass.
                        com = torch.lerp(tgt, fgr_f, pha_f)
                    results["com"] = com
                if "pha" in outputs:
                    results["pha"] = pha_f
                if "fgr" in outputs:
                    results["fgr"] = fgr_f
                if "err" in outputs:
                    if err.shape[2:] != (Hp, Wp):
                        err = F.interpolate(err.float(), (Hp, Wp), mode="bilinear", align_corners=False)
                    results["err"] = err[:, :, :H, :W].float()
                if "ref" in outputs:
                    results["ref"] = F.interpolate(ref.float(), (Hp, Wp), mode="nearest")[:, :, :H, :W]

                done_event = None
                host = {}
                for name, value in results.items():
                    if cuda:
                        u8 = to_u8(value)
                        host[name] = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
                        host[name].copy_(u8, non_blocking=True)
                    else:
                        # NB: on the CPU each writer converts its own output to
                        # 8 bits (numpy, one thread), beside the model's next
                        # frame instead of before it.
                        host[name] = value
                if cuda:
                    done_event = torch.cuda.Event()
                    done_event.record()
                for name, thread in writers.items():
                    thread.queue.put((done_event, host[name]))
                frames_done += B
                if bar is not None:
                    bar.update(B)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reader.stop.set()
        for thread in writers.values():
            thread.queue.put(END)
        for thread in writers.values():
            thread.join()
        if bar is not None:
            bar.close()
        # NB: the reader must be done with the decoders before convert_video
        # closes them.
        reader.join(timeout=60)
    if cuda:
        torch.cuda.synchronize(dev)
        model_seconds = sum(b.elapsed_time(e) for b, e in model_events) / 1000
    seconds = time.perf_counter() - started
    written = {name: thread.writer.count for name, thread in writers.items()}
    result = {"frames": frames_done, "written": written, "seconds": seconds, "model_seconds": model_seconds,
              "fps": frames_done / seconds if seconds > 0 else 0.0, "outputs": paths,
              "output_format": output_format, "width": W, "height": H, "padded": bool(pad_h or pad_w),
              "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "batch_size": batch_size,
              "codec": codec if output_format == "video" else None, "video_fps": float(rate),
              "video_resize": list(video_resize) if video_resize else None, "aligned": aligner is not None}
    if interrupted:
        raise ConversionInterrupted(result)
    raise_writer_error(writers, paths)
    return result
