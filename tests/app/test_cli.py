"""The pymatting-ext command line and convert_video: outputs against the
model called on the decoded frames, frame counts and sizes, the composite
formula, padding of sizes not divisible by 4, one-line errors for bad input,
interrupted runs, the speed test's table/JSON/plot and the TorchScript
export. Small generated clips (64x96, a few frames) and checkpoints of
randomly initialised models saved with torch.save: no official weights are
needed."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

av = pytest.importorskip("av", reason="needs PyAV: pip install 'pymatting_ext[cli]'")
pytest.importorskip("tqdm", reason="needs tqdm: pip install 'pymatting_ext[cli]'")
pytest.importorskip("PIL", reason="needs Pillow: pip install 'pymatting_ext[cli]'")
pytest.importorskip("torchvision", reason="the models need torchvision")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import pymatting_ext as pm  # noqa: E402
from pymatting_ext.app import cli  # noqa: E402
from pymatting_ext.app.common import build_model  # noqa: E402
from pymatting_ext.app.pipeline import ConversionInterrupted  # noqa: E402
from pymatting_ext.app.synthetic import make_synthetic_inputs  # noqa: E402

from helpers import random_bn_  # noqa: E402

H, W, FRAMES = 64, 96, 5
#: Refine 100 cells of 384: the selection is exercised, not everything.
MODEL_ARGS = ["--backbone", "mobilenetv2", "--refine-sample-pixels", "1600"]


# -- inputs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A clip, its background, the clip's frames as PNGs, and checkpoints."""
    root = tmp_path_factory.mktemp("cli")
    src, bgr = make_synthetic_inputs(str(root / "inputs"), W, H, FRAMES)
    frames = decode(src)
    folder = root / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"f{i}.png")
    torch.manual_seed(0)
    refine = random_bn_(pm.MattingRefine("mobilenetv2"))
    torch.save(refine.state_dict(), root / "refine.pth")
    torch.save(random_bn_(pm.MattingBase("mobilenetv2")).state_dict(), root / "base.pth")
    return {"root": root, "src": src, "bgr": bgr, "frames": frames, "folder": str(folder),
            "ckpt": str(root / "refine.pth"), "base_ckpt": str(root / "base.pth")}


def decode(path):
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def read_pngs(folder):
    names = sorted(os.listdir(folder))
    assert all(n.endswith(".png") for n in names), names
    return [np.asarray(Image.open(os.path.join(folder, n))) for n in names]


def to_input(frame):
    """A uint8 (H, W, 3) frame as the pipeline hands it to the model."""
    return torch.from_numpy(np.array(frame)).permute(2, 0, 1)[None].float().div_(255).contiguous()


def u8(x):
    return x.mul(255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def model_for(data, **kw):
    model, _ = build_model(checkpoint=data["ckpt"], backbone="mobilenetv2", refine_sample_pixels=1600, **kw)
    return model


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- matte ---------------------------------------------------------------------

def test_png_outputs_equal_the_model_on_the_decoded_frames(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(["matte", data["src"], data["bgr"], "-o", str(out), "--checkpoint", data["ckpt"],
                                "--output-format", "png", "--outputs", "com", "pha", "fgr", "err", "ref",
                                *MODEL_ARGS], capsys)
    assert code == 0, stderr
    assert "frame/s" in stderr  # the progress bar
    assert f"matted {FRAMES} frames" in stdout
    model = model_for(data)
    bgr = to_input(np.asarray(Image.open(data["bgr"]).convert("RGB")))
    got = {name: read_pngs(out / name) for name in ("com", "pha", "fgr", "err", "ref")}
    for name, frames in got.items():
        assert len(frames) == FRAMES, name
    for i, frame in enumerate(data["frames"]):
        with torch.inference_mode():
            pha, fgr, _, _, err, ref = model(to_input(frame), bgr)
        np.testing.assert_array_equal(got["pha"][i], u8(pha)[:, :, 0])
        np.testing.assert_array_equal(got["fgr"][i], u8(fgr))
        # png without a target background: RGBA, as upstream.
        rgba = torch.cat([fgr * (pha > 0), pha], 1)
        assert got["com"][i].shape == (H, W, 4)
        np.testing.assert_array_equal(got["com"][i], u8(rgba))
        err_full = torch.nn.functional.interpolate(err, (H, W), mode="bilinear", align_corners=False)
        np.testing.assert_array_equal(got["err"][i], u8(err_full)[:, :, 0])
        ref_full = torch.nn.functional.interpolate(ref, (H, W), mode="nearest")
        assert set(np.unique(got["ref"][i])) <= {0, 255}
        np.testing.assert_array_equal(got["ref"][i], u8(ref_full)[:, :, 0])
        assert 0 < (got["ref"][i] == 255).mean() < 1  # some cells refined, not all


def test_video_outputs_frame_counts_sizes_and_values(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(["matte", data["src"], data["bgr"], "-o", str(out), "--checkpoint", data["ckpt"],
                           "--outputs", "com", "pha", "fgr", "err", "ref", "--crf", "0", *MODEL_ARGS], capsys)
    assert code == 0, stderr
    model = model_for(data)
    bgr = to_input(np.asarray(Image.open(data["bgr"]).convert("RGB")))
    videos = {name: decode(str(out / f"{name}.mp4")) for name in ("com", "pha", "fgr", "err", "ref")}
    for name, frames in videos.items():
        assert len(frames) == FRAMES, name
        assert frames[0].shape == (H, W, 3), name
    green = torch.tensor([120, 255, 155]).div(255).view(1, 3, 1, 1)
    for i, frame in enumerate(data["frames"]):
        with torch.inference_mode():
            pha, fgr = model(to_input(frame), bgr)[:2]
        com = fgr * pha + green * (1 - pha)
        # Lossy 4:2:0 (crf 0 is lossless in YUV; the RGB round trip is not).
        for name, want in (("pha", u8(pha.expand(-1, 3, -1, -1))), ("fgr", u8(fgr)), ("com", u8(com))):
            diff = np.abs(videos[name][i].astype(int) - want.astype(int))
            assert diff.mean() < 4 and np.percentile(diff, 99) < 24, (name, diff.mean())


def test_composite_over_a_colour_and_an_image(data, tmp_path, capsys):
    model = model_for(data)
    bgr = to_input(np.asarray(Image.open(data["bgr"]).convert("RGB")))
    target_img = tmp_path / "target.png"
    target = (np.arange(H * W * 3) % 251).astype(np.uint8).reshape(H, W, 3)
    Image.fromarray(target).save(target_img)
    for spec, tgt in (("10,20,30", torch.tensor([10, 20, 30]).div(255).view(1, 3, 1, 1)),
                      (str(target_img), to_input(target))):
        out = tmp_path / f"out{len(spec)}"
        code, _, stderr = run(["matte", data["folder"], data["bgr"], "-o", str(out), "--checkpoint", data["ckpt"],
                               "--outputs", "com", "--target-bgr", spec, "--max-frames", "2", "--no-progress",
                               *MODEL_ARGS], capsys)
        assert code == 0, stderr
        coms = read_pngs(out / "com")  # a folder source writes png by default
        assert len(coms) == 2
        for i in range(2):
            with torch.inference_mode():
                pha, fgr = model(to_input(data["frames"][i]), bgr)[:2]
            want = u8(fgr * pha + tgt * (1 - pha))
            assert coms[i].shape == (H, W, 3)
            assert np.abs(coms[i].astype(int) - want.astype(int)).max() <= 1


def test_sizes_not_divisible_by_4_are_padded_and_cropped(data, tmp_path, capsys):
    h, w = 62, 93
    frame = data["frames"][0][:h, :w]
    src, bgr_path = tmp_path / "src.png", tmp_path / "bgr.png"
    Image.fromarray(frame).save(src)
    background = np.asarray(Image.open(data["bgr"]).convert("RGB"))[:h, :w]
    Image.fromarray(background).save(bgr_path)
    out = tmp_path / "out"
    code, _, stderr = run(["matte", str(src), str(bgr_path), "-o", str(out), "--checkpoint", data["ckpt"],
                           "--outputs", "pha", "fgr", "--no-progress", *MODEL_ARGS], capsys)
    assert code == 0, stderr
    pha_png, fgr_png = read_pngs(out / "pha"), read_pngs(out / "fgr")
    assert len(pha_png) == 1 and pha_png[0].shape == (h, w)
    pad = lambda x: torch.nn.functional.pad(x, (0, 3, 0, 2), mode="replicate")  # noqa: E731
    with torch.inference_mode():
        pha, fgr = model_for(data)(pad(to_input(frame)), pad(to_input(background)))[:2]
    np.testing.assert_array_equal(pha_png[0], u8(pha[:, :, :h, :w])[:, :, 0])
    np.testing.assert_array_equal(fgr_png[0], u8(fgr[:, :, :h, :w]))
    # And as a video: an odd size is written in 4:4:4.
    code, _, stderr = run(["matte", str(src), str(bgr_path), "-o", str(tmp_path / "vid"), "--checkpoint",
                           data["ckpt"], "--outputs", "pha", "--output-format", "video", "--no-progress",
                           *MODEL_ARGS], capsys)
    assert code == 0, stderr
    assert decode(str(tmp_path / "vid" / "pha.mp4"))[0].shape == (h, w, 3)


def test_background_video_in_step_holds_its_last_frame(data, tmp_path):
    # A background video of 2 frames for a 4-frame source: frames 2, 3 use its last.
    short = tmp_path / "short_bgr"
    short.mkdir()
    backgrounds = [np.asarray(Image.open(data["bgr"]).convert("RGB")), data["frames"][0]]
    for i, b in enumerate(backgrounds):
        Image.fromarray(b).save(short / f"{i}.png")
    model = model_for(data)
    result = pm.convert_video(model, data["folder"], str(short), str(tmp_path / "out"), outputs=["pha"],
                              max_frames=4, batch_size=3, progress=False)
    assert result["frames"] == 4 and result["written"] == {"pha": 4}
    got = read_pngs(tmp_path / "out" / "pha")
    for i in range(4):
        with torch.inference_mode():
            pha = model(to_input(data["frames"][i]), to_input(backgrounds[min(i, 1)]))[0]
        np.testing.assert_array_equal(got[i], u8(pha)[:, :, 0])


def test_convert_video_api_summary_and_mattingbase(data, tmp_path):
    model, _ = build_model("mattingbase", checkpoint=data["base_ckpt"])
    result = pm.convert_video(model, data["src"], data["bgr"], str(tmp_path / "out"), outputs=("pha", "err"),
                              progress=False)
    assert result["frames"] == FRAMES and result["output_format"] == "video"
    assert result["model_seconds"] > 0 and result["seconds"] >= result["model_seconds"] * 0.5
    assert set(result["outputs"]) == {"pha", "err"}
    assert len(decode(result["outputs"]["err"])) == FRAMES


def test_importing_the_package_needs_no_cli_dependencies():
    code = ("import sys, pymatting_ext; assert 'av' not in sys.modules and 'PIL' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('av', 'PIL')); print(pymatting_ext.convert_video.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "convert_video", out.stderr


def test_random_weights_are_announced(data, tmp_path, capsys):
    code, _, stderr = run(["matte", data["folder"], data["bgr"], "-o", str(tmp_path / "o"), "--outputs", "pha",
                           "--max-frames", "1", "--no-progress", *MODEL_ARGS], capsys)
    assert code == 0, stderr
    assert "random weights" in stderr and "timing and pipeline only" in stderr


# -- bad input: one line, no traceback -------------------------------------------------

def _bad_cases(data, tmp):
    garbage = tmp / "garbage.mp4"
    garbage.write_bytes(b"not a video " * 100)
    bad_ckpt = tmp / "bad.pth"
    bad_ckpt.write_bytes(b"not a checkpoint")
    state = torch.load(data["ckpt"])
    state["refiner.conv2.weight"] = torch.zeros(5, 24, 3, 3)
    shape_ckpt = tmp / "shape.pth"
    torch.save(state, shape_ckpt)
    small = tmp / "small.png"
    Image.new("RGB", (W // 2, H // 2)).save(small)
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    exists = tmp / "exists"
    exists.mkdir(exist_ok=True)
    (exists / "pha.mp4").write_bytes(b"")
    src, bgr, ck = data["src"], data["bgr"], data["ckpt"]
    out = str(tmp / "out")
    cases = {
        "missing source": (["matte", str(tmp / "nope.mp4"), bgr, "-o", out], "source", "does not exist"),
        "unreadable source": (["matte", str(garbage), bgr, "-o", out], "cannot read source", "garbage.mp4"),
        "missing background": (["matte", src, str(tmp / "nope.png"), "-o", out], "background", "does not exist"),
        "empty folder": (["matte", str(empty), bgr, "-o", out], "holds no images", "empty"),
        "missing checkpoint": (["matte", src, bgr, "-o", out, "--checkpoint", str(tmp / "no.pth")],
                               "checkpoint", "does not exist"),
        "unreadable checkpoint": (["matte", src, bgr, "-o", out, "--checkpoint", str(bad_ckpt)],
                                  "cannot read checkpoint", "not a PyTorch checkpoint"),
        "wrong backbone": (["matte", src, bgr, "-o", out, "--checkpoint", ck, "--backbone", "resnet50"],
                           "backbone.features.0.0.weight", "use --backbone mobilenetv2"),
        "wrong shape": (["matte", src, bgr, "-o", out, "--checkpoint", str(shape_ckpt)],
                        "refiner.conv2.weight [5, 24, 3, 3]", "expected [16, 24, 3, 3]"),
        "base checkpoint for refine": (["matte", src, bgr, "-o", out, "--checkpoint", data["base_ckpt"]],
                                       "refiner.conv1.weight", "--model-type mattingbase"),
        "sizes differ": (["matte", src, str(small), "-o", out, "--checkpoint", ck],
                         f"source is {W}x{H}", f"is {W // 2}x{H // 2}"),
        "unknown codec": (["matte", src, bgr, "-o", out, "--checkpoint", ck, "--codec", "nosuchcodec"],
                          "unknown video codec 'nosuchcodec'", "libx264"),
        "output exists": (["matte", src, bgr, "-o", str(exists), "--checkpoint", ck, "--outputs", "pha"],
                          "exists", "--overwrite"),
        "ref from MattingBase": (["matte", src, bgr, "-o", out, "--checkpoint", data["base_ckpt"],
                                  "--model-type", "mattingbase", "--outputs", "ref"], "'ref'", "MattingRefine"),
        "bad choice": (["matte", src, bgr, "-o", out, "--backbone", "vgg"], "invalid choice", "--help"),
    }
    if not torch.cuda.is_available():
        cases["no GPU"] = (["matte", src, bgr, "-o", out, "--device", "cuda"], "--device cuda", "no GPU")
        cases["no GPU (speed)"] = (["speed", "--device", "cuda"], "--device cuda", "no GPU")
    return cases


BAD = ["missing source", "unreadable source", "missing background", "empty folder", "missing checkpoint",
       "unreadable checkpoint", "wrong backbone", "wrong shape", "base checkpoint for refine", "sizes differ",
       "unknown codec", "output exists", "ref from MattingBase", "bad choice", "no GPU", "no GPU (speed)"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_line(case, data, tmp_path, capsys):
    cases = _bad_cases(data, tmp_path)
    if case not in cases:
        pytest.skip("a GPU is present")
    argv, *expected = cases[case]
    with pytest.raises(SystemExit) if case == "bad choice" else _nothing() as exit_info:
        code, _, stderr = run(argv, capsys)
    if case == "bad choice":
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 2
    lines = [line for line in stderr.splitlines() if not line.startswith("pymatting-ext: no --checkpoint")]
    assert len(lines) == 1, stderr
    assert "error:" in lines[0] and "Traceback" not in stderr
    for text in expected:
        assert text in lines[0], lines[0]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_bad_input_from_the_real_command_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pymatting_ext", "matte", str(tmp_path / "missing.mp4"),
                          str(tmp_path / "bgr.png"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"pymatting-ext matte: error: source '{tmp_path / 'missing.mp4'}' does not exist"]


# -- interruption ------------------------------------------------------------------

def _interrupt_after(model, calls):
    forward = model.forward
    count = [0]

    def wrapped(*args):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return forward(*args)

    model.forward = wrapped
    return model


@pytest.mark.parametrize("fmt", ["video", "png"])
def test_interrupted_run_leaves_complete_files(fmt, data, tmp_path):
    model = _interrupt_after(model_for(data), 3)
    out = tmp_path / "out"
    with pytest.raises(ConversionInterrupted) as info:
        pm.convert_video(model, data["src"], data["bgr"], str(out), outputs=("com", "pha"), output_format=fmt,
                         progress=False)
    assert info.value.result["frames"] == 3
    for name in ("com", "pha"):
        if fmt == "video":
            assert len(decode(str(out / f"{name}.mp4"))) == 3
        else:
            assert sorted(os.listdir(out / name)) == ["00000.png", "00001.png", "00002.png"]
            assert len(read_pngs(out / name)) == 3


def test_ctrl_c_in_the_command_closes_the_outputs(data, tmp_path):
    """A real SIGINT while the command runs: exit status 130, and the video
    it was writing opens with the frames done."""
    import re

    total = 400  # enough that it is still running when the signal comes
    frames = tmp_path / "many"
    frames.mkdir()
    for i in range(total):
        Image.fromarray(data["frames"][i % FRAMES]).save(frames / f"{i:03d}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pymatting_ext", "matte", str(frames), data["bgr"], "-o", str(out),
                             "--checkpoint", data["ckpt"], "--outputs", "pha", "--output-format", "video",
                             *MODEL_ARGS], stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    seen = ""
    deadline = time.time() + 240
    while time.time() < deadline:
        chunk = proc.stderr.read(1)
        if not chunk:
            break
        seen += chunk
        # The progress bar says how many frames are done (it redraws at most
        # every 0.1 s, so not every count shows).
        if any(int(n) >= 3 for n in re.findall(rf"(\d+)/{total}", seen[-200:])):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, seen + rest
    assert "interrupted:" in rest and "Traceback" not in rest
    n = len(decode(str(out / "pha.mp4")))
    assert 3 <= n < total


# -- speed -------------------------------------------------------------------------

def test_speed_table_json_and_plot(data, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib: pip install 'pymatting_ext[cli]'")
    js, png = tmp_path / "speed.json", tmp_path / "speed.png"
    code, stdout, stderr = run(["speed", *MODEL_ARGS, "--resolution", str(W), str(H), "--resolution", "128", "96",
                                "--iterations", "2", "--warmup", "0", "--json", str(js), "--plot", str(png)], capsys)
    assert code == 0, stderr
    report = json.loads(js.read_text())
    rows = report["rows"]
    backends = {r["backend"] for r in rows}
    assert "cpu" in backends
    try:
        import BackgroundMattingV2  # noqa: F401
        assert "upstream" in backends
    except ImportError:
        pass
    assert {r["resolution"] for r in rows} == {f"{W}x{H}", "128x96"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["fps"] > 0 and r["iterations"] == 2 and r["mode"] == "eager"
        assert r["backend"] + " " in stdout or r["backend"] in stdout
    assert "ms/frame" in stdout and "frames/s" in stdout
    with Image.open(png) as im:
        assert im.size[0] >= 600 and im.size[1] >= 400


# -- export (TorchScript here; ONNX and AOTInductor in test_export.py) -----------------------

def test_export_torchscript(data, tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.pt"
    code, stdout, stderr = run(["export", "--format", "torchscript", "-o", str(path), "--checkpoint", data["ckpt"],
                                "--resolution", "96", "64", *MODEL_ARGS], capsys)
    assert code == 0, stderr
    # The scripted model runs the coarse network's modules, the eager one
    # its CPU plan (pymatting_ext._coarse): float32 rounding apart.
    diff = re.search(r"max \|difference\| from the eager model ([0-9.e+-]+)", stdout)
    assert diff and float(diff.group(1)) < 1e-5, stdout
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path))
    src, bgr = torch.rand(1, 3, H, W), torch.rand(1, 3, H, W)
    monkeypatch.setenv("PYMATTING_EXT_COARSE_PLAN", "0")  # the modules in both: bit for bit
    with torch.inference_mode():
        for a, b in zip(model_for(data, refine_threshold=0.1)(src, bgr), loaded(src, bgr)):
            assert torch.equal(a, b)


def test_console_script_is_installed():
    import shutil
    exe = shutil.which("pymatting-ext")
    if exe is None:
        pytest.skip("the pymatting-ext script is not on PATH (an editable install made before it existed)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("pymatting-ext "), out.stderr
