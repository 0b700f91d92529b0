"""Where outputs go: videos (PyAV) or PNG sequences, each written by a thread
of its own from a bounded queue; the 8-bit conversion; the output files."""
import os
import queue
import threading
from fractions import Fraction
from typing import Dict, Optional

import torch

from .common import UserError, av_module, numpy_module, pil_image
from .sources import END

__all__ = ["check_codec", "VideoWriter", "PngWriter", "WriterThread", "to_u8", "prepare_outputs",
           "raise_writer_error"]

#: Container for a codec's output file (mp4 for the rest).
_CODEC_CONTAINER = {"libvpx-vp9": ".webm", "libvpx": ".webm", "libaom-av1": ".webm", "ffv1": ".mkv",
                    "prores_ks": ".mov", "prores": ".mov", "qtrle": ".mov", "png": ".mov"}

_SUGGESTED_CODECS = ("libx264", "libx265", "h264_nvenc", "hevc_nvenc", "mpeg4", "libvpx-vp9", "ffv1", "prores_ks")


def check_codec(codec: str) -> None:
    """A UserError for a codec FFmpeg cannot encode video with."""
    av = av_module("writing video")
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


class VideoWriter:
    """Frames (N, 1|3, H, W) uint8 into a video file."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, codec: str, crf: Optional[int],
                 preset: Optional[str], video_mbps: Optional[float], threads: Optional[int] = None):
        av = av_module("writing video")
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
        av = av_module()
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


class PngWriter:
    """Frames (N, 1|3|4, H, W) uint8 as 00000.png, 00001.png, ...; each file
    is written under a temporary name and renamed, so a file that exists is
    complete."""

    def __init__(self, folder: str, compress_level: int = 1):
        self.folder, self.count, self.level = folder, 0, compress_level
        os.makedirs(folder, exist_ok=True)

    def write(self, frames) -> None:
        Image = pil_image()
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


class WriterThread(threading.Thread):
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
                if item is END:
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


def to_u8(x: torch.Tensor) -> torch.Tensor:
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
        np = numpy_module()
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


def _output_path(output_dir: str, name: str, output_format: str, codec: str) -> str:
    if output_format == "video":
        return os.path.join(output_dir, name + _CODEC_CONTAINER.get(codec, ".mp4"))
    return os.path.join(output_dir, name)


def prepare_outputs(output_dir, outputs, output_format, codec, overwrite) -> Dict[str, str]:
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


def raise_writer_error(writers: Dict[str, "WriterThread"], paths: Dict[str, str]) -> None:
    for name, thread in writers.items():
        exc = thread.error
        if exc is None:
            continue
        if isinstance(exc, (UserError, KeyboardInterrupt)):
            raise exc
        if isinstance(exc, (OSError, ValueError)) or type(exc).__module__.startswith("av"):
            raise UserError(f"cannot write {name} to {paths[name]!r}: {exc}") from exc
        raise exc
