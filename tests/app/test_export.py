"""pymatting-ext export: ONNX (the refiner in standard operators, run in
onnxruntime) and the torch.export/AOTInductor package with pymatting_ext's
custom ops, run from a C++ program without Python. (TorchScript: test_cli.py
and models/test_compile_script.py.)

Random weights (saved with torch.save), small inputs; each export is one
compile, shared by the checks that follow it."""
import os
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("torchvision", reason="the models need torchvision")

import pymatting_ext as pm  # noqa: E402
from pymatting_ext.app import export  # noqa: E402

from helpers import TESTS_DIR, random_bn_  # noqa: E402

NAMES = ["pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm"]


def model(mode):
    torch.manual_seed(0)
    return random_bn_(pm.MattingRefine("mobilenetv2", 0.25, mode, 16 * 100, 0.1)).eval()


def inputs(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g), torch.rand(B, 3, H, W, generator=g)


# -- ONNX ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnxruntime():
    pytest.importorskip("onnx", reason="needs onnx: pip install 'pymatting_ext[export]'")
    pytest.importorskip("onnxscript", reason="needs onnxscript: pip install 'pymatting_ext[export]'")
    return pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'pymatting_ext[export]'")


def run_onnx(ort, path, src, bgr):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"src": src.numpy(), "bgr": bgr.numpy()})


def assert_matches(names, want, got, atol=1e-5):
    for name, w, g in zip(names, want, got):
        g = torch.as_tensor(g)
        assert tuple(g.shape) == tuple(w.shape), name
        torch.testing.assert_close(g.to(w.dtype), w, atol=atol, rtol=0, msg=name)


def test_onnx_sampling_with_dynamic_axes_matches_pytorch(onnxruntime, tmp_path):
    """Exported once at batch 2 x 192 x 256 with dynamic batch, height and
    width; run at other sizes too."""
    m = model("sampling")
    path = tmp_path / "sampling.onnx"
    result = export.export_onnx(m, str(path), example=inputs(2, 192, 256), dynamic=True)
    assert result["dynamic"] and len(result["max_abs_diff"]) == 2  # checked at two sizes
    import onnx
    proto = onnx.load(str(path))
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}, "only standard operators"
    assert not {n.domain for n in proto.graph.node} - {"", "ai.onnx"}
    for B, H, W in ((1, 136, 168), (3, 200, 260)):
        src, bgr = inputs(B, H, W, seed=B)
        with torch.inference_mode():
            want = m(src, bgr)  # our default backend ('cpu'), not the reference the export ran
        got = run_onnx(onnxruntime, path, src, bgr)
        assert_matches(NAMES, want, got)
        assert 0 < float(torch.as_tensor(got[5]).mean()) < 1  # some cells refined, not all


def test_onnx_thresholding_matches_pytorch(onnxruntime, tmp_path):
    """Thresholding: a data-dependent number of refined patches in the graph,
    none at all included (every cell's error under the threshold)."""
    m = model("thresholding")
    m.refiner.threshold = 0.01  # these random weights predict err below 0.07
    path = tmp_path / "thresholding.onnx"
    result = export.export_onnx(m, str(path), example=inputs(2, 96, 128), dynamic=True)
    assert len(result["max_abs_diff"]) == 2
    for B, H, W in ((1, 136, 168), (3, 100, 124)):
        src, bgr = inputs(B, H, W, seed=B)
        with torch.inference_mode():
            want = m(src, bgr)
        got = run_onnx(onnxruntime, path, src, bgr)
        assert_matches(NAMES, want, got)
        assert 0 < float(torch.as_tensor(got[5]).mean()) < 1  # some cells refined, not all


def test_onnx_thresholding_with_no_cell_refined(onnxruntime, tmp_path):
    # err is clamped to [0, 1]: a threshold of 1 refines nothing, so the
    # graph's patch tensors are empty.
    m = model("thresholding")
    m.refiner.threshold = 1.0
    path = tmp_path / "none.onnx"
    example = inputs(2, 96, 128)
    export.export_onnx(m, str(path), example=example, dynamic=True)
    with torch.inference_mode():
        want = m(*example)
    got = run_onnx(onnxruntime, path, *example)
    assert_matches(NAMES, want, got)
    assert float(torch.as_tensor(got[5]).sum()) == 0


def test_onnx_full_mode_matches_pytorch(onnxruntime, tmp_path):
    m = model("full")
    path = tmp_path / "full.onnx"
    example = inputs(1, 96, 128)
    export.export_onnx(m, str(path), example=example, dynamic=False)
    with torch.inference_mode():
        want = m(*example)
    assert_matches(NAMES, want, run_onnx(onnxruntime, path, *example))


# -- torch.export + AOTInductor, run from C++ ------------------------------------------------

def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _start_cpp_build(exe):
    """Compiles tests/cpp/run_aoti.cpp in the background (it takes about as
    long as the AOTInductor compile it runs beside)."""
    import torch.utils.cpp_extension as ext

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cmd = [_compiler(), "-std=c++20", "-O0", os.path.join(TESTS_DIR, "cpp", "run_aoti.cpp"), "-o", exe,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += [f"-I{d}" for d in ext.include_paths()]
    cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.skipif(_compiler() is None, reason="needs a C++ compiler")
def test_aoti_package_with_custom_ops_runs_in_cpp_without_python(tmp_path):
    """The exported program calls pymatting_ext's ops; the package is
    compiled by AOTInductor and run by a C++ program (libtorch only) that
    loads the extension's library first, as tests/cpp/run_scripted.cpp does
    for TorchScript. Exported with dynamic batch, height and width, and run
    from C++ at two sizes."""
    if not pm.extension_available():
        pytest.skip("the compiled extension is not loaded")
    m = model("sampling")
    example = inputs(2, 96, 128)  # at least min_dynamic_side (68) for dynamic sizes
    program = export.export_program(m, example)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(name.startswith("pymatting_ext.") for name in ops), sorted(ops)

    exe = str(tmp_path / "run_aoti")
    build = _start_cpp_build(exe)
    try:
        package = str(tmp_path / "model.pt2")
        # A cheaper wrapper compile where torch has the setting: the kernels are
        # what run.
        configs = {}
        if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level"):
            configs["aot_inductor.compile_wrapper_opt_level"] = "O0"
        result = export.export_aoti(m, package, example=example, dynamic=True, inductor_configs=configs)
        assert len(result["max_abs_diff"]) == 2  # checked in Python at two sizes
        assert max(max(d.values()) for d in result["max_abs_diff"].values()) <= 1e-5
        cases = []
        for i, (src, bgr) in enumerate([example, inputs(1, 104, 136, seed=1)]):
            with torch.inference_mode():
                outputs = m(src, bgr)
            cases.append(str(tmp_path / f"case{i}.pt"))
            torch.save({"src": src, "bgr": bgr, **{f"out{j}": t for j, t in enumerate(outputs)}}, cases[-1])
        log = build.communicate(timeout=900)[0]
        assert build.returncode == 0, log[-4000:]
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    run = subprocess.run([exe, pm.library_path(), package, *cases], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count(" close") == 12, run.stdout
    assert "[2, 3, 96, 128]" in run.stdout and "[1, 3, 104, 136]" in run.stdout, run.stdout
