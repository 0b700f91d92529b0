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
import queue
import re
import threading
import time
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._app import UserError, dtype_of, pick_device, require

__all__ = ["convert_video", "ConversionInterrupted", "OUTPUTS", "DEFAULT_TARGET", "open_frames",
           "make_synthetic_inputs", "parse_color"]

#: Output names, in the order they are written.
OUTPUTS = ("com", "pha", "fgr", "err", "ref")

#: Upstream's composite colour (inference_video.py).
DEFAULT_TARGET = (120, 255, 155)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

#: Container for a codec's output file (mp4 for the rest).
_CODEC_CONTAINER = {"libvpx-vp9": ".webm", "libvpx": ".webm", "libaom-av1": ".webm", "ffv1": ".mkv",
                    "prores_ks": ".mov", "prores": ".mov", "qtrle": ".mov", "png": ".mov"}

_SUGGESTED_CODECS = ("libx264", "libx265", "h264_nvenc", "hevc_nvenc", "mpeg4", "libvpx-vp9", "ffv1", "prores_ks")


class ConversionInterrupted(KeyboardInterrupt):
    """Raised by convert_video when interrupted (Ctrl-C), after every output
    file was closed with the frames computed so far. ``result`` is
    convert_video's summary of those frames."""

    def __init__(self, result: dict):
        super().__init__(f"interrupted after {result['frames']} frames")
        self.result = result


def _av(why="reading and writing video"):
    return require("av", why)


def _pil(why="reading and writing images"):
    require("PIL.Image", why)
    from PIL import Image
    return Image


def _np():
    return require("numpy", "pymatting_ext.video")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


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


# -- reading -------------------------------------------------------------------

class Frames:
    """The frames of a video file, an image or a folder of images, as uint8
    RGB numpy arrays (H, W, 3). Opening decodes the first frame, so that an
    unreadable file is reported before any output is written.

    Attributes: ``kind`` ('video', 'image' or 'folder'), ``width``,
    ``height``, ``count`` (None if the container does not say), ``fps``
    (a Fraction, None for images)."""

    def __init__(self, path: str, what: str = "source", threads: Optional[int] = None):
        self.path, self.what, self._threads = path, what, threads
        self.fps: Optional[Fraction] = None
        self.count: Optional[int] = None
        self._container = None
        if not os.path.exists(path):
            raise UserError(f"{what} {path!r} does not exist")
        if os.path.isdir(path):
            self.kind = "folder"
            self._files = sorted((os.path.join(path, f) for f in os.listdir(path)
                                  if f.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
            if not self._files:
                raise UserError(f"{what} folder {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.count = len(self._files)
            self._first = self._read_image(self._files[0])
        elif path.lower().endswith(IMAGE_EXTENSIONS):
            self.kind = "image"
            self.count = 1
            self._first = self._read_image(path)
        else:
            self.kind = "video"
            self._open_video()
        self.height, self.width = self._first.shape[:2]

    def _read_image(self, path: str):
        Image = _pil()
        try:
            with Image.open(path) as im:
                return _np().asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"cannot read {self.what} image {path!r}: {exc}") from None

    def _open_video(self) -> None:
        av = _av()
        try:
            self._container = av.open(self.path)
            streams = self._container.streams.video
            if not streams:
                raise UserError(f"{self.what} {self.path!r} has no video stream")
            stream = streams[0]
            if self._threads is None:
                stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
            else:
                stream.thread_count = self._threads
            self.fps = stream.average_rate or stream.guessed_rate
            self.count = stream.frames or None
            self._decoder = self._container.decode(stream)
            self._first = next(self._decoder).to_ndarray(format="rgb24")
        except UserError:
            self.close()
            raise
        except StopIteration:
            self.close()
            raise UserError(f"{self.what} {self.path!r} has no frames") from None
        except (av.FFmpegError, OSError, ValueError) as exc:
            self.close()
            raise UserError(f"cannot read {self.what} {self.path!r} as a video or image: {exc}") from None

    def __iter__(self) -> Iterator:
        yield self._first
        if self.kind == "folder":
            for path in self._files[1:]:
                frame = self._read_image(path)
                if frame.shape != self._first.shape:
                    raise UserError(f"{self.what} image {path!r} is {frame.shape[1]}x{frame.shape[0]} but the "
                                    f"folder's first image is {self.width}x{self.height}")
                yield frame
        elif self.kind == "video":
            av = _av()
            try:
                for frame in self._decoder:
                    yield frame.to_ndarray(format="rgb24")
            except av.FFmpegError as exc:
                raise UserError(f"cannot decode {self.what} {self.path!r}: {exc}") from None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


def open_frames(path: str, what: str = "source", threads: Optional[int] = None) -> Frames:
    """The frames of a video, an image or a folder of images (see Frames);
    threads: FFmpeg's decoding threads (default: as many as it likes)."""
    return Frames(path, what, threads)


# -- writing -------------------------------------------------------------------

def check_codec(codec: str) -> None:
    """A UserError for a codec FFmpeg cannot encode video with."""
    av = _av("writing video")
    try:
        found = av.codec.Codec(codec, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        known = []
        for name in _SUGGESTED_CODECS:
            try:
                av.codec.Codec(name, "w")
                known.append(name)
            except (av.codec.codec.UnknownCodecError, ValueError):
                pass
        raise UserError(f"unknown video codec {codec!r}: this FFmpeg has no encoder of that name "
                        f"(available here: {', '.join(known)})") from None
    if found.type != "video":
        raise UserError(f"codec {codec!r} encodes {found.type}, not video")


class _VideoWriter:
    """Frames (N, 1|3, H, W) uint8 into a video file."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, codec: str, crf: Optional[int],
                 preset: Optional[str], video_mbps: Optional[float], threads: Optional[int] = None):
        av = _av("writing video")
        self.path, self.count = path, 0
        formats = [f.name for f in (av.codec.Codec(codec, "w").video_formats or [])]
        # NB: 4:2:0 needs an even width and height; 4:4:4 takes any size.
        even = width % 2 == 0 and height % 2 == 0
        pix_fmt = ("yuv420p" if even and "yuv420p" in formats else
                   "yuv444p" if "yuv444p" in formats else formats[0] if formats else "yuv420p")
        if not even and pix_fmt == "yuv420p":
            raise UserError(f"codec {codec!r} cannot encode an odd frame size ({width}x{height}); "
                            f"use --codec libx264 or --output-format png")
        options = {}
        if codec in ("libx264", "libx265") and video_mbps is None:
            options["crf"] = str(18 if crf is None else crf)
        if codec in ("libx264", "libx265") and preset:
            options["preset"] = preset
        try:
            self.container = av.open(path, "w")
            self.stream = self.container.add_stream(codec, rate=fps, options=options)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
            if video_mbps is not None or codec not in ("libx264", "libx265"):
                self.stream.bit_rate = int((video_mbps or 16) * 1e6)
            if threads is None:
                self.stream.thread_type = "AUTO"
            else:
                self.stream.thread_count = threads
            self.stream.codec_context.open()  # errors here rather than at the first frame
        except (av.FFmpegError, ValueError) as exc:
            raise UserError(f"cannot write {path!r} with codec {codec!r}: {exc}") from None

    def write(self, frames) -> None:
        av = _av()
        for frame in frames:
            if frame.shape[0] == 1:
                vf = av.VideoFrame.from_ndarray(frame[0], format="gray")
            else:
                # NB: planar RGB as FFmpeg's gbrp (a (H, W, 3) view of the
                # planes): no interleaving pass, and a cheaper conversion to
                # YUV than from packed RGB (the same result).
                vf = av.VideoFrame.from_ndarray(frame.transpose(1, 2, 0), format="gbrp")
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.count += 1

    def close(self) -> None:
        if self.container is None:
            return
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None


class _PngWriter:
    """Frames (N, 1|3|4, H, W) uint8 as 00000.png, 00001.png, ...; each file
    is written under a temporary name and renamed, so a file that exists is
    complete."""

    def __init__(self, folder: str, compress_level: int = 1):
        self.folder, self.count, self.level = folder, 0, compress_level
        os.makedirs(folder, exist_ok=True)

    def write(self, frames) -> None:
        Image = _pil()
        for frame in frames:
            planes = [Image.fromarray(plane) for plane in frame]
            im = planes[0] if len(planes) == 1 else Image.merge("RGB" if len(planes) == 3 else "RGBA", planes)
            final = os.path.join(self.folder, f"{self.count:05d}.png")
            tmp = final + ".part"
            im.save(tmp, format="PNG", compress_level=self.level)
            os.replace(tmp, final)
            self.count += 1

    def close(self) -> None:
        pass


_END = object()


class _WriterThread(threading.Thread):
    """Encodes the batches put on its queue: (event, host tensor (B, C, H,
    W)), uint8 (from a GPU; the event says when the device-to-host copy is
    done) or float in 0..1 (on the CPU: converted here)."""

    def __init__(self, name: str, writer):
        super().__init__(name=f"pymatting-ext-write-{name}", daemon=True)
        self.writer, self.queue, self.error = writer, queue.Queue(maxsize=4), None
        self.to_u8 = _ToU8()

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is _END:
                    break
                if self.error is not None:
                    continue  # keep draining so that the producer never blocks
                event, frames = item
                try:
                    if event is not None:
                        event.synchronize()
                    self.writer.write(self.to_u8(frames))
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    self.error = exc
        finally:
            try:
                self.writer.close()
            except BaseException as exc:  # noqa: BLE001
                self.error = self.error or exc


class _ReaderThread(threading.Thread):
    """Decodes batches of (source, background, target) frames into uint8
    tensors (B, H, W, 3), pinned when the model is on a GPU."""

    def __init__(self, sources: Dict[str, Frames], batch_size: int, max_frames: Optional[int], pin: bool):
        super().__init__(name="pymatting-ext-read", daemon=True)
        self.sources, self.batch_size, self.max_frames, self.pin = sources, batch_size, max_frames, pin
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.stop = threading.Event()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run(self) -> None:
        np = _np()
        try:
            iters = {name: iter(frames) for name, frames in self.sources.items()}
            # The last frame of each background stream: a shorter one holds it.
            held: Dict[str, object] = {}
            ended = set()
            done = 0
            while not self.stop.is_set():
                want = self.batch_size if self.max_frames is None else min(self.batch_size, self.max_frames - done)
                if want <= 0:
                    break
                batch: Dict[str, List] = {name: [] for name in iters}
                for _ in range(want):
                    frame = next(iters["src"], None)
                    if frame is None:
                        break
                    batch["src"].append(frame)
                    for name, it in iters.items():
                        if name == "src":
                            continue
                        if name not in ended:
                            other = next(it, None)
                            if other is None:
                                ended.add(name)
                            else:
                                held[name] = other
                        batch[name].append(held[name])
                if not batch["src"]:
                    break
                tensors = {}
                for name, frames in batch.items():
                    t = torch.from_numpy(np.stack(frames))
                    tensors[name] = t.pin_memory() if self.pin else t
                done += len(batch["src"])
                if not self._put(tensors):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            self._put(exc)
            return
        self._put(_END)


# -- the conversion ---------------------------------------------------------------

def _to_u8(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) values in 0..1 -> uint8, round(255 x) (ties to even)."""
    return x.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


class _ToU8:
    """_to_u8 in numpy for a writer thread (one thread, no OpenMP team beside
    the model's; the same arithmetic: float32 x 255, round half to even,
    clip), into buffers reused from batch to batch (fresh 24 MB arrays per
    1080p frame would cost their page faults every time). The result is
    valid until the next call."""

    def __init__(self):
        self.f = self.u = None

    def __call__(self, frames: torch.Tensor):
        np = _np()
        if frames.dtype == torch.uint8:
            return frames.numpy()
        a = frames.numpy()
        if self.f is None or self.f.shape != a.shape:
            self.f, self.u = np.empty(a.shape, np.float32), np.empty(a.shape, np.uint8)
        np.multiply(a, np.float32(255), out=self.f)
        np.rint(self.f, out=self.f)
        np.clip(self.f, 0, 255, out=self.f)
        self.u[...] = self.f
        return self.u


def _is_refine(model: torch.nn.Module) -> bool:
    return hasattr(model, "refiner")


def _output_path(output_dir: str, name: str, output_format: str, codec: str) -> str:
    if output_format == "video":
        return os.path.join(output_dir, name + _CODEC_CONTAINER.get(codec, ".mp4"))
    return os.path.join(output_dir, name)


def _prepare_outputs(output_dir, outputs, output_format, codec, overwrite) -> Dict[str, str]:
    paths = {name: _output_path(output_dir, name, output_format, codec) for name in outputs}
    for name, path in paths.items():
        if os.path.exists(path) and not overwrite:
            if not os.path.isdir(path) or any(f.endswith(".png") for f in os.listdir(path)):
                raise UserError(f"output {path!r} exists; pass --overwrite (overwrite=True) to replace it")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {output_dir!r}: {exc}") from None
    for path in paths.values():
        if output_format == "png" and os.path.isdir(path):
            for f in os.listdir(path):
                if f.endswith(".png") or f.endswith(".png.part"):
                    os.remove(os.path.join(path, f))
    return paths


def convert_video(model: torch.nn.Module, source: str, background: str, output_dir: str, *,
                  outputs: Sequence[str] = ("com", "pha", "fgr"), output_format: Optional[str] = None,
                  target_background: Union[None, str, Tuple[int, int, int]] = None,
                  device: Union[None, str, torch.device] = None, precision: Optional[str] = None,
                  batch_size: int = 1, codec: str = "libx264", crf: Optional[int] = None,
                  preset: Optional[str] = "ultrafast", video_mbps: Optional[float] = None,
                  fps: Optional[float] = None, max_frames: Optional[int] = None, overwrite: bool = False,
                  progress: bool = True, cuda_graph: bool = False) -> dict:
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
    src = Frames(source, "source", io_threads)
    opened = [src]
    try:
        return _convert(model, src, background, output_dir, opened, outputs=outputs,
                        output_format=output_format, target_background=target_background, dev=dev, dtype=dtype,
                        cuda=cuda, batch_size=batch_size, codec=codec, crf=crf, preset=preset,
                        video_mbps=video_mbps, fps=fps, max_frames=max_frames, overwrite=overwrite,
                        progress=progress, use_graph=cuda_graph, io_threads=io_threads)
    finally:
        for frames in opened:
            frames.close()


def _load_still(frames: Frames, dev, dtype) -> torch.Tensor:
    """An image's single frame as a (1, 3, H, W) tensor in 0..1 on dev."""
    image = torch.from_numpy(next(iter(frames)).copy())
    return image.to(dev).permute(2, 0, 1)[None].to(dtype).div_(255).contiguous()


def _convert(model, src: Frames, background, output_dir, opened, *, outputs, output_format, target_background,
             dev, dtype, cuda, batch_size, codec, crf, preset, video_mbps, fps, max_frames, overwrite,
             progress, use_graph, io_threads) -> dict:
    if output_format is None:
        output_format = "video" if src.kind == "video" else "png"
    if output_format not in ("video", "png"):
        raise UserError(f"output format must be 'video' or 'png', got {output_format!r}")
    if output_format == "video":
        check_codec(codec)
    H, W = src.height, src.width

    bgr = Frames(background, "background", io_threads)
    opened.append(bgr)
    if (bgr.height, bgr.width) != (H, W):
        raise UserError(f"the source is {src.size_text()} but the background {background!r} is "
                        f"{bgr.size_text()}; they must be the same size")
    streamed = {"src": src}
    still = {}
    if bgr.kind == "image":
        still["bgr"] = _load_still(bgr, dev, dtype)
    else:
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
            tgt = Frames(target, "target background", io_threads)
            opened.append(tgt)
            if (tgt.height, tgt.width) != (H, W):
                raise UserError(f"the source is {src.size_text()} but the target background {target!r} is "
                                f"{tgt.size_text()}; they must be the same size")
            if tgt.kind == "image":
                still["tgt"] = _load_still(tgt, dev, torch.float32)
            else:
                streamed["tgt"] = tgt
        else:
            if len(target) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in target):
                raise UserError(f"target background colour must be three integers in 0..255, got {target!r}")
            color = torch.tensor(target, dtype=torch.float32, device=dev).div_(255).view(1, 3, 1, 1)

    rate = Fraction(fps).limit_denominator(1001) if fps else (src.fps or Fraction(30))
    tqdm = require("tqdm", "the progress bar").tqdm if progress else None
    paths = _prepare_outputs(output_dir, outputs, output_format, codec, overwrite)
    writers: Dict[str, _WriterThread] = {}
    try:
        for name in outputs:
            if output_format == "video":
                writer = _VideoWriter(paths[name], W, H, rate, codec, crf, preset, video_mbps, io_threads)
            else:
                writer = _PngWriter(paths[name])
            writers[name] = _WriterThread(name, writer)
    except BaseException:
        for thread in writers.values():
            thread.writer.close()
        raise
    for thread in writers.values():
        thread.start()

    total = src.count if max_frames is None else min(max_frames, src.count or max_frames)
    bar = tqdm(total=total, unit="frame", desc="matte", dynamic_ncols=True, smoothing=0.1) if tqdm else None
    reader = _ReaderThread(streamed, batch_size, max_frames, pin=cuda)
    reader.start()

    pad_h, pad_w = (-H) % 4, (-W) % 4
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
        from .graphs import cuda_graph

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
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                _raise_writer_error(writers, paths)
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
                        u8 = _to_u8(value)
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
            thread.queue.put(_END)
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
              "codec": codec if output_format == "video" else None, "video_fps": float(rate)}
    if interrupted:
        raise ConversionInterrupted(result)
    _raise_writer_error(writers, paths)
    return result


def _raise_writer_error(writers: Dict[str, "_WriterThread"], paths: Dict[str, str]) -> None:
    for name, thread in writers.items():
        exc = thread.error
        if exc is None:
            continue
        if isinstance(exc, (UserError, KeyboardInterrupt)):
            raise exc
        if isinstance(exc, (OSError, ValueError)) or type(exc).__module__.startswith("av"):
            raise UserError(f"cannot write {name} to {paths[name]!r}: {exc}") from exc
        raise exc


# -- synthetic inputs ---------------------------------------------------------------

def _synthetic_background(width: int, height: int):
    np = _np()
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    r = 0.55 + 0.35 * np.sin(6.0 * x + 1.0) * np.cos(3.0 * y)
    g = 0.45 + 0.30 * np.cos(4.0 * y + 2.0 * x)
    b = 0.50 + 0.25 * np.sin(9.0 * x * y + 0.5)
    checker = ((np.floor(x * 12) + np.floor(y * 8)) % 2) * 0.08
    image = np.stack([r + checker, g - checker, b], axis=-1)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _synthetic_frame(background, t: float):
    """The background with a soft-edged figure (head and body) that walks
    across it; t in 0..1."""
    np = _np()
    height, width = background.shape[:2]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx = (0.15 + 0.7 * t) * width
    cy = 0.5 * height + 0.05 * height * np.sin(2 * np.pi * 3 * t)
    r = 0.12 * min(width, height)
    head = np.hypot((x - cx) / r, (y - (cy - 1.6 * r)) / (1.1 * r))
    body = np.maximum(np.abs(x - cx) / (1.3 * r), np.maximum((cy - 0.4 * r - y) / r, (y - cy - 3.0 * r) / r))
    inside = np.minimum(head, np.where(y > cy - 0.6 * r, np.maximum(body, 0) + 0.0, 9))
    alpha = np.clip((1.05 - inside) / 0.1, 0, 1)[..., None]
    stripes = 0.5 + 0.5 * np.sin((x + y) / max(r / 3, 1))
    colour = np.stack([0.85 * stripes + 0.1, 0.35 + 0.2 * stripes, 0.25 + 0.0 * x], axis=-1) * 255
    return (alpha * colour + (1 - alpha) * background).round().astype(np.uint8)


def make_synthetic_inputs(folder: str, width: int = 640, height: int = 360, frames: int = 60,
                          fps: int = 30, codec: str = "libx264") -> Tuple[str, str]:
    """Writes a clip of a figure walking over a textured background
    (``source.mp4``, near-lossless) and the background alone
    (``background.png``) into folder; returns their paths."""
    av = _av("writing the synthetic clip")
    Image = _pil()
    os.makedirs(folder, exist_ok=True)
    background = _synthetic_background(width, height)
    bgr_path = os.path.join(folder, "background.png")
    Image.fromarray(background).save(bgr_path)
    src_path = os.path.join(folder, "source.mp4")
    check_codec(codec)
    container = av.open(src_path, "w")
    try:
        options = {"crf": "10", "preset": "veryfast"} if codec in ("libx264", "libx265") else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        if codec not in ("libx264", "libx265"):
            stream.bit_rate = 20_000_000
        for i in range(frames):
            frame = _synthetic_frame(background, i / max(frames - 1, 1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    finally:
        container.close()
    return src_path, bgr_path
