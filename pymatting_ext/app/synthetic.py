"""The synthetic demo clip: a figure walking over a textured background
(a video and the background alone), for the demo, tests and benchmarks."""
import os
from typing import Tuple

from .common import av_module, numpy_module, pil_image
from .sinks import check_codec

__all__ = ["make_synthetic_inputs"]


def _synthetic_background(width: int, height: int):
    np = numpy_module()
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    r = 0.55 + 0.35 * np.sin(6.0 * x + 1.0) * np.cos(3.0 * y)
    g = 0.45 + 0.30 * np.cos(4.0 * y + 2.0 * x)
    b = 0.50 + 0.25 * np.sin(9.0 * x * y + 0.5)
    checker = ((np.floor(x * 12) + np.floor(y * 8)) % 2) * 0.08
    # A fixed speckle of 8x8 squares: the distinct corners a real scene has,
    # which --preprocess-alignment's feature matching needs.
    speckle = np.random.default_rng(0).uniform(-0.06, 0.06, ((height + 7) // 8, (width + 7) // 8))
    speckle = np.kron(speckle, np.ones((8, 8)))[:height, :width]
    image = np.stack([r + checker, g - checker, b], axis=-1) + speckle[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _synthetic_frame(background, t: float):
    """The background with a soft-edged figure (head and body) that walks
    across it; t in 0..1."""
    np = numpy_module()
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
    av = av_module("writing the synthetic clip")
    Image = pil_image()
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
