"""--preprocess-alignment (pymatting_ext/app/align.py) and --video-resize:
a generated hand-held clip, whose camera moves by a known homography per
frame over a textured scene, with the background plate shot from the
starting position. The homography recovered for each frame is within a
pixel of the true one, and the matte with the aligned plate is the matte
with a background that matches each frame exactly (what a static camera
gives), within the tolerance stated below."""
import os

import pytest
import torch

cv2 = pytest.importorskip("cv2", reason="--preprocess-alignment needs OpenCV: pip install 'pymatting_ext[cli]'")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("av", reason="needs PyAV: pip install 'pymatting_ext[cli]'")

import pymatting_ext as pm  # noqa: E402
from pymatting_ext.app import cli  # noqa: E402
from pymatting_ext.app.align import BackgroundAligner  # noqa: E402
from pymatting_ext.app.common import UserError  # noqa: E402
from pymatting_ext.app.synthetic import _synthetic_frame  # noqa: E402

H, W, FRAMES = 240, 320, 5
#: Where the plate sits in the scene (the camera's starting position).
ORIGIN = np.array([[1, 0, -40], [0, 1, -30], [0, 0, 1]], np.float64)


def scene(seed=0, height=H + 60, width=W + 80):
    """A textured scene larger than a frame: smoothed random blobs, so that
    ORB finds distinct corners and a sub-pixel warp changes little."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 6, width // 6, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = cv2.GaussianBlur(image, (0, 0), 1.2)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def camera(t):
    """Scene -> frame homography of frame t: a small rotation, zoom,
    translation and perspective, growing with t."""
    a, s = 0.02 * t, 1 + 0.01 * t
    move = np.array([[s * np.cos(a), -s * np.sin(a), 3.0 * t],
                     [s * np.sin(a), s * np.cos(a), -2.0 * t],
                     [2e-5 * t, -1e-5 * t, 1]], np.float64)
    return move @ ORIGIN


def view(world, matrix):
    return cv2.warpPerspective(world, matrix, (W, H), flags=cv2.INTER_LINEAR)


def true_homography(t):
    """Plate pixel -> frame pixel."""
    return camera(t) @ np.linalg.inv(ORIGIN)


def project(matrix, points):
    p = np.concatenate([points, np.ones((len(points), 1))], 1) @ matrix.T
    return p[:, :2] / p[:, 2:]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The plate, the moving frames (a figure over the moving scene) and the
    exact background of each frame, as PNG files."""
    folder = tmp_path_factory.mktemp("handheld")
    world = scene()
    plate = view(world, ORIGIN)
    Image.fromarray(plate).save(folder / "plate.png")
    for name in ("src", "exact"):
        (folder / name).mkdir()
    frames = []
    for t in range(FRAMES):
        background = view(world, camera(t))
        # The figure's walk stays inside the part of the frame the plate covers.
        frame = _synthetic_frame(background, 0.3 + 0.1 * t)
        Image.fromarray(frame).save(folder / "src" / f"{t:03d}.png")
        Image.fromarray(background).save(folder / "exact" / f"{t:03d}.png")
        frames.append((frame, background))
    return folder, plate, frames


def test_the_recovered_homography_is_within_a_pixel(clip):
    _, plate, frames = clip
    aligner = BackgroundAligner()
    ys, xs = np.mgrid[10:H - 10:20, 10:W - 10:20]
    grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    for t, (frame, _) in enumerate(frames):
        found = aligner.homography(frame, plate, t)
        err = np.linalg.norm(project(found, grid) - project(true_homography(t), grid), axis=1)
        assert err.max() < 1.0, (t, float(err.max()))


class DifferenceMatte(torch.nn.Module):
    """A stand-in for MattingBase whose matte is what alignment is for: how
    far each pixel is from the background (pha, fgr, err, hid as
    MattingBase returns them)."""

    def forward(self, src, bgr):
        pha = (src - bgr).abs().amax(1, keepdim=True)
        return pha, src, pha, src.new_zeros(src.shape[0], 32, src.shape[2] // 4, src.shape[3] // 4)


def _mattes(folder):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f))).astype(np.float32) / 255
                     for f in sorted(os.listdir(folder))])


def test_the_aligned_matte_is_the_matte_of_a_matching_background(clip, tmp_path):
    folder, _, _ = clip
    run = dict(outputs=("pha",), output_format="png", progress=False, device="cpu")
    aligned = pm.convert_video(DifferenceMatte(), str(folder / "src"), str(folder / "plate.png"),
                               str(tmp_path / "aligned"), preprocess_alignment=True, **run)
    exact = pm.convert_video(DifferenceMatte(), str(folder / "src"), str(folder / "exact"), str(tmp_path / "exact"),
                             **run)
    unaligned = pm.convert_video(DifferenceMatte(), str(folder / "src"), str(folder / "plate.png"),
                                 str(tmp_path / "unaligned"), **run)
    assert aligned["aligned"] and aligned["frames"] == exact["frames"] == FRAMES
    got, want = _mattes(tmp_path / "aligned" / "pha"), _mattes(tmp_path / "exact" / "pha")
    off = _mattes(tmp_path / "unaligned" / "pha")
    # The tolerance: over each frame a mean difference of 1% of the alpha
    # range, and 99% of the pixels within 5%: the plate is resampled twice
    # (a warp of the scene, then the alignment's) where the exact background
    # is resampled once, by warps within a pixel of each other (measured:
    # means 0.5-0.8%, 99th percentiles 1.6-2.8%).
    for t in range(FRAMES):
        diff = np.abs(got[t] - want[t])
        assert diff.mean() < 0.01, (t, float(diff.mean()))
        assert np.quantile(diff, 0.99) < 0.05, (t, float(np.quantile(diff, 0.99)))
    # Without alignment the moving frames differ from the plate everywhere.
    assert np.abs(off[1:] - want[1:]).mean() > 20 * np.abs(got[1:] - want[1:]).mean()


def test_a_background_without_features_is_a_clear_error(clip, tmp_path):
    folder, _, _ = clip
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(UserError, match=r"cannot align the background to source frame 0: 0 feature matches"):
        pm.convert_video(DifferenceMatte(), str(folder / "src"), str(tmp_path / "flat.png"), str(tmp_path / "out"),
                         outputs=("pha",), output_format="png", progress=False, device="cpu",
                         preprocess_alignment=True)


def test_matte_command_line_aligns_and_resizes(clip, tmp_path, capsys):
    """`pymatting-ext matte` with upstream's flags: --video-resize W H (the
    outputs at that size) and --preprocess-alignment, on a MattingRefine."""
    folder, _, _ = clip
    ckpt = tmp_path / "refine.pth"
    torch.manual_seed(0)
    torch.save(pm.MattingRefine("mobilenetv2").state_dict(), ckpt)
    out = tmp_path / "out"
    code = cli.main(["matte", str(folder / "src"), str(folder / "plate.png"), "-o", str(out), "--checkpoint",
                     str(ckpt), "--backbone", "mobilenetv2", "--video-resize", "160", "120", "--preprocess-alignment",
                     "--outputs", "pha", "com", "--output-format", "png", "--refine-sample-pixels", "2000",
                     "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    for name in ("pha", "com"):
        files = sorted(os.listdir(out / name))
        assert len(files) == FRAMES
        assert Image.open(out / name / files[0]).size == (160, 120)


def test_help_lists_upstreams_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["matte", "--help"])
    text = capsys.readouterr().out
    assert "--preprocess-alignment" in text and "--video-resize" in text
