"""The whole model beyond eager fp32: torch.compile(fullgraph=True),
torch.jit.script, torch.autocast and .half()/.bfloat16(), for Refiner and
MattingRefine, against eager fp32 runs of the same model (and upstream's
scripted model)."""
import os
import subprocess
import warnings

import pytest
import torch

import pymatting_ext as pm

from conftest import DEVICES, heavy_on_gpu, needs_cuda
from helpers import TESTS_DIR, random_bn_, refiner_inputs

upstream_model = pytest.importorskip("BackgroundMattingV2.model")

MODES = ["sampling", "thresholding", "full"]
OUTPUTS = ("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm")


def matting_pair(mode, device="cpu"):
    """Upstream's MattingRefine and ours with the same random weights."""
    up = random_bn_(upstream_model.MattingRefine("mobilenetv2", 0.25, mode, 16 * 150, 0.3)).to(device).eval()
    ours = pm.MattingRefine("mobilenetv2", 0.25, mode, 16 * 150, 0.3).to(device).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def images(device="cpu", B=2, H=96, W=128):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(B, 3, H, W, generator=g).to(device), torch.rand(B, 3, H, W, generator=g).to(device))


def script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream of us
        return torch.jit.script(module)


def assert_same(a, b, atol, names=OUTPUTS):
    assert len(a) == len(b)
    for name, u, v in zip(names, a, b):
        assert u.shape == v.shape and u.dtype == v.dtype, name
        torch.testing.assert_close(v, u, atol=atol, rtol=0, msg=name)


# -- TorchScript ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_scripted_refiner_matches_eager(device, mode):
    refiner = random_bn_(pm.Refiner(mode, 16 * 40, 0.4)).to(device).eval()
    scripted = script(refiner)
    x = refiner_inputs(2, 64, 96, 16, 24, device)
    with torch.no_grad():
        assert_same(refiner(*x), scripted(*x), 0, ("pha", "fgr", "ref"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_scripted_matting_refine_matches_eager_and_upstream(device, mode, tmp_path, monkeypatch):
    # TorchScript runs the coarse network's modules: so does eager Python
    # here (bit for bit), instead of its CPU plan (test_coarse_plan.py).
    monkeypatch.setenv("PYMATTING_EXT_COARSE_PLAN", "0")
    up, ours = matting_pair(mode, device)
    scripted = script(ours)
    # Saved and loaded, as C++ users do.
    scripted.save(str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"), map_location=device)
    src, bgr = images(device)
    with torch.no_grad():
        eager, want = ours(src, bgr), up(src, bgr)
        assert_same(eager, scripted(src, bgr), 0)
        assert_same(eager, loaded(src, bgr), 0)
        assert_same(want, loaded(src, bgr), 1e-5)
    assert loaded.refiner.mode == mode


# -- torch.compile -------------------------------------------------------------

@pytest.mark.parametrize("device", heavy_on_gpu(DEVICES))
@pytest.mark.parametrize("mode", MODES)
def test_matting_refine_compiles_fullgraph(device, mode):
    torch._dynamo.reset()
    up, ours = matting_pair(mode, device)
    src, bgr = images(device)
    # Thresholding: see refiner/test_refiner_capture.py's note on inductor's layout optimisation.
    with torch.no_grad(), torch._inductor.config.patch(layout_optimization=mode != "thresholding"):
        compiled = torch.compile(ours, fullgraph=True)(src, bgr)
        want = up(src, bgr)
    assert_same(want, compiled, 1e-5)


# -- mixed precision -----------------------------------------------------------

#: The documented tolerance of reduced precision against the fp32 model: a
#: mean absolute difference of at most 3e-3 on every output, and at most 2% of
#: the refined cells chosen differently (near-ties in the error map reorder).
MEAN_ATOL = 3e-3
REF_CHANGE = 0.02


def assert_within_documented_tolerance(fp32, low):
    for name, u, v in zip(OUTPUTS, fp32, low):
        assert u.shape == v.shape, name
        assert bool(torch.isfinite(v).all()), name
        if name == "ref_sm":
            assert float((u != v.float()).float().mean()) <= REF_CHANGE, name
        else:
            diff = float((u - v.float()).abs().mean())
            assert diff <= MEAN_ATOL, f"{name}: mean abs diff {diff:.3g}"


def fp32_and_low(mode, device, run_low):
    """Outputs of our fp32 model and of run_low(model, src, bgr) on it."""
    _, ours = matting_pair(mode, device)
    src, bgr = images(device)
    with torch.no_grad():
        return ours(src, bgr), run_low(ours, src, bgr)


def low_precision_cases():
    yield pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16")
    yield pytest.param("cuda", torch.float16, marks=needs_cuda, id="cuda-float16")
    yield pytest.param("cuda", torch.bfloat16, marks=needs_cuda, id="cuda-bfloat16")


@pytest.mark.parametrize("device,dtype", low_precision_cases())
@pytest.mark.parametrize("mode", MODES)
def test_autocast_within_tolerance(device, dtype, mode):
    def under_autocast(model, src, bgr):
        with torch.autocast(device, dtype=dtype):
            return model(src, bgr)

    fp32, low = fp32_and_low(mode, device, under_autocast)
    # The coarse network runs in the low precision; the refiner takes the
    # widest dtype of its inputs (src's), so pha and fgr come out fp32.
    assert low[0].dtype == low[1].dtype == torch.float32
    assert low[2].dtype == dtype
    assert_within_documented_tolerance(fp32, low)


@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float16, id="cpu-float16")]
                         + list(low_precision_cases()))
@pytest.mark.parametrize("mode", MODES)
def test_reduced_precision_model_within_tolerance(device, dtype, mode):
    fp32, low = fp32_and_low(mode, device, lambda model, src, bgr: model.to(dtype)(src.to(dtype), bgr.to(dtype)))
    assert all(t.dtype == dtype for t in low[:5])  # ref_sm is float32 in thresholding mode, as upstream's
    assert_within_documented_tolerance(fp32, low)


# -- a scripted model in C++ ---------------------------------------------------

def _compiler():
    import shutil
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(_compiler() is None, reason="needs a C++ compiler")
def test_scripted_matting_refine_runs_in_cpp_without_python(tmp_path, monkeypatch):
    """As upstream's C++ users do: torch::jit::load of the saved model in a
    C++ program (libtorch only, no Python), with pymatting_ext's op library
    loaded; the outputs equal Python's bit for bit (Python running the
    coarse network's modules too, as TorchScript does)."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("PYMATTING_EXT_COARSE_PLAN", "0")

    _, ours = matting_pair("sampling")
    src, bgr = images()
    with torch.no_grad():
        outputs = ours(src, bgr)
    script(ours).save(str(tmp_path / "model.pt"))

    class Case(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("src", src)
            self.register_buffer("bgr", bgr)
            for i, t in enumerate(outputs):
                self.register_buffer(f"out{i}", t)

    script(Case()).save(str(tmp_path / "case.pt"))

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    exe = str(tmp_path / "run_scripted")
    cmd = [_compiler(), "-std=c++20", "-O0", os.path.join(TESTS_DIR, "cpp", "run_scripted.cpp"), "-o", exe,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f"-I{d}" for d in ext.include_paths()]
    cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]

    lib = pm.library_path()
    run = subprocess.run([exe, lib, str(tmp_path / "model.pt"), str(tmp_path / "case.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count(" equal") == 6, run.stdout
