"""Where frames come from: a video file (anything FFmpeg decodes, through
PyAV), an image, or a folder of images (sorted by name), as uint8 RGB arrays;
and the reader thread that decodes batches of them beside the model."""
import os
import queue
import re
import threading
from fractions import Fraction
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .common import UserError, av_module, numpy_module, pil_image

__all__ = ["IMAGE_EXTENSIONS", "Frames", "open_frames", "FrameReader", "load_still", "END"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

#: The last item on a stage's queue.
END = object()


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class Frames:
    """The frames of a video file, an image or a folder of images, as uint8
    RGB numpy arrays (H, W, 3). Opening decodes the first frame, so that an
    unreadable file is reported before any output is written.

    With ``size`` (W, H), every frame is resized to it as upstream's
    --video-resize does (Pillow's bilinear filter, antialiased when it
    shrinks, as torchvision's Resize on PIL images).

    Attributes: ``kind`` ('video', 'image' or 'folder'), ``width``,
    ``height`` (after the resize), ``count`` (None if the container does
    not say), ``fps`` (a Fraction, None for images)."""

    def __init__(self, path: str, what: str = "source", threads: Optional[int] = None,
                 size: Optional[Tuple[int, int]] = None):
        self.path, self.what, self._threads, self._size = path, what, threads, size
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
        self._first = self._resized(self._first)
        self.height, self.width = self._first.shape[:2]

    def _resized(self, frame):
        if self._size is None or (frame.shape[1], frame.shape[0]) == tuple(self._size):
            return frame
        Image = pil_image("--video-resize")
        return numpy_module().asarray(Image.fromarray(frame).resize(tuple(self._size), Image.BILINEAR))

    def _read_image(self, path: str):
        Image = pil_image()
        try:
            with Image.open(path) as im:
                return numpy_module().asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"cannot read {self.what} image {path!r}: {exc}") from None

    def _open_video(self) -> None:
        av = av_module()
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
                if self._size is None and frame.shape != self._first.shape:
                    raise UserError(f"{self.what} image {path!r} is {frame.shape[1]}x{frame.shape[0]} but the "
                                    f"folder's first image is {self.width}x{self.height}")
                yield self._resized(frame)
        elif self.kind == "video":
            av = av_module()
            try:
                for frame in self._decoder:
                    yield self._resized(frame.to_ndarray(format="rgb24"))
            except av.FFmpegError as exc:
                raise UserError(f"cannot decode {self.what} {self.path!r}: {exc}") from None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


def open_frames(path: str, what: str = "source", threads: Optional[int] = None,
                size: Optional[Tuple[int, int]] = None) -> Frames:
    """The frames of a video, an image or a folder of images (see Frames);
    threads: FFmpeg's decoding threads (default: as many as it likes); size:
    (W, H) to resize every frame to."""
    return Frames(path, what, threads, size)


class FrameReader(threading.Thread):
    """Decodes batches of (source, background, target) frames into uint8
    tensors (B, H, W, 3), pinned when the model is on a GPU. With ``align``
    (align(src, bgr, frame number) -> bgr, see align.py), each background
    frame is replaced by its alignment to its source frame, here, beside the
    model."""

    def __init__(self, sources: Dict[str, Frames], batch_size: int, max_frames: Optional[int], pin: bool,
                 align: Optional[Callable] = None):
        super().__init__(name="pymatting-ext-read", daemon=True)
        self.sources, self.batch_size, self.max_frames, self.pin = sources, batch_size, max_frames, pin
        self.align = align
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
        np = numpy_module()
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
                if self.align is not None:
                    batch["bgr"] = [self.align(src, bgr, done + i)
                                    for i, (src, bgr) in enumerate(zip(batch["src"], batch["bgr"]))]
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
        self._put(END)


def load_still(frames: Frames, dev, dtype) -> torch.Tensor:
    """An image's single frame as a (1, 3, H, W) tensor in 0..1 on dev."""
    image = torch.from_numpy(next(iter(frames)).copy())
    return image.to(dev).permute(2, 0, 1)[None].to(dtype).div_(255).contiguous()
